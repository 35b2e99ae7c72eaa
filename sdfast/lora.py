"""LoRA adapters: read a LoRA file, check it against the model, fuse it into the weights, undo it exactly.

Formats (``.safetensors`` only: a pickled ``.ckpt`` / ``.pt`` / ``.bin`` can run code when opened):

- diffusers / PEFT: ``unet.<module>.lora.down.weight`` + ``.lora.up.weight``, or ``.lora_A.weight`` +
  ``.lora_B.weight``, under the prefixes ``unet.``, ``text_encoder.``, ``text_encoder_2.`` (SDXL);
  alpha from ``<module>.alpha`` keys or the file's ``lora_adapter_metadata`` (what diffusers' own
  ``save_lora_weights`` writes), else alpha = rank;
- kohya (sd-scripts, A1111): ``lora_unet_<module with _ for .>.lora_down.weight`` + ``.lora_up.weight``
  + ``.alpha``; ``lora_te_`` / ``lora_te1_`` for the first text encoder, ``lora_te2_`` for SDXL's second.
  The U-Net module may be named as diffusers names it or as the original LDM U-Net did
  (``input_blocks_4_1_proj_in``, ``middle_block_…``, ``output_blocks_…``: lora_ldm.py).
  LCM-LoRA files are of the first kind.

A layer's update is ``W += scale · alpha / rank · up @ down`` (a conv layer: ``up`` (out, r, 1, 1) times
``down`` (r, in, kh, kw), reshaped to the kernel): what diffusers' ``fuse_lora`` computes, and the
tests hold it to diffusers (``load_lora_weights`` + ``fuse_lora``) on SD and SDXL.

Every update of a set is computed and checked before any weight changes, so a LoRA that does not fit
the model (another architecture, another family, a module it lacks, a shape that differs) is refused
in one line with nothing half-applied. The weights a set touches are kept as they were loaded, and
every change of the set starts again from them: ``set([])`` restores the base bit for bit, and
A → B → A equals a fresh load of A.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidArgument, MissingFile

#: the torch modules a LoRA may change (load_torch_modules' names); the VAE has no LoRA
GROUPS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                  "lora_te_": "text_encoder"}
#: suffix -> which half of the pair it is, for the spellings diffusers, PEFT and kohya write
DOWN = (".lora_down.weight", ".lora.down.weight", ".lora_A.weight", ".lora_linear_layer.down.weight")
UP = (".lora_up.weight", ".lora.up.weight", ".lora_B.weight", ".lora_linear_layer.up.weight")
#: keys of adapters that are not LoRA (LyCORIS LoHa / LoKr, DoRA, bias and full-weight diffs)
NOT_LORA = {"hada_": "LoHa", "lokr_": "LoKr", "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA",
            ".lora_mid.": "LoCon-CP (lora_mid)", ".diff": "weight-difference", ".diff_b": "bias-difference"}
#: |scale| above this is refused as a likely typo (0.7 written 70); LoRA scales in use lie within ±2
MAX_SCALE = 10.0
METADATA_KEY = "lora_adapter_metadata"


@dataclass(frozen=True)
class LoraLayer:
    group: str  # one of GROUPS
    module: str  # the module's name as the file writes it (kohya: with _ for .)
    down: torch.Tensor  # (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    alpha: float | None  # None: alpha = rank
    key: str  # the file's key of ``down``, for messages
    kohya: bool


@dataclass(frozen=True, eq=False)  # equal only to itself: its tensors have no == that answers a bool
class LoraFile:
    path: Path
    sha256: str
    format: str  # "diffusers" | "peft" | "kohya"
    layers: tuple[LoraLayer, ...]

    @property
    def name(self) -> str:
        return self.path.stem


@dataclass(frozen=True)
class Lora:
    """A LoRA file and the scale it is applied at."""

    file: LoraFile
    scale: float = 1.0

    def record(self) -> dict[str, Any]:
        """What a generation records of it (PNG metadata, GenerationOutput.loras, /metrics)."""
        return {"name": self.file.name, "sha256": self.file.sha256, "scale": self.scale, "format": self.file.format}


def check_scale(scale: Any, arg: str = "loras") -> float:
    from .rules import is_number

    if not is_number(scale) or not math.isfinite(float(scale)) or abs(float(scale)) > MAX_SCALE:
        raise InvalidArgument(f"{arg}: a LoRA scale must be a finite number from -{MAX_SCALE:g} to {MAX_SCALE:g}, "
                              f"got {scale!r}; 1 applies it as trained, 0.5 at half strength")
    return float(scale)


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` (the CLI's --lora): the scale is what follows the last colon when that
    parses as a number, so ``C:/loras/a.safetensors`` is a path and ``a.safetensors:0.7`` a scale."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            value = float(tail)
        except ValueError:
            return text, 1.0
        return path, check_scale(value, "--lora")
    return text, 1.0


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_lora(path: str | Path) -> LoraFile:
    """Read and check one LoRA file on its own (pairs complete, format known); the model check is
    :func:`plan`'s."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"loras: {path} does not exist" if not path.exists() else f"loras: {path} is not a file")
    if path.suffix.lower() != ".safetensors":
        raise InvalidArgument(f"loras: {path} is not a .safetensors file; sdfast reads LoRA weights only from "
                              "safetensors (a pickled .ckpt/.pt/.bin can run code when opened): convert it, e.g. "
                              "safetensors.torch.save_file(torch.load(f, weights_only=True), 'x.safetensors')")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:  # safetensors' own errors name neither the file nor the fix
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise InvalidArgument(f"loras: {path} is not a readable safetensors file ({first}); "
                              "download it again or pass another file") from None
    return _parse(path, tensors, meta)


