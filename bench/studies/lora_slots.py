"""LoRA slots on the SD 1.5 architecture (random weights): swap time on ONNX Runtime and OpenVINO
engines exported with ``--lora-rank``, beside a re-export, and what the slots cost per U-Net call.

Not a test: a measurement. Exports (into --work, reused when there) the model at one static
profile (batch 1, --size², fp32) four times: onnx and openvino, each plain and with slots of
--slot-rank; the export time of each is recorded (a re-export is what a LoRA swap costs on
engines without slots, beside the session build that bench/studies/lora_swap.py times). Then, per
backend, at --threads, rounds interleaved (each row once per round):

- swap A->B:   Pipeline.set_loras([B]) with A in the slots (two rank---rank kohya LoRAs on every
               attention, feed-forward and text-encoder linear: bench/studies/lora_swap.py's files);
- restore:     set_loras([]) (zero slots, the base model);
- unet plain / unet slots: one guided U-Net call (batch 2) on the plain and on the slot engine;
               the slots' price on every call, with or without a LoRA.

Best and median wall and process CPU time per row; the machine and its load at the end.

    python bench/studies/lora_slots.py [--work DIR] [--rank 64] [--slot-rank 64] [--threads 1] [--rounds 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from lora_swap import print_table, summarize, timed  # noqa: E402  (the same rows as bench/studies/lora_swap.py)

BACKEND = {"onnx": "onnxruntime", "openvino": "openvino"}


def export(info, fmt: str, rank: int, out: Path, size: int) -> float | None:
    """Export ``fmt`` with slots of ``rank`` (0: none) into ``out`` unless there; its seconds or None."""
    from sdfast.model.components import ShapeProfile

    if (out / "manifest.json").exists():
        return None
    profile = ShapeProfile.static(1, size, size)
    t0 = time.perf_counter()
    if fmt == "onnx":
        from sdfast.export.onnx import OnnxExportOptions, export_onnx

        export_onnx(info, out, profile, OnnxExportOptions(lora_rank=rank))
    else:
        from sdfast.export.openvino import OpenVinoExportOptions, export_openvino

        export_openvino(info, out, profile, OpenVinoExportOptions(lora_rank=rank))
    return time.perf_counter() - t0


def measure(args, info, backend: str, plain_dir: str, slots_dir: str, la, lb,
            rows: dict[str, list[tuple[float, float]]]) -> None:
    """One backend's rows, interleaved round by round (see the module doc)."""
    import sdfast
    from sdfast.model.components import ShapeProfile, sample_inputs

    plain = sdfast.load(args.model, backend=backend, engines=plain_dir).engines["unet"]
    pipe = sdfast.load(args.model, backend=backend, engines=slots_dir)
    slotted = pipe.engines["unet"]
    x = sample_inputs(slotted.spec, info, ShapeProfile.static(1, args.size, args.size), which=1)  # the guided call
    plain(**x), slotted(**x)  # first calls (allocations) out of the rounds
    pipe.set_loras([la])
    for _ in range(args.rounds):
        rows.setdefault(f"{backend} swap A->B", []).append(timed(lambda: pipe.set_loras([lb])))
        rows.setdefault(f"{backend} restore", []).append(timed(lambda: pipe.set_loras([])))
        pipe.set_loras([la])
        rows.setdefault(f"{backend} unet plain", []).append(timed(lambda: plain(**x)))
        rows.setdefault(f"{backend} unet slots", []).append(timed(lambda: slotted(**x)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default="random-sd15")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sdfast-lora-slots"), help="exports, reused when there")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rank", type=int, default=64, help="rank of each of the two LoRAs")
    ap.add_argument("--slot-rank", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--formats", nargs="+", default=["onnx", "openvino"], choices=sorted(BACKEND))
    ap.add_argument("--json", default=None, metavar="OUT")
    args = ap.parse_args()

    import torch
    from lora_swap import write_lora

    import sdfast
    from sdfast.cli.info import cpu_model_name
    from sdfast.hardware import busy_cpus
    from sdfast.lora import read_lora
    from sdfast.model.info import resolve_model

    torch.set_num_threads(args.threads)
    info = resolve_model(args.model)
    exports: dict[str, dict] = {}
    for fmt in args.formats:
        for rank in (0, args.slot_rank):
            out = args.work / f"{fmt}-r{rank}"
            seconds = export(info, fmt, rank, out, args.size)
            exports[f"{fmt}-r{rank}"] = {"folder": str(out), "export_s": seconds}
            print(f"{fmt} rank {rank}: {out}" + (f" exported in {seconds:.0f} s" if seconds else " (reused)"), flush=True)
            gc.collect()
    args.work.mkdir(parents=True, exist_ok=True)
    a, b = args.work / "a.safetensors", args.work / "b.safetensors"
    if not b.exists():
        mods = sdfast.load(args.model)._lora_modules()
        write_lora(a, mods, args.rank, 1)
        write_lora(b, mods, args.rank, 2)
        del mods
    la, lb = read_lora(a), read_lora(b)
    layers = len(la.layers)
    rows: dict[str, list[tuple[float, float]]] = {}
    for fmt in args.formats:
        measure(args, info, BACKEND[fmt], exports[f"{fmt}-r0"]["folder"],
                exports[f"{fmt}-r{args.slot_rank}"]["folder"], la, lb, rows)
        gc.collect()
    summary = summarize(rows)
    cpu = f"{cpu_model_name()}, {busy_cpus():.1f} CPUs busy at the end"
    print(f"{args.model} at {args.size}², two rank-{args.rank} LoRAs ({layers} layers), slots of rank "
          f"{args.slot_rank}, threads={args.threads}, {args.rounds} interleaved rounds; {cpu}")
    print_table(summary, width=28)
    for fmt in args.formats:
        backend = BACKEND[fmt]
        p, s = summary[f"{backend} unet plain"]["median_s"], summary[f"{backend} unet slots"]["median_s"]
        print(f"{backend}: slots cost {100 * (s / p - 1):+.1f} % per U-Net call (median)")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "size": args.size, "rank": args.rank,
                                               "slot_rank": args.slot_rank, "layers": layers,
                                               "threads": args.threads, "rounds": args.rounds, "cpu": cpu,
                                               "exports": exports, "rows": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
