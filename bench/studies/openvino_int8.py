"""Issue 27: int8 U-Nets through NNCF (sdfast/export/int8.py), every mode against bf16 and fp32.

Two measurements, one script:

``--model random-sd15`` (speed): one guided U-Net call (batch 2, --size², default 256) per row,
rows interleaved round by round (each round calls every row once), median wall and process CPU
time, one thread. Rows: the OpenVINO fp32 and bf16 exports' U-Net and each int8 mode over each
base (what int8 leaves in float: ``--int8-base``). The int8 models are built exactly as the
exporter builds them (``int8.capture_calibration`` on the eager loop, ``int8.quantize_model``).
Each row's output is compared with eager fp32 torch on a held-out input (a captured U-Net input
of a caption and seed not in the calibration set): random weights make that a check of numerics,
not of image quality.

``--model tiny`` (quality): the real export path (``export_openvino``, ``sdfast.load``) per row,
then the toy held-out measure of tests/test_toy_model.py (its 24 captions, seeds 0 and 1, 20 steps,
guidance 7.5) for toy accuracy, and PSNR of those 48 images against eager fp32.

    python bench/studies/openvino_int8.py --model random-sd15 --threads 1 --json bench/results/openvino-int8-sd15-256-1t.json
    python bench/studies/openvino_int8.py --model tiny --json bench/results/openvino-int8-toy-modes.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import sdfast  # noqa: E402
from sdfast import toy  # noqa: E402
from sdfast.export import int8  # noqa: E402
from sdfast.measure.parity import image_metrics, tensor_metrics  # noqa: E402
from sdfast.model.components import Precision, ShapeProfile  # noqa: E402

TOY_STEPS, TOY_SEEDS, TOY_SCHEDULER = 20, (0, 1), "euler"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def machine() -> dict:
    import openvino as ov

    core = ov.Core()
    return {"cpu": core.get_property("CPU", "FULL_DEVICE_NAME"), "platform": platform.platform(),
            "isa": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")), "openvino": ov.get_version(),
            "nncf": _ver("nncf"),
            "torch": torch.__version__, "cores": os.cpu_count()}


def _ver(name: str) -> str | None:
    from sdfast.artifacts import package_version

    return package_version(name)


def rows_wanted(modes: list[str], bases: list[str]) -> list[tuple[str, str | None, str]]:
    """(label, mode or None, base) per row."""
    rows = [("openvino fp32", None, "fp32"), ("openvino bf16", None, "bf16")]
    rows += [(f"int8 {m} / {b}", m, b) for m in modes for b in bases]
    return rows


# -- speed on the SD 1.5 architecture ---------------------------------------------------------

def speed(a) -> dict:
    import openvino as ov

    from sdfast.engines.openvino import compile_config
    from sdfast.export.openvino import convert_component
    from sdfast.model.info import component_modules, load_torch_modules, resolve_model

    info = resolve_model(a.model)
    profile = ShapeProfile.static(1, a.size, a.size)
    torch.set_num_threads(a.calibration_threads)
    t0 = time.perf_counter()
    opts = int8.Int8Options(calibration_prompts=a.calibration_prompts, calibration_steps=a.calibration_steps)
    cal = int8.capture_calibration(info, profile, opts)
    held = int8.capture_calibration(info, profile, int8.Int8Options(calibration_prompts=1, calibration_steps=4,
                                                                    seed=99, calibration_file=a.held_out_file))
    sample = held.samples["unet"][2]  # a mid-schedule call of a caption/seed outside the calibration set
    cal_s = time.perf_counter() - t0
    print(f"calibration: {len(cal.samples['unet'])} U-Net calls in {cal_s:.0f} s; {uptime()}", flush=True)

    unet = component_modules(load_torch_modules(info, parts=("unet",)))["unet"]
    with torch.inference_mode():
        ref = unet(*[torch.from_numpy(x) for x in sample])
        ref = (ref[0] if isinstance(ref, tuple | list) else ref).float()
    fp32_ir = convert_component(unet, "unet", info, profile, Precision.FP32)
    tmp = Path(a.work) / "sd15-int8"
    tmp.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    ov.save_model(fp32_ir, str(tmp / "fp32.xml"), compress_to_fp16=False)
    paths["fp32"] = tmp / "fp32.xml"
    quant_s = {}
    for mode in a.modes:
        t1 = time.perf_counter()
        q, _ = int8.quantize_model(fp32_ir.clone(), cal.samples["unet"], int8.Int8Options(mode=mode))
        quant_s[mode] = time.perf_counter() - t1
        ov.save_model(q, str(tmp / f"{mode}.xml"), compress_to_fp16=False)
        paths[mode] = tmp / f"{mode}.xml"
        print(f"quantized {mode} in {quant_s[mode]:.0f} s", flush=True)
        del q
        gc.collect()
    del fp32_ir, unet
    gc.collect()

    torch.set_num_threads(a.threads)
    core = ov.Core()
    rows = rows_wanted(a.modes, a.bases)
    reqs, results = {}, {}
    inputs = [ov.Tensor(np.ascontiguousarray(x)) for x in sample]
    for label, mode, base in rows:
        model = core.read_model(str(paths[mode or "fp32"]))
        t1 = time.perf_counter()
        compiled = core.compile_model(model, "CPU", compile_config({"fp32": "f32", "bf16": "bf16"}[base], a.threads))
        del model
        req = compiled.create_infer_request()
        for i, t in enumerate(inputs):
            req.set_input_tensor(i, t)
        req.infer()  # warm-up, and the output compared with eager fp32
        out = torch.from_numpy(req.get_output_tensor(0).data.copy()).float()
        m = tensor_metrics(ref, out)
        mse = float(((out - ref) ** 2).mean())
        psnr = 10 * np.log10(float(ref.abs().max()) ** 2 / mse) if mse > 0 else float("inf")
        reqs[label] = req
        results[label] = {"mode": mode, "base": base, "compile_s": time.perf_counter() - t1, "wall_s": [],
                          "cpu_s": [], "vs_eager_fp32": {**m, "psnr_db_peak": psnr}}
        print(f"compiled {label} in {results[label]['compile_s']:.0f} s; cosine {m['cosine']:.6f} "
              f"max abs {m['max_abs']:.3g}", flush=True)
    load_before = uptime()
    for r in range(a.rounds):
        for label, *_ in rows:
            w0, c0 = time.perf_counter(), time.process_time()
            reqs[label].infer()
            results[label]["wall_s"].append(time.perf_counter() - w0)
            results[label]["cpu_s"].append(time.process_time() - c0)
        print(f"round {r + 1}/{a.rounds}: " + "  ".join(f"{lb} {results[lb]['cpu_s'][-1]:.2f}" for lb, *_ in rows),
              flush=True)
    load_after = uptime()
    bf16 = statistics.median(results["openvino bf16"]["cpu_s"])
    bf16_wall = statistics.median(results["openvino bf16"]["wall_s"])
    for res in results.values():
        res["median_wall_s"] = statistics.median(res["wall_s"])
        res["median_cpu_s"] = statistics.median(res["cpu_s"])
        res["speedup_vs_bf16_cpu"] = bf16 / res["median_cpu_s"]
        res["speedup_vs_bf16_wall"] = bf16_wall / res["median_wall_s"]
    return {"model": a.model, "size": a.size, "unet_batch": 2, "threads": a.threads, "rounds": a.rounds,
            "calibration": {**cal.record(), "capture_s": cal_s}, "quantize_s": quant_s,
            "held_out_input": {**held.record(), "call": 2}, "uptime_before": load_before, "uptime_after": load_after,
            "rows": results}


# -- quality on the toy model -----------------------------------------------------------------

def toy_quality(a) -> dict:
    from sdfast.export.openvino import OpenVinoExportOptions, export_openvino
    from sdfast.model.info import resolve_model

    info = resolve_model("tiny")
    eval_prompts = int8.toy_eval_prompts()
    combos = [(c, b) for c, b in (_colour_bg(p) for p in eval_prompts)]
    n = len(eval_prompts)
    torch.set_num_threads(a.threads)
    profile = ShapeProfile(1, n, n, 64, 64, 64, 64, 64, 64)

    def images(pipe):
        return np.concatenate([np.stack([np.asarray(im) for im in pipe.generate(
            eval_prompts, steps=TOY_STEPS, guidance_scale=7.5, seed=s, scheduler=TOY_SCHEDULER).images])
            for s in TOY_SEEDS])

    def accuracy(pix):
        want = combos * len(TOY_SEEDS)
        return float(np.mean([toy.classify(im) == w for w, im in zip(want, pix, strict=True)]))

    ref = images(sdfast.load("tiny"))
    rows = {"eager fp32": {"accuracy": accuracy(ref), "psnr_db": 100.0}}
    print(f"eager fp32: toy accuracy {rows['eager fp32']['accuracy']:.1%}; {uptime()}", flush=True)
    work = Path(a.work)
    for label, mode, base in rows_wanted(a.modes, a.bases):
        out = work / f"toy-{label.replace(' ', '-').replace('/', '')}"
        if mode is None:
            opts = OpenVinoExportOptions(precision=Precision(base))
        else:
            opts = OpenVinoExportOptions(precision=Precision.INT8, int8=int8.Int8Options(
                mode=mode, base=Precision(base), calibration_prompts=a.calibration_prompts,
                calibration_steps=a.calibration_steps))
        t0 = time.perf_counter()
        export_openvino(info, out, profile, opts, model_arg="tiny")
        export_s = time.perf_counter() - t0
        pix = images(sdfast.load("tiny", backend="openvino", engines=out, dtype="auto"))
        m = image_metrics(ref, pix)
        rec = json.loads((out / "manifest.json").read_text())["components"]["unet"].get("quantization")
        rows[label] = {"mode": mode, "base": base, **m, "accuracy": accuracy(pix), "export_s": export_s,
                       "calibration": rec and rec.get("calibration")}
        print(f"{label:28s} PSNR {m['psnr_db']:5.1f} dB  max px {m['max_pixel']:3.0f}  toy accuracy "
              f"{rows[label]['accuracy']:.1%}  (export {export_s:.0f} s)", flush=True)
    return {"model": "tiny", "steps": TOY_STEPS, "seeds": list(TOY_SEEDS), "scheduler": TOY_SCHEDULER,
            "prompts": n, "threads": a.threads, "uptime": uptime(), "rows": rows}


def _colour_bg(prompt: str) -> tuple[str, str]:
    # "a {colour} {shape} on a {background} background"
    words = prompt.split()
    return words[1], words[5]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random-sd15", help="tiny: the quality run; any other: the speed run")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calibration-threads", type=int, default=2, help="torch threads of the calibration capture")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--modes", type=lambda s: s.split(","), default=list(int8.MODES))
    ap.add_argument("--bases", type=lambda s: s.split(","), default=["fp32", "bf16"])
    ap.add_argument("--calibration-prompts", type=int, default=None)
    ap.add_argument("--calibration-steps", type=int, default=None)
    ap.add_argument("--held-out-file", default=None, help="captions of the held-out input (default: a fixed one)")
    ap.add_argument("--work", default="/tmp/sdfast-int8-bench")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.held_out_file is None:
        Path(a.work).mkdir(parents=True, exist_ok=True)
        a.held_out_file = str(Path(a.work) / "held-out.txt")
        Path(a.held_out_file).write_text("a bicycle leaning against a brick wall, evening light\n")
    if a.model == "tiny":
        a.calibration_prompts = a.calibration_prompts or 48
        a.calibration_steps = a.calibration_steps or 10
    else:
        a.calibration_prompts = a.calibration_prompts or 2
        a.calibration_steps = a.calibration_steps or 10
    print(f"start: {uptime()}", flush=True)
    res = toy_quality(a) if a.model == "tiny" else speed(a)
    res = {"command": "python " + " ".join(sys.argv), "machine": machine(), **res}
    print(f"end: {uptime()}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
