"""Inpainting: tier 2 against diffusers' StableDiffusionInpaintPipeline for ordinary
U-Nets (latent blending) and 9-channel inpaint U-Nets, several schedulers and strengths; on the
toy model the masked shape takes the new colour and the kept region stays; refusals in one line;
rows of a batch with different masks each their own; tier 1 on ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from inpaint_models import build_tiny_inpaint
from PIL import Image
from test_pipeline_parity import LATENT_RTOL, assert_parity, run_diffusers

import sdfast
from sdfast import toy
from sdfast.cli import main
from sdfast.errors import InvalidArgument, MissingFile

SOURCE = "a red circle on a blue background"
TARGET = "a yellow circle on a blue background"


@pytest.fixture(scope="module")
def toy_pipe():
    return sdfast.load("tiny")  # the trained toy model (tiny_pipe is a random-weights one)


@pytest.fixture(scope="module")
def source_image(toy_pipe):
    return toy_pipe.generate(SOURCE, steps=20, seed=0, scheduler="euler").images[0]


def box_mask(size: int = 64, lo: int = 16, hi: int = 48, mode: str = "L") -> Image.Image:
    m = Image.new("L", (size, size), 0)
    m.paste(255, (lo, lo, hi, hi))
    return m.convert(mode)


@pytest.fixture(scope="module")
def inpaint_info(tmp_path_factory):
    from sdfast.model.info import resolve_model

    folder = build_tiny_inpaint(sdfast.load("tiny").info.path, tmp_path_factory.mktemp("inp") / "tiny-inpaint")
    return resolve_model(str(folder))


@pytest.fixture(scope="module")
def inpaint_pipe(inpaint_info):
    return sdfast.load(inpaint_info)


def diffusers_inpaint(info):
    from diffusers import StableDiffusionInpaintPipeline

    from sdfast.measure.bench import diffusers_pipeline
    from sdfast.model.info import load_torch_modules

    pipe = StableDiffusionInpaintPipeline(**diffusers_pipeline(info, load_torch_modules(info), "euler").components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ref_blend(tiny_info):
    return diffusers_inpaint(tiny_info)


@pytest.fixture(scope="module")
def ref_nine(inpaint_info):
    return diffusers_inpaint(inpaint_info)


@pytest.mark.parametrize("scheduler,strength,guidance", [
    ("euler", 1.0, 7.5), ("euler_a", 1.0, 7.5), ("ddim", 0.6, 7.5), ("dpmpp_2m", 1.0, 7.5), ("lms", 0.7, 7.5),
    ("euler", 1.0, 1.0),
])
def test_latent_blending_matches_diffusers(tiny_pipe, tiny_info, ref_blend, source_image, scheduler, strength,
                                           guidance):
    mask = box_mask()
    lat, img = run_diffusers(ref_blend, tiny_info, scheduler, prompt=TARGET, image=source_image, mask_image=mask,
                             strength=strength, num_inference_steps=10, guidance_scale=guidance, seed=3,
                             height=64, width=64)
    out = tiny_pipe.generate(TARGET, image=source_image, mask=mask, strength=strength, steps=10, seed=3,
                             scheduler=scheduler, guidance_scale=guidance)
    assert_parity(out, lat, img)


@pytest.mark.parametrize("scheduler,strength", [("euler", 1.0), ("euler_a", 0.7), ("ddim", 1.0), ("dpmpp_2m", 0.7)])
def test_nine_channel_unet_matches_diffusers(inpaint_pipe, inpaint_info, ref_nine, source_image, scheduler, strength):
    mask = box_mask(lo=8, hi=40)
    lat, img = run_diffusers(ref_nine, inpaint_info, scheduler, prompt=TARGET, image=source_image, mask_image=mask,
                             strength=strength, num_inference_steps=8, guidance_scale=7.5, seed=4, height=64, width=64)
    out = inpaint_pipe.generate(TARGET, image=source_image, mask=mask, strength=strength, steps=8, seed=4,
                                scheduler=scheduler)
    assert_parity(out, lat, img)
    assert out.metadata()["inpainting"] == "9-channel U-Net"


def test_masks_of_any_mode_and_size_are_read_like_diffusers(tiny_pipe, tiny_info, ref_blend, source_image):
    """An RGBA mask at twice the size, with a soft edge: made grey, resized, binarized at 0.5."""
    big = np.zeros((128, 128), dtype=np.uint8)
    big[20:100, 30:90] = 200
    big[20:100, 88:90] = 100  # below the threshold after resizing: kept
    rgba = Image.fromarray(np.stack([big, big, big, np.full_like(big, 255)], axis=-1), "RGBA")
    lat, img = run_diffusers(ref_blend, tiny_info, "euler", prompt=TARGET, image=source_image, mask_image=rgba,
                             num_inference_steps=6, guidance_scale=7.5, seed=2, height=64, width=64)
    out = tiny_pipe.generate(TARGET, image=source_image, mask=rgba, steps=6, seed=2, scheduler="euler")
    assert_parity(out, lat, img)


def test_the_masked_shape_takes_the_new_colour_and_the_rest_is_kept(toy_pipe, source_image):
    assert toy.classify(source_image)[:2] == ("red", "blue")
    out = toy_pipe.generate(TARGET, image=source_image, mask=box_mask(), steps=20, seed=1, scheduler="euler",
                            paste_unmasked=True)
    got = out.images[0]
    assert toy.classify(got)[0] == "yellow"
    keep = np.asarray(box_mask()) < 128
    diff = np.abs(np.asarray(got).astype(int) - np.asarray(source_image).astype(int))
    assert diff[keep].max() <= 2 and diff[~keep].max() > 50
    plain = toy_pipe.generate(TARGET, image=source_image, mask=box_mask(), steps=20, seed=1, scheduler="euler")
    assert np.array_equal(np.asarray(plain.images[0])[~keep], np.asarray(got)[~keep])  # the paste is all it changes
    assert out.metadata()["inpainting"] == "latent blending" and out.metadata()["paste_unmasked"] is True


def test_without_a_mask_nothing_changes_and_strength_defaults_differ(tiny_pipe, source_image):
    from sdfast.request import Request

    info = tiny_pipe.info
    assert Request.build(info, prompt="x", image=source_image).strength == 0.8
    assert Request.build(info, prompt="x", image=source_image, mask=box_mask()).strength == 1.0
    assert Request.build(info, prompt="x", image=source_image, mask=box_mask(), strength=0.5).strength == 0.5
    assert not Request.build(info, prompt="x", image=source_image).inpainting


def test_rows_with_different_masks_each_get_their_own(tiny_pipe, source_image):
    from sdfast.request import Request

    masks = [box_mask(lo=0, hi=32), box_mask(lo=32, hi=64)]
    reqs = [Request.build(tiny_pipe.info, prompt=TARGET, image=source_image, mask=m, seed=s, steps=6,
                          scheduler="euler_a") for m, s in zip(masks, (7, 8), strict=True)]
    together = tiny_pipe.run_batch(reqs)
    for req, out in zip(reqs, together, strict=True):
        alone = tiny_pipe.run(req)
        assert (out.latents - alone.latents).abs().max().item() <= LATENT_RTOL * alone.latents.abs().max().item()
    assert not torch.allclose(together[0].latents, together[1].latents)
    plain = Request.build(tiny_pipe.info, prompt=TARGET, image=source_image, strength=1.0, steps=6, scheduler="euler_a")
    with pytest.raises(InvalidArgument, match="inpainting"):
        tiny_pipe.run_batch([reqs[0], plain])  # img2img and inpainting never share a loop


@pytest.mark.parametrize("kwargs,message", [
    (dict(mask="MASK"), "mask: a mask marks what to repaint in an init image, and no image was given"),
    (dict(image="IMG", paste_unmasked=True), "paste_unmasked: copies the init image's kept pixels, and there is no mask"),
    (dict(image="IMG", mask="MASK", paste_unmasked=1), "paste_unmasked: must be True or False"),
    (dict(image="IMG", mask=[[1, 2]]), "mask: a builtins.list is not an image"),
    (dict(image="IMG", mask="/no/such/mask.png"), "mask: no file at"),
    (dict(image="IMG", mask="MASK", strength=0), "strength: must be in"),
])
def test_bad_inpainting_requests_are_refused_in_one_line(tiny_pipe, source_image, kwargs, message):
    kwargs = {k: source_image if v == "IMG" else box_mask() if v == "MASK" else v for k, v in kwargs.items()}
    with pytest.raises((InvalidArgument, MissingFile)) as e:
        tiny_pipe.generate(TARGET, steps=2, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_an_inpainting_unet_refuses_text_to_image(inpaint_pipe, source_image):
    for kwargs in ({}, {"image": source_image}):
        with pytest.raises(InvalidArgument, match="has an inpainting U-Net .*9 input channels.*pass image= and mask="):
            inpaint_pipe.generate(TARGET, steps=2, **kwargs)


def test_cli_mask(source_image, tmp_path, capsys):
    src, mask, out = tmp_path / "src.png", tmp_path / "mask.png", tmp_path / "out.png"
    source_image.save(src)
    box_mask().save(mask)
    assert main(["generate", TARGET, "--model", "tiny", "--init-image", str(src), "--mask", str(mask),
                 "--steps", "20", "--scheduler", "euler", "--seed", "1", "--paste-unmasked", "--out", str(out)]) == 0
    capsys.readouterr()  # the first run's progress bar
    meta = json.loads(Image.open(out).info["sdfast"])
    assert meta["inpainting"] == "latent blending" and meta["strength"] == 1.0
    assert toy.classify(Image.open(out).convert("RGB"))[0] == "yellow"
    assert main(["generate", TARGET, "--model", "tiny", "--mask", str(mask), "--steps", "2",
                 "--out", str(tmp_path / "no.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no image was given" in err[0] and not (tmp_path / "no.png").exists()


@pytest.mark.parametrize("backend", ["onnxruntime", pytest.param("openvino", marks=pytest.mark.slow)])
@pytest.mark.parametrize("which", ["blend", "nine"])
def test_engines_inpaint_at_tier_1(backend, which, tiny_pipe, inpaint_pipe, tiny_info, inpaint_info, source_image,
                                   tmp_path):
    """Every exported backend inpaints (the 9-channel U-Net's spec exported and loaded like the
    others): its latents within tier 1 of the eager run's, one request with rows that differ."""
    from sdfast.model.components import ShapeProfile

    info, eager = (tiny_info, tiny_pipe) if which == "blend" else (inpaint_info, inpaint_pipe)
    profile = ShapeProfile.static(2, 64, 64)
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
        from sdfast.export.onnx import export_onnx

        engines = export_onnx(info, tmp_path / "engines", profile)
    else:
        pytest.importorskip("openvino")
        from sdfast.export.openvino import export_openvino

        engines = export_openvino(info, tmp_path / "engines", profile)
    exported = sdfast.load(info, backend=backend, engines_dir=engines)
    kw = dict(image=source_image, mask=box_mask(), steps=6, seed=9, scheduler="euler", num_images_per_prompt=2)
    want, got = eager.generate(TARGET, **kw), exported.generate(TARGET, **kw)
    assert (got.latents - want.latents).abs().max().item() <= LATENT_RTOL * 10 * want.latents.abs().max().item()
    assert (got.latents[0] - got.latents[1]).abs().max().item() > 1e-2
