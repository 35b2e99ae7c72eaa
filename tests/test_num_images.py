"""Several images per prompt (diffusers' ``num_images_per_prompt``): tier 2 against diffusers
with the same seed, and each distinct text encoded once."""

from __future__ import annotations

import pytest
from test_pipeline_parity import assert_parity, run_diffusers

from sdfast.engines.base import WrappedEngine
from sdfast.errors import InvalidArgument


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("scheduler", ["euler", "euler_a"])
def test_num_images_per_prompt_matches_diffusers(tiny_pipe, diffusers_pipe, tiny_info, n, scheduler):
    kw = dict(prompt=["a red circle", "a blue square"], negative_prompt=["", "green"], guidance_scale=7.5,
              height=64, width=64)
    lat, img = run_diffusers(diffusers_pipe, tiny_info, scheduler, num_inference_steps=5, seed=9,
                             num_images_per_prompt=n, **kw)
    out = tiny_pipe.generate(kw.pop("prompt"), steps=5, seed=9, scheduler=scheduler, num_images_per_prompt=n, **kw)
    assert len(out.images) == 2 * n and out.request.prompts[:n] == ["a red circle"] * n
    assert_parity(out, lat, img)
    assert out.metadata(2 * n - 1)["prompt"] == "a blue square"


def test_each_distinct_text_is_encoded_once(tiny_pipe):
    rows = []
    encoder = tiny_pipe.engines["text_encoder"]

    def spy(**inputs):
        rows.append(inputs["input_ids"].shape[0])
        return encoder(**inputs)

    tiny_pipe.engines["text_encoder"] = WrappedEngine(encoder, spy)
    try:
        tiny_pipe.generate("a cat", steps=2, num_images_per_prompt=4)
    finally:
        tiny_pipe.engines["text_encoder"] = encoder
    assert rows == [2]  # "" and "a cat", not 8 rows


@pytest.mark.parametrize("n", [0, 65, 1.5, True])
def test_bad_num_images_is_refused_naming_the_argument(tiny_pipe, n):
    with pytest.raises(InvalidArgument, match="^num_images_per_prompt: must be an integer from 1 to 64"):
        tiny_pipe.generate("x", steps=2, num_images_per_prompt=n)
