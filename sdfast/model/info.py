"""Find and describe a Stable Diffusion model folder; load its torch modules.

``resolve_model`` turns what a user typed (a folder, a hub id, a built-in name) into a checked
diffusers-layout folder, and ``ModelInfo`` reads the sizes every other module needs from its
configs (never from literals). Loading the torch modules imports diffusers (but see
sdfast/model/lite.py), so it lives behind ``load_torch_modules``: exported engines never pay for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidArgument, MissingFile
from .folder import (
    IGNORED_PARTS,
    LCM_SCHEDULER_CONFIG,
    MODEL_INDEX,
    SD15_SCHEDULER_CONFIG,
    cache_dir,
    check_config,
    check_model_folder,
    download,
    model_family,
    weight_variant,
    weight_variants,
)
from .folder import read_json as _read_json
from .wrappers import COMPONENT_MODULE, component_modules, family_modules  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent.parent / "data"
TOKENIZER_DIR = DATA_DIR / "tokenizer"
#: The trained toy model shipped in the package; "tiny" falls back to the random one.
PACKAGED_TINY = DATA_DIR / "models" / "tiny"
#: the toy model distilled into a latent consistency model (scripts/distill_lcm.py)
PACKAGED_TINY_LCM = DATA_DIR / "models" / "tiny-lcm"

#: diffusers' AutoencoderKL class default, used only for old folders whose vae config lacks the key.
DIFFUSERS_DEFAULT_SCALING_FACTOR = 0.18215

def _config(path: Path, part: str) -> dict[str, Any]:
    return check_config(path, part, _read_json(path))


@dataclass(frozen=True)
class ModelInfo:
    """Everything the runtime needs to know about a model, read from its configs."""

    path: Path
    name: str
    text_encoder_config: dict[str, Any] = field(repr=False)
    unet_config: dict[str, Any] = field(repr=False)
    vae_config: dict[str, Any] = field(repr=False)
    scheduler_config: dict[str, Any] = field(repr=False)
    tokenizer_config: dict[str, Any] = field(repr=False)
    #: A config-only folder (random-sd15, ...): modules are built from config with a fixed seed.
    random_weights: bool = False
    model_index: dict[str, Any] = field(default_factory=dict, repr=False)
    #: SDXL's second text encoder (CLIPTextModelWithProjection); empty for SD 1.x/2.x.
    text_encoder_2_config: dict[str, Any] = field(default_factory=dict, repr=False)
    #: weight file variant to load ("fp16" for ``*.fp16.safetensors``), None for plain weights.
    variant: str | None = None
    #: LoRAs (lora.Lora) fused into the torch modules as they load (``with_loras``): the model an
    #: export with ``--lora`` is made from; the fingerprint stays the folder's, the manifest records these
    loras: tuple = field(default=(), repr=False)
    #: DeepCache's branch when its two U-Net graphs are components too (``sdfast export --cache-branch``;
    #: ``dataclasses.replace(info, cache_branch=B)``, sdfast/deepcache.py)
    cache_branch: int | None = None
    lite: bool = field(default=False, repr=False, compare=False)  # sdfast/model/lite.py's modules (lite_info)

    def with_loras(self, loras) -> ModelInfo:
        """This model with ``loras`` (files, (file, scale) pairs or lora.Lora) fused at load."""
        import dataclasses

        from ..lora import as_loras

        return dataclasses.replace(self, loras=tuple(as_loras(loras)))

    @classmethod
    def from_folder(cls, path: Path, name: str | None = None, random_weights: bool = False,
                    variant: str | None = None) -> ModelInfo:
        path = Path(path)
        index_path = path / "model_index.json"
        model_index = _read_json(index_path) if index_path.is_file() else {}
        family = model_family(model_index)
        from .components import FAMILIES

        text_encoders = FAMILIES[family].text_encoders
        check_model_folder(path, weights=not random_weights, text_encoders=text_encoders)
        ignored = [p for p in IGNORED_PARTS if (model_index.get(p) or [None])[0] is not None]
        if ignored:
            log.info("model: %s has %s, which sdfast does not run; ignored", path, ", ".join(ignored))
        if variant is None and not random_weights:
            found = {weight_variant(path / sub) for sub in family_modules(family)} - {None}
            if found:
                variant = sorted(found)[0]
                log.info("model: %s holds %s-variant weights only; loading those", path, variant)
        tok_cfg_path = path / "tokenizer" / "tokenizer_config.json"
        te2 = path / "text_encoder_2" / "config.json"
        return cls(
            path=path,
            name=name or path.name,
            text_encoder_config=_config(path / "text_encoder" / "config.json", "text_encoder"),
            unet_config=_config(path / "unet" / "config.json", "unet"),
            vae_config=_config(path / "vae" / "config.json", "vae"),
            scheduler_config=_config(path / "scheduler" / "scheduler_config.json", "scheduler"),
            tokenizer_config=_config(tok_cfg_path, "tokenizer") if tok_cfg_path.is_file() else {},
            random_weights=random_weights,
            model_index=model_index,
            text_encoder_2_config=_config(te2, "text_encoder_2") if "text_encoder_2" in text_encoders else {},
            variant=variant,
        )

    @property
    def family(self) -> str:
        """"sd" (SD 1.x/2.x) or "sdxl", from model_index.json."""
        return model_family(self.model_index)

    @property
    def family_record(self):
        """What the family is (``components.Family``): its specs, text encoders, conditioning."""
        from .components import FAMILIES

        return FAMILIES[self.family]

    @property
    def specs(self):
        """The family's component specs (``components.FAMILY_SPECS``), by component name; a U-Net
        distilled with guidance as an input (LCM) takes ``timestep_cond`` too."""
        from .components import deepcache_specs, with_timestep_cond

        specs = self.family_record.specs
        if self.timestep_cond_dim:
            specs = {**specs, "unet": with_timestep_cond(specs["unet"])}
        if self.cache_branch is not None:
            specs = {**specs, **deepcache_specs(specs["unet"], self.unet_config, self.cache_branch)}
        return specs

    @property
    def timestep_cond_dim(self) -> int | None:
        """Width of the guidance-scale embedding an LCM U-Net takes (``time_cond_proj_dim``), or None:
        such a U-Net is guided by that input, in one batch per step, with no unconditional rows."""
        dim = self.unet_config.get("time_cond_proj_dim")
        return int(dim) if dim else None

    @property
    def text_dims(self) -> dict[str, int]:
        """SDXL's text widths: D1, D2 (hidden sizes of the two encoders) and P (pooled projection)."""
        if not self.text_encoder_2_config:
            return {}
        te2 = self.text_encoder_2_config
        return {"D1": int(self.text_encoder_config["hidden_size"]), "D2": int(te2["hidden_size"]),
                "P": int(te2["projection_dim"])}

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """SDXL: no negative prompt means zero embeddings, not the embedding of "" (model_index.json)."""
        return self.family_record.size_conditioning and bool(self.model_index.get("force_zeros_for_empty_prompt", True))

    @property
    def vae_force_upcast(self) -> bool:
        """SDXL's VAE overflows fp16 (its config says force_upcast): run it in fp32, as diffusers'
        SDXL pipeline does. SD 1.x/2.x pipelines ignore the key (AutoencoderKL defaults it to
        true), so do we: their fp16 VAE keeps the NaN fallback instead."""
        return self.family_record.size_conditioning and bool(self.vae_config.get("force_upcast", True))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the latents (the U-Net's output; the VAE's latent_channels)."""
        return int(self.unet_config.get("out_channels", 4))  # diffusers UNet2DConditionModel default

    @property
    def unet_in_channels(self) -> int:
        """Channels of the U-Net's sample input: latent_channels, or 2 × + 1 for an inpainting U-Net."""
        return int(self.unet_config["in_channels"])

    @property
    def scaling_factor(self) -> float:
        return float(self.vae_config.get("scaling_factor", DIFFUSERS_DEFAULT_SCALING_FACTOR))

    @property
    def native_size(self) -> int:
        """Default image side: the U-Net's sample size times the VAE factor (512 for SD 1.5)."""
        return int(self.unet_config["sample_size"]) * self.vae_scale_factor

    @property
    def max_tokens(self) -> int:
        configured = self.tokenizer_config.get("model_max_length")
        positions = int(self.text_encoder_config["max_position_embeddings"])
        # Some releases store a huge sentinel for model_max_length; the text encoder bounds it.
        return min(int(configured), positions) if configured else positions

    @property
    def text_hidden_size(self) -> int:
        """Width of the U-Net's text sequence (SDXL: both encoders' widths concatenated)."""
        return int(self.text_encoder_config["hidden_size"]) + self.text_dims.get("D2", 0)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over every config and weight file of the folder (names and bytes)."""
        h = hashlib.sha256()
        for f in sorted(p for p in self.path.rglob("*") if p.is_file()):
            rel = f.relative_to(self.path).as_posix()
            if rel.startswith(".") or "/." in rel:
                continue
            h.update(rel.encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()


# -- built-in models -----------------------------------------------------------------------

def tiny_random_configs(vocab_size: int, max_tokens: int) -> dict[str, dict[str, Any]]:
    """A few-hundred-kB SD: real component classes, 64×64 images, VAE factor 8 like SD."""
    return {
        "text_encoder": dict(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
            vocab_size=vocab_size, max_position_embeddings=max_tokens, projection_dim=32,
            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        ),
        "unet": dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            attention_head_dim=8, norm_num_groups=8,
        ),
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
            block_out_channels=(8, 16, 16, 16), norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=64,
        ),
    }




def write_model_folder(dest: Path, text_encoder, unet, vae, tokenizer_dir: Path,
                       scheduler_config: dict[str, Any]) -> Path:
    """Save modules as a diffusers folder, atomically: a crash leaves no half folder at ``dest``."""
    from ..fsio import staging_dir

    with staging_dir(dest, complete="model_index.json") as tmp:
        text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
        (tmp / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return Path(dest)


#: ``tiny-random-lcm``: the tiny random SD whose U-Net takes a guidance embedding this wide.
TINY_LCM_COND_DIM = 32


def build_tiny_random(dest: Path, seed: int = 0, lcm: bool = False) -> Path:
    """Make the random tiny model folder from a fixed seed (same weights on every machine);
    ``lcm``: its U-Net takes a guidance embedding (``time_cond_proj_dim``) and its scheduler is LCM's."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = _read_json(TOKENIZER_DIR / "vocab.json")
    max_tokens = int(_read_json(TOKENIZER_DIR / "tokenizer_config.json")["model_max_length"])
    cfg = tiny_random_configs(len(vocab), max_tokens)
    if lcm:
        cfg["unet"]["time_cond_proj_dim"] = TINY_LCM_COND_DIM
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])).eval()
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**cfg["unet"]).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**cfg["vae"]).eval()
    return write_model_folder(dest, text_encoder, unet, vae, TOKENIZER_DIR,
                              LCM_SCHEDULER_CONFIG if lcm else SD15_SCHEDULER_CONFIG)


