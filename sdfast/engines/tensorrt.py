"""TensorRT engines over an ``sdfast export --format tensorrt`` folder.

UNVERIFIED: written against the documented TensorRT 10/11 Python API without a GPU or
TensorRT at hand; the buffer, profile, stream-order and locking logic is tested on the CPU
with a fake ``tensorrt`` module, the rest is not.

Buffers are allocated once, as torch tensors sized for the profile's max shapes, and bound by
address when the engine is made. A call runs on the engine's own non-default stream:

1. that stream waits for torch's current stream (whose kernels made the inputs);
2. on it, the inputs are copied into the buffers, the shapes set, ``execute_async_v3``
   enqueued (on the legacy default stream, torch's usual current stream, TensorRT would
   synchronize every enqueue) and the outputs cloned out of the buffers;
3. torch's current stream waits for it, and the outputs are marked as used there.

No host sync anywhere but a LoRA refit (plans built with ``--refit``; sdfast/lora_refit.py), which
waits for the engine's stream before TensorRT changes the weights it reads. Threads: one execution context and one buffer set, guarded by a lock,
rather than one context per thread. TensorRT allows concurrent use only with a context per
thread, but every context holds its own activation memory (GBs for the SD U-Net) and one SD
call fills the GPU, so two contexts would time-slice the same hardware at twice the memory.
The lock is held only while the call *enqueues* (microseconds of host time); every touch of
the buffers is on the one stream, so calls from any thread run in lock order on the device.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..artifacts import check_precision, gpu_record
from ..errors import ArtifactMismatch, InvalidArgument
from ..lora_refit import RefitBase, RefitRefused, RefitTable
from ..model.components import COMPONENT_MODULE, ComponentSpec, Precision, ShapeProfile, size_multiple
from ..model.info import ModelInfo
from .base import ExportedEngine, open_export


def buffer_shapes(component: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """tensor name -> the largest shape it takes under the profile (the allocation size)."""
    return {name: tuple(rec["max"]) for section in ("inputs", "outputs") for name, rec in component[section].items()}


def allocate_buffers(component: dict[str, Any], dtypes: dict[str, torch.dtype],
                     device: torch.device) -> dict[str, torch.Tensor]:
    """One flat tensor per I/O tensor, sized for its max shape; calls take views of its front."""
    return {name: torch.empty(math.prod(shape), dtype=dtypes[name], device=device)
            for name, shape in buffer_shapes(component).items()}


def torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    return table[dtype]


class CudaStreams:
    """The engine's own CUDA stream and its ordering with torch's current stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)  # torch's pool streams are non-blocking

    @property
    def handle(self) -> int:
        return self.stream.cuda_stream

    def current(self):
        return torch.cuda.current_stream(self.device)

    def enter(self, caller):
        """Wait for ``caller``'s work, then make the engine's stream current."""
        self.stream.wait_stream(caller)
        return torch.cuda.stream(self.stream)

    def leave(self, caller, outputs: list[torch.Tensor]) -> None:
        for y in outputs:  # allocated on our stream, used on the caller's: keep the allocator honest
            y.record_stream(caller)
        caller.wait_stream(self.stream)

    def synchronize(self) -> None:
        """Block until the work enqueued on the engine's stream has run (before a refit)."""
        self.stream.synchronize()


