"""The diffusers model-folder layout (the files every built-in model writes, the cache) and the
checks on a folder before any weight is loaded: each failure is one line
naming the file and what is wrong with it (a missing file, JSON that is not an object, a config
key missing or of the wrong type, a safetensors file that is empty, truncated or not one)."""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument, MissingFile

WEIGHT_SUFFIXES = (".safetensors", ".bin")
#: the shard part of a sharded weight file's variant: ``fp16-00001-of-00002``
_SHARD = re.compile(r"-\d+-of-\d+$")
#: (component folder, config file) that every SD 1.x/2.x folder has.
REQUIRED_CONFIGS = (
    ("text_encoder", "config.json"),
    ("unet", "config.json"),
    ("vae", "config.json"),
    ("scheduler", "scheduler_config.json"),
)
#: a CLIP tokenizer folder holds either of these (transformers 5 saves tokenizer.json only).
TOKENIZER_LAYOUTS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
#: model_index.json's pipeline class -> model family (components.FAMILY_SPECS).
FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionImg2ImgPipeline": "sd",
            "LatentConsistencyModelPipeline": "sd", "StableDiffusionInpaintPipeline": "sd",
            "StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl",
            "StableDiffusionXLInpaintPipeline": "sdxl"}
#: model_index.json entries SD releases carry that sdfast does not run (said once, at info level).
IGNORED_PARTS = ("safety_checker", "feature_extractor", "image_encoder")
#: the extra folders an SDXL folder has.
#: config keys sdfast reads (ModelInfo, components) or whose bad value would only fail deep inside
#: a library (a ZeroDivisionError, a module with no layers, an absurd allocation), with their JSON
#: types and whether a config must have them. Every int must be positive; a list (or an int-or-list)
#: must be non-empty and hold positive ints; a number must be finite and positive.
_INTS = (int, list)
CONFIG_KEYS: dict[str, dict[str, tuple[type | tuple[type, ...], bool]]] = {
    "text_encoder": {"hidden_size": (int, True), "max_position_embeddings": (int, True), "vocab_size": (int, True),
                     "num_attention_heads": (int, False), "num_hidden_layers": (int, False),
                     "intermediate_size": (int, False)},
    "text_encoder_2": {"hidden_size": (int, True), "max_position_embeddings": (int, True),
                       "vocab_size": (int, True), "projection_dim": (int, True),
                       "num_attention_heads": (int, False), "num_hidden_layers": (int, False),
                       "intermediate_size": (int, False)},
    "unet": {"in_channels": (int, True), "sample_size": (int, True), "block_out_channels": (list, True),
             "out_channels": (int, False), "norm_num_groups": (int, False), "layers_per_block": (_INTS, False),
             "attention_head_dim": (_INTS, False), "num_attention_heads": (_INTS, False),
             "cross_attention_dim": (_INTS, False), "transformer_layers_per_block": (_INTS, False)},
    "vae": {"block_out_channels": (list, True), "scaling_factor": ((int, float), False),
            "latent_channels": (int, False), "norm_num_groups": (int, False), "layers_per_block": (int, False)},
    "scheduler": {"num_train_timesteps": (int, False)},
    "tokenizer": {"model_max_length": (int, False)},
}
#: (component, the channel list, the group count, its diffusers default): GroupNorm needs every
#: channel count to be a multiple of the groups, and (text encoder) attention the width a multiple
#: of the heads; otherwise the library fails with a bare ZeroDivisionError or shape error.
_DIVISIBLE = {"unet": ("block_out_channels", "norm_num_groups", 32), "vae": ("block_out_channels", "norm_num_groups", 32),
              "text_encoder": ("hidden_size", "num_attention_heads", 8),
              "text_encoder_2": ("hidden_size", "num_attention_heads", 8)}
_FIX = "restore the file from the model release"


def cache_dir() -> Path:
    return Path(os.environ.get("SDFAST_CACHE", Path.home() / ".cache" / "sdfast"))


