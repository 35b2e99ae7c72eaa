"""Which source makes the better OpenVINO IR: the torch module or sdfast's ONNX graph?

For each component: seconds to build the IR each way (torch → ``ov.convert_model``; torch →
sdfast's ONNX export → ``ov.convert_model``, the ONNX export counted), the max abs difference
of each IR at f32 against eager fp32 on the same inputs, and seconds per call of each at bf16.

    python bench/studies/openvino_source.py --model tiny-random --threads 1
    python bench/studies/openvino_source.py --model random-sd15 --components unet --height 256 --width 256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sdfast.model.components import SPECS, Precision, ShapeProfile, sample_inputs  # noqa: E402
from sdfast.model.info import COMPONENT_MODULE, component_modules, load_torch_modules, resolve_model  # noqa: E402


def best_call(compiled, args, repeat: int) -> float:
    request = compiled.create_infer_request()
    request.infer(args)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        request.infer(args)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    import openvino as ov

    from sdfast.export.onnx import OnnxExportOptions, export_onnx
    from sdfast.export.openvino import convert_component

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--components", default="text_encoder,unet,vae_decoder")
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    info = resolve_model(a.model)
    h, w = a.height or info.native_size, a.width or info.native_size
    profile = ShapeProfile.static(1, h, w)
    core = ov.Core()
    cfg = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": a.threads}
    print(f"load: {os.getloadavg()}  threads {a.threads}  {a.model} {h}x{w}", flush=True)
    rows = []
    for name in a.components.split(","):
        spec = getattr(info, "specs", SPECS)[name]
        inputs = sample_inputs(spec, info, profile, which=1)
        args = [inputs[n].numpy() for n in spec.input_names]
        part = COMPONENT_MODULE[name]
        module = component_modules(load_torch_modules(info, parts=(part,)))[name]
        with torch.no_grad():
            ref = module(*(inputs[n] for n in spec.input_names)).float()
        t0 = time.perf_counter()
        from_torch = convert_component(module, name, info, profile, Precision.FP32)
        torch_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            export_onnx(info, Path(tmp) / "x", profile, OnnxExportOptions(), components=(name,))
            from_onnx = ov.convert_model(str(Path(tmp) / "x" / f"{name}.onnx"))
            onnx_s = time.perf_counter() - t0
            row = {"component": name, "build_s": {"torch": torch_s, "onnx": onnx_s}}
            for label, model in (("torch", from_torch), ("onnx", from_onnx)):
                f32 = core.compile_model(model, "CPU", {**cfg, "INFERENCE_PRECISION_HINT": "f32"})
                out = torch.from_numpy(f32.create_infer_request().infer(args)[0].copy())
                row.setdefault("max_abs_f32", {})[label] = (out - ref).abs().max().item()
                bf16 = core.compile_model(model, "CPU", {**cfg, "INFERENCE_PRECISION_HINT": "bf16"})
                row.setdefault("bf16_call_s", {})[label] = best_call(bf16, args, a.repeat)
                del f32, bf16
        rows.append(row)
        print(f"{name:13s} build: torch {torch_s:6.1f} s, onnx {onnx_s:6.1f} s | f32 max|d|: torch "
              f"{row['max_abs_f32']['torch']:.2g}, onnx {row['max_abs_f32']['onnx']:.2g} | bf16 call: torch "
              f"{row['bf16_call_s']['torch'] * 1e3:7.1f} ms, onnx {row['bf16_call_s']['onnx'] * 1e3:7.1f} ms",
              flush=True)
        del module, from_torch, from_onnx
    print(f"load after: {os.getloadavg()}")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "threads": a.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
