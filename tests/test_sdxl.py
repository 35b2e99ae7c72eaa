"""SDXL through the same loop: tier 2 against diffusers' StableDiffusionXLPipeline (and its
img2img pipeline) on a tiny SDXL folder, every scheduler and the variants the issue names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_pipeline_parity import assert_parity

import sdfast
from sdfast.errors import InvalidArgument
from sdfast.measure.bench import diffusers_scheduler
from sdfast.schedulers import SCHEDULERS


@pytest.fixture(scope="session")
def sdxl(sdxl_folder):
    from diffusers import StableDiffusionXLPipeline

    ref = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return sdfast.load(sdxl_folder), ref


def run_ref(pipe, config: dict, scheduler: str, seed: int, **kw):
    pipe.scheduler = diffusers_scheduler(scheduler, config)  # from the folder's config, not the last test's
    if scheduler == "tcd":  # diffusers steps TCD with the pipeline's eta as its gamma
        from sdfast.schedulers.tcd import read_gamma

        kw.setdefault("eta", read_gamma(config))
    lat = pipe(**kw, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
    img = pipe(**kw, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images
    return lat, (img * 255).round().astype(np.uint8)


def test_the_folder_is_read_as_sdxl(sdxl):
    pipe, _ = sdxl
    info = pipe.info
    assert info.family == "sdxl" and list(info.specs) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder",
                                                          "vae_encoder"]
    assert info.text_hidden_size == 64 and info.text_dims == {"D1": 32, "D2": 32, "P": 32}
    assert info.native_size == 64 and info.scaling_factor == 0.13025  # from the configs, not literals
    assert info.force_zeros_for_empty_prompt and info.vae_force_upcast


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_txt2img_matches_diffusers_for_every_scheduler(sdxl, scheduler):
    pipe, ref = sdxl
    lat, img = run_ref(ref, pipe.info.scheduler_config, scheduler, 3, prompt="a red circle", num_inference_steps=5, guidance_scale=6.0)
    out = pipe.generate("a red circle", steps=5, guidance_scale=6.0, seed=3, scheduler=scheduler)
    assert_parity(out, lat, img)


@pytest.mark.parametrize(
    "case",
    [
        dict(negative_prompt="blurry, green"),
        dict(prompt_2="a blue square", negative_prompt="x", negative_prompt_2="white"),
        dict(height=64, width=96),
        dict(prompt=["a red circle", "a yellow square"], negative_prompt=["", "white"]),
        dict(guidance_scale=1.0),
        dict(original_size=(128, 96), crops_coords_top_left=(4, 8), target_size=(64, 80)),
        dict(negative_original_size=(32, 32), negative_target_size=(48, 48), negative_prompt="x"),
        dict(num_images_per_prompt=2),
    ],
    ids=["negative", "prompt-2", "non-square", "batch-of-two", "guidance-1", "sizes", "negative-sizes", "2-images"],
)
def test_variants_match_diffusers(sdxl, case):
    pipe, ref = sdxl
    args = dict(prompt="a blue triangle", guidance_scale=6.0) | case
    lat, img = run_ref(ref, pipe.info.scheduler_config, "euler", 11, num_inference_steps=4, **args)
    out = pipe.generate(args.pop("prompt"), steps=4, seed=11, scheduler="euler", **args)
    assert_parity(out, lat, img)


def test_empty_negative_is_zeros_only_when_none_was_given(sdxl):
    pipe, _ = sdxl
    kw = dict(steps=3, seed=1, scheduler="euler")
    none = pipe.generate("a red circle", **kw).latents
    empty = pipe.generate("a red circle", negative_prompt="", **kw).latents
    assert (none - empty).abs().max() > 1e-4  # "" is encoded; None gives zero embeddings (force_zeros)


@pytest.mark.parametrize("scheduler", ["euler", "lms", "ddim", "dpmpp_2m"])
def test_img2img_matches_diffusers(sdxl, scheduler):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe, ref = sdxl
    img2img = StableDiffusionXLImg2ImgPipeline(**ref.components)
    img2img.set_progress_bar_config(disable=True)
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    lat, img = run_ref(img2img, pipe.info.scheduler_config, scheduler, 5, prompt="a green square", image=init, strength=0.6,
                       num_inference_steps=10, guidance_scale=6.0)
    out = pipe.generate("a green square", image=init, strength=0.6, steps=10, guidance_scale=6.0, seed=5,
                        scheduler=scheduler)
    assert out.steps == 6
    assert_parity(out, lat, img)


def test_sdxl_only_arguments_are_refused_on_sd_models(tiny_pipe):
    with pytest.raises(InvalidArgument, match="^prompt_2: only SDXL models take it"):
        tiny_pipe.generate("a", prompt_2="b", steps=2)
    with pytest.raises(InvalidArgument, match="^original_size: only SDXL models take it"):
        tiny_pipe.generate("a", original_size=(64, 64), steps=2)
    with pytest.raises(InvalidArgument, match="^crops_coords_top_left: only SDXL models take it"):
        tiny_pipe.generate("a", crops_coords_top_left=[8, 0], steps=2)
    with pytest.raises(InvalidArgument, match="^original_size: only SDXL models take it"):
        tiny_pipe.generate("a", original_size=[0, 0], steps=2)  # (0, 0) is the default only for crops
    # the crops' default, as a tuple or as the list a JSON body gives, asks for nothing SDXL-only
    for crops in ((0, 0), [0, 0]):
        assert tiny_pipe.generate("a", crops_coords_top_left=crops, negative_crops_coords_top_left=crops,
                                  steps=2).steps == 2


def test_bad_sizes_are_refused_naming_the_argument(sdxl):
    pipe, _ = sdxl
    with pytest.raises(InvalidArgument, match=r"^target_size: must be two integers >= 0"):
        pipe.generate("a", target_size=(64,), steps=2)
    with pytest.raises(InvalidArgument, match="^prompt_2: a list must have one entry per prompt"):
        pipe.generate(["a", "b"], prompt_2=["c"], steps=2)


@pytest.fixture(scope="session")
def sdxl_onnx(sdxl_folder, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from sdfast.export.onnx import export_onnx
    from sdfast.model.components import ShapeProfile
    from sdfast.model.info import resolve_model

    info = resolve_model(sdxl_folder)
    return export_onnx(info, tmp_path_factory.mktemp("sdxl-onnx") / "tiny-sdxl", ShapeProfile.static(1, 64, 64))


def test_onnx_runtime_meets_tier_1_on_every_sdxl_component(sdxl_folder, sdxl_onnx):
    from sdfast.measure.parity import run_parity

    report = run_parity(str(sdxl_folder), "onnxruntime", str(sdxl_onnx), schedulers=("euler",), steps=4)
    names = {r.name.split(" ")[0] for r in report.rows}
    assert {"text_encoder", "text_encoder_2.hidden_states", "text_encoder_2.text_embeds", "unet", "vae_decoder",
            "vae_encoder", "pipeline"} <= names, names
    assert report.passed, report.table()


def test_a_tampered_sdxl_export_is_refused(sdxl_folder, sdxl_onnx, tmp_path):
    import shutil

    from sdfast.errors import ArtifactMismatch

    bad = tmp_path / "bad"
    shutil.copytree(sdxl_onnx, bad)
    target = bad / "text_encoder_2.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactMismatch, match="text_encoder_2.onnx does not match its sha256"):
        sdfast.load(sdxl_folder, backend="onnxruntime", engines=bad)


def test_the_graphed_step_equals_the_plain_loop_on_sdxl(sdxl, sdxl_folder):
    """The static-buffer step (captured on CUDA) carries SDXL's extra U-Net inputs too."""
    pipe, _ = sdxl
    graphed = sdfast.load(sdxl_folder, cuda_graphs=True)  # uncaptured on the CPU: the same buffers, plain calls
    for kw in (dict(scheduler="euler_a"), dict(scheduler="dpmpp_2m", negative_prompt="x", target_size=(48, 64))):
        ref = pipe.generate("a red circle", steps=3, seed=2, **kw)
        out = graphed.generate("a red circle", steps=3, seed=2, **kw)
        assert torch.equal(out.latents, ref.latents)


