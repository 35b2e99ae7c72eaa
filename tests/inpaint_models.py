"""A tiny 9-channel inpainting model for the tests: the shipped toy model with its U-Net replaced
by a seeded random one of the same config but 9 input channels (latents, mask, masked-image
latents), as stable-diffusion-inpainting is SD 1.5's U-Net with 9."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def build_tiny_inpaint(tiny: Path, dest: Path, seed: int = 0) -> Path:
    from diffusers import UNet2DConditionModel

    shutil.copytree(tiny, dest)
    config = json.loads((tiny / "unet" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**config, "in_channels": 9}).eval()
    shutil.rmtree(dest / "unet")
    unet.save_pretrained(dest / "unet", safe_serialization=True)
    index = json.loads((dest / "model_index.json").read_text())
    (dest / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionInpaintPipeline"}))
    return dest
