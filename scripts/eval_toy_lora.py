"""Grade a toy LoRA (scripts/train_toy_lora.py) on the toy model, with and without it.

The same sampling as scripts/eval_toy.py: diffusers' ``StableDiffusionPipeline`` on the shipped
toy model, LMS, 20 steps, 64x64, guidance 7.5, one generator per image seeded ``1000 * seed + i``.
The colour the LoRA teaches (orange for the shipped file) is read from its ``sdfast_toy_lora``
metadata. Two caption sets, the canonical template "a {colour} {shape} on a {background} background":

  new   the 36 combos of the new colour (a shape in it on each old colour, each old colour on it),
        graded by train_toy_lora.classify (toy.classify's patches, nearest colour of the palette
        with the new colour added): right when centre and corners are both the prompted colours
  old   the 90 combos of the toy world, graded by toy.classify (and, reported beside it, how many
        of them the extended classifier calls the new colour)

Seeds default to 100 and 101, which the toy model's choices were not made on; the shipped LoRA was
chosen among runs graded on 100-103, so 104 and 105 are its held-out seeds (sdfast/data/loras/TRAINING.md).
The LoRA is fused with diffusers' own ``load_lora_weights`` + ``fuse_lora`` (``--loader sdfast``:
sdfast.lora's reader and fuser instead).

    python scripts/eval_toy_lora.py [--lora sdfast/data/loras/toy-orange.safetensors] [--seeds 100 101]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import train_toy_lora as concept  # noqa: E402
from eval_toy import make_scheduler  # noqa: E402

from sdfast import toy  # noqa: E402


def load_pipe(model: Path, lora: Path | None, loader: str, scheduler: str):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlogging

    dlogging.disable_progress_bar()
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, safety_checker=None)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        if loader == "diffusers":
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
            pipe.fuse_lora()
            pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
        else:
            from sdfast.lora import FusedLoras, Lora, read_lora

            FusedLoras({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, "sd15").set([Lora(read_lora(lora))])
    return pipe


def lora_concept(lora: Path) -> str:
    """The colour a LoRA written by train_toy_lora.py teaches, from its ``sdfast_toy_lora`` metadata."""
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as fh:
        meta = (fh.metadata() or {}).get("sdfast_toy_lora")
    if meta is None:
        raise SystemExit(f"{lora}: no sdfast_toy_lora metadata; grade a LoRA written by scripts/train_toy_lora.py")
    return json.loads(meta)["concept"]


def grade(pipe, combos, seeds, guidance: float, steps: int, batch: int = 48) -> dict:
    prompts = [toy.caption(*c) for c in combos]
    right = centre_ok = corner_ok = new_seen = total = 0
    misses = []
    for seed in seeds:
        for i0 in range(0, len(prompts), batch):
            chunk = prompts[i0 : i0 + batch]
            gens = [torch.Generator().manual_seed(1000 * seed + i0 + j) for j in range(len(chunk))]
            images = pipe(chunk, height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
                          generator=gens).images
            for (shape, colour, background), im in zip(combos[i0 : i0 + batch], images, strict=True):
                new = concept.NEW in (colour, background)
                c, k = concept.classify(im) if new else toy.classify(im)
                centre_ok += c == colour
                corner_ok += k == background
                ok = c == colour and k == background
                right += ok
                new_seen += concept.NEW in concept.classify(im)
                total += 1
                if not ok:
                    misses.append(f"{shape} {colour}/{background} seed {seed}: {c}/{k}")
    return {"accuracy": right / total, "centre": centre_ok / total, "corners": corner_ok / total,
            "images": total, "new_seen": new_seen, "misses": misses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "sdfast" / "data" / "models" / "tiny")
    ap.add_argument("--lora", type=Path, default=ROOT / "sdfast" / "data" / "loras" / "toy-orange.safetensors",
                    help="a LoRA written by scripts/train_toy_lora.py (its metadata names the colour it teaches)")
    ap.add_argument("--loader", choices=["diffusers", "sdfast"], default="diffusers")
    ap.add_argument("--seeds", type=int, nargs="+", default=[100, 101])
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scheduler", default="lms", choices=["lms", "pndm", "ddim", "euler"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sets", nargs="+", choices=["new", "old"], default=["new", "old"])
    ap.add_argument("--models", nargs="+", choices=["base", "lora"], default=["base", "lora"],
                    help="grade the base model, the model with the LoRA, or both")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    concept.set_concept(lora_concept(args.lora))

    sets = {"new": concept.new_combos(), "old": toy.combos()}
    results = {}
    print(f"{args.scheduler} {args.steps} steps, guidance {args.guidance}, seeds {args.seeds}, 64x64")
    print(f"{'model':>6} {'set':>4} {'right':>7} {'centre':>7} {'corners':>7} {'images':>6} {concept.NEW:>6} {'secs':>6}")
    for name, lora in [(m, args.lora if m == "lora" else None) for m in args.models]:
        pipe = load_pipe(args.model, lora, args.loader, args.scheduler)
        for s in args.sets:
            t0 = time.time()
            r = grade(pipe, sets[s], args.seeds, args.guidance, args.steps)
            r["secs"] = time.time() - t0
            results[f"{name}/{s}"] = r
            print(f"{name:>6} {s:>4} {r['accuracy']:>7.1%} {r['centre']:>7.1%} {r['corners']:>7.1%} "
                  f"{r['images']:>6d} {r['new_seen']:>6d} {r['secs']:>6.1f}", flush=True)
    for key, r in results.items():
        if r["misses"]:
            print(f"{key} misses ({len(r['misses'])}): " + "; ".join(r["misses"][:40]))
    if "base/old" in results and "lora/old" in results:
        drop = 100 * (results["base/old"]["accuracy"] - results["lora/old"]["accuracy"])
        print(f"old captions: {drop:+.1f} points lost with the LoRA (bar: <= 3)")
    if "lora/new" in results:
        print(f"new captions with the LoRA: {results['lora/new']['accuracy']:.1%} (bar: >= 90 %)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
