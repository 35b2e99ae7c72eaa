"""ONNX Runtime engines over an ``sdfast export --format onnx`` folder.

Tensors stay torch tensors on the engine's device: inputs are bound by pointer and every call
binds a freshly allocated torch output, so a returned tensor is never overwritten by a later
call. Loading verifies the manifest (model fingerprint, file hashes) before any session opens.
Importing this module never imports diffusers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..artifacts import Manifest, load_manifest
from ..components import SPECS, ComponentSpec, Precision, ShapeProfile, output_shapes, size_multiple
from ..errors import InvalidArgument
from ..models import ModelInfo, cache_dir
from .base import ExportedEngine, engine_inputs

log = logging.getLogger(__name__)

NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
                torch.bfloat16: None}


def session_options(threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    # ALL adds the layout (NCHWc) and fusion passes for the provider at hand; it is applied at
    # load time, so the artifact on disk stays portable standard ONNX.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The loop calls one component at a time: share torch's thread budget, no inter-op pool.
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_mem_pattern = True
    # No busy-waiting between ops: SD's ops are long enough that waking costs nothing, and
    # spinning workers starve torch's own threads (and other processes) on shared CPUs.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


def providers_for(device: torch.device, precision: Precision) -> list:
    """CPU always; CUDA (and TensorRT) in front of it when onnxruntime-gpu provides them."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise InvalidArgument(
            "device: ONNX Runtime has no CUDA provider here (onnxruntime, not onnxruntime-gpu, is installed); "
            "pip install onnxruntime-gpu or use --device cpu"
        )
    idx = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(idx).cuda_stream
    # ORT runs on torch's stream, so bound tensors need no extra synchronization.
    cuda = ("CUDAExecutionProvider", {"device_id": idx, "user_compute_stream": str(stream),
                                      "has_user_compute_stream": "1", "cudnn_conv_algo_search": "HEURISTIC"})
    out = [cuda, "CPUExecutionProvider"]
    if "TensorrtExecutionProvider" in available:
        trt = ("TensorrtExecutionProvider", {
            "device_id": idx, "trt_fp16_enable": precision is Precision.FP16,
            "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir() / "ort-trt"),
            "user_compute_stream": str(stream), "has_user_compute_stream": "1",
        })
        out.insert(0, trt)
    return out


class OrtEngine(ExportedEngine):
    """One component on an InferenceSession with I/O binding."""

    def __init__(self, spec: ComponentSpec, session, info: ModelInfo, device: torch.device,
                 precision: Precision, profile: ShapeProfile):
        super().__init__(spec, device, precision, profile, size_multiple(info))
        self.session = session
        self.info = info
        self._device_type = "cuda" if device.type == "cuda" else "cpu"
        self._device_id = device.index or 0

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        binding = self.session.io_binding()
        keep = engine_inputs(self.spec, inputs, self.device, self.dtype)  # must outlive the run
        for t, x in zip(self.spec.inputs, keep, strict=True):
            binding.bind_input(t.name, self._device_type, self._device_id, NUMPY_DTYPES[x.dtype],
                               tuple(x.shape), x.data_ptr())
        shapes = output_shapes(self.spec, self.info, {n: tuple(x.shape) for n, x in zip(self.spec.input_names, keep, strict=True)})
        outs = {}
        for t in self.spec.outputs:
            # A fresh buffer per call: a returned tensor never aliases the next call's output.
            y = torch.empty(shapes[t.name], dtype=self.dtype, device=self.device)
            binding.bind_output(t.name, self._device_type, self._device_id, NUMPY_DTYPES[y.dtype],
                                tuple(y.shape), y.data_ptr())
            outs[t.name] = y
        if self._device_type == "cuda":
            binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        if self._device_type == "cuda":
            binding.synchronize_outputs()
        return {k: v.float() for k, v in outs.items()}


def open_session(path: Path, device: torch.device, precision: Precision):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), sess_options=session_options(), providers=providers_for(device, precision))


def load(info: ModelInfo, device: torch.device, precision: Precision, engines: str | None = None) -> dict[str, OrtEngine]:
    if engines is None:
        raise InvalidArgument(
            "engines: the onnxruntime backend runs an exported folder; pass --engines DIR made by "
            f"`sdfast export --model {info.path} --out DIR --format onnx`"
        )
    root = Path(engines)
    manifest = load_manifest(root, info, "onnx")
    _check_precision(manifest, precision, root)
    if device.type == "cpu" and any(manifest.precision(c) is Precision.FP16 for c in SPECS):
        log.info("fp16 graphs on the CPU provider: ORT inserts fp32 casts where it has no fp16 kernel")
    return {
        name: OrtEngine(SPECS[name], open_session(manifest.file(root, name), device, manifest.precision(name)),
                        info, device, manifest.precision(name), manifest.profile)
        for name in SPECS
    }


def _check_precision(manifest: Manifest, precision: Precision, root: Path) -> None:
    # The graphs fix their own precision; --dtype must name it (VAE may stay fp32 by design).
    core = manifest.precision("unet")
    if core is not precision:
        raise InvalidArgument(
            f"dtype: {root} holds {core.value} graphs but --dtype {precision.value} was asked for; "
            f"pass --dtype {core.value} or export with --precision {precision.value}"
        )
