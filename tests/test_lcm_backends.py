"""An LCM-distilled U-Net through every CPU backend: exported, loaded and sampled with the LCM
and TCD schedulers (guidance as the U-Net's embedding, one U-Net row per image), the whole run
within tier 1 of the eager pipeline: latents and pixels, rows of a batch that differ."""

from __future__ import annotations

import pytest
import torch
from tiers import LATENT_RTOL, assert_tier1

import sdfast
from sdfast.model.components import ShapeProfile
from sdfast.model.info import resolve_model

PROMPTS = ["a red circle on a blue background", "a yellow square on a white background"]
#: one or two images per call, 64x64 (the tiny model's native side)
PROFILE = ShapeProfile(1, 1, 2, 64, 64, 64, 64, 64, 64)


@pytest.fixture(scope="module")
def lcm_info(_private_cache):
    return resolve_model("tiny-random-lcm")


@pytest.fixture(scope="module")
def eager(lcm_info):
    return sdfast.load(lcm_info)


def _export(backend, info, out):
    if backend == "onnxruntime":
        from sdfast.export.onnx import export_onnx

        export_onnx(info, out, PROFILE)
    elif backend == "openvino":
        pytest.importorskip("openvino")
        from sdfast.export.openvino import export_openvino

        export_openvino(info, out, PROFILE)
    else:
        from sdfast.export.inductor import export_inductor

        export_inductor(info, out, PROFILE)
    return out


@pytest.fixture(scope="module", params=["onnxruntime", "openvino",
                                        pytest.param("inductor", marks=pytest.mark.slow)])
def exported(request, lcm_info, tmp_path_factory):
    out = _export(request.param, lcm_info, tmp_path_factory.mktemp("lcm") / request.param)
    return sdfast.load(lcm_info, backend=request.param, engines_dir=out)


@pytest.mark.parametrize(("scheduler", "steps"), [("lcm", 1), ("lcm", 4), ("tcd", 2)])
def test_an_exported_lcm_unet_samples_within_tier1_of_eager(exported, eager, scheduler, steps):
    kw = dict(prompt=PROMPTS, steps=steps, guidance_scale=8.0, seed=7, scheduler=scheduler)
    ref, out = eager.generate(**kw), exported.generate(**kw)
    assert_tier1(out, ref)
    # the two rows are different images, each its own prompt's
    assert not torch.allclose(ref.latents[0], ref.latents[1])


def test_the_guidance_scale_reaches_the_exported_unet(exported, eager):
    """The LCM U-Net embeds the guidance scale: a different scale gives a different image on the
    engines as on eager (it is not dropped on the way into the graph)."""
    kw = dict(prompt=PROMPTS[:1], steps=2, seed=3, scheduler="lcm")
    low, high = exported.generate(guidance_scale=2.0, **kw), exported.generate(guidance_scale=9.0, **kw)
    assert (low.latents - high.latents).abs().max().item() > 100 * LATENT_RTOL * high.latents.abs().max().item()
    assert_tier1(low, eager.generate(guidance_scale=2.0, **kw))
