"""Inpainting, more: guidance_until with a 9-channel U-Net (held to diffusers with its
guidance dropped in a callback, and the uncond half of the mask channels dropped with the text
rows), and masks near the edges: all black, all white, another size than the image, OpenAI's
transparent-means-edit RGBA masks, and bad masks refused in one line naming ``mask``."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from inpaint_models import build_tiny_inpaint, drop_guidance_after, run_reference
from PIL import Image
from test_guidance_until import RowCounter
from test_inpaint import diffusers_inpaint
from test_pipeline_parity import assert_parity

import sdfast
from sdfast.errors import InvalidArgument, MissingFile
from sdfast.request import Request
from sdfast.runtime import Pipeline

PROMPT = "a yellow circle on a blue background"


@pytest.fixture(scope="module")
def nine_info(tmp_path_factory):
    from sdfast.model.info import resolve_model

    folder = build_tiny_inpaint(sdfast.load("tiny").info.path, tmp_path_factory.mktemp("inp") / "tiny-inpaint", 1)
    return resolve_model(str(folder))


@pytest.fixture(scope="module")
def nine(nine_info):
    return sdfast.load(nine_info), diffusers_inpaint(nine_info)


@pytest.fixture(scope="module")
def blend(tiny_pipe, tiny_info):
    return tiny_pipe, diffusers_inpaint(tiny_info)


def init_image(seed: int = 0, size: int = 64) -> Image.Image:
    """Smooth colour blobs, different per seed."""
    y, x = np.mgrid[0:size, 0:size] / size
    a, b = 4 + seed, 5 + 2 * seed
    rgb = np.stack([np.sin(a * x) * 0.5 + 0.5, np.cos(b * y) * 0.5 + 0.5, (x + y + 0.1 * seed) % 1], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def box(size: int = 64, lo: int = 16, hi: int = 48) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[lo:hi, lo:hi] = True
    return m


def grey(m: np.ndarray) -> Image.Image:
    return Image.fromarray(np.where(m, 255, 0).astype(np.uint8), "L")


def compare(pair, mask, scheduler="euler", strength=1.0, guidance=7.5, seed=3, steps=6, image=None, **extra):
    pipe, ref = pair
    image = init_image() if image is None else image
    lat, img = run_reference(ref, pipe.info.scheduler_config, scheduler, seed, prompt=PROMPT, image=image,
                             mask_image=mask, strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                             height=64, width=64, **extra)
    out = pipe.generate(PROMPT, image=image, mask=mask, strength=strength, steps=steps, seed=seed,
                        scheduler=scheduler, guidance_scale=guidance)
    assert_parity(out, lat, img)
    return out


# guidance_until ------------------------------------------------------------------------------

@pytest.mark.parametrize("which,scheduler,strength", [("nine", "euler", 1.0), ("nine", "dpmpp_2m", 0.6),
                                                      ("blend", "euler_a", 1.0)])
def test_guidance_until_matches_diffusers_dropping_guidance_in_a_callback(request, which, scheduler, strength):
    pipe, ref = request.getfixturevalue(which)
    steps, until = 10, 0.4
    ran = min(int(steps * strength), steps)
    cut = int(np.ceil(until * ran))  # relative to the first step that runs
    callback, keys = drop_guidance_after(cut - 1, ("prompt_embeds", "mask", "masked_image_latents"))
    image, mask = init_image(), grey(box())
    lat, img = run_reference(ref, pipe.info.scheduler_config, scheduler, 4, prompt=PROMPT, image=image,
                             mask_image=mask, strength=strength, num_inference_steps=steps, guidance_scale=7.5,
                             height=64, width=64, callback_on_step_end=callback,
                             callback_on_step_end_tensor_inputs=keys)
    out = pipe.generate(PROMPT, image=image, mask=mask, strength=strength, steps=steps, seed=4, scheduler=scheduler,
                        guidance_until=until)
    assert out.request.guidance_cut == out.request.start_step + cut
    assert_parity(out, lat, img)


class ExtraChannels(RowCounter):
    """A U-Net engine that records the mask and masked-image channels of every call."""

    def __init__(self, engine):
        super().__init__(engine)
        self.seen = []

    def __call__(self, **inputs):
        self.seen.append(inputs["sample"][:, 4:].clone())
        return super().__call__(**inputs)


def test_guidance_until_drops_the_uncond_half_of_the_mask_channels(nine):
    pipe, _ = nine
    spy = ExtraChannels(pipe.engines["unet"])
    counted = Pipeline(pipe.info, {**pipe.engines, "unet": spy}, pipe.device, pipe.precision, "torch",
                       tokenizer=pipe.tokenizer)
    seen = spy.seen
    masks = [grey(box(lo=0, hi=32)), grey(box(lo=32, hi=64))]
    reqs = [Request.build(pipe.info, prompt=PROMPT, image=init_image(i), mask=m, steps=6, seed=i, scheduler="euler",
                          guidance_until=0.5) for i, m in enumerate(masks)]
    outs = counted.run_batch(reqs)
    h = 64 // pipe.info.vae_scale_factor
    assert [tuple(x.shape) for x in seen] == [(4, 5, h, h)] * 3 + [(2, 5, h, h)] * 3  # [u0 u1 c0 c1], then [c0 c1]
    assert torch.equal(seen[0][:2], seen[0][2:])  # the uncond and cond rows carry the same mask and image
    assert torch.equal(seen[3], seen[0][2:]) and torch.equal(seen[5], seen[0][2:])  # after the cut: the cond half
    assert not torch.equal(seen[0][0], seen[0][1])  # each row its own mask
    full = [pipe.run(Request.build(pipe.info, prompt=PROMPT, image=init_image(i), mask=m, steps=6, seed=i,
                                   scheduler="euler")) for i, m in enumerate(masks)]
    for out, ref in zip(outs, full, strict=True):
        assert torch.isfinite(out.latents).all()
        assert (out.latents - ref.latents).abs().max().item() > 1e-3
        assert any(a.startswith("guidance_until 0.5") for a in out.approximations)


# masks near the edges -----------------------------------------------------------------------

def test_an_all_black_mask_gives_back_the_init_image(blend, nine):
    """Nothing repainted: blending ends on the init image's latents exactly (its posterior sample,
    the seed's first draw), for any prompt; the 9-channel U-Net equals diffusers."""
    pipe, _ = blend
    image, black = init_image(), grey(np.zeros((64, 64), dtype=bool))
    out = compare(blend, black, scheduler="euler_a")
    x = pipe.image_tensor(image, 64, 64)
    want = pipe.encode_pixels(x, torch.Generator("cpu").manual_seed(3))
    assert torch.equal(out.latents, want)
    other = pipe.generate("a green square", image=image, mask=black, steps=6, seed=3, scheduler="euler_a")
    assert torch.equal(other.latents, want)
    compare(nine, black, scheduler="ddim")


