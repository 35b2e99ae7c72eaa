"""The Engine protocol and the backend registry."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from ..artifacts import Manifest, check_io, load_manifest, rebuild_hint
from ..errors import ArtifactMismatch, InvalidArgument
from ..lora_slots import SlotTable
from ..model.components import COMPONENT_MODULE, ComponentSpec, Precision, ShapeProfile
from ..model.info import ModelInfo, model_arg
from ..rules import check_side


@runtime_checkable
class Engine(Protocol):
    """What the runtime may read of any engine (every backend's and every wrapper's).

    precision: what it computes in; profile / size_multiple: the shapes an exported engine
    serves (None: any shape, the eager engines); graph_safe: its call may be captured in a CUDA
    graph as it is (graphs.py wraps the others)."""

    spec: ComponentSpec
    device: torch.device
    precision: Precision
    profile: ShapeProfile | None
    size_multiple: int | None
    graph_safe: bool

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]: ...


class WrappedEngine:
    """``engine`` with its call replaced by ``call(**inputs)``: the Engine protocol's attributes
    are ``engine``'s own. For spies, recorders and wrappers that call through to ``engine``."""

    def __init__(self, engine: Engine, call):
        self.engine, self._call = engine, call
        self.spec, self.device, self.precision = engine.spec, engine.device, engine.precision
        self.profile, self.size_multiple, self.graph_safe = engine.profile, engine.size_multiple, engine.graph_safe

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._call(**inputs)


class ExportedEngine:
    """What every engine built from an export carries: its component spec, device, the precision
    it was built in, and the shape profile and side multiple that :func:`check_request` holds
    requests to."""

    graph_safe = False
    #: the LoRA slots its file takes after the component's inputs (``sdfast export --lora-rank``;
    #: sdfast/lora_slots.py), None without; ``slot_inputs`` the factors it runs with now
    lora_slots: SlotTable | None = None
    slot_dtype: torch.dtype = torch.float32
    #: a plan built with ``--refit`` (TensorRT): its lora_refit.RefitTable, with ``refit_base`` and
    #: ``refit_weights(values, supply)`` (sdfast/lora_refit.py); None: its weights are fixed
    refit = None

    def __init__(self, spec: ComponentSpec, device: torch.device, precision: Precision,
                 profile: ShapeProfile, size_multiple: int):
        self.spec = spec
        self.device = device
        self.precision = precision
        self.dtype = precision.torch_dtype
        self.profile = profile
        self.size_multiple = size_multiple
        self.slot_inputs: list[torch.Tensor] = []

    def init_slots(self, table: SlotTable | None, dtype: torch.dtype) -> None:
        """Take ``table``'s slots with zero factors (the base model) in ``dtype``."""
        self.lora_slots, self.slot_dtype = table, dtype
        self.slot_inputs = table.zeros(dtype) if table is not None else []

    def set_lora_slots(self, tensors: list[torch.Tensor]) -> None:
        """Run with these slot factors from the next call on (``SlotLoras`` computed and checked them)."""
        want = self.lora_slots.input_shapes() if self.lora_slots is not None else []
        if [tuple(t.shape) for t in tensors] != want or any(t.dtype != self.slot_dtype for t in tensors):
            raise AssertionError(f"{self.spec.name}: slot factors do not match the engine's slots")  # pragma: no cover
        self.slot_inputs = [t.to(self.device).contiguous() for t in tensors]


def engine_inputs(spec: ComponentSpec, inputs: dict[str, torch.Tensor], device: torch.device,
                  dtype: torch.dtype) -> list[torch.Tensor]:
    """The spec's inputs in order, on ``device``, contiguous; float ones cast to ``dtype``."""
    out = []
    for t in spec.inputs:
        x = inputs[t.name].to(device)
        out.append((x.to(dtype) if t.kind == "float" else x).contiguous())
    return out


