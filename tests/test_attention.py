"""The eager backend's attention= option: SDPA (default) and the classic math path agree, and
each choice really runs the attention it names."""

from __future__ import annotations

import importlib.util

import pytest
import torch.nn.functional as F

import sdfast
from sdfast.engines.base import WrappedEngine
from sdfast.errors import InvalidArgument

#: Engines whose attention layers follow the attention= choice (CLIP keeps its own).
FOLLOWS_CHOICE = ("unet", "vae_decoder")


def test_sdpa_and_math_attention_give_the_same_latents(tiny_info):
    kw = dict(steps=2, guidance_scale=7.5, seed=0, scheduler="euler")
    sdpa = sdfast.load(tiny_info.path, attention="sdpa").generate("a red circle", **kw)
    math = sdfast.load(tiny_info.path, attention="math").generate("a red circle", **kw)
    err = (sdpa.latents - math.latents).abs().max().item()
    scale = math.latents.abs().max().item()
    print(f"sdpa vs math attention: latents max abs diff {err:.3g} (max |latents| {scale:.3g})")
    assert err <= 1e-5 * scale  # float32 rounding of a different summation order


def sdpa_calls_per_engine(pipe, monkeypatch) -> dict[str, int]:
    """Run a short generation and count torch's scaled_dot_product_attention calls made while
    each engine runs. The spy passes every call through, so the result is unchanged."""
    counts = dict.fromkeys(pipe.engines, 0)
    current: list[str] = []
    real_sdpa = F.scaled_dot_product_attention

    def sdpa_spy(*args, **kwargs):
        if current:
            counts[current[-1]] += 1
        return real_sdpa(*args, **kwargs)

    def tracked(name, engine):
        def call(**inputs):
            current.append(name)
            try:
                return engine(**inputs)
            finally:
                current.pop()
        return WrappedEngine(engine, call)

    for name, engine in list(pipe.engines.items()):
        monkeypatch.setitem(pipe.engines, name, tracked(name, engine))
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa_spy)
    pipe.generate("a red circle", steps=2, guidance_scale=7.5, seed=0, scheduler="euler")
    monkeypatch.undo()
    return counts


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_attention_choice_takes_effect_in_unet_and_vae(tiny_info, monkeypatch, attention):
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    pipe = sdfast.load(tiny_info.path, attention=attention)
    expected = AttnProcessor2_0 if attention == "sdpa" else AttnProcessor
    for name in FOLLOWS_CHOICE:
        layers = [m for m in pipe.engines[name].module.modules() if isinstance(m, Attention)]
        assert layers, f"{name} has no attention layers: this check proves nothing on this model"
        assert {type(m.processor) for m in layers} == {expected}, name
    # Behaviour, not just the processor's class: math never reaches torch's SDPA kernel.
    counts = sdpa_calls_per_engine(pipe, monkeypatch)
    print(f"attention={attention}: SDPA calls per engine {counts}")
    for name in FOLLOWS_CHOICE:
        if attention == "math":
            assert counts[name] == 0, f"{name} still called scaled_dot_product_attention"
        else:
            assert counts[name] > 0, f"{name} never called scaled_dot_product_attention"


def test_unknown_attention_is_refused_with_the_choices(tiny_info):
    with pytest.raises(InvalidArgument, match="attention: 'flash3'.*sdpa, xformers, math"):
        sdfast.load(tiny_info.path, attention="flash3")


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed here")
def test_xformers_without_the_package_says_how_to_fix(tiny_info):
    with pytest.raises(InvalidArgument, match="pip install xformers"):
        sdfast.load(tiny_info.path, attention="xformers")
