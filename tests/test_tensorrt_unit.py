"""Issue 3: the TensorRT path's GPU-free logic (profiles, buffers, manifest checks).

The build and the engine themselves need TensorRT and a GPU; those tests are marked
``tensorrt`` and skip here with the reason. Everything TensorRT-related is unverified on a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from sdfast import artifacts as mf
from sdfast.artifacts import Manifest, model_record, tensor_records
from sdfast.engines.tensorrt import allocate_buffers, buffer_shapes
from sdfast.errors import ArtifactMismatch, InvalidArgument
from sdfast.export.tensorrt import onnx_covers, profile_triples
from sdfast.model.components import SPECS, Precision, ShapeProfile

HAS_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
PROFILE = ShapeProfile(1, 1, 2, 64, 64, 128, 64, 64, 96)


def test_profile_triples_are_min_opt_max_input_shapes(tiny_info):
    t = profile_triples(tiny_info, PROFILE, "unet")
    assert t["sample"] == ((1, 4, 8, 8), (2, 4, 8, 8), (4, 4, 16, 12))
    assert t["timestep"] == ((1,), (1,), (1,))
    assert t["encoder_hidden_states"] == ((1, 77, 32), (2, 77, 32), (4, 77, 32))
    assert profile_triples(tiny_info, PROFILE, "text_encoder")["input_ids"][2] == (4, 77)
    assert profile_triples(tiny_info, PROFILE, "vae_encoder")["image"] == ((1, 3, 64, 64), (1, 3, 64, 64),
                                                                         (2, 3, 128, 96))
    static = profile_triples(tiny_info, ShapeProfile.static(1, 64, 64), "vae_decoder")["latent"]
    assert static[0] == static[1] == static[2] == (1, 4, 8, 8)


def test_buffers_are_sized_for_the_profile_max(tiny_info):
    comp = tensor_records("vae_decoder", PROFILE, tiny_info)
    assert buffer_shapes(comp) == {"latent": (2, 4, 16, 12), "image": (2, 3, 128, 96)}
    bufs = allocate_buffers(comp, {"latent": torch.float16, "image": torch.float32}, torch.device("cpu"))
    assert bufs["image"].numel() == 2 * 3 * 128 * 96 and bufs["latent"].dtype == torch.float16
    # A smaller call takes a view of the buffer's front: same storage, no reallocation.
    view = bufs["image"][: 1 * 3 * 64 * 64].view(1, 3, 64, 64)
    assert view.data_ptr() == bufs["image"].data_ptr()


def test_onnx_export_must_cover_the_tensorrt_profile():
    assert onnx_covers(PROFILE, ShapeProfile.static(2, 128, 96)) == []
    assert onnx_covers(ShapeProfile.static(1, 64, 64), PROFILE) == [
        "batch 1..2 is outside the ONNX export's 1..1", "height 64..128 is outside the ONNX export's 64..64",
        "width 64..96 is outside the ONNX export's 64..64"]


def fake_plan_dir(tmp_path, info, trt_version="10.3.0", gpu="NVIDIA H100 80GB HBM3", cc="9.0"):
    root = tmp_path / "plans"
    root.mkdir()
    comps = {}
    for name in SPECS:
        (root / f"{name}.plan").write_bytes(b"not a real plan " + name.encode())
        comps[name] = {"file": f"{name}.plan", "precision": "fp16", **tensor_records(name, PROFILE, info)}
    m = Manifest(format="tensorrt", model=model_record(info), profile=PROFILE, components=comps,
                 device={"gpu": gpu, "compute_capability": cc},
                 export_command=mf.export_command("tiny-random", root, "tensorrt", "fp16", PROFILE))
    m.versions["tensorrt"] = trt_version
    m.seal(root)
    return root


def test_plans_from_another_tensorrt_version_are_refused(tiny_info, tmp_path, monkeypatch):
    root = fake_plan_dir(tmp_path, tiny_info)
    monkeypatch.setattr(mf, "package_version", lambda m: "10.9.0" if m == "tensorrt" else None)
    with pytest.raises(ArtifactMismatch, match="built with TensorRT 10.3.0 but TensorRT 10.9.0") as e:
        mf.load_manifest(root, tiny_info, "tensorrt", device={"gpu": "NVIDIA H100 80GB HBM3",
                                                              "compute_capability": "9.0"})
    assert "sdfast export --model" in str(e.value) and "--format tensorrt" in str(e.value)


def test_plans_for_another_gpu_are_refused(tiny_info, tmp_path, monkeypatch):
    root = fake_plan_dir(tmp_path, tiny_info)
    monkeypatch.setattr(mf, "package_version", lambda m: "10.3.0" if m == "tensorrt" else None)
    m = mf.load_manifest(root, tiny_info, "tensorrt", device={"gpu": "NVIDIA H100 80GB HBM3",
                                                              "compute_capability": "9.0"})
    assert m.precision("unet") is Precision.FP16 and m.device["compute_capability"] == "9.0"
    with pytest.raises(ArtifactMismatch, match="built for GPU 'NVIDIA H100 80GB HBM3' .* 'NVIDIA L4'"):
        mf.load_manifest(root, tiny_info, "tensorrt", device={"gpu": "NVIDIA L4", "compute_capability": "8.9"})
    (root / "unet.plan").write_bytes(b"tampered")
    with pytest.raises(ArtifactMismatch, match="unet.plan has 8 bytes"):
        mf.load_manifest(root, tiny_info, "tensorrt", device={"gpu": "NVIDIA H100 80GB HBM3",
                                                              "compute_capability": "9.0"})
    assert json.loads((root / "manifest.json").read_text())["device"]["gpu"] == "NVIDIA H100 80GB HBM3"


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_tensorrt_export_without_tensorrt_says_how_to_get_it(tiny_info, tmp_path):
    from sdfast.export.tensorrt import export_tensorrt

    with pytest.raises(InvalidArgument, match="needs the tensorrt Python package"):
        export_tensorrt(tiny_info, tmp_path / "x", ShapeProfile.static(1, 64, 64))
    assert not (tmp_path / "x").exists()


def test_tensorrt_backend_refuses_cpu_device(tiny_info, tmp_path):
    from sdfast.engines.tensorrt import load

    with pytest.raises(InvalidArgument, match="--device cuda"):
        load(tiny_info, torch.device("cpu"), Precision.FP16, engines=str(tmp_path))


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT and a CUDA GPU (neither exists on CPU CI)")
def test_tensorrt_fp16_engines_match_eager(tiny_info, tiny_pipe, tmp_path):
    import sdfast
    from sdfast.export.tensorrt import TensorRTBuildOptions, export_tensorrt
    from sdfast.measure.parity import end_to_end_parity

    out = export_tensorrt(tiny_info, tmp_path / "trt", PROFILE, TensorRTBuildOptions(precision=Precision.FP16))
    pipe = sdfast.load(tiny_info.path, backend="tensorrt", device="cuda", dtype="fp16", engines=out)
    rows = end_to_end_parity(tiny_pipe, pipe, PROFILE, Precision.FP16, ("lms",), steps=8)
    assert all(r.passed for r in rows), rows


# -- the engine's Python logic with a fake ``tensorrt`` (issue 19 item 4) -------------------------

class _FakeContext:
    """Copies each input's mean into its outputs, reading and writing the bound addresses; it
    sleeps before reading, so a second thread that shares it unguarded overwrites the inputs."""

    def __init__(self, engine):
        self.engine, self.addr, self.shapes, self.handles = engine, {}, {}, []

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)

    def get_tensor_shape(self, name):
        b, _, h, w = self.shapes["latent"]
        f = self.engine.factor
        return (b, 3, h * f, w * f)

    def execute_async_v3(self, handle):
        import ctypes
        import time

        import numpy as np

        self.handles.append(handle)
        time.sleep(0.02)  # the enqueue returns at once on a GPU; here it gives the other thread a window
        shape = self.shapes["latent"]
        n = int(np.prod(shape))
        x = np.frombuffer((ctypes.c_float * n).from_address(self.addr["latent"]), dtype=np.float32)
        out_shape = self.get_tensor_shape("image")
        m = int(np.prod(out_shape))
        y = np.frombuffer((ctypes.c_float * m).from_address(self.addr["image"]), dtype=np.float32)
        y[:] = x.reshape(shape[0], -1).mean(axis=1).repeat(m // shape[0])
        return True


class _FakeEngine:
    def __init__(self, factor):
        self.factor, self.names, self.contexts = factor, ["latent", "image"], []
        self.num_io_tensors = 2

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "IN" if name == "latent" else "OUT"

    def get_tensor_dtype(self, name):
        return "FLOAT"

    def create_execution_context(self):
        self.contexts.append(_FakeContext(self))
        return self.contexts[-1]


def _fake_tensorrt(factor):
    import types

    engine = _FakeEngine(factor)
    runtime = types.SimpleNamespace(deserialize_cuda_engine=lambda plan: engine)
    return types.SimpleNamespace(
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        Runtime=lambda logger: runtime,
        TensorIOMode=types.SimpleNamespace(INPUT="IN", OUTPUT="OUT"),
        DataType=types.SimpleNamespace(FLOAT="FLOAT", HALF="HALF", INT32="INT32", INT64="INT64", BOOL="BOOL"),
    ), engine


class _FakeStreams:
    """Records the engine's stream protocol per call: wait on the caller, enqueue, caller waits."""

    handle = 777  # the engine's own stream; the caller's is another

    def __init__(self):
        import threading

        self.events, self._lock = [], threading.Lock()

    def current(self):
        import threading

        return f"caller-{threading.get_ident()}"

    def enter(self, caller):
        import contextlib

        with self._lock:
            self.events.append(("engine stream waits for", caller))
        return contextlib.nullcontext()

    def leave(self, caller, outputs):
        with self._lock:
            self.events.append(("caller waits for engine stream", caller))