def _tiny_random_folder(lcm: bool = False) -> Path:
    # The folder name carries a hash of what builds it, so a changed recipe never reuses old weights.
    scheduler = LCM_SCHEDULER_CONFIG if lcm else SD15_SCHEDULER_CONFIG
    parts = [tiny_random_configs(0, 0), scheduler, torch.__version__] + ([TINY_LCM_COND_DIM] if lcm else [])
    recipe = json.dumps(parts, sort_keys=True) + (TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8")
    key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    name = "tiny-random-lcm" if lcm else "tiny-random"
    dest = cache_dir() / "models" / f"{name}-{key}"
    if not (dest / "model_index.json").is_file():
        log.info("building the %s model in %s", name, dest)
        build_tiny_random(dest, lcm=lcm)
    return dest


#: Real SD architectures with random weights, for benchmarking without a download.
RANDOM_ARCHITECTURES = {
    "random-sd15": "SD 1.5 architecture, random weights, real CLIP tokenizer (benchmarks only)",
    "random-sd21": "SD 2.1 (768 px, v-prediction) architecture, random weights, real CLIP tokenizer (benchmarks only)",
    "random-sd21-base": "SD 2.1-base (512 px, epsilon) architecture, random weights, real CLIP tokenizer (benchmarks only)",
    "random-sdxl": "SDXL base 1.0 architecture (1024 px, two text encoders), random weights (benchmarks only)",
    "random-sd15-lcm": "SD 1.5 architecture with an LCM U-Net (guidance embedding, 256 wide) and LCM's "
                       "scheduler, random weights (benchmarks only)",
}


def builtin_models() -> dict[str, str]:
    """Built-in model names and what they are (for --help and `sdfast info`)."""
    return {
        "tiny": "trained toy SD (coloured shapes, 64x64), shipped in the package"
        if (PACKAGED_TINY / "model_index.json").is_file()
        else "alias of tiny-random (the trained toy model is not installed)",
        **({"tiny-lcm": "the toy model distilled into a latent consistency model: 1-4 steps, no uncond "
                        "batch (an approximation of tiny at 20 guided steps)"}
           if (PACKAGED_TINY_LCM / "model_index.json").is_file() else {}),
        "tiny-random": "SD component classes at toy size with random weights (tests)",
        "tiny-random-lcm": "tiny-random with an LCM U-Net (guidance embedding input) and LCM's scheduler (tests)",
        **RANDOM_ARCHITECTURES,
    }


def _builtin_folder(name: str) -> Path | None:
    """The folder a built-in model name stands for (a random architecture's or tiny-random's is
    written on first use), or None when ``name`` is not a built-in here."""
    if name == "tiny":
        return PACKAGED_TINY if (PACKAGED_TINY / "model_index.json").is_file() else _tiny_random_folder()
    if name == "tiny-lcm" and (PACKAGED_TINY_LCM / "model_index.json").is_file():
        return PACKAGED_TINY_LCM
    if name in ("tiny-random", "tiny-random-lcm"):
        return _tiny_random_folder(lcm=name.endswith("-lcm"))
    if name in RANDOM_ARCHITECTURES:
        from .random_models import random_model_folder

        return random_model_folder(name)
    return None


def model_arg(info: ModelInfo) -> str:
    """What ``--model`` takes to name ``info`` again, for the commands errors suggest: a built-in's
    name (``tiny``, not the package folder it lives in), else its folder."""
    try:
        folder = _builtin_folder(info.name)
        if folder is not None and folder.resolve() == Path(info.path).resolve():
            return info.name
    except OSError:
        pass
    return str(info.path)


def resolve_model(model: str | os.PathLike, variant: str | None = None) -> ModelInfo:
    """A folder path, a built-in name, or a hub id → a checked ModelInfo. ``variant`` picks
    weight files such as ``*.fp16.safetensors`` (default: plain ones, or the only variant there)."""
    text = os.fspath(model)
    folder = _builtin_folder(text)
    if folder is not None:
        return ModelInfo.from_folder(folder, name=text, random_weights=text in RANDOM_ARCHITECTURES)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MissingFile(f"model: {path} is a file; pass the model *folder* (the one holding model_index.json)")
        return ModelInfo.from_folder(path, variant=variant)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return ModelInfo.from_folder(download(text), name=text, variant=variant)
    raise MissingFile(
        f"model: no folder at {text!r}; pass a diffusers model folder, a hub id such as "
        f"'org/name', or a built-in name ({', '.join(builtin_models())})"
    )


# -- torch modules ---------------------------------------------------------------------------

def load_tokenizer(info: ModelInfo, folder: str = "tokenizer"):
    """The CLIP tokenizer in ``folder`` (tokenizer.json, or vocab.json + merges.txt); ``info.lite``: sdfast's."""
    if info.lite and folder == "tokenizer":
        from .lite_text import LiteTokenizer
        return LiteTokenizer(info.path / folder, info.max_tokens)
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(info.path / folder)
    except Exception as e:  # noqa: BLE001 -- tokenizers raises bare Exception for a malformed vocab / merges
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise InvalidArgument(f"model: cannot load {info.path / folder} ({type(e).__name__}: {first}); "
                              f"copy the tokenizer folder of the model release") from None


#: torch module name -> (library, class name, folder); the component wrappers draw on these.
MODULE_CLASSES = {"text_encoder": ("transformers", "CLIPTextModel"),
                  "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),  # SDXL
                  "unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL")}
