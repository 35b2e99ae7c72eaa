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

from ..artifacts import FLOAT_TYPES, check_precision
from ..errors import InvalidArgument
from ..model.components import ComponentSpec, Precision, ShapeProfile, output_shapes, size_multiple
from ..model.info import ModelInfo
from .base import ExportedEngine, check_engine_io, engine_inputs, open_export, read_artifact

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


def _current_stream_handle(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def providers_for(device: torch.device, precision: Precision, stream: int | None = None) -> list:
    """The providers a session of this backend runs on, chosen explicitly.

    CPU: the CPU provider alone. CUDA: the CUDA provider with its options (torch's current
    stream, or ``stream``), then the CPU provider for the few nodes CUDA has no kernel for.
    Never the TensorRT provider, even where onnxruntime-gpu lists it: it would turn this
    backend into ORT-TensorRT (minutes of engine builds, rebuilt per shape) without being asked;
    TensorRT is the ``tensorrt`` backend. ``precision`` is accepted for the record: the graphs
    fix their own precision. UNVERIFIED on a GPU.
    """
    import onnxruntime as ort

    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise InvalidArgument(
            "device: ONNX Runtime has no CUDA provider here (onnxruntime, not onnxruntime-gpu, is installed); "
            "pip install onnxruntime-gpu or use --device cpu"
        )
    idx = device.index if device.index is not None else torch.cuda.current_device()
    handle = _current_stream_handle(torch.device("cuda", idx)) if stream is None else stream
    # ORT enqueues on torch's stream, so torch's work and ORT's are ordered without host syncs.
    cuda = ("CUDAExecutionProvider", {"device_id": idx, "user_compute_stream": str(handle),
                                      "has_user_compute_stream": "1", "cudnn_conv_algo_search": "HEURISTIC"})
    return [cuda, "CPUExecutionProvider"]


def check_providers(session, providers: list, path: Path) -> None:
    """Refuse a session that is not on the providers asked for.

    ORT's Python InferenceSession retries a failed provider with a fallback list and *no*
    provider options (which loses ``user_compute_stream``), and newer versions skip a CUDA
    provider whose libraries do not load with only a log line: either way the session would
    run somewhere else than asked, silently. UNVERIFIED on a GPU.
    """
    wanted = [p if isinstance(p, str) else p[0] for p in providers]
    got = list(session.get_providers())
    if got != wanted:
        raise InvalidArgument(
            f"device: ONNX Runtime opened {path.name} on {', '.join(got)} instead of {', '.join(wanted)} "
            f"(its provider failed to load: check onnxruntime-gpu against the CUDA and cuDNN installed); "
            f"fix the install or use --device cpu"
        )
    for name, opts in (p for p in providers if not isinstance(p, str)):
        have = session.get_provider_options().get(name, {})
        if opts.get("has_user_compute_stream") == "1" and have.get("has_user_compute_stream", "1") != "1":
            raise InvalidArgument(
                f"device: ONNX Runtime opened {path.name} on {name} without the user_compute_stream it was "
                f"given (it retried the provider without its options); fix the onnxruntime-gpu install "
                f"or use --device cpu"
            )


class _OrderedStreams:
    """Orders ORT's stream after torch's current one and back, on the device (no host sync)."""

    def __init__(self, device: torch.device, session_stream: int):
        self.current = torch.cuda.current_stream(device)
        self.ort = torch.cuda.ExternalStream(session_stream, device=device)

    def __enter__(self):
        self.ort.wait_stream(self.current)

    def __exit__(self, *exc):
        self.current.wait_stream(self.ort)


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
        slots = self.slot_inputs  # this call's LoRA factors, even if a swap replaces the list meanwhile
        if slots:
            for name, x in zip(self.lora_slots.input_names(), slots, strict=True):
                binding.bind_input(name, self._device_type, self._device_id, NUMPY_DTYPES[x.dtype],
                                   tuple(x.shape), x.data_ptr())
        shapes = output_shapes(self.spec, self.info, {n: tuple(x.shape) for n, x in zip(self.spec.input_names, keep, strict=True)})
        outs = {}
        for t in self.spec.outputs:
            # A fresh buffer per call: a returned tensor never aliases the next call's output.
            y = torch.empty(shapes[t.name], dtype=self.dtype, device=self.device)
            binding.bind_output(t.name, self._device_type, self._device_id, NUMPY_DTYPES[y.dtype],
                                tuple(y.shape), y.data_ptr())
            outs[t.name] = y
        if self._device_type != "cuda":
            self.session.run_with_iobinding(binding)
            return {k: v.float() for k, v in outs.items()}
        # CUDA (UNVERIFIED): the session was opened on torch's current stream (providers_for),
        # so torch's kernels that made the inputs and ORT's kernels run in stream order, and
        # binding.synchronize_inputs/outputs (host syncs) would only stall the loop. ORT's own
        # stream sync at the end of each run is switched off for the same reason
        # (disable_synchronize_execution_providers). Called from another torch stream (a side
        # stream), the two streams are ordered on the device with waits, still without a host sync.
        import onnxruntime as ort

        reported = self.session.get_provider_options().get("CUDAExecutionProvider", {}).get("user_compute_stream")
        if reported is None:  # an ORT that does not say which stream it runs on: order by host syncs
            binding.synchronize_inputs()
            self.session.run_with_iobinding(binding)
            binding.synchronize_outputs()
            return {k: v.float() for k, v in outs.items()}
        session_stream = int(reported)
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        if _current_stream_handle(self.device) == session_stream:
            self.session.run_with_iobinding(binding, run_options)
        else:
            with _OrderedStreams(self.device, session_stream):
                self.session.run_with_iobinding(binding, run_options)
        return {k: v.float() for k, v in outs.items()}


def open_session(path: Path, device: torch.device, precision: Precision, stream: int | None = None):
    """An InferenceSession on exactly the providers of ``providers_for``, or a one-line refusal."""
    import onnxruntime as ort

    providers = providers_for(device, precision, stream)
    session = ort.InferenceSession(str(path), sess_options=session_options(), providers=providers)
    check_providers(session, providers, Path(path))
    return session


def load(info: ModelInfo, device: torch.device, precision: Precision, engines: str | None = None,
         components: tuple[str, ...] | None = None) -> dict[str, OrtEngine]:
    """The engines of an export: every component of ``info.specs``, or ``components`` of them
    (DeepCache's two graphs load on first use, sdfast/deepcache.py)."""
    root, manifest, hint = open_export(info, engines, "onnxruntime", "onnx", "an exported folder")
    check_precision(manifest, root, precision, "graphs")  # the graphs fix their own precision
    if device.type == "cpu" and any(manifest.precision(c) is Precision.FP16 for c in info.specs):
        log.info("fp16 graphs on the CPU provider: ORT inserts fp32 casts where it has no fp16 kernel")
    out = {}
    for name in components or info.specs:
        path = manifest.file(root, name)
        session = read_artifact(lambda path=path, name=name: open_session(path, device, manifest.precision(name)),
                                "ONNX Runtime", path, hint)
        precision = manifest.precision(name)
        slots = check_engine_io(manifest, root, info, name, _ort_io(session.get_inputs()),
                                _ort_io(session.get_outputs()), FLOAT_TYPES[precision])
        out[name] = OrtEngine(info.specs[name], session, info, device, precision, manifest.profile)
        out[name].init_slots(slots, precision.torch_dtype)
    return out


def _ort_io(args) -> list[tuple[str, str | None, list[int | None]]]:
    """ORT's NodeArgs as (name, element type, dims with None for symbolic) for ``check_io``."""
    kinds = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
             "tensor(int64)": "int64"}
    return [(a.name, kinds.get(a.type, a.type), [d if isinstance(d, int) else None for d in a.shape]) for a in args]