def _parse(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> LoraFile:
    if not tensors:
        raise InvalidArgument(f"loras: {path} holds no tensors; it is not a LoRA file")
    for key in tensors:
        for mark, kind in NOT_LORA.items():
            if mark in key:
                raise InvalidArgument(f"loras: {path} is a {kind} adapter (key {key!r}), not a LoRA; sdfast applies "
                                      "plain LoRA (down/up pairs): use a LoRA file, or fuse it into the model first")
    downs: dict[tuple[str, str, bool], tuple[str, torch.Tensor]] = {}
    ups: dict[tuple[str, str, bool], torch.Tensor] = {}
    alphas: dict[tuple[str, str, bool], float] = {}
    spellings = set()
    for key, t in tensors.items():
        group, rest, kohya = _split_group(path, key)
        if "processor." in rest:
            raise InvalidArgument(f"loras: {path} is in diffusers' pre-0.20 attention-processor format (key {key!r}); "
                                  "load it in diffusers and save it again with save_lora_weights, then pass that file")
        if rest.endswith(".alpha"):
            alphas[(group, rest[: -len(".alpha")], kohya)] = _scalar(path, key, t)
            continue
        half = next(((s, "down") for s in DOWN if rest.endswith(s)), None) or \
            next(((s, "up") for s in UP if rest.endswith(s)), None)
        if half is None:
            raise InvalidArgument(f"loras: {path}: key {key!r} is not a LoRA weight (expected one ending in "
                                  f"{', '.join(DOWN[:3])} or their up halves, or .alpha)")
        suffix, which = half
        spellings.add(suffix)
        if t.dim() not in (2, 4) or not t.is_floating_point():
            raise InvalidArgument(f"loras: {path}: {key} has shape {tuple(t.shape)} ({t.dtype}); a LoRA weight is a "
                                  "2-D (linear) or 4-D (conv) float tensor")
        mod = (group, rest[: -len(suffix)], kohya)
        if which == "down":
            downs[mod] = (key, t)
        else:
            ups[mod] = t
    for mod in sorted(set(downs) ^ set(ups)):
        have, lacks = ("down", "up") if mod in downs else ("up", "down")
        raise InvalidArgument(f"loras: {path}: {mod[0]} module {mod[1]!r} has a {have} weight and no {lacks} weight; "
                              "the file is incomplete: download it again")
    if not downs:
        raise InvalidArgument(f"loras: {path} holds only alpha values, no LoRA weights")
    stray = sorted(set(alphas) - set(downs))
    if stray:
        raise InvalidArgument(f"loras: {path}: an alpha for {stray[0][1]!r} has no LoRA weights; the file is "
                              "incomplete or not a LoRA")
    meta_alpha = _metadata_alphas(path, meta)
    layers = []
    for mod, (key, down) in sorted(downs.items()):
        group, name, kohya = mod
        alpha = alphas.get(mod)
        if alpha is None and group in meta_alpha:
            alpha = _pattern_alpha(meta_alpha[group], name)
        layers.append(LoraLayer(group, name, down, ups[mod], alpha, key, kohya))
    fmt = "kohya" if any(layer.kohya for layer in layers) else \
        "peft" if ".lora_A.weight" in spellings else "diffusers"
    return LoraFile(path, sha256_file(path), fmt, tuple(layers))


def _split_group(path: Path, key: str) -> tuple[str, str, bool]:
    for prefix, group in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            return group, key[len(prefix):], True
    head, _, rest = key.partition(".")
    if head in GROUPS and rest:
        return head, rest, False
    raise InvalidArgument(f"loras: {path}: key {key!r} names no part sdfast knows; LoRA keys start with "
                          f"{', '.join(g + '.' for g in GROUPS)} (diffusers/PEFT) or "
                          f"{', '.join(KOHYA_PREFIXES)} (kohya)")


def _scalar(path: Path, key: str, t: torch.Tensor) -> float:
    if t.numel() != 1 or not math.isfinite(float(t.reshape(-1)[0])):
        raise InvalidArgument(f"loras: {path}: {key} must be one finite number, got shape {tuple(t.shape)}")
    value = float(t.reshape(-1)[0])
    if value <= 0:
        raise InvalidArgument(f"loras: {path}: {key} is {value:g}; a LoRA alpha is positive")
    return value


def _metadata_alphas(path: Path, meta: dict[str, str]) -> dict[str, dict[str, Any]]:
    """group -> {"lora_alpha": a, "alpha_pattern": {...}} from diffusers' adapter metadata."""
    if METADATA_KEY not in meta:
        return {}
    try:
        data = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError:
        raise InvalidArgument(f"loras: {path}: its {METADATA_KEY} is not JSON; the file is damaged") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"loras: {path}: its {METADATA_KEY} is not a JSON object; the file is damaged")
    out: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        group, _, field = str(key).partition(".")
        if group in GROUPS and field in ("lora_alpha", "alpha_pattern", "use_dora"):
            out.setdefault(group, {})[field] = value
    for group, cfg in out.items():
        if cfg.get("use_dora"):
            raise InvalidArgument(f"loras: {path} is a DoRA adapter ({group}.use_dora), not a LoRA; sdfast applies "
                                  "plain LoRA")
    return out