def open_export(info: ModelInfo, engines: str | Path | None, backend: str, fmt: str, what: str,
                export_flags: str = "", device: dict[str, Any] | None = None) -> tuple[Path, Manifest, str]:
    """The opening every exported backend's ``load`` shares: the folder it was given (or how to
    make one), its manifest read and verified against the model (``device``: the GPU a plan must
    match), and the rebuild hint its errors end with."""
    if engines is None:
        raise InvalidArgument(f"engines: the {backend} backend runs {what}; pass --engines DIR made by "
                              f"`sdfast export --model {model_arg(info)} --out DIR --format {fmt}{export_flags}`")
    root = Path(engines)
    m = load_manifest(root, info, fmt, device=device)
    return root, m, rebuild_hint(m, root, info, fmt)


def check_engine_io(m: Manifest, root: Path, info: ModelInfo, name: str, inputs: list, outputs: list,
                    slot_type: str) -> SlotTable | None:
    """``artifacts.check_io`` of one engine file, and of its LoRA slot inputs where the manifest
    lists slots for it (``slot_type``: their element type); returns the slot table or None."""
    record = m.components[name].get("lora_slots")
    if record is None:
        check_io(m, root, info, name, inputs, outputs)
        return None
    path, hint = m.file(root, name), rebuild_hint(m, root, info, m.format)
    table = SlotTable.from_record(record, str(path))
    if table.group != COMPONENT_MODULE[name]:
        raise ArtifactMismatch(f"engines: {path}: lora_slots are for {table.group}, but {name} runs "
                               f"{COMPONENT_MODULE[name]} (an edited manifest); {hint}")
    n = len(info.specs[name].inputs)
    check_io(m, root, info, name, inputs[:n], outputs)
    table.check_io(inputs[n:], slot_type, path, hint)
    return table


def read_artifact(read: Callable[[], Any], library: str, path: Path, hint: str) -> Any:
    """``read()`` (a library opening one component's file); what it raises, in the library's own
    types and often many lines, becomes one ArtifactMismatch line naming the file and the fix."""
    try:
        return read()
    except InvalidArgument:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ArtifactMismatch(f"engines: {library} cannot open {path} ({first}); {hint}") from None


def load_engines(info: ModelInfo, backend: str, device: torch.device, precision: Precision,
                 engines: str | None = None, options: dict[str, Any] | None = None) -> dict[str, Engine]:
    """The engines of ``backend`` for every component, keyed by component name.

    ``options`` (e.g. ``attention``) go to the backends whose record lists them; others ignore them.
    """
    from .. import backends

    record = backends.get(backend)
    module = record.load_module()
    extra = {k: v for k, v in (options or {}).items() if k in record.options}
    return module.load(info, device=device, precision=precision, engines=engines, **extra)


def check_request(engines: dict[str, Engine], batch: int, height: int, width: int, guided: bool,
                  chunks: int = 1) -> None:
    """Refuse, before any work, a request outside the shape profile of exported engines.

    Engines built for a profile expose it as ``engine.profile`` (a ``components.ShapeProfile``);
    eager engines have none and serve any shape. ``guided`` is accepted for the record: the
    profile's component batch ranges already span both the guided (2B) and unguided (B) U-Net.
    """
    for engine in engines.values():
        profile = engine.profile
        if profile is None:
            continue
        multiple = engine.size_multiple
        for arg, v in (("height", height), ("width", width)):
            if multiple:
                check_side(arg, v, multiple, f"exported engines serve multiples of {multiple}: VAE factor × "
                           "U-Net downsampling")
        reasons = profile.covers(batch, height, width, chunks)
        if reasons:
            flags = _covering_flags(profile, batch, height, width, chunks)
            raise InvalidArgument(
                f"engines: the request ({batch} image(s) of {height}x{width}) is outside the exported profile "
                f"({profile.describe()}): {'; '.join(reasons)}; export again with {flags}, or change the request"
            )
        return  # one profile per engine set


def _covering_flags(profile, batch: int, height: int, width: int, chunks: int = 1) -> str:
    """The export range flags whose profile covers both the old one and the request."""
    parts = []
    for arg, v, (lo, _, hi) in (("batch", batch, profile.batch), ("height", height, profile.height),
                                ("width", width, profile.width), ("chunks", chunks, profile.chunks)):
        if arg == "chunks" and lo <= v <= hi:
            continue  # only named when prompt length is what falls outside
        parts.append(f"--min-{arg} {min(lo, v)} --max-{arg} {max(hi, v)}")
    return " ".join(parts)
