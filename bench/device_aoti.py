"""The AOTInductor section of bench/device_check.py, run as its own process so that the parent
can kill it (with its compile workers) at a hard timeout and keep everything else.

    python bench/device_aoti.py SPEC.json      # written by device_check.py; not meant to be run by hand

UNVERIFIED on CUDA (no GPU here); ``--smoke`` runs it on the CPU with the tiny text encoder.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch._inductor
from device_check import free_memory, sdfast_figures, timed, write_json  # bench/ is sys.path[0] here


def main(spec_path: str) -> int:
    """Compile ``spec["aoti"]`` ("unet", another component or "all") and compare each compiled
    component with the eager one on the benchmark's shape; with "all", also benchmark the
    inductor pipeline built by ``sdfast.load``. Progress is written to ``spec["result"]`` after
    every stage, so the parent keeps what finished when it kills this process."""
    import sdfast
    from sdfast.export.inductor import InductorExportOptions, export_inductor
    from sdfast.model.components import SPECS, Precision, ShapeProfile
    from sdfast.model.info import resolve_model

    spec = json.loads(Path(spec_path).read_text())
    res: dict[str, Any] = {"stage": "load"}
    result = Path(spec["result"])
    write_json(result, res)
    device, precision = torch.device(spec["device"]), Precision(spec["dtype"])
    info = resolve_model(spec["model"])
    eager = sdfast.load(info, device=device, dtype=precision.value, cuda_graphs=False)
    names = tuple(getattr(info, "specs", SPECS)) if spec["aoti"] == "all" else (spec["aoti"],)
    profile = ShapeProfile.static(1, spec["height"], spec["width"])
    options = InductorExportOptions(precision=precision, device=device.type, autotune=spec["autotune"])
    res["stage"] = "compile"
    write_json(result, res)
    t0 = time.perf_counter()
    work = export_inductor(info, spec["work"], profile, options, components=names)
    manifest = json.loads((work / "manifest.json").read_text())
    res["compile_s"] = {n: manifest["components"][n]["compile_s"] for n in names}
    res["compile_wall_s"] = time.perf_counter() - t0
    res["stage"] = "compare"
    write_json(result, res)
    res["components_ms"] = {}
    for name in names:
        res["components_ms"][name] = compare_component(name, manifest["components"][name], work, eager, info,
                                                       profile, device)
        write_json(result, res)
    del eager
    free_memory(device)
    if spec["aoti"] == "all":
        res["stage"] = "pipeline"
        write_json(result, res)
        pipe = sdfast.load(info, backend="inductor", engines=work, device=device, dtype=precision.value)
        ref = np.load(spec["reference"]) if spec.get("reference") else None
        res["pipeline"] = sdfast_figures(pipe, spec, device, ref)
    res["stage"] = "done"
    write_json(result, res)
    return 0


def compare_component(name: str, comp: dict[str, Any], work: Path, eager, info, profile, device) -> dict[str, Any]:
    """A compiled component against the eager one on the same sample inputs: ms per call, difference."""
    from sdfast.engines.base import engine_inputs
    from sdfast.model.components import SPECS, Precision, sample_inputs

    cspec = getattr(info, "specs", SPECS)[name]  # the model family's spec where sdfast has families
    runner = torch._inductor.aoti_load_package(str(work / comp["file"]), run_single_threaded=device.type == "cuda")
    inputs = sample_inputs(cspec, info, profile, which=1)  # the guided batch at the bench size
    module, dtype = eager.engines[name].module, eager.engines[name].dtype
    args = engine_inputs(cspec, inputs, device, Precision(comp["precision"]).torch_dtype)
    eager_args = engine_inputs(cspec, inputs, device, dtype)
    first = lambda y: y[0] if isinstance(y, (list, tuple)) else y  # noqa: E731
    calls = 10 if device.type == "cuda" else 2
    with torch.no_grad():
        got, want = first(runner(*args)).float(), first(module(*eager_args)).float()
        aoti_ms = min(timed(lambda: runner(*args), device) for _ in range(calls))
        eager_ms = min(timed(lambda: module(*eager_args), device) for _ in range(calls))
    diff = (got - want).abs()
    return {"aoti_ms": aoti_ms, "eager_ms": eager_ms, "speedup": eager_ms / aoti_ms, "finite": bool(torch.isfinite(got).all()),
            "max_abs_vs_eager": diff.max().item(), "rel_vs_eager": (diff.max() / want.abs().max()).item(),
            "input_shapes": {k: list(v.shape) for k, v in inputs.items()}, "eager_dtype": str(dtype)}



if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
