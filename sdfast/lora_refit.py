"""LoRA on TensorRT plans built with ``sdfast export --format tensorrt --refit``: a swap refits weights.

UNVERIFIED on a GPU: TensorRT's refitter (``trt.Refitter``) is driven here as NVIDIA documents
it, and tested on the CPU against a fake ``tensorrt`` module (tests/test_tensorrt_refit.py) only.

Export (sdfast/export/tensorrt.py) builds the text encoder and U-Net plans with
``BuilderFlag.REFIT`` and writes beside each plan ``<name>.refit.safetensors``: the ONNX graph's
float initializers as they were (the names TensorRT's ONNX parser gives the plan's weights, the
names its refitter takes), sealed by the manifest's sha256 like every file of the export. The
component's manifest record ``refit`` maps each LoRA-targetable layer (every Linear and Conv2d,
by its diffusers name, as :func:`lora.match` resolves a LoRA file's keys) to its initializer and
whether the graph holds it transposed (a Linear traced as MatMul holds ``W.T``).

A set is applied the way :class:`lora.FusedLoras` fuses it, always from the base: each touched
weight is ``(base in fp32 + Σ scale·alpha/rank·up@down)`` cast back to the initializer's type, and
only the weights whose value changes (touched by the set before or by the new one) are refitted;
a weight the set no longer touches gets its base bytes back. So ``set([])`` restores the plan's
weights bit for bit and A → B → A leaves exactly A: nothing is ever computed from the weights the
engine holds now (whose blend A → B → A is the TensorRT web UI's known bug). Every LoRA is matched
before any engine changes; a refit TensorRT rejects midway refits the set before back and raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ArtifactMismatch, InvalidArgument
from .lora import GROUPS, Lora, layer_index, match

NOT_REFITTABLE = ("loras: these TensorRT plans were built without --refit, so their weights are fixed; export them "
                  "again with sdfast export --format tensorrt --refit to swap LoRAs, or with the set fused (sdfast "
                  "export --lora FILE[:SCALE])")


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class RefitRefused(RuntimeError):
    """TensorRT refused a weight before the refit began: the engine holds what it held."""


def refit_file(name: str) -> str:
    """The base weights' file of component ``name``, beside its plan."""
    return f"{name}.refit.safetensors"


@dataclass(frozen=True)
class RefitLayer:
    name: str  # the layer's dotted name in its group module (diffusers' / transformers')
    weight: str  # the ONNX initializer holding its weight: the plan's refit name
    transposed: bool  # the initializer is W.T (a Linear traced as MatMul)
    shape: tuple[int, ...]  # the torch weight's shape

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape)) if self.transposed else self.shape


@dataclass(frozen=True)
class RefitTable:
    """One component's refittable layers, as its manifest record ``refit`` lists them."""

    group: str
    layers: tuple[RefitLayer, ...]

    def record(self) -> dict[str, Any]:
        return {"group": self.group,
                "layers": [[x.name, x.weight, "t" if x.transposed else "w", list(x.shape)] for x in self.layers]}

    @classmethod
    def from_record(cls, d: Any, where: str) -> RefitTable:
        try:
            group, rows = d["group"], d["layers"]
            layers = tuple(RefitLayer(n, w, t == "t", tuple(int(s) for s in shape)) for n, w, t, shape in rows)
            ok = (group in GROUPS and bool(layers)
                  and all(isinstance(n, str) and isinstance(w, str) and t in ("t", "w") and len(shape) in (2, 4)
                          and all(isinstance(s, int) and s > 0 for s in shape) for n, w, t, shape in rows)
                  and not any(x.transposed and len(x.shape) != 2 for x in layers)
                  and len({x.name for x in layers}) == len(layers) == len({x.weight for x in layers}))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ArtifactMismatch(f"engines: {where}: refit is not a refit table (group, layers of [name, weight, "
                                   "t|w, shape], each layer and weight once); export again")
        return cls(group, layers)

    def by_name(self) -> dict[str, RefitLayer]:
        return {x.name: x for x in self.layers}

    def index(self):
        """The refittable layers as :func:`lora.match` reads a model's layers (param: the layer name)."""
        shapes = {x.name: x.shape for x in self.layers}
        text = self.group != "unet" and not any(n.startswith("text_model.") for n in shapes)
        return layer_index(shapes, {n: n for n in shapes}, flattened_text=text)