def _pattern_alpha(cfg: dict[str, Any], module: str) -> float | None:
    """PEFT's alpha_pattern (a module-name regex or suffix -> alpha), else lora_alpha."""
    for pattern, alpha in (cfg.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern) or re.fullmatch(pattern, module):
            return float(alpha)
    alpha = cfg.get("lora_alpha")
    return None if alpha is None else float(alpha)


# -- against a model -----------------------------------------------------------------------

def _module_index(group_module: torch.nn.Module) -> LayerIndex:
    """The LoRA-able layers (Linear, Conv2d) of one torch module: see :func:`layer_index`."""
    shapes, params = {}, {}
    for n, m in group_module.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            shapes[n], params[n] = tuple(m.weight.shape), f"{n}.weight"
    text = not hasattr(group_module, "text_model") and hasattr(group_module, "encoder")  # a flattened CLIP
    return layer_index(shapes, params, flattened_text=text)


#: (LoRA-side dotted name -> (weight's parameter name, weight shape), kohya's underscored name -> dotted)
LayerIndex = tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]


def layer_index(shapes: dict[str, tuple[int, ...]], params: dict[str, str], flattened_text: bool = False) -> LayerIndex:
    """The names a LoRA file may give a model's layers. ``shapes``: layer name -> weight shape;
    ``params``: layer name -> what the layer's weight is called where the update goes. A flattened
    text encoder (transformers 5's CLIPTextModel) answers to ``text_model.``-prefixed names too:
    LoRA files keep the prefix that it no longer has."""
    layers = {n: (params[n], shape) for n, shape in shapes.items()}
    if flattened_text:
        layers.update({f"text_model.{n}": v for n, v in list(layers.items())})
    flat = {n.replace(".", "_"): n for n in layers}
    # kohya files of the original LDM U-Net (input_blocks/middle_block/output_blocks names)
    from .lora_ldm import ldm_names

    flat.update({ldm.replace(".", "_"): n for ldm, n in ldm_names(list(layers)).items() if n in layers})
    return layers, flat


