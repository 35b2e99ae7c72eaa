"""OpenVINO engines over an ``sdfast export --format openvino`` folder (CPU).

Tensors stay torch tensors: inputs are wrapped as OpenVINO tensors over the torch buffers (no
copy; bf16 as its raw 16-bit words typed ``bf16``), and every call hands the request a freshly
allocated torch output to write into, so a returned tensor never aliases a later call's.
Loading verifies the manifest (model fingerprint, file hashes), then each IR's real I/O
(names, element types, static dims and intervals) against the spec and profile, before any
model is compiled. Importing this module never imports diffusers.

CPU settings (``compile_config``), chosen by measurement (bench/openvino_unet.py, numbers in
bench/README.md): the LATENCY hint with one stream (the loop makes one call at a time, so a
second stream only splits the cores), ``INFERENCE_NUM_THREADS`` = torch's thread count (the
two never run at once and share one budget), and the inference precision from the manifest
(never the plugin's default, which is bf16 on AMX CPUs even for an fp32 export). CPU pinning
follows ``SDFAST_OV_PINNING`` (default off: see ``PINNING_DEFAULT``).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch

from ..artifacts import Manifest, check_precision, rebuild_hint
from ..components import ComponentSpec, Precision, ShapeProfile, output_shapes, size_multiple
from ..errors import ArtifactMismatch, InvalidArgument
from ..models import ModelInfo
from .base import ExportedEngine, check_engine_io, engine_inputs, open_export, read_artifact

log = logging.getLogger(__name__)

FORMAT = "openvino"
#: OpenVINO element type names → the names ``artifacts.check_io`` compares.
ELEMENT_TYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "i64": "int64"}
#: the inference precision hint of each precision an export builds.
OV_HINT = {Precision.FP32: "f32", Precision.BF16: "bf16"}
#: input shapes each engine compiles statically before falling back to its interval model: the
#: guided and unguided U-Net batch plus one (see OpenVinoEngine).
STATIC_SHAPES = 3
#: Pinning threads to cores did not pay on the shared 2-core machine measured (see the module
#: doc); a dedicated machine may set SDFAST_OV_PINNING=1.
PINNING_DEFAULT = False


def compile_config(inference_precision: str, threads: int | None = None,
                   pinning: bool | None = None) -> dict[str, Any]:
    """The CPU plugin settings every engine compiles with (see the module doc)."""
    if pinning is None:
        env = os.environ.get("SDFAST_OV_PINNING")
        pinning = PINNING_DEFAULT if env is None else env.strip().lower() in ("1", "true", "yes", "on")
    return {
        "INFERENCE_PRECISION_HINT": inference_precision,
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": "1",
        "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
        "ENABLE_CPU_PINNING": bool(pinning),
    }


def to_ov(x: torch.Tensor):
    """An ``ov.Tensor`` sharing ``x``'s memory (``x`` contiguous on the CPU)."""
    import openvino as ov

    if x.dtype == torch.bfloat16:
        return ov.Tensor(x.view(torch.int16).numpy(), ov.Shape(list(x.shape)), ov.Type.bf16)
    return ov.Tensor(x.numpy(), shared_memory=True)


class OpenVinoEngine(ExportedEngine):
    """One component on OpenVINO; float outputs come back float32.

    Each input shape seen is compiled with every dim static (``model.reshape`` of the IR's
    intervals to that shape), up to ``static_shapes`` shapes, then the interval model serves
    the rest: the CPU plugin plans memory and picks kernels once per static shape, which is its
    fast case, while a static-side profile meets only a few shapes (the guided and unguided
    U-Net batch). The profile's tuned shape is compiled on load, so a broken IR fails there."""

    def __init__(self, spec: ComponentSpec, model, core, config: dict[str, Any], info: ModelInfo,
                 device: torch.device, precision: Precision, profile: ShapeProfile, static_shapes: int):
        super().__init__(spec, device, precision, profile, size_multiple(info))
        self.model = model
        self.core = core
        self.config = config
        self.info = info
        self.static_shapes = static_shapes
        self._requests: dict[tuple[tuple[int, ...], ...], Any] = {}
        self._dynamic = None
        self._slot_ov: list = []  # the LoRA slots' factors as ov.Tensors (init_slots / set_lora_slots)
        self._lock = threading.Lock()  # one request per shape: calls from several threads take turns

    def init_slots(self, table, dtype: torch.dtype) -> None:
        super().init_slots(table, dtype)
        self._slot_ov = [to_ov(x) for x in self.slot_inputs]  # wrapped once per set, not per call

    def set_lora_slots(self, tensors: list[torch.Tensor]) -> None:
        super().set_lora_slots(tensors)
        self._slot_ov = [to_ov(x) for x in self.slot_inputs]

    def request_for(self, shapes: tuple[tuple[int, ...], ...]):
        """The infer request serving input ``shapes`` (compiled on first need; caller holds the lock)."""
        req = self._requests.get(shapes)
        if req is not None:
            return req
        import openvino as ov

        if self.model.is_dynamic() and len(self._requests) < self.static_shapes:
            m = self.model.clone()
            m.reshape({i: ov.PartialShape(list(s)) for i, s in enumerate(shapes)})
            req = self._requests[shapes] = self.core.compile_model(m, "CPU", self.config).create_infer_request()
            log.info("%s: compiled for %s", self.spec.name, shapes)
            return req
        if not self.model.is_dynamic():
            req = self._requests[shapes] = self.core.compile_model(self.model, "CPU", self.config).create_infer_request()
            return req
        if self._dynamic is None:
            self._dynamic = self.core.compile_model(self.model, "CPU", self.config).create_infer_request()
        return self._dynamic

    @property
    def compiled(self):
        """The compiled model of the first shape served (for inspecting its properties)."""
        with self._lock:
            req = next(iter(self._requests.values()), None) or self._dynamic
        return req.get_compiled_model()

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        keep = engine_inputs(self.spec, inputs, self.device, self.dtype)  # must outlive the run
        in_shapes = tuple(tuple(x.shape) for x in keep)
        shapes = output_shapes(self.spec, self.info, dict(zip(self.spec.input_names, in_shapes, strict=True)))
        outs = {t.name: torch.empty(shapes[t.name], dtype=self.dtype) for t in self.spec.outputs}
        with self._lock:
            request = self.request_for(in_shapes)
            for i, x in enumerate(keep):
                request.set_input_tensor(i, to_ov(x))
            for i, t in enumerate(self._slot_ov, len(keep)):  # then the LoRA slots' factors, if any
                request.set_input_tensor(i, t)
            for i, t in enumerate(self.spec.outputs):
                request.set_output_tensor(i, to_ov(outs[t.name]))
            request.infer()
        return {k: v.float() for k, v in outs.items()}