class TensorRTEngine(ExportedEngine):
    #: the layers a LoRA may change by refitting (plans built with ``--refit``), and their base weights
    refit: RefitTable | None = None
    refit_base: RefitBase | None = None

    def __init__(self, spec: ComponentSpec, plan: bytes, component: dict[str, Any], info: ModelInfo,
                 device: torch.device, precision: Precision, profile: ShapeProfile, clone_outputs: bool = True,
                 streams=None):
        import tensorrt as trt

        super().__init__(spec, device, precision, profile, size_multiple(info))
        self.clone_outputs = clone_outputs
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with on_device:
            # not ``self.engine``: wrappers (WrappedEngine, the CUDA-graph one) name what they wrap so
            self.cuda_engine = self._runtime.deserialize_cuda_engine(plan)
            if self.cuda_engine is None:
                raise RuntimeError(f"TensorRT could not deserialize the {spec.name} plan")
            self.context = self.cuda_engine.create_execution_context()
        names = [self.cuda_engine.get_tensor_name(i) for i in range(self.cuda_engine.num_io_tensors)]
        self.inputs = [n for n in names if self.cuda_engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        expected = set(spec.input_names) | set(spec.output_names)
        if set(names) != expected:
            raise RuntimeError(f"{spec.name} plan has tensors {sorted(names)}, the spec {sorted(expected)}")
        self.dtypes = {n: torch_dtype(trt, self.cuda_engine.get_tensor_dtype(n)) for n in names}
        self.buffers = allocate_buffers(component, self.dtypes, device)
        for n, buf in self.buffers.items():
            self.context.set_tensor_address(n, buf.data_ptr())
        # ``streams``: CudaStreams(device) unless a test passes a fake (the CPU tests do).
        self.streams = streams if streams is not None else CudaStreams(device)
        self._lock = threading.Lock()  # one context and one buffer set: see the module doc

    def refit_weights(self, values: dict[str, torch.Tensor], supply: Callable[[str], torch.Tensor]) -> None:
        """Refit the plan's weights ``values`` (ONNX initializer name -> its new value, as the graph
        held it); ``supply(name)``: the value of a weight TensorRT also asks for (``get_missing_weights``:
        one it optimized together with a changed one). Raises, one line, if TensorRT refuses; a
        fresh ``Refitter`` per call, so nothing of a refused refit is left pending."""
        import numpy as np
        import tensorrt as trt

        with self._lock:  # no call enqueues while the weights change
            refitter = trt.Refitter(self.cuda_engine, self._logger)
            keep = []  # trt.Weights borrows the arrays' memory: they must outlive refit_cuda_engine

            def put(name: str, value: torch.Tensor) -> None:
                arr = np.ascontiguousarray(value.detach().cpu().numpy())
                keep.append(arr)
                if not refitter.set_named_weights(name, trt.Weights(arr)):
                    raise RefitRefused(f"the {self.spec.name} plan refused weight {name!r} ({arr.dtype} "
                                       f"{list(arr.shape)}): not a refittable weight of this plan")

            for name, value in values.items():
                put(name, value)
            for name in refitter.get_missing_weights():
                try:
                    value = supply(name)
                except KeyError:
                    raise RefitRefused(f"the {self.spec.name} plan also needs weight {name!r} refitted, which its "
                                       ".refit.safetensors lacks") from None
                put(name, value)
            missing = list(refitter.get_missing_weights())
            if missing:
                raise RefitRefused(f"the {self.spec.name} plan still misses {len(missing)} weight(s) (first: "
                                   f"{missing[0]!r})")
            self.streams.synchronize()  # calls already enqueued read the old weights to the end
            if not refitter.refit_cuda_engine():
                raise RuntimeError(f"refit_cuda_engine failed on the {self.spec.name} plan")

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        with self._lock:
            caller = self.streams.current()
            with self.streams.enter(caller):
                for t in self.spec.inputs:
                    x = inputs[t.name]
                    buf = self.buffers[t.name][: x.numel()].view(x.shape)
                    buf.copy_(x, non_blocking=True)  # casts to the plan's dtype on the device
                    self.context.set_input_shape(t.name, tuple(x.shape))
                if not self.context.execute_async_v3(self.streams.handle):
                    raise RuntimeError(f"TensorRT failed to enqueue {self.spec.name}")
                out = {}
                for t in self.spec.outputs:
                    shape = tuple(self.context.get_tensor_shape(t.name))
                    y = self.buffers[t.name][: math.prod(shape)].view(shape)
                    if y.dtype != torch.float32:
                        y = y.float()  # a new tensor: never aliases the buffer
                    elif self.clone_outputs:
                        y = y.clone()
                    out[t.name] = y
            self.streams.leave(caller, list(out.values()))
        return out


def load(info: ModelInfo, device: torch.device, precision: Precision, engines: str | None = None,
         clone_outputs: bool = True) -> dict[str, TensorRTEngine]:
    if engines is not None and device.type != "cuda":
        raise InvalidArgument("device: the tensorrt backend runs on a CUDA GPU; pass --device cuda")
    root, manifest, hint = open_export(info, engines, "tensorrt", "tensorrt", "built plans",
                                       device=gpu_record(device.index or 0) if device.type == "cuda" else None)
    check_precision(manifest, root, precision, "plans")
    return open_plans(info, root, manifest, hint, device, clone_outputs)


def open_plans(info: ModelInfo, root: Path, manifest, hint: str, device: torch.device, clone_outputs: bool = True,
               streams: Callable[[], Any] | None = None) -> dict[str, TensorRTEngine]:
    """One engine per component of a verified plan folder; the refittable ones (a ``refit``
    record) with their refit table and base weights. ``streams``: makes each engine's streams
    (tests pass a fake; default CudaStreams on ``device``)."""
    out = {}
    for name in info.specs:
        rec = manifest.components[name]
        e = TensorRTEngine(info.specs[name], manifest.file(root, name).read_bytes(), rec, info, device,
                           manifest.precision(name), manifest.profile, clone_outputs,
                           streams=streams() if streams is not None else None)
        if "refit" in rec:
            where = str(manifest.file(root, name))
            e.refit = RefitTable.from_record(rec["refit"], where)
            if e.refit.group != COMPONENT_MODULE[name]:
                raise ArtifactMismatch(f"engines: {where}: its refit table is for {e.refit.group}, but {name} runs "
                                       f"{COMPONENT_MODULE[name]} (an edited manifest); {hint}")
            if not isinstance(rec.get("weights"), str):
                raise ArtifactMismatch(f"engines: {where}: a refit record without its weights file; {hint}")
            e.refit_base = RefitBase(root / rec["weights"], e.refit, hint)
        out[name] = e
    return out
