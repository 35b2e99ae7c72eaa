"""Issue 28: ``Pipeline.set_loras`` on TensorRT plans, over the fake ``tensorrt`` (tests/fake_tensorrt.py):
plans built with ``--refit`` swap by refitting (RefitLoras), plans built without refuse in one line
naming ``--refit``, and ``sdfast export --refit`` is refused for any format but tensorrt.
UNVERIFIED on a GPU: the real TensorRT refitter has never run this code."""

from __future__ import annotations

import sys

import fake_tensorrt
import numpy as np
import pytest
import torch
from lora_files import make_lora, sd_layers
from test_tensorrt_refit import _export

from sdfast import artifacts as mf
from sdfast.cli import main
from sdfast.engines.tensorrt import open_plans
from sdfast.errors import InvalidArgument
from sdfast.lora_refit import RefitLoras
from sdfast.model.info import load_torch_modules
from sdfast.runtime import Pipeline


@pytest.fixture(scope="module")
def trt():
    return fake_tensorrt.make_module()


@pytest.fixture(scope="module")
def folders(tiny_info, onnx_dynamic, tmp_path_factory, trt):
    d = tmp_path_factory.mktemp("trt-refit-pipe")
    return {k: _export(tiny_info, onnx_dynamic, d / k, trt, refit=k == "refit") for k in ("refit", "frozen")}


def pipeline(info, root, trt, monkeypatch) -> Pipeline:
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    m = mf.load_manifest(root, info, "tensorrt")
    engines = open_plans(info, root, m, "export again", torch.device("cpu"),
                         streams=lambda: fake_tensorrt.FakeStreams(trt.events))
    return Pipeline(info, engines, torch.device("cpu"), mf.Precision.FP32, "tensorrt")


def test_set_loras_on_refittable_plans_refits_and_returns_to_the_base(tiny_info, folders, trt, monkeypatch,
                                                                      tmp_path):
    pipe = pipeline(tiny_info, folders["refit"], trt, monkeypatch)
    unet = pipe.engines["unet"].cuda_engine
    base = {n: a.copy() for n, a in unet.weights.items()}
    lora = make_lora(tmp_path / "a.safetensors", load_torch_modules(tiny_info, parts=("text_encoder", "unet")),
                     sd_layers(), "kohya", seed=71)
    pipe.set_loras([(lora, 0.6)])
    assert isinstance(pipe._lora_target(), RefitLoras) and pipe.loras[0].scale == 0.6
    assert len(unet.refits) == 1 and any(not np.array_equal(unet.weights[n], base[n]) for n in unet.refits[0])
    pipe.set_loras([])
    assert pipe.loras == () and all(np.array_equal(unet.weights[n], base[n]) for n in base)


def test_set_loras_on_plans_built_without_refit_says_to_export_with_refit(tiny_info, folders, trt, monkeypatch,
                                                                          tmp_path):
    pipe = pipeline(tiny_info, folders["frozen"], trt, monkeypatch)
    lora = make_lora(tmp_path / "a.safetensors", load_torch_modules(tiny_info, parts=("text_encoder", "unet")),
                     sd_layers(), "kohya", seed=72)
    with pytest.raises(InvalidArgument) as e:
        pipe.set_loras([lora])
    assert "\n" not in str(e.value) and "built without --refit" in str(e.value)
    assert "--format tensorrt --refit" in str(e.value) and pipe.loras == ()


def test_cli_export_refuses_refit_for_other_formats_before_any_work(tiny_info, tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["export", "--model", str(tiny_info.path), "--out", str(out), "--format", "onnx", "--refit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--refit" in err[0] and "--format tensorrt, not onnx" in err[0]
    assert not out.exists()
