"""LCM U-Nets (diffusers' ``time_cond_proj_dim``): the guidance embedding is a U-Net input named
``timestep_cond`` on every path: the spec, the eager engine and exported engines."""

from __future__ import annotations

import pytest
import torch

from sdfast.model.components import ShapeProfile, sample_inputs
from sdfast.model.info import TINY_LCM_COND_DIM, load_torch_modules, resolve_model


@pytest.fixture(scope="module")
def lcm_info(_private_cache):
    return resolve_model("tiny-random-lcm")


@pytest.fixture(scope="module")
def lcm_engines(lcm_info):
    from sdfast.engines.torch import load
    from sdfast.model.components import Precision

    return load(lcm_info, torch.device("cpu"), Precision.FP32)


def unet_inputs(info, batch=2, seed=0):
    inputs = sample_inputs(info.specs["unet"], info, ShapeProfile.static(batch, 64, 64), which=0, seed=seed)
    # rows that differ only in their guidance embedding
    inputs["sample"] = inputs["sample"][:1].expand_as(inputs["sample"]).clone()
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:1].expand_as(
        inputs["encoder_hidden_states"]).clone()
    return inputs


def test_the_spec_of_an_lcm_unet_takes_timestep_cond_and_a_plain_one_does_not(lcm_info, tiny_info):
    assert lcm_info.timestep_cond_dim == TINY_LCM_COND_DIM
    assert lcm_info.specs["unet"].input_names[-1] == "timestep_cond"
    assert tiny_info.timestep_cond_dim is None
    assert "timestep_cond" not in tiny_info.specs["unet"].input_names
    shapes = ShapeProfile.static(2, 64, 64).shapes(lcm_info.specs["unet"], lcm_info)
    assert shapes["timestep_cond"][0] == (2, TINY_LCM_COND_DIM)


def test_the_random_sd15_lcm_architecture_is_sd15_with_a_256_wide_guidance_embedding(_private_cache):
    lcm, plain = resolve_model("random-sd15-lcm"), resolve_model("random-sd15")
    assert lcm.timestep_cond_dim == 256 and plain.timestep_cond_dim is None
    assert lcm.scheduler_config["_class_name"] == "LCMScheduler"
    assert {k: v for k, v in lcm.unet_config.items() if k != "time_cond_proj_dim"} == plain.unet_config


def test_each_row_gets_its_own_guidance_embedding(lcm_info, lcm_engines):
    inputs = unet_inputs(lcm_info)
    out = lcm_engines["unet"](**inputs)["noise_pred"]
    assert not torch.allclose(out[0], out[1])  # the embedding reaches the U-Net, per row
    for k in range(2):  # a row equals that row run alone
        alone = lcm_engines["unet"](**{n: t[k:k + 1] if t.shape[0] == 2 else t for n, t in inputs.items()})
        torch.testing.assert_close(alone["noise_pred"][0], out[k], rtol=1e-5, atol=1e-6)


def test_the_eager_engine_equals_diffusers_unet_called_with_timestep_cond(lcm_info, lcm_engines):
    unet = load_torch_modules(lcm_info, parts=("unet",))["unet"]
    inputs = unet_inputs(lcm_info)
    with torch.no_grad():
        ref = unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                   timestep_cond=inputs["timestep_cond"]).sample
    torch.testing.assert_close(lcm_engines["unet"](**inputs)["noise_pred"], ref, rtol=0, atol=0)


def test_the_engine_refuses_a_call_without_the_guidance_embedding(lcm_info, lcm_engines):
    inputs = unet_inputs(lcm_info)
    del inputs["timestep_cond"]
    with pytest.raises(Exception, match="timestep_cond"):
        lcm_engines["unet"](**inputs)


def test_onnxruntime_engine_takes_timestep_cond_row_by_row(lcm_info, lcm_engines, tmp_path):
    from sdfast.engines import onnxruntime as ort_engines
    from sdfast.export.onnx import export_onnx
    from sdfast.model.components import Precision

    out = export_onnx(lcm_info, tmp_path / "lcm", ShapeProfile(1, 1, 2, 64, 64, 64, 64, 64, 64))
    engines = ort_engines.load(lcm_info, torch.device("cpu"), Precision.FP32, str(out))
    inputs = unet_inputs(lcm_info)
    got = engines["unet"](**inputs)["noise_pred"]
    want = lcm_engines["unet"](**inputs)["noise_pred"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert not torch.allclose(got[0], got[1])


def test_openvino_engine_takes_timestep_cond_row_by_row(lcm_info, lcm_engines, tmp_path):
    pytest.importorskip("openvino")
    from sdfast.engines import openvino as ov_engines
    from sdfast.export.openvino import export_openvino
    from sdfast.model.components import Precision

    out = export_openvino(lcm_info, tmp_path / "lcm-ov", ShapeProfile(1, 1, 2, 64, 64, 64, 64, 64, 64))
    engines = ov_engines.load(lcm_info, torch.device("cpu"), Precision.FP32, str(out))
    inputs = unet_inputs(lcm_info)
    got = engines["unet"](**inputs)["noise_pred"]
    torch.testing.assert_close(got, lcm_engines["unet"](**inputs)["noise_pred"], rtol=0, atol=1e-4)
    assert not torch.allclose(got[0], got[1])
