"""LoRA slots: exported engines that take a LoRA set as inputs, so a swap is a copy, not a re-export.

ONNX Runtime and OpenVINO compile the weights into their engines (ORT's layout passes repack
them at session load, OpenVINO's CPU plugin reorders them at compile), so a fused LoRA means a
new session or a new compile: 5.7 s for the SD 1.5 U-Net's ORT session on one thread, before any
image (bench/README.md, "LoRA"). ``sdfast export --lora-rank R`` instead writes every slot layer
as its base weight plus an unfused low-rank branch whose two factors are engine inputs::

    y = W x + up · (down · x)        down: (R, in), up: (out, R)

(a 1×1 convolution: the same with 1×1 kernels). A LoRA set becomes those inputs: per layer its
files' ``down`` rows stacked and their ``up`` columns, each scaled by ``scale · alpha / rank``,
zero-padded to R — a few copies, no matrix product, no compile. Without a LoRA the inputs are
zeros and the branch adds exact zeros; it still costs its two small matmuls per layer per call,
which is why slots are opt-in (measured in bench/README.md). This is openvino.genai's "dynamic"
adapter mode, done at export for both engines.

The slot layers are the ones LoRA trainers target: in the U-Net the attention blocks' q/k/v/out,
feed-forward and proj_in/out layers (``.attentions.`` in diffusers' names); in each text encoder
every layer's q/k/v/out_proj and fc1/fc2. A LoRA that changes any other layer (LoCon's resnet
convolutions), or needs more than R ranks at one layer (its rank, summed over the set), is
refused in one line naming the layer and the fix; the set before stays. The manifest lists the
slots per component (``lora_slots``: rank and each layer's name, kind and widths), and loading
checks the engine file's extra inputs against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .errors import ArtifactMismatch, InvalidArgument
from .lora import GROUPS, Lora, layer_index, match

#: the most ranks one slot layer may take (a set's ranks add up; LoRAs in use are 4-256)
MAX_RANK = 512
UNET_SLOTS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_SLOTS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
WHAT = ("the U-Net's attention-block layers (q/k/v/out, feed-forward, proj_in/out) and the text encoders' "
        "attention and MLP layers")


def check_rank(value: Any, arg: str = "lora_rank") -> int:
    """``--lora-rank``: 0 (no slots) to MAX_RANK."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RANK:
        raise InvalidArgument(f"{arg}: {value!r} is not a slot rank; pass an integer from 1 to {MAX_RANK} (the sum "
                              "of the ranks of the LoRAs used together, e.g. 64), or 0 for no slots")
    return value


def is_slot(group: str, name: str, module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Conv2d):
        if tuple(module.kernel_size) != (1, 1) or module.groups != 1 or tuple(module.stride) != (1, 1):
            return False
    elif not isinstance(module, torch.nn.Linear):
        return False
    if group == "unet":
        return ".attentions." in f".{name}" and any(name.endswith(f".{s}") for s in UNET_SLOTS)
    return any(name.endswith(f".{s}") for s in TEXT_SLOTS)


@dataclass(frozen=True)
class Slot:
    name: str  # the layer's dotted name in its group module
    kind: str  # "linear" | "conv" (1x1)
    fan_in: int
    fan_out: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.fan_out, self.fan_in) if self.kind == "linear" else (self.fan_out, self.fan_in, 1, 1)


