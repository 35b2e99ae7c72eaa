"""``sdfast generate``: one prompt (or several) to a PNG, with optional step frames and animation."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InvalidArgument

DESCRIPTION = """Generate an image from a prompt.

The prompt is the words after `generate`: quote it ("a red circle") or not (a red circle): the
words are joined with single spaces, as the shell split them. For a batch of different prompts,
give each with -p/--prompt instead; several prompts or --num-images N write OUT-0.png, OUT-1.png, ...

The PNG's text chunks record prompt, negative prompt, seed, steps, guidance, scheduler, size,
model, backend and dtype, so `sdfast generate` can reproduce it. Every output path is checked
before any work, and the outputs of a run (images, --save-steps frames, --animation) are
written together at the end: a run that fails leaves none of them.
"""


def register(sub: argparse._SubParsersAction) -> None:
    from ..request import DEFAULTS as D
    from ..request import IMG2IMG_STRENGTH, LONG_PROMPT
    from ..rules import MAX_GUIDANCE
    from ..schedulers import SCHEDULERS

    p = sub.add_parser("generate", help="generate an image from a prompt", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="*", metavar="PROMPT",
                   help="the prompt; unquoted words are joined into one prompt")
    p.add_argument("-p", "--prompt", dest="prompts", action="append", default=None, metavar="PROMPT",
                   help="one prompt of a batch; repeat for several (instead of the positional PROMPT)")
    add_model_arguments(p, backend_from_engines=True)
    p.add_argument("--variant", default=None, metavar="NAME",
                   help="weight files variant to load, e.g. fp16 for *.fp16.safetensors (default: plain weights, "
                        "or the only variant a folder holds)")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (default: empty)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's native size)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's native size)")
    p.add_argument("--steps", type=int, default=D["steps"], help=f"denoising steps (default {D['steps']})")
    p.add_argument("--guidance-scale", type=float, default=D["guidance_scale"],
                   help=f"classifier-free guidance g in u + g(t - u), 0..{MAX_GUIDANCE:g}; <= 1 turns guidance off "
                        f"(default {D['guidance_scale']:g}). Past ~20 images oversaturate; past the bound the latents leave their "
                        "range by orders of magnitude and the result is noise or an fp16 overflow")
    p.add_argument("-s", "--seed", type=int, default=D["seed"], help=f"seed of the initial noise (default {D['seed']})")
    p.add_argument("--scheduler", default=D["scheduler"], choices=list(SCHEDULERS),
                   help="sampling algorithm (default: the one the model folder's scheduler_config.json names, "
                        "lms where sdfast has no equal of its class)")
    p.add_argument("--init-image", default=None, metavar="PNG", help="img2img: start from this image (PNG, JPEG, ...; 16-bit scaled to 8, "
                        "transparency composited on white)")
    p.add_argument("--mask", default=None, metavar="PNG",
                   help="inpaint: repaint the white part of --init-image (any mode or size: made grey, resized, "
                        "binarized at 50 %%; transparent pixels count as white); black is kept")
    p.add_argument("--paste-unmasked", action="store_true",
                   help="inpaint: copy the init image's kept pixels over the result (the VAE alone keeps them only "
                        "approximately)")
    p.add_argument("--strength", type=float, default=D["strength"],
                   help=f"img2img / inpaint: how much of the schedule re-runs from the noised init image, in (0, 1] "
                        f"(default {IMG2IMG_STRENGTH:g}; 1 with --mask, diffusers' inpainting default)")
    p.add_argument("-n", "--num-images", type=int, default=D["num_images_per_prompt"], metavar="N",
                   help="images per prompt, each from its own noise (default 1); written as OUT-0.png, ...")
    p.add_argument("--long-prompt", default=D["long_prompt"], choices=list(LONG_PROMPT),
                   help="prompts longer than the text encoder takes (77 tokens in SD): encode them in chunks "
                        "(default) or cut them (diffusers' behaviour)")
    approx = p.add_argument_group("approximations (off by default; each is recorded in the PNG metadata)")
    approx.add_argument("--guidance-until", type=float, default=D["guidance_until"], metavar="F",
                        help="classifier-free guidance for the first fraction F in [0, 1] of the steps only, then "
                             "one U-Net row per image (default: every step; 1 is the exact run)")
    approx.add_argument("--cache-interval", type=int, default=D["cache_interval"], metavar="N",
                        help="DeepCache (torch; onnx / openvino exports made with --cache-branch): the full U-Net every "
                             "N steps, a shallow pass reusing its "
                             "deep features between (default: off; 1 = every step full)")
    approx.add_argument("--cache-branch", type=int, default=D["cache_branch"], metavar="B",
                        help="DeepCache's skip branch: 0 the shallowest and fastest (default), deeper ones rerun "
                             "more of the U-Net on the shallow steps; needs --cache-interval 2 or more")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:SCALE]",
                   help="fuse a LoRA (.safetensors: diffusers, PEFT or kohya keys) into the U-Net and text "
                        "encoder(s) at SCALE (default 1, from -10 to 10); repeat for several; recorded with its "
                        "sha256 in the PNG metadata; with --engines: any set on inductor engines and on engines "
                        "exported with LoRA slots, else the set the engines were exported with (sdfast export --lora)")
    p.add_argument("--save-steps", default=None, metavar="DIR", help="write one decoded frame per step into DIR")
    p.add_argument("--animation", default=None, metavar="OUT.gif|OUT.mp4", help="write the denoising as an animation")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers", "math"],
                   help="torch backend attention: PyTorch SDPA (default), xformers, or the plain math path")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the guided step as a CUDA graph (default: on for CUDA devices)")
    sdxl = p.add_argument_group("SDXL models (diffusers' names; refused on SD 1.x/2.x)")
    sdxl.add_argument("--prompt-2", default=None, help="prompt of the second text encoder (default: the prompt)")
    sdxl.add_argument("--negative-prompt-2", default=None,
                      help="negative prompt of the second text encoder (default: the negative prompt)")
    for flag, what in (("--original-size", "H W the image is conditioned as having had (default: the size)"),
                       ("--crops-coords-top-left", "TOP LEFT crop the image is conditioned on (default 0 0)"),
                       ("--target-size", "H W the image is conditioned to have (default: the size)")):
        sdxl.add_argument(flag, type=int, nargs=2, default=None, metavar=("A", "B"), help=what)
    p.add_argument("-o", "--out", default="out.png", help="output PNG (default out.png)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out file that sdfast did not write (an sdfast PNG is replaced anyway)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def add_model_arguments(p: argparse.ArgumentParser, backend_from_engines: bool = False) -> None:
    """--model, --backend, --engines, --device, --dtype. ``backend_from_engines``: without
    --backend, --engines DIR runs on the backend its manifest names (``runtime.load``)."""
    from ..backends import BACKENDS
    from ..model.info import builtin_models

    names = ", ".join(builtin_models())
    p.add_argument("--model", default="tiny", help=f"diffusers model folder, hub id, or built-in ({names}); default tiny")
    p.add_argument("--backend", default=None if backend_from_engines else "torch", choices=list(BACKENDS),
                   help="engine backend (default: the one --engines DIR was exported for, else torch)"
                   if backend_from_engines else "engine backend (default torch)")
    p.add_argument("--engines", default=None, metavar="DIR", help="artifact folder from `sdfast export` (non-torch backends)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="compute precision. auto (default): fp16 on CUDA, bf16 on CPUs with bf16 units "
                        "(AMX/AVX512-BF16, ~3x faster than fp32 there), else fp32; fp32 is the parity reference")


def prompts_from_args(args: argparse.Namespace) -> list[str]:
    """One prompt from the positional words (joined: the shell split an unquoted prompt), or
    one per -p/--prompt; both at once is refused, since which one is meant is unclear."""
    if args.prompt and args.prompts:
        raise InvalidArgument(f"prompt: both a positional prompt ({' '.join(args.prompt)!r}) and -p/--prompt were "
                              f"given; pass the prompt once, or every prompt of the batch with -p")
    if args.prompts:
        return list(args.prompts)
    if not args.prompt:
        raise InvalidArgument('prompt: none given; pass one, e.g. sdfast generate "a red circle on a blue background"')
    return [" ".join(args.prompt)]


def _out_paths(out: str, n: int) -> list[Path]:
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise InvalidArgument(f"out: {out!r} must end in .png")
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{k}{path.suffix}") for k in range(n)]


def written_by_sdfast(path: Path) -> bool:
    """True when ``path`` is a PNG whose metadata sdfast wrote (its ``sdfast`` text chunk)."""
    import json

    from PIL import Image

    try:
        with Image.open(path) as im:
            meta = json.loads(getattr(im, "text", {}).get("sdfast", "null"))
    except (OSError, ValueError, SyntaxError):  # not an image, or not one PIL reads
        return False
    return isinstance(meta, dict) and "sdfast_version" in meta


def check_outputs(args: argparse.Namespace, n: int) -> list[Path]:
    """Every output of the run, checked before any work (writable, not a folder, names that fit)."""
    from ..artifacts import check_output_dir, check_output_path
    from ..media import check_animation_path

    outs = _out_paths(args.out, n)
    for path in outs:
        check_output_path(path, "out")
        if not getattr(args, "force", False) and path.exists() and not written_by_sdfast(path):
            raise InvalidArgument(f"out: {str(path)!r} exists and sdfast did not write it; pass --force to replace "
                                  "it, or choose another --out")
    if args.animation:
        check_animation_path(args.animation)
        check_output_path(args.animation, "animation")
    if args.save_steps:
        check_output_dir(args.save_steps, "save-steps")
        check_output_path(Path(args.save_steps) / "step-0000.png", "save-steps")
    targets = [p.absolute() for p in outs] + ([Path(args.animation).absolute()] if args.animation else [])
    if len(set(targets)) != len(targets):
        raise InvalidArgument("out: --out and --animation name the same file; give each its own path")
    return outs


def lite_run(args: argparse.Namespace, req, loras) -> bool:
    """Whether this run may load sdfast's own modules (sdfast/model/lite.py): eager torch on the CPU,
    text to image, SDPA, no LoRA, no DeepCache (their code paths need the libraries' modules;
    CUDA is not verified on them)."""
    return (args.backend in (None, "torch") and args.engines is None and args.device == "cpu" and not loras
            and args.attention == "sdpa" and req.image is None and getattr(req, "mask", None) is None
            and (req.cache_interval is None or req.cache_interval <= 1))


def _toy_caption_hint(info, prompts: list[str]) -> None:
    """On the built-in toy models, one stderr line when a prompt names no shape or colour they
    know (they still draw something: a hint, not an error)."""
    from ..model.info import model_arg
    from ..toy import TOY_MODELS, caption_hint

    if model_arg(info) not in TOY_MODELS:
        return
    for prompt in prompts:
        hint = caption_hint(prompt)
        if hint is not None:
            print(hint, file=sys.stderr)
            return


def run(args: argparse.Namespace) -> int:
    from ..artifacts import output_group
    from ..lora import as_loras, parse_lora_arg
    from ..media import write_animation, write_png
    from ..model.info import resolve_model
    from ..request import Request
    from ..runtime import load

    prompts = prompts_from_args(args)
    outs = check_outputs(args, len(prompts) * max(1, args.num_images))  # a bad N is refused by Request.build
    info = resolve_model(args.model, variant=args.variant)
    _toy_caption_hint(info, prompts)
    # Every rule is checked here, before loading weights and before the run writes anything.
    req = Request.build(info, prompt=prompts if len(prompts) > 1 else prompts[0],
                        negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                        steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
                        scheduler=args.scheduler, image=args.init_image, strength=args.strength,
                        num_images_per_prompt=args.num_images, long_prompt=args.long_prompt,
                        prompt_2=args.prompt_2, negative_prompt_2=args.negative_prompt_2,
                        original_size=args.original_size, target_size=args.target_size,
                        crops_coords_top_left=args.crops_coords_top_left or (0, 0),
                        guidance_until=args.guidance_until, cache_interval=args.cache_interval,
                        cache_branch=args.cache_branch, mask=args.mask, paste_unmasked=args.paste_unmasked)
    loras = as_loras([parse_lora_arg(text) for text in args.lora or []])  # read and checked before the model loads
    if loras and args.engines is not None:
        from ..artifacts import read_manifest

        m = read_manifest(args.engines, info)
        swaps = m.format == "inductor" or any("lora_slots" in c for c in m.components.values())
        if not swaps or m.model.get("loras"):
            # engines with their LoRAs fused at export: --lora names that set, and the manifest check holds
            # them to it (inductor packages and engines with LoRA slots, exported without a fused set, take
            # the set at load as torch does)
            info, loras = info.with_loras(loras), []
    if lite_run(args, req, loras):
        from ..model.lite import lite_info

        info = lite_info(info)  # the same bits without importing diffusers and transformers (sdfast/model/lite.py)
    # backend None: the one --engines DIR was exported for (load reads its manifest once)
    pipe = load(info, backend=args.backend, device=args.device, dtype=args.dtype, engines_dir=args.engines,
                attention=args.attention, cuda_graphs=args.cuda_graphs, loras=loras)

    frames: list = []
    want_frames = bool(args.save_steps or args.animation)

    def on_step(i, t, latents):
        # One decoded frame per step (first image of the batch), like the classic walk-through.
        frames.append(pipe.to_pil(pipe.decode(latents[:1]))[0])

    out = pipe.run(req, callback=on_step if want_frames else None, progress=not args.quiet)

    extra = {"init_image": str(args.init_image)} if req.image is not None else {}
    written = [str(p) for p in outs]
    # All outputs appear together at the end, or none (a failed write discards every one).
    with output_group() as group:
        if args.save_steps:
            folder = Path(args.save_steps)
            for k, im in enumerate(frames):
                im.save(group.path(folder / f"step-{k:04d}.png"), format="PNG")
            if frames:
                written.append(f"{len(frames)} frames in {folder}{'/' if not str(folder).endswith('/') else ''}")
        if args.animation:
            write_animation(frames + [out.images[0]], group.path(args.animation), Path(args.animation).suffix)
            written.append(str(args.animation))
        for k, (img, path) in enumerate(zip(out.images, outs, strict=True)):
            write_png(img, group.path(path), {**out.metadata(k), **extra})  # the same metadata as out.save()
    if not args.quiet:
        t = out.timings
        chosen = f"{pipe.precision.value}, chosen by --dtype auto" if args.dtype == "auto" else pipe.precision.value
        print(f"wrote {', '.join(written)} ({t['total']:.2f} s; U-Net {t.get('unet', 0):.2f} s over {out.steps} "
              f"steps; {pipe.backend}, {chosen})")
        for line in out.approximations:  # never silent
            print(f"approximation: {line}")
        for lora in out.loras:
            print(f"lora: {lora['name']} at scale {lora['scale']:g} ({lora['format']}, sha256 {lora['sha256'][:12]})")
    return 0
