"""SDXL inpainting: tier 2 against diffusers' StableDiffusionXLInpaintPipeline on tiny
SDXL folders, a 4-channel one (latent blending) and a 9-channel inpaint U-Net, several
schedulers, strengths 1 and below, guided and unguided, two images per prompt.

Both sides run the same computation because every argument that differs between them is
passed: diffusers' SDXL inpaint defaults ``strength`` to 0.9999 (sdfast, with a mask: 1; 0.9999
is run too, and is not "full strength": one step fewer, the start from the noised init image);
``requires_aesthetics_score`` is False (the six size ids, as SDXL and its 9-channel inpaint
U-Net take them; the refiner's aesthetic score is not modelled by sdfast); ``denoising_start`` is
not used; no watermark."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from inpaint_models import build_tiny_sdxl_pair, drop_guidance_after, run_reference
from PIL import Image
from test_pipeline_parity import assert_parity

import sdfast
from sdfast.errors import InvalidArgument

PROMPT = "a yellow circle on a blue background"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return build_tiny_sdxl_pair(tmp_path_factory.mktemp("sdxl-inpaint"))


def reference(folder):
    from diffusers import StableDiffusionXLInpaintPipeline

    ref = StableDiffusionXLInpaintPipeline.from_pretrained(folder, dtype=torch.float32, add_watermarker=False,
                                                           requires_aesthetics_score=False)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.fixture(scope="module")
def blend(folders):
    return sdfast.load(folders[0]), reference(folders[0])


@pytest.fixture(scope="module")
def nine(folders):
    return sdfast.load(folders[1]), reference(folders[1])


def init_image(h: int = 64, w: int = 64) -> Image.Image:
    """Smooth colour blobs (a VAE round trip keeps them), not noise."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    rgb = np.stack([np.sin(6 * x) * 0.5 + 0.5, np.cos(5 * y) * 0.5 + 0.5, x * y], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def box_mask(h: int = 64, w: int = 64, box=(12, 16, 44, 52)) -> Image.Image:
    m = Image.new("L", (w, h), 0)
    m.paste(255, box)
    return m


def compare(pair, scheduler, strength, guidance, n, seed=3, steps=6, image=None, mask=None, **extra):
    """sdfast and diffusers on the same arguments: parity asserted, sdfast's output returned."""
    pipe, ref = pair
    image = init_image() if image is None else image
    mask = box_mask() if mask is None else mask
    lat, img = run_reference(ref, pipe.info.scheduler_config, scheduler, seed, prompt=PROMPT, image=image,
                             mask_image=mask, strength=strength, num_inference_steps=steps,
                             guidance_scale=guidance, num_images_per_prompt=n, height=image.height,
                             width=image.width, **extra)
    out = pipe.generate(PROMPT, image=image, mask=mask, strength=strength, steps=steps, seed=seed,
                        scheduler=scheduler, guidance_scale=guidance, num_images_per_prompt=n, **extra)
    assert out.steps == min(int(steps * strength), steps)
    assert_parity(out, lat, img)
    if n > 1:  # each row its own draw: a batch that repeated one row would still match a repeated reference
        assert (out.latents[0] - out.latents[1]).abs().max().item() > 0.1
    return out


CASES = [  # scheduler, strength, guidance scale, images per prompt
    ("euler", 1.0, 6.0, 2),
    ("euler_a", 0.6, 6.0, 2),
    ("ddim", 1.0, 1.0, 2),  # unguided
    ("dpmpp_2m", 0.6, 6.0, 1),
    ("lms", 0.9999, 6.0, 1),  # diffusers' SDXL default strength: 5 of 6 steps, from the noised image
]


@pytest.mark.parametrize("scheduler,strength,guidance,n", CASES)
def test_latent_blending_matches_diffusers(blend, scheduler, strength, guidance, n):
    out = compare(blend, scheduler, strength, guidance, n)
    assert out.metadata()["inpainting"] == "latent blending"


