"""`sdfast parity` passes a good export and fails (exit 1) a perturbed one."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
from onnx import numpy_helper

from sdfast.artifacts import read_manifest
from sdfast.cli import main


def test_parity_passes_on_good_export_and_writes_json(tiny_info, onnx_dynamic, tmp_path, capsys):
    out = tmp_path / "parity.json"
    rc = main(["parity", "--model", str(tiny_info.path), "--engines", str(onnx_dynamic), "--backend", "onnxruntime",
               "--steps", "3", "--json", str(out)])
    table = capsys.readouterr().out
    assert rc == 0 and "parity PASSED" in table and "unet t=" in table and "pipeline euler_a" in table
    report = json.loads(out.read_text())
    assert report["passed"] and len(report["rows"]) == 8
    e2e = [r for r in report["rows"] if r["tier"] == "e2e"]
    assert all(r["metrics"]["max_pixel"] <= 2 for r in e2e)


def test_parity_fails_with_exit_1_on_perturbed_unet(tiny_info, onnx_dynamic, tmp_path, capsys):
    bad = tmp_path / "perturbed"
    shutil.copytree(onnx_dynamic, bad)
    model = onnx.load(str(bad / "unet.onnx"))
    conv = next(t for t in model.graph.initializer if t.name.endswith("conv_out.weight"))
    w = numpy_helper.to_array(conv)
    conv.CopyFrom(numpy_helper.from_array((w * 1.01).astype(np.float32), conv.name))  # a 1% weight error
    onnx.save(model, str(bad / "unet.onnx"))
    read_manifest(bad).seal(bad)  # re-sealed, so it loads: only parity can catch it
    rc = main(["parity", "--model", str(tiny_info.path), "--engines", str(bad), "--backend", "onnxruntime",
               "--steps", "3", "--schedulers", "euler"])
    table = capsys.readouterr().out
    assert rc == 1 and "parity FAILED" in table
    assert any(line.startswith("1 ") and "unet" in line and line.rstrip().endswith("FAIL") for line in table.splitlines())


def test_parity_rejects_unknown_scheduler_with_exit_2(tiny_info, onnx_dynamic, capsys):
    rc = main(["parity", "--model", str(tiny_info.path), "--engines", str(onnx_dynamic), "--schedulers", "nope"])
    assert rc == 2 and "schedulers" in capsys.readouterr().err
