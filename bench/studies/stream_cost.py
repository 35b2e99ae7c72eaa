"""What streamed partial images cost: the same request with 0 and with K partial images.

Not a test: a measurement. The SD 1.5 architecture with random weights (random-sd15), eager
torch, --size², --steps, guided, at --threads; rows interleaved round by round. Per row the
best and median wall and process CPU time of the whole run, and the seconds the run's timer
gives the partial images (their VAE decodes and the estimate's conversion to PIL) and the final
decode. The final latents of both rows are compared (streaming must not change them).

    python bench/studies/stream_cost.py [--size 256] [--steps 10] [--partial 3] [--threads 1] [--rounds 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from lora_swap import print_table, summarize, timed  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random-sd15")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--partial", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import sdfast
    from sdfast.hardware import cpu_name
    from sdfast.request import Request

    pipe = sdfast.load(args.model)
    req = Request.build(pipe.info, prompt="a photo of a lighthouse at dawn", height=args.size, width=args.size,
                        steps=args.steps, seed=0)
    pipe.warmup(height=args.size, width=args.size, steps=2)
    rows: dict[str, list[tuple[float, float]]] = {"partial 0": [], f"partial {args.partial}": []}
    stages: dict[str, list[dict[str, float]]] = {k: [] for k in rows}
    latents = {}
    loads = [os.getloadavg()]
    for _ in range(args.rounds):
        for name in rows:
            k = int(name.split()[1])
            box = {}

            def run(k=k, box=box):
                got = []
                box["out"] = pipe.run(req, partial_images=k, on_partial=got.append if k else None)
                box["partials"] = len(got)

            rows[name].append(timed(run))
            t = box["out"].timings
            stages[name].append({"partial_images": t.get("partial_images", 0.0), "vae_decode": t["vae_decode"],
                                 "unet": t["unet"], "partials": box["partials"]})
            latents[name] = box["out"].latents
        loads.append(os.getloadavg())
    summary = summarize(rows)
    for name in rows:
        summary[name]["median_partial_images_s"] = statistics.median(s["partial_images"] for s in stages[name])
        summary[name]["median_vae_decode_s"] = statistics.median(s["vae_decode"] for s in stages[name])
        summary[name]["median_unet_s"] = statistics.median(s["unet"] for s in stages[name])
        summary[name]["partials_made"] = stages[name][0]["partials"]
    a, b = latents.values()
    same = bool(torch.equal(a, b))
    print_table(summary)
    k = args.partial
    extra = summary[f"partial {k}"]["median_s"] - summary["partial 0"]["median_s"]
    per = summary[f"partial {k}"]["median_partial_images_s"] / max(1, summary[f"partial {k}"]["partials_made"])
    print(f"{k} partial images: +{extra:.2f} s median wall ({100 * extra / summary['partial 0']['median_s']:.1f} %), "
          f"{per:.3f} s each by the run's timer; final latents identical: {same}")
    result = {"model": args.model, "size": args.size, "steps": args.steps, "partial_images": k,
              "threads": args.threads, "rounds": args.rounds, "rows": summary, "final_latents_identical": same,
              "machine": {"cpu": cpu_name(), "python": platform.python_version(), "torch": torch.__version__,
                          "sdfast": sdfast.__version__, "loadavg_during": loads}}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
