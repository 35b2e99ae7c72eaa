"""Real Stable Diffusion architectures with random weights: ``random-sd15``, ``random-sd21``
(768 px, v-prediction), ``random-sd21-base``, ``random-sdxl``; and the tiny SDXL the tests run.

Benchmarks need the real shapes and FLOPs, not the real weights. ``random_model_folder`` writes
a config-only diffusers folder (model_index.json, the component configs, the scheduler config and
CLIP's real tokenizer); ``models.load_torch_modules`` builds the modules from those configs with
fixed seeds. Every output that comes from such a model says "random weights".

The configs are those of the public releases (runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-2-1 and -2-1-base, stabilityai/stable-diffusion-xl-base-1.0).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument
from ..fsio import staging_dir
from .bpe import CLIP_BPE_FILE, CLIP_VOCAB_SIZE, EOS, write_clip_tokenizer
from .folder import LCM_SCHEDULER_CONFIG, MODEL_INDEX, SD15_SCHEDULER_CONFIG, cache_dir

log = logging.getLogger(__name__)

#: Bumped when the recipe below changes in a way the configs do not show.
RECIPE_VERSION = 1
MAX_TOKENS = 77

_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

_UNET_SD15 = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "sample_size": 64,
}

_TEXT_SD15 = {  # CLIP ViT-L/14 text tower
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": MAX_TOKENS,
    "vocab_size": CLIP_VOCAB_SIZE,
    "projection_dim": 768,
    "layer_norm_eps": 1e-05,
    # The ids SD 1.5's released config carries (pooling is unused by SD pipelines).
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

_TEXT_SD21 = {  # OpenCLIP ViT-H/14 text tower, penultimate layer (23 of 24), as SD 2.x ships it
    **_TEXT_SD15,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 1024,
}

_UNET_SD21_BASE = {
    **_UNET_SD15,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "upcast_attention": False,
    "sample_size": 64,  # 512 px
}
#: stabilityai/stable-diffusion-2-1: 768 px, v-prediction, attention upcast to fp32 (its fp16
#: softmax overflows otherwise).
_UNET_SD21 = {**_UNET_SD21_BASE, "upcast_attention": True, "sample_size": 96}
_SCHEDULER_SD21 = {**SD15_SCHEDULER_CONFIG, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}

# stabilityai/stable-diffusion-xl-base-1.0: CLIP ViT-L (penultimate layer) + OpenCLIP bigG with
# projection, a 3-level U-Net with "text_time" conditioning, 1024 px, the VAE forced to fp32.
_TEXT_SDXL_2 = {**_TEXT_SD15, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu",
                "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
                "projection_dim": 1280}
_UNET_SDXL = {
    **_UNET_SD15,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "projection_class_embeddings_input_dim": 2816,  # 6 size numbers × 256 + the 1280 pooled text
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
}
_SCHEDULER_SDXL = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "steps_offset": 1, "timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": False,
    "set_alpha_to_one": False, "skip_prk_steps": True, "clip_sample": False, "sample_max_value": 1.0,
}
SDXL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

RECIPES: dict[str, dict[str, Any]] = {
    "random-sd15": {
        "text_encoder": _TEXT_SD15,
        "unet": _UNET_SD15,
        "vae": _VAE,
        "scheduler": SD15_SCHEDULER_CONFIG,
        "pad_token": EOS,
    },
    # LCM-distilled SD 1.5 releases (e.g. LCM_Dreamshaper_v7): SD 1.5's U-Net plus a 256-wide
    # guidance embedding, and LCM's scheduler.
    "random-sd15-lcm": {
        "text_encoder": _TEXT_SD15,
        "unet": {**_UNET_SD15, "time_cond_proj_dim": 256},
        "vae": _VAE,
        "scheduler": LCM_SCHEDULER_CONFIG,
        "pad_token": EOS,
        "model_index": {**MODEL_INDEX, "_class_name": "LatentConsistencyModelPipeline",
                        "scheduler": ["diffusers", "LCMScheduler"]},
    },
    # SD 1.5's inpainting release (stable-diffusion-inpainting): the U-Net takes latents, mask and
    # masked-image latents (4 + 1 + 4 channels).
    "random-sd15-inpaint": {
        "text_encoder": _TEXT_SD15,
        "unet": {**_UNET_SD15, "in_channels": 9},
        "vae": _VAE,
        "scheduler": SD15_SCHEDULER_CONFIG,
        "pad_token": EOS,
        "model_index": {**MODEL_INDEX, "_class_name": "StableDiffusionInpaintPipeline"},
    },
    "random-sd21": {
        "text_encoder": _TEXT_SD21,
        "unet": _UNET_SD21,
        "vae": {**_VAE, "sample_size": 768},
        "scheduler": _SCHEDULER_SD21,
        # OpenCLIP pads with "!" (id 0), not with <|endoftext|> as OpenAI CLIP does.
        "pad_token": "!",
    },
    "random-sd21-base": {
        "text_encoder": _TEXT_SD21,
        "unet": _UNET_SD21_BASE,
        "vae": _VAE,
        # SD 2.1-base's scheduler: SD 1.5's PNDM settings with explicit epsilon prediction.
        "scheduler": {**SD15_SCHEDULER_CONFIG, "prediction_type": "epsilon"},
        "pad_token": "!",
    },
    "random-sdxl": {
        "text_encoder": _TEXT_SD15,
        "text_encoder_2": _TEXT_SDXL_2,
        "unet": _UNET_SDXL,
        "vae": {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "scheduler": _SCHEDULER_SDXL,
        "pad_token": EOS,
        "pad_token_2": "!",
        "model_index": SDXL_MODEL_INDEX,
    },
}


def recipe_key(name: str) -> str:
    """Hash of everything that makes the folder, so a changed recipe never reuses an old one."""
    h = hashlib.sha256(json.dumps([RECIPE_VERSION, name, RECIPES[name]], sort_keys=True).encode())
    h.update(CLIP_BPE_FILE.read_bytes())
    return h.hexdigest()[:12]


def random_model_folder(name: str) -> Path:
    """Create (once, atomically) the config-only folder of a random-weights architecture."""
    if name not in RECIPES:
        raise InvalidArgument(f"model: unknown random architecture {name!r}; choose one of {', '.join(RECIPES)}")
    dest = cache_dir() / "models" / f"{name}-{recipe_key(name)}"
    if (dest / "model_index.json").is_file():
        return dest
    log.info("writing the config-only folder of %s in %s", name, dest)
    recipe = copy.deepcopy(RECIPES[name])
    configs = {
        "text_encoder/config.json": recipe["text_encoder"],
        "unet/config.json": recipe["unet"],
        "vae/config.json": recipe["vae"],
        "scheduler/scheduler_config.json": recipe["scheduler"],
        "model_index.json": {**recipe.get("model_index", MODEL_INDEX), "_sdfast_random_weights": True},
    }
    if "text_encoder_2" in recipe:
        configs["text_encoder_2/config.json"] = recipe["text_encoder_2"]
    # Written whole or not at all; a concurrent writer of the same recipe writes the same bytes.
    with staging_dir(dest, complete="model_index.json") as tmp:
        for rel, cfg in configs.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        write_clip_tokenizer(tmp / "tokenizer", model_max_length=MAX_TOKENS, pad_token=recipe["pad_token"])
        if "pad_token_2" in recipe:
            write_clip_tokenizer(tmp / "tokenizer_2", model_max_length=MAX_TOKENS, pad_token=recipe["pad_token_2"])
    return dest


def build_tiny_sdxl(dest: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny SDXL folder with real (random, seeded) weights, as diffusers' own SDXL tests build
    it: two 32-wide CLIPs, a 2-level U-Net with text_time conditioning, a 2-level VAE (factor 2)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = len(json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8")))
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, vocab_size=vocab,
                max_position_embeddings=MAX_TOKENS, projection_dim=32, hidden_act="gelu",
                bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    torch.manual_seed(seed)
    te = CLIPTextModel(CLIPTextConfig(**text)).eval()
    torch.manual_seed(seed + 1)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**text)).eval()
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=1).eval()  # 80 = 6 × 8 + the 32 pooled text
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, sample_size=64, scaling_factor=0.13025, force_upcast=True).eval()
    with staging_dir(dest, complete="model_index.json") as tmp:
        for name, module in (("text_encoder", te), ("text_encoder_2", te2), ("unet", unet), ("vae", vae)):
            module.save_pretrained(tmp / name, safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2"):
            shutil.copytree(tokenizer_dir, tmp / name)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(_SCHEDULER_SDXL, indent=2))
        (tmp / "model_index.json").write_text(json.dumps(SDXL_MODEL_INDEX, indent=2))
    return Path(dest)
