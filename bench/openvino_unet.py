"""One guided SD 1.5 U-Net call on the CPU, every engine side by side in ONE process.

Rows: eager torch fp32 / bf16, OpenVINO IR converted from the torch module (``ov.convert_model``,
sdfast's exporter) at fp32 and bf16 with the CPU settings varied one at a time (pinning,
PERFORMANCE_HINT, streams), OpenVINO IR converted from sdfast's ONNX graph (``--onnx``), and an
AOTInductor bf16 package compiled with weight freezing (``--aoti PKG``, built beforehand by
``--compile-aoti PKG`` in its own process, since compiling takes many minutes).

    python bench/openvino_unet.py --threads 1 --repeat 3 --json bench/results/openvino-unet-1t.json
    python bench/openvino_unet.py --compile-aoti /tmp/unet-bf16-frozen.pt2   # once, slow
    python bench/openvino_unet.py --threads 1 --aoti /tmp/unet-bf16-frozen.pt2 --onnx /tmp/unet.onnx

Every row reports best and median seconds per call over ``--repeat`` timed calls after one
warm-up, the share of the measured bf16 matmul peak (2048³, same threads), and the max abs
difference of its output against eager fp32 on the same inputs. The machine's load average
is printed with the table: on a shared CPU only ratios inside one run mean anything.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdfast.components import SPECS, Precision, ShapeProfile, sample_inputs  # noqa: E402
from sdfast.models import component_modules, load_torch_modules, resolve_model  # noqa: E402

UNET = SPECS["unet"]


def timed(fn, repeat: int) -> tuple[float, float, torch.Tensor]:
    out = fn()  # warm-up: allocation, lazy init, first-shape compilation
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times), out


def matmul_peak(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def unet_gflop(info, inputs) -> float:
    from sdfast.flops import count_stage_flops

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random-sd15")
    ap.add_argument("--batch", type=int, default=1, help="images; the guided U-Net sees twice this")
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rows", default="eager,ov,settings", help="comma list of: eager,fp32,ov,settings")
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
    rows_wanted = set(a.rows.split(","))
    gflop = unet_gflop(info, inputs)
    peak = matmul_peak(torch.bfloat16)
    print(f"load before: {os.getloadavg()}  threads {a.threads}  U-Net {gflop:.0f} GFLOP  bf16 matmul peak "
          f"{peak:.3f} TFLOP/s", flush=True)
    rows = []

    def row(name: str, fn) -> None:
        best, med, out = timed(fn, a.repeat)
        err = (out.float() - ref).abs().max().item()
        rows.append({"engine": name, "best_s": best, "median_s": med, "max_abs_vs_fp32": err,
                     "share_of_bf16_peak": gflop / 1e3 / best / peak, "load": os.getloadavg()[0]})
        print(f"{name:58s} best {best:6.3f} s  median {med:6.3f} s  {gflop / 1e3 / best / peak:5.1%} of peak  "
              f"max|d| vs fp32 {err:.3g}", flush=True)

    import openvino as ov

    unet = component_modules(load_torch_modules(info, dtype=torch.float32, parts=("unet",)))["unet"]
    with torch.no_grad():
        ref = unet(*args).float()
        if "eager" in rows_wanted:
            row("eager torch fp32", lambda m=unet: m(*args))
        t0 = time.perf_counter()
        from sdfast.export.openvino import convert_component

        model = convert_component(unet, "unet", info, profile, Precision.FP32)
        convert_s = time.perf_counter() - t0
        print(f"ov.convert_model from torch: {convert_s:.1f} s", flush=True)
        # A copy: the IR shares the fp32 module's weight memory (convert_model's share_weights).
        ubf = copy.deepcopy(unet).to(torch.bfloat16)
        bargs = tuple(x.to(torch.bfloat16) for x in args)
        if "eager" in rows_wanted:
            row("eager torch bf16 (sdfast's torch backend)", lambda m=ubf: m(*bargs))
        del ubf
        gc.collect()
    if "fp32" in rows_wanted:
        row("OpenVINO fp32 (from torch, sdfast settings)", ov_call(ov_engine(model, "f32", a.threads), args, False))
        gc.collect()
    if "ov" in rows_wanted or "settings" in rows_wanted:
        row("OpenVINO bf16 (from torch, sdfast settings)", ov_call(ov_engine(model, "bf16", a.threads), args, False))
        gc.collect()
    if "settings" in rows_wanted:
        for label, kw in (("pinning on", {"pinning": True}),
                          ("THROUGHPUT hint, default streams", {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": "AUTO"}),
                          ("no hint, plugin defaults", {"PERFORMANCE_HINT": "LATENCY"})):
            if label == "no hint, plugin defaults":
                req = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"}).create_infer_request()
            else:
                req = ov_engine(model, "bf16", a.threads, **kw)
            row(f"OpenVINO bf16, {label}", ov_call(req, args, False))
            del req
            gc.collect()
    del model, unet
    gc.collect()
    if a.onnx:
        t0 = time.perf_counter()
        om = ov.convert_model(a.onnx)
        print(f"ov.convert_model from ONNX: {time.perf_counter() - t0:.1f} s", flush=True)
        row("OpenVINO bf16 (from sdfast's ONNX)", ov_call(ov_engine(om, "bf16", a.threads), args, False))
        del om
        gc.collect()
    if a.aoti:
        runner = torch._inductor.aoti_load_package(a.aoti)
        bargs = tuple(x.to(torch.bfloat16) for x in args)
        with torch.no_grad():
            row("AOTInductor bf16, freezing (C++ wrapper)", lambda: runner(*bargs)[0])
        del runner
    print(f"load after: {os.getloadavg()}")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "threads": a.threads, "batch": a.batch,
                                            "height": a.height, "width": a.width, "unet_gflop": gflop,
                                            "bf16_peak_tflops": peak, "convert_s": convert_s, "rows": rows},
                                           indent=2))


if __name__ == "__main__":
    main()
