"""One guided SD 1.5 U-Net call on the CPU, every engine side by side in ONE process.

Rows: eager torch bf16 (and fp32 with ``--rows fp32``), OpenVINO IR converted from the torch
module (``ov.convert_model``, sdfast's exporter) at bf16 with the CPU settings varied one at a
time (static shapes vs the batch interval, pinning, PERFORMANCE_HINT, streams), OpenVINO IR
converted from sdfast's ONNX graph (``--onnx``), and an AOTInductor bf16 package compiled with
weight freezing (``--aoti PKG``, built beforehand by ``--compile-aoti PKG`` in its own process:
compiling takes minutes).

    python bench/studies/openvino_unet.py --compile-aoti /tmp/unet-bf16-frozen.pt2   # once, ~8 min
    python bench/studies/openvino_unet.py --threads 1 --repeat 5 --aoti /tmp/unet-bf16-frozen.pt2 \
        --json bench/results/openvino-unet-1t.json

Rows are built first, then timed interleaved (one call of each per round, after one warm-up
call each), so load drifting on a shared CPU touches every row alike. Each row reports wall
seconds (best, median) and the median process CPU seconds: with one thread those are the work
itself and barely move with other processes' load, so the ratios use them. Also: the share of
the bf16 matmul peak (best of 20 2048³ matmuls, CPU time) and the max abs difference and
cosine of the output against eager fp32 on the same inputs.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sdfast.model.components import SPECS, Precision, ShapeProfile, sample_inputs  # noqa: E402
from sdfast.model.info import component_modules, load_torch_modules, resolve_model  # noqa: E402

UNET = SPECS["unet"]


def matmul_peak(dtype: torch.dtype, n: int = 2048) -> float:
    """Best of 20 n³ matmuls in TFLOP/s, by process CPU time (the rows' measure: see interleaved)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(20):
        c0 = time.process_time()
        a @ b
        best = min(best, time.process_time() - c0)
    return 2 * n**3 / best / 1e12


def unet_gflop(info, inputs) -> float:
    from sdfast.measure.flops import count_stage_flops

    h = inputs["sample"].shape[2] * info.vae_scale_factor
    w = inputs["sample"].shape[3] * info.vae_scale_factor
    return count_stage_flops(info, h, w, inputs["sample"].shape[0] // 2, True).unet_step / 1e9


def ov_engine(model, precision: str, threads: int, **overrides):
    import openvino as ov

    from sdfast.engines.openvino import compile_config

    cfg = compile_config(precision, threads, pinning=overrides.pop("pinning", None))
    cfg.update(overrides)
    compiled = ov.Core().compile_model(model, "CPU", cfg)
    request = compiled.create_infer_request()
    return request


def ov_call(request, args, bf16_io: bool):
    from sdfast.engines.openvino import to_ov

    def run():
        for i, x in enumerate(args):
            x = x.to(torch.bfloat16) if bf16_io and x.is_floating_point() else x
            request.set_input_tensor(i, to_ov(x.contiguous()))
        request.infer()
        y = request.get_output_tensor(0)
        return torch.from_numpy(y.data.copy()).float() if y.element_type.get_type_name() != "bf16" else \
            torch.from_numpy(y.data.view("int16").copy()).view(torch.bfloat16).float()
    return run


def compile_aoti(info, inputs, dest: str) -> None:
    """AOTInductor bf16 with weight freezing (constant-folded, mkldnn-prepacked weights)."""
    unet = component_modules(load_torch_modules(info, dtype=torch.bfloat16, parts=("unet",)))["unet"]
    args = tuple(inputs[n].to(torch.bfloat16) for n in UNET.input_names)
    t0 = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(unet, args, strict=False)
        torch._inductor.aoti_compile_and_package(ep, package_path=dest, inductor_configs={"freezing": True})
    print(f"compiled {dest} in {time.perf_counter() - t0:.0f} s")


def interleaved(runners: dict[str, Any], rounds: int) -> dict[str, list[tuple[float, float]]]:
    """(wall, process CPU) seconds per call of each runner, one call of each per round (after
    one warm-up call each): load that drifts on a shared CPU then touches every row alike. With
    one thread, CPU seconds are the work itself and barely move with other processes' load."""
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in runners}
    for fn in runners.values():
        fn()
    for _ in range(rounds):
        for name, fn in runners.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random-sd15")
    ap.add_argument("--batch", type=int, default=1, help="images; the guided U-Net sees twice this")
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds (one call of every row each)")
    ap.add_argument("--rows", default="eager,settings", help="comma list of: eager, fp32, settings")
    ap.add_argument("--onnx", help="an .onnx U-Net (sdfast export --format onnx) to convert too")
    ap.add_argument("--aoti", help="an AOTInductor package from --compile-aoti to time")
    ap.add_argument("--compile-aoti", metavar="PKG", help="only compile the AOTInductor bf16 package")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    info = resolve_model(a.model)
    profile = ShapeProfile.static(a.batch, a.height, a.width)
    inputs = sample_inputs(UNET, info, profile, which=1)  # (2B, C, h, w), (1,), (2B, S, D)
    args = tuple(inputs[n] for n in UNET.input_names)
    if a.compile_aoti:
        compile_aoti(info, inputs, a.compile_aoti)
        return
    import openvino as ov

    from sdfast.export.openvino import convert_component

    wanted = set(a.rows.split(","))
    gflop = unet_gflop(info, inputs)
    peak = matmul_peak(torch.bfloat16)
    print(f"load before: {os.getloadavg()}  threads {a.threads}  U-Net {gflop:.0f} GFLOP  bf16 matmul peak "
          f"{peak:.3f} TFLOP/s", flush=True)
    runners: dict[str, Any] = {}
    unet = component_modules(load_torch_modules(info, dtype=torch.float32, parts=("unet",)))["unet"]
    with torch.no_grad():
        ref = unet(*args).float()
        t0 = time.perf_counter()
        model = convert_component(unet, "unet", info, profile, Precision.FP32)  # batch interval [1, 2B]
        convert_s = time.perf_counter() - t0
        print(f"ov.convert_model from torch: {convert_s:.1f} s", flush=True)
        static = model.clone()
        static.reshape({i: ov.PartialShape(list(x.shape)) for i, x in enumerate(args)})
        if "fp32" in wanted:
            runners["eager torch fp32"] = lambda m=unet: m(*args)
            runners["OpenVINO fp32 (static, sdfast settings)"] = ov_call(ov_engine(static, "f32", a.threads), args, False)
        # A copy: the IR shares the fp32 module's weight memory (convert_model's share_weights).
        ubf = copy.deepcopy(unet).to(torch.bfloat16)
        bargs = tuple(x.to(torch.bfloat16) for x in args)
        if "eager" in wanted:
            runners["eager torch bf16 (sdfast's torch backend)"] = lambda m=ubf: m(*bargs)
    if "settings" in wanted:
        runners["OpenVINO bf16, static shapes, sdfast settings"] = ov_call(ov_engine(static, "bf16", a.threads), args, False)
        runners["OpenVINO bf16, batch interval [1,2B], sdfast settings"] = ov_call(ov_engine(model, "bf16", a.threads), args, False)
        runners["OpenVINO bf16, static, pinning on"] = ov_call(ov_engine(static, "bf16", a.threads, pinning=True), args, False)
        runners["OpenVINO bf16, static, THROUGHPUT hint"] = ov_call(
            ov_engine(static, "bf16", a.threads, PERFORMANCE_HINT="THROUGHPUT", NUM_STREAMS="AUTO"), args, False)
        runners["OpenVINO bf16, static, THROUGHPUT hint, 1 stream, pinning on"] = ov_call(
            ov_engine(static, "bf16", a.threads, pinning=True, PERFORMANCE_HINT="THROUGHPUT", NUM_STREAMS="1"),
            args, False)
    if a.onnx:
        t0 = time.perf_counter()
        om = ov.convert_model(a.onnx)
        om.reshape({i: ov.PartialShape(list(x.shape)) for i, x in enumerate(args)})
        print(f"ov.convert_model from ONNX: {time.perf_counter() - t0:.1f} s", flush=True)
        runners["OpenVINO bf16, static, from sdfast's ONNX"] = ov_call(ov_engine(om, "bf16", a.threads), args, False)
    if a.aoti:
        runner = torch._inductor.aoti_load_package(a.aoti)

        def aoti():
            with torch.no_grad():
                out = runner(*bargs)
            return out[0] if isinstance(out, (list, tuple)) else out
        runners["AOTInductor bf16, freezing (C++ wrapper)"] = aoti
    del model, static
    if "fp32" not in wanted:
        del unet  # the compiled models hold their own weights
    gc.collect()
    errors = {}
    with torch.no_grad():
        for name, fn in runners.items():
            out = fn().float()
            errors[name] = {"max_abs": (out - ref).abs().max().item(),
                            "cosine": torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()}
        times = interleaved(runners, a.repeat)
    rows = []
    key = "eager torch bf16 (sdfast's torch backend)"
    base = statistics.median(c for _, c in times[key]) if key in times else float("nan")
    for name, ts in times.items():
        walls, cpus = [w for w, _ in ts], [c for _, c in ts]
        best, med, cpu = min(walls), statistics.median(walls), statistics.median(cpus)
        rows.append({"engine": name, "best_s": best, "median_s": med, "cpu_median_s": cpu, "times_s": walls,
                     "cpu_s": cpus, **errors[name], "vs_eager_bf16_cpu": base / cpu,
                     "share_of_bf16_peak_cpu": gflop / 1e3 / cpu / peak})
        print(f"{name:58s} wall best {best:6.3f} median {med:6.3f} s | CPU median {cpu:6.3f} s  "
              f"{base / cpu:5.2f}x eager bf16 {gflop / 1e3 / cpu / peak:4.0%} of peak | max|d| {errors[name]['max_abs']:.3g} cos {errors[name]['cosine']:.6f}",
              flush=True)
    print(f"load after: {os.getloadavg()}")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "threads": a.threads, "batch": a.batch,
                                            "height": a.height, "width": a.width, "unet_gflop": gflop,
                                            "bf16_peak_tflops": peak, "convert_s": convert_s,
                                            "load_after": os.getloadavg(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
