"""LoRA swap on AOTInductor packages without re-export: the packages' weights are
replaced in place (AOTInductor's load_constants); tier 1 against eager with the same set, A -> B
-> A equal to a fresh A, [] back to the base package's output. Slow: one compile of the tiny model."""

from __future__ import annotations

import pytest
import torch
from lora_files import make_lora, sd_layers
from test_pipeline_parity import LATENT_RTOL

import sdfast
from sdfast.model.components import ShapeProfile

pytestmark = pytest.mark.slow
KW = dict(steps=3, seed=8, scheduler="euler")


@pytest.fixture(scope="module")
def aoti(tiny_info, tmp_path_factory):
    from sdfast.export.inductor import export_inductor

    return export_inductor(tiny_info, tmp_path_factory.mktemp("aoti-lora") / "tiny", ShapeProfile.static(1, 64, 64))


@pytest.fixture(scope="module")
def files(tiny_info, tmp_path_factory):
    mods = sdfast.load(tiny_info.path)._lora_modules()
    d = tmp_path_factory.mktemp("lx")
    return (make_lora(d / "a.safetensors", mods, sd_layers(), "kohya", seed=51),
            make_lora(d / "b.safetensors", mods, sd_layers(), "peft", seed=52, alpha=None))


def test_a_swap_on_inductor_equals_eager_and_restores_exactly(tiny_info, aoti, files):
    a, b = files
    pipe = sdfast.load(tiny_info.path, backend="inductor", engines_dir=aoti)
    base = pipe.generate("a red cube", **KW).latents
    eager = sdfast.load(tiny_info.path, loras=[(a, 0.7)]).generate("a red cube", **KW).latents
    pipe.set_loras([(a, 0.7)])
    with_a = pipe.generate("a red cube", **KW)
    err = (with_a.latents - eager).abs().max().item()
    assert err <= LATENT_RTOL * eager.abs().max().item(), err
    assert (with_a.latents - base).abs().max().item() > 1e-2  # the package's weights did change
    assert with_a.loras[0]["scale"] == 0.7
    pipe.set_loras([(b, 1.0)])
    pipe.set_loras([(a, 0.7)])
    fresh = sdfast.load(tiny_info.path, backend="inductor", engines_dir=aoti, loras=[(a, 0.7)])
    assert torch.equal(pipe.generate("a red cube", **KW).latents, fresh.generate("a red cube", **KW).latents)
    pipe.set_loras([])
    assert torch.equal(pipe.generate("a red cube", **KW).latents, base)