@dataclass(frozen=True)
class Match:
    """One layer of one LoRA, matched to the model's weight it changes."""

    lora: Lora
    layer: LoraLayer
    name: str  # the layer's dotted name (kohya's resolved)
    param: str  # the weight's parameter name in its group
    shape: tuple[int, ...]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) as 2-D float32 (out, r) and (r, in·kh·kw), the scale · alpha / rank in ``up``."""
        down, up = self.layer.down.float(), self.layer.up.float()
        rank = down.shape[0]
        alpha = rank if self.layer.alpha is None else self.layer.alpha
        return up.flatten(1) * (self.lora.scale * alpha / rank), down.flatten(1)

    def delta(self) -> torch.Tensor:
        up, down = self.factors()
        return (up @ down).reshape(self.shape)


def match(loras: list[Lora], indexes: dict[str, LayerIndex], family: str,
          not_loaded: frozenset[str] = frozenset(),
          missing: Callable[[Lora, list[LoraLayer], str], str] | None = None) -> list[Match]:
    """Every layer of ``loras`` matched to the model's layers (``indexes``: group -> its
    :func:`layer_index`); raises, naming the file and the layer, on the first that does not fit.
    Layers of the groups in ``not_loaded`` (parts not at hand this time) are left out.
    ``missing(lora, layers, group)``: the message for layers the index lacks, where the index is
    not the whole model (an export's LoRA slots)."""
    out = []
    for lora in loras:
        lacking = []
        for layer in lora.file.layers:
            if layer.group in not_loaded:
                continue
            if layer.group not in indexes:
                what = "SDXL (it changes text_encoder_2)" if layer.group == "text_encoder_2" else layer.group
                raise InvalidArgument(f"loras: {lora.file.path} is for {what}, and this model is {family}; "
                                      "pass a LoRA trained for this model's family")
            layers, flat = indexes[layer.group]
            name = flat.get(layer.module) if layer.kohya else layer.module
            target = layers.get(name) if name is not None else None
            if target is None:
                lacking.append(layer)
                continue
            param, shape = target
            if not _fits(layer.up, layer.down, shape):
                raise InvalidArgument(f"loras: {lora.file.path}: {layer.group} layer {name!r} (up "
                                      f"{tuple(layer.up.shape)}, down {tuple(layer.down.shape)}) does not fit the "
                                      f"model's weight {shape}; the LoRA is for another architecture (another "
                                      "width): pass one trained for this model")
            out.append(Match(lora, layer, name, param, shape))
        if lacking and missing is not None:
            raise InvalidArgument(missing(lora, lacking, lacking[0].group))
        if lacking:
            first = lacking[0]
            ldm = " (the original LDM U-Net's names: this model's blocks have no such layer)" \
                if re.match(r"(input_blocks|middle_block|output_blocks)", first.module) else ""
            raise InvalidArgument(
                f"loras: {lora.file.path}: {len(lacking)} of {len(lora.file.layers)} layers name modules this "
                f"model's {first.group} lacks (first: {first.module!r}{ldm}); the LoRA is for another architecture: "
                "pass one trained for this model")
    return out


def plan(loras: list[Lora], modules: dict[str, torch.nn.Module], family: str,
         not_loaded: frozenset[str] = frozenset()) -> dict[tuple[str, str], torch.Tensor]:
    """(group, weight's parameter name) -> the summed float32 update of ``loras`` on ``modules``
    (group -> torch module); raises as :func:`match` does."""
    deltas: dict[tuple[str, str], torch.Tensor] = {}
    for m in match(loras, {g: _module_index(mod) for g, mod in modules.items()}, family, not_loaded):
        key, delta = (m.layer.group, m.param), m.delta()
        deltas[key] = deltas[key] + delta if key in deltas else delta
    return deltas


def _fits(up: torch.Tensor, down: torch.Tensor, shape: tuple[int, ...]) -> bool:
    """up @ down has ``shape``: linear (out, r) @ (r, in); conv (out, r, 1, 1) @ (r, in, kh, kw), or a
    2-D pair on a 1x1 conv."""
    if up.shape[1] != down.shape[0] or up.shape[0] != shape[0]:
        return False
    if len(shape) == 2:
        return up.dim() == down.dim() == 2 and down.shape[1] == shape[1]
    if down.dim() == 4:
        return up.dim() == 4 and tuple(up.shape[2:]) == (1, 1) and tuple(down.shape[1:]) == shape[1:]
    return up.dim() == 2 and shape[2:] == (1, 1) and down.shape[1] == shape[1]


class FusedLoras:
    """A LoRA set fused into torch modules in place, and the weights as loaded to undo it exactly.

    ``modules``: group -> torch module (the unet, the text encoder(s)). In-place changes keep every
    tensor's storage, so a captured CUDA graph and any shared reference see the new weights."""

    def __init__(self, modules: dict[str, torch.nn.Module], family: str, engines: dict[str, Any] | None = None):
        self.modules = modules
        self.family = family
        #: group -> an exported engine whose copy of the weights follows the modules' (its
        #: ``load_weights``); None: the modules are what runs (the torch backend)
        self.engines = engines
        self._base: dict[tuple[str, str], torch.Tensor] = {}
        self.active: tuple[Lora, ...] = ()

    def _param(self, key: tuple[str, str]) -> torch.Tensor:
        return self.modules[key[0]].get_parameter(key[1])

    def check(self, loras: list[Lora]) -> None:
        """Refuse, as ``set`` would, a set that does not fit; changes nothing."""
        self._check_engines(set(plan(loras, self.modules, self.family)))

    @torch.no_grad()
    def set(self, loras: list[Lora]) -> None:
        deltas = plan(loras, self.modules, self.family)  # every check before the first change
        changed = set(self._base) | set(deltas)
        self._check_engines(changed)
        for key in [k for k in self._base if k not in deltas]:
            self._param(key).copy_(self._base.pop(key))
        for key, delta in deltas.items():
            p = self._param(key)
            base = self._base.setdefault(key, p.detach().clone())
            p.copy_((base.float() + delta.to(base.device)).to(p.dtype))
        if self.engines is not None:
            for group in sorted({g for g, _ in changed}):
                self.engines[group].load_weights({n: self._param((g, n)) for g, n in changed if g == group})
        self.active = tuple(loras)

    def _check_engines(self, keys: set[tuple[str, str]]) -> None:
        if self.engines is None:
            return
        for group in sorted({g for g, _ in keys}):
            names = self.engines[group].weight_names()
            lacking = sorted(n for g, n in keys if g == group and n not in names)
            if lacking:
                raise InvalidArgument(f"loras: the exported {group} holds no weight {lacking[0]!r} to replace (its "
                                      "compiler folded it into another constant); export with the LoRAs fused "
                                      "instead (sdfast export --lora FILE[:SCALE])")


def fuse_at_load(mods: dict[str, torch.nn.Module], info) -> None:
    """Fuse ``info.loras`` into the freshly loaded ``mods`` (some or all of the model's parts: an
    export loads one at a time), each layer into its part when that part is loaded."""
    from .model.wrappers import family_modules

    groups = [g for g in GROUPS if g in family_modules(info.family)]
    loaded = {g: mods[g] for g in groups if g in mods}
    if loaded:
        with torch.no_grad():
            for key, delta in plan(list(info.loras), loaded, info.family,
                                   frozenset(groups) - set(loaded)).items():
                p = loaded[key[0]].get_parameter(key[1])
                p.copy_((p.float() + delta.to(p.device)).to(p.dtype))


def as_loras(items: Any) -> list[Lora]:
    """``loras=`` as callers write it: a path, ``(path, scale)``, a Lora or LoraFile, or a list of those."""
    if items is None:
        return []
    from .rules import is_number

    if isinstance(items, (str, Path, Lora, LoraFile)) or (isinstance(items, tuple) and len(items) == 2
                                                  and isinstance(items[0], (str, Path)) and is_number(items[1])):
        items = [items]  # one LoRA, not a list of them
    if not isinstance(items, (list, tuple)):
        raise InvalidArgument(f"loras: expected a list of LoRA files or (file, scale) pairs, got {type(items).__name__}")
    out, seen = [], set()
    for item in items:
        if isinstance(item, Lora):
            lora = Lora(item.file, check_scale(item.scale))
        elif isinstance(item, LoraFile):
            lora = Lora(item, 1.0)
        elif isinstance(item, (str, Path)):
            lora = Lora(read_lora(item), 1.0)
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (str, Path)):
            lora = Lora(read_lora(item[0]), check_scale(item[1]))
        else:
            raise InvalidArgument(f"loras: a {type(item).__name__} ({repr(item)[:60]}) is neither a LoRA file nor a "
                                  "(file, scale) pair")
        if lora.file.sha256 in seen:
            raise InvalidArgument(f"loras: {lora.file.path} is given twice; pass it once with the sum of the scales")
        seen.add(lora.file.sha256)
        out.append(lora)
    return out
