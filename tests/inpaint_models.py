"""Tiny 9-channel inpainting models and diffusers reference runs for the inpainting tests: a
tiny folder with its U-Net replaced by a seeded random one of the same config but 9 input
channels (latents, mask, masked-image latents), as stable-diffusion-inpainting is SD 1.5's U-Net
with 9 and stable-diffusion-xl-1.0-inpainting-0.1 SDXL's (same text_time conditioning: six size
ids, no aesthetic score)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def nine_channel_copy(src: Path, dest: Path, seed: int, class_name: str) -> Path:
    """``src`` copied to ``dest`` with a random 9-channel U-Net of its U-Net's config."""
    from diffusers import UNet2DConditionModel

    shutil.copytree(src, dest)
    config = json.loads((src / "unet" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**config, "in_channels": 9}).eval()
    shutil.rmtree(dest / "unet")
    unet.save_pretrained(dest / "unet", safe_serialization=True)
    index = json.loads((dest / "model_index.json").read_text())
    (dest / "model_index.json").write_text(json.dumps({**index, "_class_name": class_name}))
    return dest


def build_tiny_inpaint(tiny: Path, dest: Path, seed: int = 0) -> Path:
    """SD 1.x: the shipped toy model (``tiny``) with a 9-channel U-Net."""
    return nine_channel_copy(tiny, dest, seed, "StableDiffusionInpaintPipeline")


def build_tiny_sdxl_pair(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Two tiny SDXL folders under ``root``: an ordinary 4-channel one (sdfast.model.random_models'
    ``build_tiny_sdxl``, diffusers' own test config) and a copy with a 9-channel U-Net."""
    from sdfast.model.info import TOKENIZER_DIR
    from sdfast.model.random_models import build_tiny_sdxl

    four = build_tiny_sdxl(root / "tiny-sdxl", TOKENIZER_DIR, seed=seed)
    nine = nine_channel_copy(four, root / "tiny-sdxl-inpaint", seed + 10, "StableDiffusionXLInpaintPipeline")
    return four, nine


def run_reference(pipe, scheduler_config: dict, scheduler: str, seed: int, **kw):
    """A diffusers inpaint pipeline's (latents, uint8 images) for sdfast's ``scheduler`` name: one
    run to latents, decoded as the pipeline's own ``output_type="np"`` decodes them (the VAE at
    1/scaling_factor, then its image processor), so a case costs one denoising loop, not two."""
    import numpy as np
    from test_pipeline_parity import reference_scheduler

    pipe.scheduler = reference_scheduler(scheduler, scheduler_config)  # from the folder's config
    lat = pipe(**kw, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
    with torch.no_grad():
        img = pipe.vae.decode(lat / pipe.vae.config.scaling_factor, return_dict=False)[0]
    img = pipe.image_processor.postprocess(img, output_type="np")
    return lat, (img * 255).round().astype(np.uint8)


def drop_guidance_after(step: int, keys: tuple[str, ...]):
    """A diffusers ``callback_on_step_end`` that after step index ``step`` (of the steps that
    run) turns classifier-free guidance off: the guidance scale to 1 and each of ``keys`` (the
    [uncond..., cond...] tensors the loop reads) to its conditional half, diffusers' own recipe
    for dynamic guidance; sdfast's guidance_until with cut ``step + 1`` must equal it."""

    def callback(pipe, i, t, tensors):
        if i == step:
            pipe._guidance_scale = 1.0
            return {k: tensors[k].chunk(2)[1] for k in keys}
        return {}

    return callback, list(keys)
