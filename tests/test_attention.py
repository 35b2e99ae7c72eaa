"""The eager backend's attention= option: SDPA (default) and the classic math path agree."""

from __future__ import annotations

import importlib.util

import pytest

import sdfast
from sdfast.errors import InvalidArgument


def test_sdpa_and_math_attention_give_the_same_latents(tiny_info):
    kw = dict(steps=2, guidance_scale=7.5, seed=0, scheduler="euler")
    sdpa = sdfast.load(tiny_info.path, attention="sdpa").generate("a red circle", **kw)
    math = sdfast.load(tiny_info.path, attention="math").generate("a red circle", **kw)
    err = (sdpa.latents - math.latents).abs().max().item()
    scale = math.latents.abs().max().item()
    print(f"sdpa vs math attention: latents max abs diff {err:.3g} (max |latents| {scale:.3g})")
    assert err <= 1e-5 * scale  # float32 rounding of a different summation order


def test_unknown_attention_is_refused_with_the_choices(tiny_info):
    with pytest.raises(InvalidArgument, match="attention: 'flash3'.*sdpa, xformers, math"):
        sdfast.load(tiny_info.path, attention="flash3")


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed here")
def test_xformers_without_the_package_says_how_to_fix(tiny_info):
    with pytest.raises(InvalidArgument, match="pip install xformers"):
        sdfast.load(tiny_info.path, attention="xformers")