def test_cli_takes_the_sdxl_flags_and_records_them(sdxl_folder, tmp_path):
    from sdfast.cli import main
    from sdfast.media import read_png_metadata

    out = tmp_path / "x.png"
    rc = main(["generate", "a red circle", "--model", str(sdxl_folder), "--steps", "2", "--dtype", "fp32",
               "--prompt-2", "a blue square", "--original-size", "128", "96", "--crops-coords-top-left", "4", "8",
               "--target-size", "64", "80", "-o", str(out), "--quiet"])
    assert rc == 0
    meta = read_png_metadata(out)
    assert meta["prompt_2"] == "a blue square" and meta["original_size"] == [128, 96]
    assert meta["crops_coords_top_left"] == [4, 8] and meta["target_size"] == [64, 80]


@pytest.mark.slow  # OpenVINO converts five components (~20 s idle)
def test_openvino_meets_tier_1_on_every_sdxl_component(sdxl_folder, tmp_path):
    pytest.importorskip("openvino")
    from sdfast.export.openvino import OpenVinoExportOptions, export_openvino
    from sdfast.measure.parity import run_parity
    from sdfast.model.components import Precision, ShapeProfile
    from sdfast.model.info import resolve_model

    out = export_openvino(resolve_model(sdxl_folder), tmp_path / "ov", ShapeProfile.static(1, 64, 64),
                          OpenVinoExportOptions(precision=Precision.FP32))
    report = run_parity(str(sdxl_folder), "openvino", str(out), schedulers=("euler",), steps=4)
    assert any(r.name == "text_encoder_2.text_embeds" for r in report.rows)
    assert report.passed, report.table()