def _ov_io(ports) -> list[tuple[str, str | None, list[int | None]]]:
    """OpenVINO ports as (name, element type, dims with None for a dynamic dim) for ``check_io``."""
    out = []
    for p in ports:
        names = sorted(p.get_names())
        kind = p.get_element_type().get_type_name()
        out.append((names[0] if names else "", ELEMENT_TYPES.get(kind, kind),
                    [d.get_length() if d.is_static else None for d in p.get_partial_shape()]))
    return out


def check_bounds(model, m: Manifest, root: Path, info: ModelInfo, name: str) -> None:
    """Refuse an IR whose dynamic dims are not bounded by the manifest's profile (check_io has
    made sure they are dynamic; an unbounded or differently bounded one is not this export)."""
    shapes = m.profile.shapes(info.specs[name], info, "inputs")
    for port in model.inputs[:len(info.specs[name].inputs)]:  # LoRA slots (after them) are static
        tname = sorted(port.get_names())[0]
        lo, _, hi = shapes[tname]
        for axis, (d, a, b) in enumerate(zip(port.get_partial_shape(), lo, hi, strict=True)):
            if d.is_static:
                continue
            if (d.get_min_length(), d.get_max_length()) != (a, b):
                raise ArtifactMismatch(
                    f"engines: {m.file(root, name)} input {tname} spans {d.get_min_length()}..{d.get_max_length()} "
                    f"on axis {axis} but the manifest's profile spans {a}..{b} (a foreign or edited file); "
                    f"{rebuild_hint(m, root, info, FORMAT)}")


def load(info: ModelInfo, device: torch.device, precision: Precision, engines: str | None = None,
         threads: int | None = None, static_shapes: int | None = None) -> dict[str, OpenVinoEngine]:
    """The engines of an export; ``static_shapes`` per engine (default ``SDFAST_OV_STATIC_SHAPES``
    or STATIC_SHAPES; 0 runs the IR's interval shapes as they are)."""
    if device.type != "cpu":
        raise InvalidArgument(f"device: the openvino backend runs on the CPU, not {device.type}; use --device cpu")
    import openvino as ov

    if static_shapes is None:
        static_shapes = int(os.environ.get("SDFAST_OV_STATIC_SHAPES", STATIC_SHAPES))
    root, m, hint = open_export(info, engines, "openvino", FORMAT, "an exported folder", " --precision bf16")
    check_precision(m, root, precision, "models")
    core = ov.Core()
    out = {}
    for name in info.specs:
        path = m.file(root, name)
        if m.precision(name) not in OV_HINT:
            raise ArtifactMismatch(f"engines: {root} lists {name} in {m.precision(name).value}, which the openvino "
                                   f"export never builds (fp32 or bf16); {hint}")
        model = read_artifact(lambda path=path: core.read_model(str(path)), "OpenVINO", path, hint)
        slots = check_engine_io(m, root, info, name, _ov_io(model.inputs), _ov_io(model.outputs), "float32")
        check_bounds(model, m, root, info, name)
        # The hint follows the checked precision (the manifest's own hint field is informative).
        engine = OpenVinoEngine(info.specs[name], model, core, compile_config(OV_HINT[m.precision(name)], threads),
                                info, device, m.precision(name), m.profile, static_shapes)
        engine.init_slots(slots, torch.float32)  # weights stay fp32 in the IR (see export/openvino.py)
        with engine._lock:  # the tuned shape now: a broken IR fails on load, not mid-generation
            engine.request_for(tuple(s[1] for s in m.profile.shapes(info.specs[name], info, "inputs").values()))
        out[name] = engine
    return out