#: SD 1.5's scheduler/scheduler_config.json, which every built-in model uses.
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}

#: diffusers' LCMScheduler as LCM-distilled SD 1.5 releases ship it (SD 1.5's betas, 50 original steps).
LCM_SCHEDULER_CONFIG = {
    "_class_name": "LCMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_scaling": 10.0,
    "clip_sample": False,
    "trained_betas": None,
}

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; InvalidArgument naming the file for anything else."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"model: {path} is not valid JSON ({e}); {_FIX}") from None
    if not isinstance(d, dict):
        raise InvalidArgument(f"model: {path} holds a JSON {type(d).__name__}, not an object; {_FIX}")
    return d


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def check_config(path: Path, part: str, config: dict[str, Any]) -> dict[str, Any]:
    """Refuse a config that lacks a key sdfast reads, has a key of the wrong type or out of range,
    or dims a layer cannot be built from; a scheduler config is checked as its noise schedule."""
    for key, (typ, required) in CONFIG_KEYS.get(part, {}).items():
        if key not in config or config[key] is None:
            if required:
                raise InvalidArgument(f"model: {path} lacks {key!r}, which a {part} config needs; {_FIX}")
            continue
        v = config[key]
        if isinstance(v, bool) or not isinstance(v, typ):
            want = " or ".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
            raise InvalidArgument(f"model: {path} has {key} = {v!r} ({type(v).__name__}), not {want}; {_FIX}")
        if isinstance(v, list) and (not v or not all(_positive_int(x) for x in v)):
            raise InvalidArgument(f"model: {path} has {key} = {v!r}, not a non-empty list of positive integers; {_FIX}")
        if isinstance(v, int) and typ in (int, _INTS) and v < 1:
            raise InvalidArgument(f"model: {path} has {key} = {v!r}, not a positive integer; {_FIX}")
        if isinstance(v, int | float) and typ == (int, float) and not (math.isfinite(v) and v > 0):
            raise InvalidArgument(f"model: {path} has {key} = {v!r}, not a finite number > 0; {_FIX}")
    if part in _DIVISIBLE:
        dims_key, groups_key, default = _DIVISIBLE[part]
        groups = config.get(groups_key) or default
        dims = config[dims_key] if isinstance(config[dims_key], list) else [config[dims_key]]
        if any(d % groups for d in dims):
            raise InvalidArgument(f"model: {path} has {dims_key} = {config[dims_key]!r}, not all multiples of "
                                  f"{groups_key} = {groups}; {_FIX}")
    if part == "scheduler":
        from ..schedulers.base import NoiseSchedule  # torch: only when a scheduler config is read

        try:
            NoiseSchedule.from_config(config)
        except InvalidArgument as e:
            raise InvalidArgument(f"model: {path}: {e}") from None
    return config


