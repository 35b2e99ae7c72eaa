"""Plot the OpenVINO benchmark JSONs (bench/studies/openvino_unet.py, bench/studies/openvino_pipeline.py) as one PNG.

    python bench/studies/openvino_plot.py bench/results/openvino-unet-1t.json \\
        bench/results/openvino-pipeline-1t.json bench/results/openvino-cpu-1t.png

Left: one guided SD 1.5 U-Net call, median process CPU seconds per engine (1 thread, so CPU
seconds are the work; wall seconds on the shared machine beside them). Right: one 10-step
256x256 generation per pipeline, p50 by stage.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(unet_json: str, pipeline_json: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unet = json.loads(Path(unet_json).read_text())
    pipe = json.loads(Path(pipeline_json).read_text())
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5.5))
    rows = unet["rows"]
    names = [r["engine"] for r in rows]
    y = range(len(rows))
    ax1.barh([i + 0.2 for i in y], [r["cpu_median_s"] for r in rows], height=0.4, label="CPU s (median)")
    ax1.barh([i - 0.2 for i in y], [r["best_s"] for r in rows], height=0.4, label="wall s (best)", alpha=0.6)
    ax1.set_yticks(list(y), names, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("seconds per guided U-Net call (batch 2, 256x256)")
    ax1.set_title(f"SD 1.5 U-Net, {unet['threads']} thread, random weights")
    ax1.legend(fontsize=8)
    stages = ("text_encoder", "unet_step", "vae_decode")
    labels = [r["backend"] for r in pipe["rows"]]
    steps = pipe["config"]["steps"]
    left = [0.0] * len(labels)
    for stage in stages:
        vals = [r["stages_ms"][stage] / 1e3 * (steps if stage == "unet_step" else 1) for r in pipe["rows"]]
        ax2.barh(labels, vals, left=left, label=stage if stage != "unet_step" else f"unet x {steps} steps")
        left = [a + b for a, b in zip(left, vals, strict=True)]
    for i, r in enumerate(pipe["rows"]):
        ax2.text(left[i], i, f"  {r['stages_ms']['total'] / 1e3:.1f} s", va="center", fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xlabel("seconds per generation (p50, wall)")
    ax2.set_title(f"end to end, {steps} steps 256x256 bf16, {pipe['config']['threads']} thread")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