def test_tensorrt_engine_runs_on_its_own_stream_between_two_waits(tiny_info, monkeypatch):
    from sdfast.engines.tensorrt import TensorRTEngine

    trt, engine = _fake_tensorrt(tiny_info.vae_scale_factor)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    streams = _FakeStreams()
    e = TensorRTEngine(SPECS["vae_decoder"], b"plan", tensor_records("vae_decoder", PROFILE, tiny_info), tiny_info,
                       torch.device("cpu"), Precision.FP32, PROFILE, streams=streams)
    out = e(latent=torch.full((1, 4, 8, 8), 0.5))["image"]
    assert out.shape == (1, 3, 64, 64) and torch.all(out == 0.5)
    assert engine.contexts[0].handles == [_FakeStreams.handle]  # never torch's current stream
    caller = streams.current()
    assert streams.events == [("engine stream waits for", caller), ("caller waits for engine stream", caller)]
    assert out.data_ptr() != e.buffers["image"].data_ptr()  # cloned out: the next call cannot overwrite it


def test_two_threads_through_one_tensorrt_engine_get_their_own_results(tiny_info, monkeypatch):
    import threading

    from sdfast.engines.tensorrt import TensorRTEngine

    trt, engine = _fake_tensorrt(tiny_info.vae_scale_factor)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    e = TensorRTEngine(SPECS["vae_decoder"], b"plan", tensor_records("vae_decoder", PROFILE, tiny_info), tiny_info,
                       torch.device("cpu"), Precision.FP32, PROFILE, streams=_FakeStreams())
    jobs = {0: torch.full((1, 4, 8, 8), 1.0), 1: torch.full((2, 4, 16, 12), 2.0)}
    got: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    start = threading.Barrier(2)

    def work(n):
        start.wait()
        for _ in range(4):
            got[n].append(e(latent=jobs[n])["image"])

    threads = [threading.Thread(target=work, args=(n,)) for n in jobs]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(engine.contexts) == 1  # one context, shared under the engine's lock
    for n, x in jobs.items():
        want_shape = (x.shape[0], 3, x.shape[2] * 8, x.shape[3] * 8)
        for y in got[n]:
            assert y.shape == want_shape and torch.all(y == x[0, 0, 0, 0]), (n, y.shape, y.unique())