class RefitBase:
    """A plan's base weights (its ``.refit.safetensors``, hashed with the export), read on demand;
    the ones a LoRA touches are kept once, in fp32."""

    def __init__(self, path: Path, table: RefitTable, hint: str):
        from safetensors import safe_open

        self.path = Path(path)
        self._fp32: dict[str, torch.Tensor] = {}
        with safe_open(str(self.path), framework="pt") as fh:
            slices = {k: fh.get_slice(k) for k in fh.keys()}
            shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
            #: weight name -> its stored type (what a fused weight is cast back to)
            self.dtypes = {k: _DTYPES.get(s.get_dtype(), torch.float32) for k, s in slices.items()}
        self.names = frozenset(shapes)
        for x in table.layers:
            if shapes.get(x.weight) != x.stored_shape:
                have = "no such tensor" if x.weight not in shapes else f"shape {list(shapes[x.weight])}"
                raise ArtifactMismatch(f"engines: {self.path} has {have} for {x.weight!r}, which the manifest's refit "
                                       f"table gives layer {x.name!r} of shape {list(x.stored_shape)}; {hint}")

    def stored(self, name: str) -> torch.Tensor:
        """The weight as the ONNX graph holds it (its layout and type): the plan's own base bytes."""
        from safetensors import safe_open

        if name not in self.names:
            raise KeyError(name)
        with safe_open(str(self.path), framework="pt") as fh:
            return fh.get_tensor(name)

    def fp32(self, name: str) -> torch.Tensor:
        if name not in self._fp32:
            self._fp32[name] = self.stored(name).float()
        return self._fp32[name]


class RefitLoras:
    """The LoRA set of refittable TensorRT engines. ``engines``: group -> an engine with ``refit``
    (its RefitTable), ``refit_base`` (RefitBase) and ``refit_weights(values, supply)``."""

    def __init__(self, engines: dict[str, Any], family: str):
        self.engines = engines
        self.family = family
        self.active: tuple[Lora, ...] = ()
        #: group -> weight name -> the value the engine holds now, for the weights that differ from the base
        self._now: dict[str, dict[str, torch.Tensor]] = {g: {} for g in engines}

    @classmethod
    def of(cls, engines: dict[str, Any], family: str) -> RefitLoras:
        """The set of ``engines`` (group -> TensorRT engine); refuses, one line, plans built without ``--refit``."""
        if any(getattr(e, "refit", None) is None for e in engines.values()):
            raise InvalidArgument(NOT_REFITTABLE)
        return cls(engines, family)

    def targets(self, loras: list[Lora]) -> dict[str, dict[str, torch.Tensor]]:
        """group -> weight name -> its value under ``loras`` (stored layout and type), for every weight
        they touch; raises, changing nothing, on a LoRA that does not fit."""
        tables = {g: e.refit for g, e in self.engines.items()}
        deltas: dict[tuple[str, str], torch.Tensor] = {}
        for m in match(loras, {g: t.index() for g, t in tables.items()}, self.family, missing=_no_refit):
            key, delta = (m.layer.group, m.param), m.delta()
            deltas[key] = deltas[key] + delta if key in deltas else delta  # summed as lora.plan sums them
        out: dict[str, dict[str, torch.Tensor]] = {g: {} for g in tables}
        layers = {g: t.by_name() for g, t in tables.items()}
        for (group, name), delta in deltas.items():
            layer, base = layers[group][name], self.engines[group].refit_base
            w = base.fp32(layer.weight)
            fused = ((w.T if layer.transposed else w) + delta).to(base.dtypes[layer.weight])  # FusedLoras' arithmetic
            out[group][layer.weight] = (fused.T if layer.transposed else fused).contiguous()
        return out

    def check(self, loras: list[Lora]) -> None:
        self.targets(loras)

    def set(self, loras: list[Lora]) -> None:
        new = self.targets(loras)  # every check before the first engine changes
        done: list[str] = []
        for group in self.engines:
            try:
                self._refit(group, self._now[group], new[group])
            except Exception as e:
                # a refused weight changed nothing; a failed refit_cuda_engine may have changed some
                self._restore([*done, *([] if isinstance(e, RefitRefused) else [group])], new)
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise RuntimeError(f"loras: TensorRT could not refit the {group} ({first}); the LoRA set before "
                                   "was refitted back") from e
            done.append(group)
        self._now = new
        self.active = tuple(loras)

    def _refit(self, group: str, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
        """Take the engine of ``group`` from the weights ``before`` to ``after`` (both: name -> value
        where it differs from the base): every name in either gets its ``after`` value or the base."""
        engine = self.engines[group]
        base = engine.refit_base
        names = sorted(set(before) | set(after))
        if not names:
            return

        def value(name: str) -> torch.Tensor:
            return after[name] if name in after else base.stored(name)

        engine.refit_weights({n: value(n) for n in names}, value)

    def _restore(self, groups: list[str], tried: dict[str, dict[str, torch.Tensor]]) -> None:
        for group in groups:
            try:
                self._refit(group, tried[group], self._now[group])
            except Exception as e:
                raise RuntimeError(f"loras: TensorRT could not refit the {group} back to the LoRA set before either "
                                   f"({e}); its weights are now unknown: load the pipeline again") from e


def _no_refit(lora: Lora, missing: list, group: str) -> str:
    return (f"loras: {lora.file.path}: {len(missing)} of {len(lora.file.layers)} layers change {group} layers these "
            f"TensorRT plans cannot refit (first: {missing[0].module!r}; the export found no single ONNX initializer "
            "holding their weight); export with the set fused instead (sdfast export --lora FILE[:SCALE]), or run "
            "it on the torch backend")