@dataclass(frozen=True)
class SlotTable:
    """One component's slots, as its manifest record ``lora_slots`` lists them."""

    group: str
    rank: int
    slots: tuple[Slot, ...]

    def input_names(self) -> list[str]:
        return [n for i in range(len(self.slots)) for n in (f"lora_down_{i}", f"lora_up_{i}")]

    def input_shapes(self) -> list[tuple[int, int]]:
        return [s for slot in self.slots for s in ((self.rank, slot.fan_in), (slot.fan_out, self.rank))]

    def zeros(self, dtype: torch.dtype) -> list[torch.Tensor]:
        return [torch.zeros(s, dtype=dtype) for s in self.input_shapes()]

    def record(self) -> dict[str, Any]:
        return {"group": self.group, "rank": self.rank,
                "layers": [[s.name, s.kind, s.fan_in, s.fan_out] for s in self.slots]}

    @classmethod
    def from_record(cls, d: Any, where: str) -> SlotTable:
        """The manifest's ``lora_slots`` of one component, checked; ``where`` names it in errors."""
        try:
            group, rank, layers = d["group"], d["rank"], d["layers"]
            slots = tuple(Slot(str(n), k, int(i), int(o)) for n, k, i, o in layers)
            ok = (group in GROUPS and isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank <= MAX_RANK
                  and slots and all(s.kind in ("linear", "conv") and s.fan_in > 0 and s.fan_out > 0 for s in slots)
                  and all(isinstance(n, str) and isinstance(i, int) and isinstance(o, int) for n, _, i, o in layers))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ArtifactMismatch(f"engines: {where}: lora_slots is not a slot table (group, rank 1..{MAX_RANK}, "
                                   "layers of [name, linear|conv, in, out]); export again")
        return cls(group, rank, slots)

    def index(self):
        """The slot layers as :func:`lora.match` reads a model's layers."""
        shapes = {s.name: s.shape for s in self.slots}
        text = self.group != "unet" and not any(n.startswith("text_model.") for n in shapes)
        return layer_index(shapes, {n: f"{n}.weight" for n in shapes}, flattened_text=text)

    def check_io(self, io: list[tuple[str, str | None, list[int | None]]], dtype: str, path: Any, hint: str) -> None:
        """Refuse an engine file whose extra inputs are not these slots (names, widths, type)."""
        names = [n for n, _, _ in io]
        if names != self.input_names():
            raise ArtifactMismatch(f"engines: {path} has {len(names)} inputs beyond the component's, but the "
                                   f"manifest lists {len(self.slots)} LoRA slots ({2 * len(self.slots)} inputs) (a "
                                   f"swapped or foreign file); {hint}")
        for (name, kind, dims), shape in zip(io, self.input_shapes(), strict=True):
            if (kind is not None and kind != dtype) or [d for d in dims] != list(shape):
                raise ArtifactMismatch(f"engines: {path} input {name} is {kind} {dims} but the manifest's slot is "
                                       f"{dtype} {list(shape)} (a foreign file or an edited manifest); {hint}")


# -- export: the slot branch in the traced torch module -----------------------------------

class SlotLayer(torch.nn.Module):
    """A Linear or 1x1 Conv2d plus the branch ``up · (down · x)`` whose factors the export's
    wrapper sets from its inputs before each call (:class:`Slotted`)."""

    def __init__(self, base: torch.nn.Module):
        super().__init__()
        self.base = base
        self.conv = isinstance(base, torch.nn.Conv2d)
        self.down: torch.Tensor | None = None
        self.up: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.conv:
            return y + F.conv2d(F.conv2d(x, self.down[:, :, None, None]), self.up[:, :, None, None])
        return y + F.linear(F.linear(x, self.down), self.up)


def add_slots(group_module: torch.nn.Module, group: str, rank: int) -> tuple[list[SlotLayer], SlotTable]:
    """Replace ``group_module``'s slot layers by :class:`SlotLayer` in place (a module loaded for
    export only); returns them in table order and the table."""
    check_rank(rank)
    found = [(n, m) for n, m in group_module.named_modules() if is_slot(group, n, m)]
    if not found:
        raise InvalidArgument(f"lora_rank: the {group} has no layer a LoRA slot fits ({WHAT}); export without "
                              "--lora-rank")
    layers, slots = [], []
    for name, module in found:
        parent_name, _, attr = name.rpartition(".")
        parent = group_module.get_submodule(parent_name) if parent_name else group_module
        layer = SlotLayer(module)
        if isinstance(parent, (torch.nn.ModuleList, torch.nn.Sequential)):
            parent[int(attr)] = layer
        else:
            setattr(parent, attr, layer)
        w = module.weight
        slots.append(Slot(name, "conv" if layer.conv else "linear", int(w.shape[1]), int(w.shape[0])))
        layers.append(layer)
    return layers, SlotTable(group, rank, tuple(slots))


