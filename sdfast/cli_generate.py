"""``sdfast generate``: one prompt (or several) to a PNG, with optional step frames and animation."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import InvalidArgument

DESCRIPTION = """Generate an image from a prompt.

The prompt is the words after `generate`: quote it ("a red circle") or not (a red circle): the
words are joined with single spaces, as the shell split them. For a batch of different prompts,
give each with -p/--prompt instead; images are then written as OUT-0.png, OUT-1.png, ...

The PNG's text chunks record prompt, negative prompt, seed, steps, guidance, scheduler, size,
model, backend and dtype, so `sdfast generate` can reproduce it. Every output path is checked
before any work, and the outputs of a run (images, --save-steps frames, --animation) are
written together at the end: a run that fails leaves none of them.
"""


def register(sub: argparse._SubParsersAction) -> None:
    from .schedulers import SCHEDULERS

    p = sub.add_parser("generate", help="generate an image from a prompt", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="*", metavar="PROMPT",
                   help="the prompt; unquoted words are joined into one prompt")
    p.add_argument("-p", "--prompt", dest="prompts", action="append", default=None, metavar="PROMPT",
                   help="one prompt of a batch; repeat for several (instead of the positional PROMPT)")
    add_model_arguments(p)
    # Without --backend, --engines DIR runs on the backend its manifest names (torch without one).
    p.set_defaults(backend=None)
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (default: empty)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's native size)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's native size)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--guidance-scale", type=float, default=7.5,
                   help="classifier-free guidance g in u + g(t - u); <= 1 turns guidance off (default 7.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--scheduler", default="lms", choices=list(SCHEDULERS), help="sampling algorithm (default lms)")
    p.add_argument("--init-image", default=None, metavar="PNG", help="img2img: start from this image")
    p.add_argument("--strength", type=float, default=0.8,
                   help="img2img: how much of the init image to repaint, in (0, 1] (default 0.8)")
    p.add_argument("--save-steps", default=None, metavar="DIR", help="write one decoded frame per step into DIR")
    p.add_argument("--animation", default=None, metavar="OUT.gif|OUT.mp4", help="write the denoising as an animation")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers", "math"],
                   help="torch backend attention: PyTorch SDPA (default), xformers, or the plain math path")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the guided step as a CUDA graph (default: on for CUDA devices)")
    p.add_argument("--out", default="out.png", help="output PNG (default out.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    from .backends import BACKENDS
    from .models import builtin_models

    names = ", ".join(builtin_models())
    p.add_argument("--model", default="tiny", help=f"diffusers model folder, hub id, or built-in ({names}); default tiny")
    p.add_argument("--backend", default="torch", choices=list(BACKENDS), help="engine backend (default: the one --engines DIR was exported for, else torch)")
    p.add_argument("--engines", default=None, metavar="DIR", help="artifact folder from `sdfast export` (non-torch backends)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="compute precision. auto (default): fp16 on CUDA, bf16 on CPUs with bf16 units "
                        "(AMX/AVX512-BF16, ~3x faster than fp32 there), else fp32; fp32 is the parity reference")


def _out_paths(out: str, n: int) -> list[Path]:
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise InvalidArgument(f"out: {out!r} must end in .png")
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{k}{path.suffix}") for k in range(n)]


def run(args: argparse.Namespace) -> int:
    from . import __version__
    from .media import check_animation_path, save_animation, save_png
    from .models import resolve_model
    from .request import Request
    from .runtime import load

    outs = _out_paths(args.out, len(args.prompt))
    if args.animation:
        check_animation_path(args.animation)
    if args.save_steps and Path(args.save_steps).exists() and not Path(args.save_steps).is_dir():
        raise InvalidArgument(f"save-steps: {args.save_steps!r} exists and is not a folder; pass a folder path")
    info = resolve_model(args.model)
    # Every rule is checked here, before loading weights and before the run writes anything.
    req = Request.build(info, prompt=args.prompt if len(args.prompt) > 1 else args.prompt[0],
                        negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                        steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
                        scheduler=args.scheduler, image=args.init_image, strength=args.strength)
    pipe = load(info, backend=args.backend, device=args.device, dtype=args.dtype, engines=args.engines,
                attention=args.attention, cuda_graphs=args.cuda_graphs)

    frames: list = []
    want_frames = bool(args.save_steps or args.animation)

    def on_step(i, t, latents):
        # One decoded frame per step (first image of the batch), like the classic walk-through.
        frames.append(pipe.to_pil(pipe.decode(latents[:1]))[0])

    out = pipe.run(req, callback=on_step if want_frames else None, progress=not args.quiet)

    meta = {
        "prompt": req.prompts[0] if req.batch == 1 else req.prompts,
        "negative_prompt": req.negative_prompts[0] if req.batch == 1 else req.negative_prompts,
        "seed": req.seed, "steps": req.steps, "guidance_scale": req.guidance_scale,
        "scheduler": req.scheduler, "height": req.height, "width": req.width,
        "model": pipe.info.name, "backend": pipe.backend, "dtype": pipe.precision.value,
        "sdfast_version": __version__,
    }
    if req.image is not None:
        meta.update(init_image=str(args.init_image), strength=req.strength)
    if args.save_steps:
        _write_frames(frames, Path(args.save_steps))
    if args.animation:
        save_animation(frames + [out.images[0]], args.animation)
    for k, (img, path) in enumerate(zip(out.images, outs, strict=True)):
        m = dict(meta, prompt=req.prompts[k], negative_prompt=req.negative_prompts[k], batch_index=k) \
            if req.batch > 1 else meta
        save_png(img, path, m)
    if not args.quiet:
        t = out.timings
        print(f"wrote {', '.join(map(str, outs))} ({t['total']:.2f} s; U-Net {t.get('unet', 0):.2f} s "
              f"over {out.steps} steps)")
    return 0


def _write_frames(frames: list, folder: Path) -> None:
    """Frames are kept in memory during the run and written only after it succeeded, each one
    atomically; nothing else in ``folder`` is touched (it may be a folder the user cares about)."""
    from .media import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    for k, im in enumerate(frames):
        with atomic_path(folder / f"step-{k:04d}.png") as tmp:
            im.save(tmp, format="PNG")
