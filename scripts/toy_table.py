"""The toy model's accuracy table: every scheduler, every caption, seeds the tests never use.

For each of sdfast's schedulers, generates the canonical caption "a {colour} {shape} on a
{background} background" of all 90 combinations of the toy world with each seed (one batched call
per seed, 20 steps, 64x64, through sdfast's eager torch pipeline) and grades every image with
:func:`sdfast.toy.classify`. Prints one row per scheduler with its accuracy and the colours it got
wrong (prompted -> drawn), and with ``--json`` writes the whole table. The README's and the
closing notes' held-out figures come from

    python scripts/toy_table.py --seeds 100 101 --guidance 7.5 [--model DIR] [--json table.json]

(about 20 minutes on one CPU thread for the six schedulers; ``--schedulers`` runs a subset).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sdfast  # noqa: E402
from sdfast import toy  # noqa: E402
from sdfast.schedulers import SCHEDULERS  # noqa: E402


def grade(pipe, scheduler: str, seeds: list[int], guidance: float, steps: int) -> dict:
    combos = toy.combos()
    prompts = [toy.caption(*c) for c in combos]
    hits = 0
    wrong_centre: Counter = Counter()
    wrong_corners: Counter = Counter()
    right_by_colour: Counter = Counter()
    for seed in seeds:
        out = pipe.generate(prompts, steps=steps, guidance_scale=guidance, seed=seed, scheduler=scheduler)
        for (_shape, colour, background), image in zip(combos, out.images, strict=True):
            centre, corners = toy.classify(image)
            ok = (centre, corners) == (colour, background)
            hits += ok
            right_by_colour[colour] += ok
            if centre != colour:
                wrong_centre[f"{colour}->{centre}"] += 1
            if corners != background:
                wrong_corners[f"{background}->{corners}"] += 1
    n = len(combos) * len(seeds)
    per_colour = n // len(toy.COLOURS)
    return {"accuracy": hits / n, "images": n, "wrong_centre": dict(wrong_centre.most_common()),
            "wrong_corners": dict(wrong_corners.most_common()),
            "accuracy_by_shape_colour": {c: right_by_colour[c] / per_colour for c in toy.COLOURS}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="model folder or built-in name (default: tiny)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[100, 101])
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--schedulers", nargs="+", choices=sorted(SCHEDULERS), default=list(SCHEDULERS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write the table here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    pipe = sdfast.load(args.model)
    print(f"model {args.model}: 90 captions x seeds {args.seeds}, guidance {args.guidance}, {args.steps} steps")
    table = {"model": str(args.model), "seeds": args.seeds, "guidance": args.guidance, "steps": args.steps,
             "schedulers": {}}
    for name in args.schedulers:
        t0 = time.time()
        row = grade(pipe, name, args.seeds, args.guidance, args.steps)
        table["schedulers"][name] = row
        print(f"{name:16s} {row['accuracy']:6.1%} of {row['images']}  ({time.time() - t0:.0f} s)  "
              f"wrong shape colour: {row['wrong_centre'] or '-'}  wrong background: {row['wrong_corners'] or '-'}",
              flush=True)
        if args.json:  # after every row, so an interrupted run keeps what it measured
            args.json.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    if args.json:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
