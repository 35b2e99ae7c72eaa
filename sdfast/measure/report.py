"""``sdfast bench`` output: the terminal table, the JSON report and the stage bar chart."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument


def format_table(report: dict[str, Any]) -> str:
    cfg = report["config"]
    random = " — RANDOM WEIGHTS (architecture benchmark, images are noise)" if cfg["random_weights"] else ""
    m = report["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['torch_threads']} torch thread(s)"
    lines = [
        f"sdfast bench: {cfg['model_name']}{random}",
        f"{cfg['height']}x{cfg['width']}, {cfg['steps']} steps, {cfg['scheduler']}, guidance {cfg['guidance_scale']}, "
        f"seed {cfg['seed']}; warm-up {cfg['warmup']}, timed {cfg['repeat']}; {where}",
        "ms, p50 (p90 in brackets); unet and sched are per step",
    ]
    head = ("backend", "dtype", "B", "text_enc", "unet/step", "sched/step", "vae_dec", "total",
            "lat p50/p99", "img/s", "peak MB", "TFLOP/s", "%peak", "vs diffusers")
    body = []
    for r in report["results"]:
        s, p = r["stages_ms"], r["stages_ms_p90"]
        share = r["share_of_peak"]["total"]
        body.append((
            r["backend"], r["dtype"], str(r["batch"]),
            f"{s['text_encoder']:.1f}", f"{s['unet_step']:.1f} ({p['unet_step']:.1f})",
            f"{s['scheduler_step']:.2f}", f"{s['vae_decode']:.1f}", f"{s['total']:.0f} ({p['total']:.0f})",
            f"{r['latency_ms']['p50']:.0f}/{r['latency_ms']['p99']:.0f}", f"{r['images_per_s']:.3g}",
            "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}",
            f"{r['tflops']['total']:.3g}", "-" if share is None else f"{100 * share:.1f}%",
            f"{r['speedup_vs_diffusers']:.2f}x" if r["speedup_vs_diffusers"] else "-",
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    lines += [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in body]
    # Which pipeline the reference rows are (StableDiffusionXLPipeline for SDXL, whose text_enc
    # is both CLIPs), run on the same torch modules as the torch rows.
    for timing in dict.fromkeys(r.get("timing") for r in report["results"] if r["backend"] == "diffusers"):
        if timing:
            lines.append(f"diffusers rows: {timing}, on the torch rows' modules")
    for s in cfg["skipped"]:
        lines.append(f"skipped {s['backend']} {s['dtype']} batch {s['batch']}: {s['reason']}")
    for r in report["results"]:
        if r.get("export_s"):
            lines.append(f"export of {r['backend']} {r['dtype']} batch {r['batch']} engines: {r['export_s']:.1f} s "
                         "(not in the timings above)")
    peaks = {(r["dtype"], r["peak_source"], r["peak_tflops"]) for r in report["results"]}
    for dtype, source, tf in sorted(peaks, key=str):
        lines.append(f"peak {dtype}: {'-' if tf is None else f'{tf:.3g} TFLOP/s'} ({source})")
    return "\n".join(lines)


def _readable(path: Path) -> None:
    # atomic_path's temporary file is created 0600; a report is for sharing.
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def write_json(report: dict[str, Any], path: str | Path) -> None:
    from ..media import atomic_path

    with atomic_path(Path(path)) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    _readable(Path(path))


def check_plot_available() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise InvalidArgument("plot: needs matplotlib, which is not installed; pip install 'sdfast[plot]' "
                              "(or matplotlib) or drop --plot")


def write_plot(report: dict[str, Any], path: str | Path) -> None:
    """Stacked bars of the p50 stage times (whole run, ms) per backend × dtype × batch. Each
    stage's p50 may come from a different run, so a stack can differ a little from the p50 total."""
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..media import atomic_path

    steps = report["config"]["steps"]
    rows = report["results"]
    labels = [f"{r['backend']}\n{r['dtype']} b{r['batch']}" for r in rows]
    parts = {
        "text encoder": [r["stages_ms"]["text_encoder"] for r in rows],
        f"U-Net × {steps}": [r["stages_ms"]["unet_step"] * steps for r in rows],
        f"scheduler+guidance × {steps}": [r["stages_ms"]["scheduler_step"] * steps for r in rows],
        "VAE decode": [r["stages_ms"]["vae_decode"] for r in rows],
    }
    other = [max(0.0, r["stages_ms"]["total"] - sum(v[i] for v in parts.values())) for i, r in enumerate(rows)]
    parts["other (tokenize, PIL, ...)"] = other
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4.5))
    bottom = [0.0] * len(rows)
    for name, vals in parts.items():
        ax.bar(labels, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    cfg = report["config"]
    title = f"{cfg['model_name']} {cfg['height']}x{cfg['width']}, {steps} steps"
    if cfg["random_weights"]:
        title += " (random weights)"
    ax.set_title(title)
    ax.set_ylabel("ms per generation (p50)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    _readable(Path(path))


def write_pareto_plot(points: list[dict[str, Any]], path: str | Path, title: str, xlabel: str) -> None:
    """Accuracy against seconds per image: one marker per configuration (``points``: dicts with
    ``label``, ``seconds``, ``accuracy`` or None, ``kind`` "sdfast" | "diffusers"), the sdfast
    Pareto front joined by a line. Configurations without a measured accuracy are drawn at the
    bottom edge with their label. Needs matplotlib."""
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..media import atomic_path
    from .fewstep import pareto_front

    fig, ax = plt.subplots(figsize=(8, 5))
    ours = [p for p in points if p["kind"] == "sdfast" and p["accuracy"] is not None]
    for kind, marker, colour in (("sdfast", "o", "tab:blue"), ("diffusers", "x", "tab:red")):
        sel = [p for p in points if p["kind"] == kind]
        if not sel:
            continue
        xs = [p["seconds"] for p in sel]
        ys = [100 * p["accuracy"] if p["accuracy"] is not None else 0.0 for p in sel]
        ax.scatter(xs, ys, marker=marker, color=colour, label=kind if kind == "sdfast" else
                   "diffusers, same recipe (at the recipe's sdfast accuracy)")
        for p, x, y in zip(sel, xs, ys, strict=True):
            ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(4, 4 if kind == "sdfast" else -10),
                        fontsize=7, color=colour)
    front = pareto_front([(p["seconds"], p["accuracy"]) for p in ours])
    if front:
        ax.plot([ours[i]["seconds"] for i in front], [100 * ours[i]["accuracy"] for i in front], "--",
                color="tab:blue", alpha=0.5, label="sdfast Pareto front")
    ax.axhline(95, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    seconds = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.xaxis.set_major_formatter(seconds)
    ax.xaxis.set_minor_formatter(seconds)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out toy accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    _readable(Path(path))