class Slotted(torch.nn.Module):
    """A component wrapper whose call takes the slot factors after the component's own inputs."""

    def __init__(self, inner: torch.nn.Module, layers: list[SlotLayer], n_inputs: int):
        super().__init__()
        self.inner = inner
        self.n_inputs = n_inputs
        self.__dict__["_layers"] = list(layers)  # already inside ``inner``; not registered twice

    def forward(self, *args: torch.Tensor):
        k = self.n_inputs
        for i, layer in enumerate(self._layers):
            layer.down, layer.up = args[k + 2 * i], args[k + 2 * i + 1]
        try:
            return self.inner(*args[:k])
        finally:
            for layer in self._layers:
                layer.down = layer.up = None


def slotted_component(mods: dict[str, torch.nn.Module], name: str, family: str, rank: int
                      ) -> tuple[torch.nn.Module, SlotTable | None]:
    """The fixed-I/O wrapper of component ``name`` over ``mods`` (load_torch_modules' parts), with
    slots when ``rank`` and the component is a LoRA group; (wrapper, its slot table or None)."""
    from .model.components import COMPONENT_MODULE, FAMILY_SPECS
    from .model.wrappers import component_modules

    group = COMPONENT_MODULE[name]
    if not rank or group not in GROUPS:
        return component_modules(mods, family)[name], None
    layers, table = add_slots(mods[group], group, rank)
    n = len(FAMILY_SPECS[family][name].inputs)
    return Slotted(component_modules(mods, family)[name], layers, n), table


# -- run time: a LoRA set as slot inputs --------------------------------------------------

class SlotLoras:
    """The LoRA set of engines exported with slots: ``set`` computes every slot input, checking
    the whole set first, then hands each engine its tensors (``engine.set_lora_slots``)."""

    def __init__(self, engines: dict[str, Any], family: str):
        self.engines = engines  # group -> engine with .lora_slots (SlotTable) and .set_lora_slots
        self.family = family
        self.active: tuple[Lora, ...] = ()

    def check(self, loras: list[Lora]) -> dict[str, list[torch.Tensor]]:
        tables = {g: e.lora_slots for g, e in self.engines.items()}
        matches = match(loras, {g: t.index() for g, t in tables.items()}, self.family, missing=_no_slot)
        by_layer: dict[tuple[str, str], list] = {}
        for m in matches:
            by_layer.setdefault((m.layer.group, m.param), []).append(m)
        out = {}
        for group, table in tables.items():
            dtype = self.engines[group].slot_dtype
            tensors = []
            for slot in table.slots:
                down = torch.zeros(table.rank, slot.fan_in)
                up = torch.zeros(slot.fan_out, table.rank)
                at = 0
                for m in by_layer.get((group, f"{slot.name}.weight"), []):
                    u, d = m.factors()
                    r = d.shape[0]
                    if at + r > table.rank:
                        need = sum(x.factors()[1].shape[0] for x in by_layer[(group, f"{slot.name}.weight")])
                        raise InvalidArgument(
                            f"loras: the set needs rank {need} at {group} layer {slot.name!r}, and these engines "
                            f"were exported with --lora-rank {table.rank}; export with --lora-rank {need} or more, "
                            "or pass fewer LoRAs at once")
                    down[at:at + r], up[:, at:at + r] = d, u
                    at += r
                tensors += [down.to(dtype).contiguous(), up.to(dtype).contiguous()]
            out[group] = tensors
        return out

    def set(self, loras: list[Lora]) -> None:
        tensors = self.check(loras)  # every check before the first engine changes
        for group, engine in self.engines.items():
            engine.set_lora_slots(tensors[group])
        self.active = tuple(loras)


def _no_slot(lora: Lora, missing: list, group: str) -> str:
    return (f"loras: {lora.file.path}: {len(missing)} of {len(lora.file.layers)} layers change {group} layers these "
            f"engines have no LoRA slot for (first: {missing[0].module!r}; slots are {WHAT}); export with the set "
            "fused instead (sdfast export --lora FILE[:SCALE]), or run it on the torch backend")
