"""Tier 2: our eager pipeline equals diffusers' own pipelines on the same folder, scheduler and seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdfast.bench import diffusers_scheduler
from sdfast.schedulers import SCHEDULERS

LATENT_RTOL = 1e-4  # max |ours - ref| relative to max |ref|
IMAGE_ATOL = 2  # on 0..255


def run_diffusers(pipe, info, scheduler, **kw):
    pipe.scheduler = diffusers_scheduler(scheduler, info.scheduler_config)
    seed = kw.pop("seed")
    lat = pipe(**kw, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
    img = pipe(**kw, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images
    return lat, (img * 255).round().astype(np.uint8)


def assert_parity(out, ref_latents, ref_images):
    err = (out.latents - ref_latents).abs().max().item()
    scale = ref_latents.abs().max().item()
    print(f"latents max abs diff {err:.3g} (ref max {scale:.3g})")
    assert err <= LATENT_RTOL * scale
    ours = np.stack([np.asarray(im) for im in out.images]).astype(int)
    pix = np.abs(ours - ref_images.astype(int))
    print(f"pixels max diff {pix.max()} mean {pix.mean():.4f}")
    assert pix.max() <= IMAGE_ATOL


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_txt2img_matches_diffusers_for_every_scheduler(tiny_pipe, diffusers_pipe, tiny_info, scheduler):
    kw = dict(prompt="a red circle on a blue background", num_inference_steps=8, guidance_scale=7.5,
              height=64, width=64, seed=3)
    lat, img = run_diffusers(diffusers_pipe, tiny_info, scheduler, **dict(kw))
    out = tiny_pipe.generate(kw["prompt"], steps=8, guidance_scale=7.5, seed=3, scheduler=scheduler)
    assert_parity(out, lat, img)


@pytest.mark.parametrize(
    "case",
    [
        dict(height=64, width=96),  # non-square
        dict(negative_prompt="blurry, green"),
        dict(prompt=["a red circle", "a yellow square"], negative_prompt=["", "white"]),  # batch of two
        dict(guidance_scale=1.0),  # no guidance: the U-Net runs on the conditional half only
    ],
    ids=["non-square", "negative-prompt", "batch-of-two", "guidance-1"],
)
def test_txt2img_variants_match_diffusers(tiny_pipe, diffusers_pipe, tiny_info, case):
    args = dict(prompt="a blue triangle", guidance_scale=7.5, height=64, width=64) | case
    lat, img = run_diffusers(diffusers_pipe, tiny_info, "euler", num_inference_steps=6, seed=11, **args)
    out = tiny_pipe.generate(args.pop("prompt"), steps=6, seed=11, scheduler="euler", **args)
    assert_parity(out, lat, img)


@pytest.mark.parametrize("scheduler", ["lms", "euler_a", "ddim", "dpmpp_2m"])
def test_img2img_matches_diffusers(tiny_pipe, tiny_info, diffusers_pipe, scheduler):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**diffusers_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    lat, img = run_diffusers(pipe, tiny_info, scheduler, prompt="a green square", image=init, strength=0.6,
                             num_inference_steps=10, guidance_scale=7.5, seed=5)
    out = tiny_pipe.generate("a green square", image=init, strength=0.6, steps=10, seed=5, scheduler=scheduler)
    assert out.steps == 6
    assert_parity(out, lat, img)


def test_same_seed_same_pixels_other_seed_other_pixels(tiny_pipe):
    a = tiny_pipe.generate("a white square", steps=4, seed=7).images[0]
    b = tiny_pipe.generate("a white square", steps=4, seed=7).images[0]
    c = tiny_pipe.generate("a white square", steps=4, seed=8).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_seed_zero_is_a_seed_and_warmups_do_not_shift_it(tiny_pipe):
    first = tiny_pipe.generate("x", steps=2, seed=0, scheduler="euler_a").latents
    tiny_pipe.generate("x", steps=2, seed=1, scheduler="euler_a")
    again = tiny_pipe.generate("x", steps=2, seed=0, scheduler="euler_a").latents
    assert torch.equal(first, again)


def test_guidance_one_equals_cond_only_and_differs_from_guided(tiny_pipe):
    calls = []
    unet = tiny_pipe.engines["unet"]

    def spy(**inputs):
        calls.append(inputs["sample"].shape[0])
        return unet(**inputs)

    tiny_pipe.engines["unet"] = spy
    try:
        plain = tiny_pipe.generate("a cat", steps=3, guidance_scale=1.0).latents
        assert calls == [1, 1, 1]  # half the compute: batch B, not 2B
        guided = tiny_pipe.generate("a cat", steps=3, guidance_scale=7.5).latents
        assert calls[3:] == [2, 2, 2]
    finally:
        tiny_pipe.engines["unet"] = unet
    assert not torch.allclose(plain, guided)


def test_callback_sees_every_step_in_order(tiny_pipe):
    seen = []
    out = tiny_pipe.generate("a", steps=5, callback=lambda i, t, lat: seen.append((i, lat.shape)))
    assert [i for i, _ in seen] == list(range(5))
    assert all(s == out.latents.shape for _, s in seen)
    assert {"text_encoder", "unet", "scheduler", "vae_decode", "total"} <= set(out.timings)