def check_safetensors(path: Path) -> None:
    """Read only the header: refuse an empty, truncated or non-safetensors file, naming it."""
    size = path.stat().st_size
    fix = "download the file again (a copy or download was cut short?)"
    if size == 0:
        raise InvalidArgument(f"model: {path} is empty (0 bytes); {fix}")
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n <= 1 or n > 100 << 20:
            raise InvalidArgument(f"model: {path} is not a safetensors file (bad header length); {fix}")
        if n > size - 8:
            raise InvalidArgument(f"model: {path} is truncated: its header alone needs {n + 8} bytes but the file "
                                  f"has {size}; {fix}")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InvalidArgument(f"model: {path} is not a safetensors file (its header is not JSON); {fix}") from None
    if not isinstance(header, dict):
        raise InvalidArgument(f"model: {path} is not a safetensors file (its header is not an object); {fix}")
    end = 0
    for name, rec in header.items():
        if name == "__metadata__":
            continue
        offsets = rec.get("data_offsets") if isinstance(rec, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise InvalidArgument(f"model: {path} is not a safetensors file (tensor {name!r} has no offsets); {fix}")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise InvalidArgument(f"model: {path} is truncated: its header needs {8 + n + end} bytes but the file has "
                              f"{size}; {fix}")


def model_family(model_index: dict[str, Any]) -> str:
    """"sd" or "sdxl" from model_index.json's ``_class_name`` (SD 1.x/2.x when absent)."""
    return FAMILIES.get(str(model_index.get("_class_name", "StableDiffusionPipeline")), "sd")


def weight_variants(folder: Path) -> tuple[bool, set[str]]:
    """Whether a component folder holds plain weights, and the variants of those it holds
    (``fp16`` of ``model.fp16.safetensors`` and of the shards ``model.fp16-00001-of-00002.safetensors``)."""
    names = [p.name for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()] if folder.is_dir() else []
    plain = any(n.count(".") == 1 or ".index" in n for n in names)
    variants = {_SHARD.sub("", n.split(".")[-2]) for n in names if n.count(".") >= 2 and ".index" not in n}
    return plain, variants - {""}


def weight_variant(folder: Path) -> str | None:
    """The variant when a component folder holds only variant weights, so loading must ask for
    it (the first by name when there are several); None when plain weights are there."""
    plain, variants = weight_variants(folder)
    return None if plain or not variants else sorted(variants)[0]


def check_model_folder(path: Path, weights: bool = True, text_encoders: tuple[str, ...] = ("text_encoder",)) -> None:
    """Raise MissingFile / InvalidArgument naming the first missing or broken file of an SD folder
    (``text_encoders``: the family's, ``components.Family.text_encoders``)."""
    extra = tuple((sub, "config.json") for sub in text_encoders[1:])
    for sub, cfg in (*REQUIRED_CONFIGS, *extra):
        if not (path / sub / cfg).is_file():
            raise MissingFile(
                f"model: {path} lacks {sub}/{cfg}; a Stable Diffusion{' XL' if extra else ''} folder needs "
                f"text_encoder/, {'text_encoder_2/, tokenizer_2/, ' if extra else ''}tokenizer/, unet/, vae/ and "
                "scheduler/ (diffusers layout)"
            )
    parts = ("text_encoder", "unet", "vae") + tuple(sub for sub, _ in extra)
    for sub in parts if weights else ():
        files = [p for p in (path / sub).iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()]
        if not files:
            raise MissingFile(
                f"model: {path / sub} has no weights file (*.safetensors or *.bin); "
                "download the complete model folder"
            )
        for f in files:
            if f.suffix == ".safetensors":
                check_safetensors(f)
            elif f.stat().st_size == 0:
                raise InvalidArgument(f"model: {f} is empty (0 bytes); download the file again")
    for tok in ("tokenizer", "tokenizer_2") if extra else ("tokenizer",):
        if not any(all((path / tok / f).is_file() for f in layout) for layout in TOKENIZER_LAYOUTS):
            # name what is missing from the layout the folder has begun (vocab without merges, say)
            layout = max(TOKENIZER_LAYOUTS, key=lambda files: sum((path / tok / f).is_file() for f in files))
            absent = [f for f in layout if not (path / tok / f).is_file()]
            raise MissingFile(f"model: {path} lacks {' and '.join(f'{tok}/{f}' for f in absent)} (a CLIP tokenizer "
                              "is tokenizer.json, or vocab.json and merges.txt); copy the tokenizer folder of the "
                              "model release")


#: what a hub download fetches: configs, tokenizers, and the plain weights of every component the
#: families load (``text_encoder*``: SDXL's second encoder too)
HUB_PATTERNS = ("model_index.json", "*.json", "*.txt", "text_encoder*/*.safetensors",
                "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors")


def download(repo_id: str) -> Path:
    """A hub model id → the local snapshot's folder (MissingFile naming the id if it cannot be had)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=list(HUB_PATTERNS)))
    except Exception as e:  # the hub client raises many types: all mean "could not get it"
        raise MissingFile(
            f"model: could not download {repo_id!r} from the hub ({type(e).__name__}: {e}); "
            "check the id and the network, or pass a local model folder"
        ) from e