#: fixed seeds of the config-only (random weight) models, one per module so any subset is reproducible.
RANDOM_SEEDS = {"text_encoder": 0, "unet": 1, "vae": 2, "text_encoder_2": 3}


def load_torch_modules(info: ModelInfo, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                       parts: tuple[str, ...] | None = None) -> dict[str, torch.nn.Module]:
    """The family's torch modules (CLIPTextModel(s), UNet2DConditionModel, AutoencoderKL), or the
    ``parts`` asked for, in eval mode on ``device``. Export loads one part at a time so peak
    memory stays near one module."""
    import importlib

    from .lite import load_lite_modules

    if info.lite and (mods := load_lite_modules(info, dtype, device, parts or family_modules(info.family))):
        return mods  # sdfast/model/lite.py: the libraries' bits without importing them
    from transformers.utils import logging as hf_logging

    # transformers draws a per-tensor "Loading weights" bar; ours is quiet unless asked.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    mods = {}
    try:
        for part in parts or family_modules(info.family):
            lib, name = MODULE_CLASSES[part]
            cls = getattr(importlib.import_module(lib), name)
            if info.random_weights:
                mods[part] = _random_module(cls, getattr(info, f"{part}_config"), RANDOM_SEEDS[part], dtype)
            else:
                mods[part] = _from_pretrained(cls, info.path / part, dtype, info.variant)
            # Cast as built: a random model's peak is one module's fp32 (random-sdxl U-Net 10 GB), not all (14 GB).
            mods[part].eval().requires_grad_(False).to(device)
            if mods[part].dtype != dtype:
                mods[part].to(dtype)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if info.loras:
        from ..lora import fuse_at_load

        fuse_at_load(mods, info)
    return mods