@pytest.mark.parametrize("scheduler,strength,guidance,n", [
    ("euler", 1.0, 6.0, 2),
    ("euler_a", 0.6, 6.0, 2),
    ("ddim", 0.6, 1.0, 2),  # unguided
    ("dpmpp_2m", 1.0, 6.0, 1),
    ("lms", 0.9999, 6.0, 1),
])
def test_nine_channel_unet_matches_diffusers(nine, scheduler, strength, guidance, n):
    out = compare(nine, scheduler, strength, guidance, n)
    assert out.metadata()["inpainting"] == "9-channel U-Net"


@pytest.mark.parametrize("which", ["blend", "nine"])
def test_sdxl_conditioning_with_a_mask_matches_diffusers(request, which):
    """Non-square, a second prompt, a negative prompt and explicit sizes and crop: the inpaint
    pipeline's add_time_ids (six ids) and pooled embeddings as its txt2img ones."""
    compare(request.getfixturevalue(which), "euler", 1.0, 5.0, 1, seed=8, steps=5, image=init_image(64, 96),
            mask=box_mask(64, 96, (40, 8, 90, 40)), prompt_2="a red square", negative_prompt="blurry",
            original_size=(128, 96), crops_coords_top_left=(4, 8), target_size=(64, 80))


@pytest.mark.parametrize("sizes", [
    dict(crops_coords_top_left=(4, 8), negative_original_size=(32, 32), negative_target_size=(48, 48)),
    dict(negative_original_size=(32, 32)),
], ids=["crop-with-negative-sizes", "one-negative-size"])
def test_negative_size_ids_match_diffusers_inpaint(blend, sizes):
    """diffusers' SDXL img2img and inpaint pipelines build the negative ids unlike its txt2img
    one: each negative size defaults to its positive one, and the crop is the positive's."""
    compare(blend, "euler", 1.0, 5.0, 1, seed=8, steps=4, negative_prompt="blurry", **sizes)


def test_a_negative_crop_with_an_init_image_is_refused_as_having_no_effect(blend):
    pipe, _ = blend
    with pytest.raises(InvalidArgument, match=r"^negative_crops_coords_top_left: has no effect with an init image"):
        pipe.generate(PROMPT, image=init_image(), mask=box_mask(), steps=4, negative_crops_coords_top_left=(4, 4))
    pipe.generate(PROMPT, image=init_image(), mask=box_mask(), steps=2, negative_crops_coords_top_left=(0, 0))


@pytest.mark.parametrize("which,strength", [("nine", 1.0), ("blend", 0.6)])
def test_guidance_until_matches_diffusers_dropping_guidance_in_a_callback(request, which, strength):
    """guidance_until on SDXL inpainting: diffusers with the uncond halves of every per-row input
    (prompt embeddings, pooled embeddings, time ids, mask, masked-image latents) dropped after the
    cut equals sdfast's conditional-only steps."""
    pipe, ref = request.getfixturevalue(which)
    steps, until = 8, 0.5
    ran = min(int(steps * strength), steps)
    cut = -(-ran // 2)  # ceil(0.5 × the steps that run), relative to the first step that runs
    callback, keys = drop_guidance_after(cut - 1, ("prompt_embeds", "add_text_embeds", "add_time_ids", "mask",
                                                   "masked_image_latents"))
    image, mask = init_image(), box_mask()
    lat, img = run_reference(ref, pipe.info.scheduler_config, "euler_a", 5, prompt=PROMPT, image=image,
                             mask_image=mask, strength=strength, num_inference_steps=steps, guidance_scale=6.0,
                             num_images_per_prompt=2, callback_on_step_end=callback,
                             callback_on_step_end_tensor_inputs=keys)
    out = pipe.generate(PROMPT, image=image, mask=mask, strength=strength, steps=steps, seed=5,
                        scheduler="euler_a", guidance_scale=6.0, num_images_per_prompt=2, guidance_until=until)
    assert out.request.guidance_cut == out.request.start_step + cut
    assert_parity(out, lat, img)
    full = pipe.generate(PROMPT, image=image, mask=mask, strength=strength, steps=steps, seed=5,
                         scheduler="euler_a", guidance_scale=6.0, num_images_per_prompt=2)
    assert (full.latents - out.latents).abs().max().item() > 1e-3  # the callback did change diffusers' run
