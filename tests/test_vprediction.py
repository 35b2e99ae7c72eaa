"""Tier 2 on a v-prediction model (SD 2.x 768's convention): sdfast's eager pipeline equals
diffusers' StableDiffusionPipeline / Img2ImgPipeline for every scheduler, txt2img and img2img."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_pipeline_parity import assert_parity, run_diffusers

import sdfast
from sdfast.schedulers import SCHEDULERS


@pytest.fixture(scope="module")
def vpred_folder(tiny_info, tmp_path_factory):
    dest = tmp_path_factory.mktemp("vpred") / "tiny-vpred"
    shutil.copytree(tiny_info.path, dest)
    cfg_path = dest / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1)  # SD 2.1's
    cfg_path.write_text(json.dumps(cfg))
    return dest


@pytest.fixture(scope="module")
def vpred(vpred_folder):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(vpred_folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return sdfast.load(vpred_folder), ref


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_v_prediction_txt2img_matches_diffusers(vpred, scheduler):
    pipe, ref = vpred
    assert pipe.info.scheduler_config["prediction_type"] == "v_prediction"
    lat, img = run_diffusers(ref, pipe.info, scheduler, prompt="a red circle", num_inference_steps=6,
                             guidance_scale=7.5, height=64, width=64, seed=2)
    out = pipe.generate("a red circle", steps=6, guidance_scale=7.5, seed=2, scheduler=scheduler)
    assert_parity(out, lat, img)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_v_prediction_img2img_matches_diffusers(vpred, scheduler):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe, ref = vpred
    img2img = StableDiffusionImg2ImgPipeline(**ref.components)
    img2img.set_progress_bar_config(disable=True)
    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    lat, img = run_diffusers(img2img, pipe.info, scheduler, prompt="a green square", image=init, strength=0.6,
                             num_inference_steps=8, guidance_scale=5.0, seed=4)
    out = pipe.generate("a green square", image=init, strength=0.6, steps=8, guidance_scale=5.0, seed=4,
                        scheduler=scheduler)
    assert_parity(out, lat, img)


def test_v_prediction_changes_the_result(vpred, tiny_pipe):
    """The same weights read as v instead of eps give another image: the config is honoured."""
    pipe, _ = vpred
    a = pipe.generate("a red circle", steps=4, seed=0, scheduler="euler").latents
    b = tiny_pipe.generate("a red circle", steps=4, seed=0, scheduler="euler").latents
    assert (a - b).abs().max() > 1e-2