def _from_pretrained(cls, folder: Path, dtype: torch.dtype, variant: str | None = None) -> torch.nn.Module:
    """``cls.from_pretrained`` with a broken folder as one line naming it, not a library traceback."""
    try:
        if variant is not None and variant in weight_variants(folder)[1]:
            return cls.from_pretrained(folder, torch_dtype=dtype, variant=variant)
        return cls.from_pretrained(folder, torch_dtype=dtype)
    except torch.OutOfMemoryError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ArithmeticError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise InvalidArgument(f"model: cannot load {folder} ({type(e).__name__}: {first}); restore the folder "
                              f"from the model release") from None


def _random_module(cls, config: dict[str, Any], seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A module built from its config with a fixed seed (the same weights every time)."""
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(seed)
    if hasattr(cls, "from_config"):
        with _cast_as_built(dtype):
            return cls.from_config(cfg)
    from transformers import CLIPTextConfig

    return cls(CLIPTextConfig(**cfg))


@contextlib.contextmanager
def _cast_as_built(dtype: torch.dtype):
    """Cast each child module to ``dtype`` as it is attached to its parent, while a diffusers
    model is built (its children take their final values in ``__init__``, no init pass after),
    so the weights equal the cast finished fp32 model's with one child's fp32 in memory:
    random-sdxl's U-Net builds in ~6 GB at bf16, not 10 GB. A global torch hook (sdfast loads on
    one thread)."""
    if dtype == torch.float32:
        yield
        return

    def cast(parent, name, child):
        if child is not None:
            torch.nn.Module.to(child, dtype)  # not ModelMixin.to, which logs per child

    handle = torch.nn.modules.module.register_module_module_registration_hook(cast)
    try:
        yield
    finally:
        handle.remove()
