"""The quick start's lite path (sdfast/model/lite.py): the same bits as diffusers' and transformers'
modules, without importing either library."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from sdfast.model.info import load_tokenizer, load_torch_modules, resolve_model
from sdfast.model.lite import lite_info, unsupported
from sdfast.model.lite_text import LiteTokenizer

TEXTS = ["a red circle on a blue background", "A  Red <|endoftext|> circel!!", "", "Ünïcödé 東京 1234 it's",
         "red\ncircle\tblue " * 6]


@pytest.mark.parametrize("name", ["tiny", "tiny-lcm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lite_modules_compute_the_libraries_bits(name, dtype):
    from sdfast.engines.torch import set_attention

    info = resolve_model(name)
    lite_model = lite_info(info)
    assert lite_model.lite and not info.lite
    ref = load_torch_modules(info, dtype)
    set_attention(ref, "sdpa")
    lite = load_torch_modules(lite_model, dtype)
    assert all(getattr(m, "lite", False) for m in lite.values()) and not any(hasattr(m, "lite") for m in ref.values())
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[810, 320, 530, 553, 811] + [811] * 11, [810] + [811] * 15])
    with torch.inference_mode():
        a, b = ref["text_encoder"](ids, return_dict=False)[0], lite["text_encoder"](ids)[0]
        assert torch.equal(a, b)
        for hw in ((8, 8), (12, 10)):  # 12x10: the U-Net's odd-size upsampling path
            x = torch.randn(2, 4, *hw, generator=g).to(dtype)
            cond = torch.randn(2, 32, generator=g).to(dtype) if info.unet_config.get("time_cond_proj_dim") else None
            for t in (torch.tensor([999.0]), torch.tensor([1.0])):
                u1 = ref["unet"](x, t.to(dtype), a.to(dtype), timestep_cond=cond, return_dict=False)[0]
                assert torch.equal(u1, lite["unet"](x, t.to(dtype), a.to(dtype), timestep_cond=cond)[0])
            assert torch.equal(ref["vae"].decode(x, return_dict=False)[0], lite["vae"].decode(x)[0])


def test_lite_tokenizer_is_clips():
    info = resolve_model("tiny")
    ref, lite = load_tokenizer(info), load_tokenizer(lite_info(info))
    assert isinstance(lite, LiteTokenizer) and not isinstance(ref, LiteTokenizer)
    assert json.loads(ref.backend_tokenizer.to_str()) == json.loads(lite.backend_tokenizer.to_str())
    assert ref(TEXTS, verbose=False).input_ids == lite(TEXTS).input_ids
    assert (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id) == (lite.bos_token_id, lite.eos_token_id,
                                                                      lite.pad_token_id)
    for ids in ref(TEXTS, verbose=False).input_ids:
        assert ref.decode(ids) == lite.decode(ids)


def test_a_configuration_the_lite_modules_do_not_build_keeps_the_libraries(tiny_info):
    import dataclasses

    other = dataclasses.replace(tiny_info, unet_config={**tiny_info.unet_config, "use_linear_projection": True})
    assert unsupported(other) == "unet use_linear_projection=True"
    assert not lite_info(other).lite
    from sdfast.model.info import DATA_DIR

    assert not lite_info(resolve_model("tiny").with_loras([DATA_DIR / "loras" / "toy-orange.safetensors"])).lite
    assert lite_info(resolve_model("random-sd15")).lite is False  # no weights in the folder


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_quick_start_image_is_the_libraries_image(dtype):
    from sdfast.request import Request
    from sdfast.runtime import load

    info = resolve_model("tiny")
    req = Request.build(info, prompt="a red circle on a blue background", scheduler="euler", steps=20, seed=0)
    images = [np.asarray(load(i, dtype=dtype).run(req, progress=False).images[0]) for i in (info, lite_info(info))]
    assert np.array_equal(*images)


def test_lite_loading_imports_neither_diffusers_nor_transformers():
    code = ("import sys, torch; from sdfast.model.info import resolve_model, load_torch_modules, load_tokenizer; "
            "from sdfast.model.lite import lite_info; info = lite_info(resolve_model('tiny')); m = load_torch_modules(info, torch.bfloat16); "
            "t = load_tokenizer(info); print(t(['a red circle']).input_ids, type(m['unet']).__name__, "
            "[k for k in ('diffusers', 'transformers', 'torch._dynamo') if k in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("LiteUNet []"), out
