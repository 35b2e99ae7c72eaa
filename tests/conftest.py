"""Shared fixtures: the tiny random model, built once per session into a private cache."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    # Tests never read or write the user's cache; the tiny model is rebuilt from its seed (~2 s).
    os.environ["SDFAST_CACHE"] = str(tmp_path_factory.mktemp("sdfast-cache"))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield


@pytest.fixture(scope="session")
def tiny_info(_private_cache):
    from sdfast.models import resolve_model

    return resolve_model("tiny-random")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_info):
    import sdfast

    return sdfast.load(tiny_info.path)


@pytest.fixture(scope="session")
def diffusers_pipe(tiny_info):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_info.path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- exported artifacts (issue 3): each exported once per session ---------------------------

@pytest.fixture(scope="session")
def onnx_dynamic(tiny_info, tmp_path_factory):
    """fp32 ONNX export of the tiny model serving batch 1..2, height 64..128, width 64..96."""
    from sdfast.components import ShapeProfile
    from sdfast.export.onnx import export_onnx

    profile = ShapeProfile(1, 1, 2, 64, 64, 128, 64, 64, 96)
    return export_onnx(tiny_info, tmp_path_factory.mktemp("onnx") / "tiny-fp32-dynamic", profile)


@pytest.fixture(scope="session")
def onnx_fp16(tiny_info, tmp_path_factory):
    """fp16 ONNX export (VAE kept fp32 by default), static 64x64, batch 1."""
    from sdfast.components import Precision, ShapeProfile
    from sdfast.export.onnx import OnnxExportOptions, export_onnx

    return export_onnx(tiny_info, tmp_path_factory.mktemp("onnx") / "tiny-fp16", ShapeProfile.static(1, 64, 64),
                       OnnxExportOptions(precision=Precision.FP16))
