"""Stretch (issue 14 item 5): int8 U-Net through NNCF post-training quantization, on the toy model.

Calibration: the U-Net inputs of eager fp32 generations of toy captions that are NOT in the
evaluation set (tests/test_toy_model.py's 24 combos), every step recorded. Variants:

- ``int8 weights``: ``nncf.compress_weights`` (INT8_ASYM, weights only; activations bf16);
- ``int8 static``: ``nncf.quantize`` (weights and activations int8, model_type TRANSFORMER,
  SmoothQuant off), what OpenVINO's own SD int8 notebooks apply to the U-Net.

Each runs as sdfast's own OpenVinoEngine (bf16 hint for whatever stays in float) in the same
Pipeline, and is held to tier 3: PSNR of the final images against eager fp32 (same prompts,
seeds, scheduler), plus the toy grader's accuracy. Needs ``pip install nncf``.

    python bench/openvino_int8.py --threads 1 --json bench/results/openvino-int8-toy.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import sdfast  # noqa: E402
from sdfast import toy  # noqa: E402
from sdfast.components import SPECS, Precision, ShapeProfile  # noqa: E402
from sdfast.parity import image_metrics  # noqa: E402

STEPS = 20


class Recorder:
    """An engine that passes calls through and keeps their inputs (calibration data)."""

    def __init__(self, engine):
        self.engine = engine
        self.spec, self.device, self.precision = engine.spec, engine.device, engine.precision
        self.profile, self.size_multiple, self.graph_safe = engine.profile, engine.size_multiple, engine.graph_safe
        self.samples: list[list[np.ndarray]] = []

    def __call__(self, **inputs):
        self.samples.append([inputs[n].float().contiguous().numpy().copy() for n in self.spec.input_names])
        return self.engine(**inputs)


def calibration_prompts(n: int, held_out: set[str]) -> list[str]:
    rng = np.random.default_rng(7)
    out = []
    for s, c, b in (toy.combos()[i] for i in rng.permutation(len(toy.combos()))):
        if len(out) == n:
            break
        p = toy.TEMPLATES[0].format(colour=c, shape=s, background=b)
        if p not in held_out:
            out.append(p)
    return out


def main() -> None:
    import nncf
    import openvino as ov
    from test_toy_model import COMBOS, PROMPTS

    from sdfast.engines.openvino import OpenVinoEngine, compile_config
    from sdfast.export.openvino import convert_component
    from sdfast.models import component_modules, load_torch_modules

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calibration-prompts", type=int, default=8)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    eager = sdfast.load("tiny")
    info = eager.info
    batch = len(PROMPTS)
    n = info.native_size
    profile = ShapeProfile(1, batch, batch, n, n, n, n, n, n)  # calibration batches are smaller
    kw = dict(steps=STEPS, guidance_scale=7.5, scheduler="euler")

    rec = Recorder(eager.engines["unet"])
    eager.engines["unet"] = rec
    calib = calibration_prompts(a.calibration_prompts, set(PROMPTS))
    eager.generate(calib, seed=11, **kw)
    eager.engines["unet"] = rec.engine
    print(f"load {os.getloadavg()}; {len(rec.samples)} calibration calls from {len(calib)} held-out prompts", flush=True)

    def images(pipe, seed):
        return np.stack([np.asarray(im) for im in pipe.generate(PROMPTS, seed=seed, **kw).images])

    def accuracy(pix: np.ndarray) -> float:
        return float(np.mean([toy.classify(im) == (c, b) for (_, c, b), im in zip(COMBOS, pix, strict=True)]))

    ref = images(eager, 0)
    unet = component_modules(load_torch_modules(info, parts=("unet",)))["unet"]
    fp32_ir = convert_component(unet, "unet", info, profile, Precision.FP32)
    core = ov.Core()
    calib_ds = nncf.Dataset(rec.samples)
    variants = {
        "bf16 (no int8; reference for the int8 rows)": fp32_ir,
        "int8 weights (nncf.compress_weights INT8_ASYM)": nncf.compress_weights(fp32_ir.clone()),
    }
    t0 = time.perf_counter()
    variants["int8 static (nncf.quantize, TRANSFORMER)"] = nncf.quantize(
        fp32_ir.clone(), calib_ds, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(rec.samples),
        advanced_parameters=nncf.AdvancedQuantizationParameters(smooth_quant_alpha=-1.0))
    quant_s = time.perf_counter() - t0
    rows = []
    base_pipe_unet = eager.engines["unet"]
    for name, model in variants.items():
        engine = OpenVinoEngine(SPECS["unet"], model, core, compile_config("bf16", a.threads), info,
                                torch.device("cpu"), Precision.FP32, profile, static_shapes=3)
        eager.engines["unet"] = engine
        try:
            out = images(eager, 0)
        finally:
            eager.engines["unet"] = base_pipe_unet
        m = image_metrics(ref, out)
        row = {"variant": name, **m, "accuracy": accuracy(out), "eager_fp32_accuracy": accuracy(ref)}
        rows.append(row)
        print(f"{name:48s} PSNR vs eager fp32 {m['psnr_db']:5.1f} dB  max px {m['max_pixel']:.0f}  "
              f"toy accuracy {row['accuracy']:.1%} (eager fp32 {row['eager_fp32_accuracy']:.1%})", flush=True)
    print(f"nncf.quantize took {quant_s:.0f} s; load {os.getloadavg()}")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": "tiny", "steps": STEPS, "prompts": len(PROMPTS),
                                            "calibration_calls": len(rec.samples), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
