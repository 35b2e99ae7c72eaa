"""Grade the toy Stable Diffusion with diffusers' reference pipeline: does the image show the prompt?

For a deterministic sample of (shape, colour, background) combos and a few seeds, generates
"a {colour} {shape} on a {background} background" at 64x64 with diffusers'
``StableDiffusionPipeline`` and checks with :func:`sdfast.toy.classify` that the centre shows the
prompted shape colour and the corners the prompted background. Prints one row per guidance scale
(guidance <= 1 means no classifier-free guidance).

    python scripts/eval_toy.py [--model sdfast/data/models/tiny] [--guidance 7.5 1.0] [--grid out.png]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sdfast import toy  # noqa: E402

SCHEDULERS = ("lms", "pndm", "ddim", "euler")


def make_scheduler(name: str, config):
    import diffusers

    cls = {
        "lms": diffusers.LMSDiscreteScheduler,
        "pndm": diffusers.PNDMScheduler,
        "ddim": diffusers.DDIMScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
    }[name]
    return cls.from_config(config)


def eval_prompts(n_combos: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """A deterministic sample of ``n_combos`` (shape, colour, background) combos."""
    all_combos = toy.combos()
    idx = np.random.default_rng(seed).choice(len(all_combos), size=min(n_combos, len(all_combos)), replace=False)
    return [all_combos[i] for i in sorted(idx)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "sdfast" / "data" / "models" / "tiny")
    ap.add_argument("--guidance", type=float, nargs="+", default=[7.5, 1.0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scheduler", choices=SCHEDULERS, default="lms")
    ap.add_argument("--combos", type=int, default=24, help="number of prompt combos sampled")
    ap.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grid", type=Path, help="save the images of the first guidance scale here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlogging

    dlogging.disable_progress_bar()
    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    combos = eval_prompts(args.combos)
    prompts = [toy.caption(*c) for c in combos]
    print(f"model {args.model}: {len(combos)} prompts x {args.seeds} seeds, {args.scheduler} "
          f"{args.steps} steps, 64x64")
    print(f"{'guidance':>8} {'both':>7} {'centre':>7} {'corners':>7} {'images':>6} {'secs':>6}")
    for gi, g in enumerate(args.guidance):
        t0 = time.time()
        both = centre_ok = corner_ok = total = 0
        grid_rows = []
        for s in range(args.seeds):
            gens = [torch.Generator().manual_seed(1000 * s + i) for i in range(len(prompts))]
            images = pipe(prompts, height=64, width=64, num_inference_steps=args.steps,
                          guidance_scale=g, generator=gens).images
            grid_rows.append(np.concatenate([np.asarray(im) for im in images], axis=1))
            for (_shape, colour, background), im in zip(combos, images, strict=True):
                c, k = toy.classify(im)
                centre_ok += c == colour
                corner_ok += k == background
                both += (c == colour) and (k == background)
                total += 1
        print(f"{g:>8.2f} {both / total:>7.1%} {centre_ok / total:>7.1%} {corner_ok / total:>7.1%} "
              f"{total:>6d} {time.time() - t0:>6.1f}", flush=True)
        if args.grid and gi == 0:
            from PIL import Image

            Image.fromarray(np.concatenate(grid_rows, axis=0)).save(args.grid)
            print(f"wrote {args.grid} (rows: seeds, columns: {'; '.join(prompts)})")


if __name__ == "__main__":
    main()