@pytest.mark.parametrize("which", ["blend", "nine"])
def test_an_all_white_mask_repaints_everything(request, which):
    """Everything repainted: equal to diffusers, and at strength 1 independent of the init image
    (a 9-channel U-Net sees an all-grey masked image; blending keeps nothing)."""
    pair = request.getfixturevalue(which)
    white = grey(np.ones((64, 64), dtype=bool))
    out = compare(pair, white, scheduler="dpmpp_2m")
    other = pair[0].generate(PROMPT, image=init_image(5), mask=white, steps=6, seed=3, scheduler="dpmpp_2m")
    assert torch.equal(other.latents, out.latents)
    kept = pair[0].generate(PROMPT, image=init_image(5), mask=grey(box()), steps=6, seed=3, scheduler="dpmpp_2m")
    assert not torch.equal(kept.latents, out.latents)  # with a kept region the init image matters


@pytest.mark.parametrize("size", [(16, 16), (80, 48)], ids=["smaller", "other-aspect"])
def test_a_mask_of_another_size_is_resized_like_diffusers(blend, size):
    w, h = size
    m = np.zeros((h, w), dtype=np.uint8)
    m[h // 4 : 3 * h // 4, w // 5 : 3 * w // 5] = 255
    mask = Image.fromarray(m, "L")
    out = compare(blend, mask)
    resized = blend[0].generate(PROMPT, image=init_image(), mask=mask.resize((64, 64), Image.LANCZOS), steps=6,
                                seed=3, scheduler="euler")
    assert torch.equal(resized.latents, out.latents)


def openai_mask(hole: np.ndarray, image: Image.Image) -> Image.Image:
    """An OpenAI Images API mask: the image itself, fully transparent where it is to be edited."""
    rgb = np.asarray(image.convert("RGB"))
    return Image.fromarray(np.dstack([rgb, np.where(hole, 0, 255).astype(np.uint8)]), "RGBA")


def test_transparent_pixels_of_an_rgba_mask_are_repainted_and_only_they(nine):
    """As the OpenAI API reads a mask: alpha 0 edits, every opaque pixel is kept whatever its
    colour (composited over white and made grey, the bright kept pixels would be repainted)."""
    pipe, _ = nine
    image = init_image()
    kw = dict(image=image, steps=4, seed=2, scheduler="euler")
    want = pipe.generate(PROMPT, mask=grey(box()), **kw)
    rgba = openai_mask(box(), image)
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    for mask in (rgba, buf.getvalue(), np.asarray(rgba), rgba.convert("LA")):
        assert torch.equal(pipe.generate(PROMPT, mask=mask, **kw).latents, want.latents)
    gone = pipe.generate(PROMPT, mask=openai_mask(np.ones((64, 64), dtype=bool), image), **kw)
    assert torch.equal(gone.latents, pipe.generate(PROMPT, mask=grey(np.ones((64, 64), dtype=bool)), **kw).latents)
    # no transparency: read by its grey values, as diffusers reads an RGBA mask
    opaque = grey(box()).convert("RGBA")
    assert torch.equal(pipe.generate(PROMPT, mask=opaque, **kw).latents, want.latents)


@pytest.mark.filterwarnings("ignore:All-NaN slice")
@pytest.mark.parametrize("mask,message", [
    (b"not an image at all", "mask: "),
    (b"", "mask: the bytes are empty"),
    (np.full((64, 64), np.nan, dtype=np.float32), "mask: a float array must hold finite values"),
    (np.zeros((4, 64, 64), dtype=np.uint8), "mask: the array has shape (4, 64, 64), channel-first"),
    (np.zeros((2, 64, 64, 1), dtype=np.uint8), "mask: the array has shape (2, 64, 64, 1); pass one image"),
    (np.zeros((64, 64), dtype=np.int64), "mask: the array's dtype is int64"),
    (3.5, "mask: a builtins.float is not an image"),
    ("/no/such/mask.png", "mask: no file at"),
], ids=["garbage-bytes", "empty-bytes", "nan", "channel-first", "batch", "int64", "float", "missing-file"])
def test_a_bad_mask_is_refused_in_one_line_naming_mask(tiny_pipe, mask, message):
    with pytest.raises((InvalidArgument, MissingFile)) as e:
        tiny_pipe.generate(PROMPT, image=init_image(), mask=mask, steps=2)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
