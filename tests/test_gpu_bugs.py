"""Bugs of the GPU paths, caught on the CPU with the tiny model and fake runtimes.

- the diffusers benchmark row's timing hooks (which synchronize CUDA) are removed after each
  run, so the sdfast row that captures the same modules in a CUDA graph never meets them;
- ONNX Runtime's provider list is chosen explicitly (never the TensorRT provider), checked
  after the session opens, and a CUDA call adds no host sync when ORT shares torch's stream.

The CUDA behaviour itself is UNVERIFIED (no GPU here): these tests pin the Python logic.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from sdfast.model.components import SPECS, Precision


def _hooked(modules: dict[str, torch.nn.Module]) -> list[str]:
    out = []
    for name, root in modules.items():
        for sub, m in root.named_modules():
            if m._forward_hooks or m._forward_pre_hooks:
                out.append(f"{name}.{sub}" if sub else name)
    return out


def test_diffusers_row_leaves_no_timing_hooks_on_the_shared_modules(tiny_info):
    from sdfast.measure.bench import BenchConfig, diffusers_pipeline, diffusers_runner
    from sdfast.model.info import load_torch_modules

    mods = load_torch_modules(tiny_info)
    pipe = diffusers_pipeline(tiny_info, mods, "euler")
    run = diffusers_runner(pipe, BenchConfig(steps=2, scheduler="euler"), 1, 64, 64, torch.device("cpu"))
    stages = run()
    assert stages["unet_step"] > 0 and stages["vae_decode"] > 0 and stages["text_encoder"] > 0
    assert _hooked(mods) == []
    second = run()  # the hooks come back for each run and go again
    assert second["unet_step"] > 0 and _hooked(mods) == []


def test_diffusers_row_removes_its_hooks_when_the_run_fails(tiny_info):
    from sdfast.measure.bench import BenchConfig, diffusers_pipeline, diffusers_runner
    from sdfast.model.info import load_torch_modules

    mods = load_torch_modules(tiny_info)
    pipe = diffusers_pipeline(tiny_info, mods, "euler")
    run = diffusers_runner(pipe, BenchConfig(steps=2, scheduler="euler"), 1, 63, 64, torch.device("cpu"))
    with pytest.raises(ValueError):  # diffusers refuses a side that is not a multiple of 8
        run()
    assert _hooked(mods) == []


# -- ONNX Runtime: a fake module that behaves like onnxruntime-gpu with TensorRT listed -----------

class FakeSession:
    falls_back_to: list[str] | None = None  # what get_providers() reports instead of the request
    drops_options = False

    def __init__(self, path, sess_options=None, providers=None):
        self.requested = providers
        names = [p if isinstance(p, str) else p[0] for p in providers]
        self._providers = self.falls_back_to or names
        self._options = {n: dict(p[1]) if not isinstance(p, str) else {} for n, p in zip(names, providers, strict=True)}
        if self.drops_options:
            self._options["CUDAExecutionProvider"] = {"device_id": "0", "has_user_compute_stream": "0"}

    def get_providers(self):
        return list(self._providers)

    def get_provider_options(self):
        return {k: {kk: str(vv) for kk, vv in v.items()} for k, v in self._options.items()}


@pytest.fixture
def fake_ort(monkeypatch):
    class SessionOptions:
        def __init__(self):
            self.entries = {}

        def add_session_config_entry(self, k, v):
            self.entries[k] = v

    class RunOptions:
        def __init__(self):
            self.entries = {}

        def add_run_config_entry(self, k, v):
            self.entries[k] = v

    mod = types.SimpleNamespace(
        get_available_providers=lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                         "CPUExecutionProvider"],
        SessionOptions=SessionOptions, RunOptions=RunOptions,
        GraphOptimizationLevel=types.SimpleNamespace(ORT_ENABLE_ALL=99),
        ExecutionMode=types.SimpleNamespace(ORT_SEQUENTIAL=0),
        InferenceSession=FakeSession,
    )
    monkeypatch.setitem(sys.modules, "onnxruntime", mod)
    monkeypatch.setattr(FakeSession, "falls_back_to", None)
    monkeypatch.setattr(FakeSession, "drops_options", False)
    return mod


def test_ort_cuda_providers_never_include_tensorrt(fake_ort):
    from sdfast.engines.onnxruntime import providers_for

    got = providers_for(torch.device("cuda:0"), Precision.FP16, stream=1234)
    names = [p if isinstance(p, str) else p[0] for p in got]
    assert "TensorrtExecutionProvider" not in names
    assert names[0] == "CUDAExecutionProvider" and isinstance(got[0], tuple)
    opts = got[0][1]
    assert opts["user_compute_stream"] == "1234" and opts["has_user_compute_stream"] == "1"
    assert opts["device_id"] == 0
    assert providers_for(torch.device("cpu"), Precision.FP32) == ["CPUExecutionProvider"]


def test_ort_session_that_fell_back_to_cpu_is_refused_in_one_line(fake_ort, tmp_path, monkeypatch):
    from sdfast.engines.onnxruntime import open_session
    from sdfast.errors import InvalidArgument

    monkeypatch.setattr(FakeSession, "falls_back_to", ["CPUExecutionProvider"])
    with pytest.raises(InvalidArgument) as e:
        open_session(tmp_path / "unet.onnx", torch.device("cuda:0"), Precision.FP16, stream=7)
    msg = str(e.value)
    assert "\n" not in msg and "CPUExecutionProvider" in msg and "CUDAExecutionProvider" in msg
    assert msg.startswith("device:")


def test_ort_session_that_lost_the_cuda_options_is_refused(fake_ort, tmp_path, monkeypatch):
    from sdfast.engines.onnxruntime import open_session
    from sdfast.errors import InvalidArgument

    monkeypatch.setattr(FakeSession, "drops_options", True)
    with pytest.raises(InvalidArgument, match="user_compute_stream"):
        open_session(tmp_path / "unet.onnx", torch.device("cuda:0"), Precision.FP16, stream=7)


def test_ort_session_with_the_requested_providers_opens(fake_ort, tmp_path):
    from sdfast.engines.onnxruntime import open_session

    s = open_session(tmp_path / "unet.onnx", torch.device("cuda:0"), Precision.FP16, stream=7)
    assert s.get_providers()[0] == "CUDAExecutionProvider"
    assert open_session(tmp_path / "unet.onnx", torch.device("cpu"), Precision.FP32).requested == \
        ["CPUExecutionProvider"]


class FakeBinding:
    def __init__(self):
        self.inputs, self.outputs = {}, {}

    def bind_input(self, name, *args):
        self.inputs[name] = args

    def bind_output(self, name, *args):
        self.outputs[name] = args

    def synchronize_inputs(self):
        raise AssertionError("synchronize_inputs: a host sync although ORT shares torch's stream")

    def synchronize_outputs(self):
        raise AssertionError("synchronize_outputs: a host sync although ORT shares torch's stream")


class FakeCudaSession:
    def __init__(self, stream: int):
        self.stream, self.runs = stream, []

    def io_binding(self):
        return FakeBinding()

    def get_provider_options(self):
        return {"CUDAExecutionProvider": {"user_compute_stream": str(self.stream), "has_user_compute_stream": "1"}}

    def run_with_iobinding(self, binding, run_options=None):
        self.runs.append((binding, run_options))


def test_ort_cuda_call_on_the_shared_stream_adds_no_host_sync(fake_ort, tiny_info, monkeypatch):
    """The CUDA branch of OrtEngine.__call__ with CPU tensors standing in for CUDA ones: no
    synchronize_inputs/outputs, and ORT is told not to block the host at the end of the run."""
    from sdfast.engines import onnxruntime as ortmod
    from sdfast.model.components import ShapeProfile

    session = FakeCudaSession(stream=4242)
    engine = ortmod.OrtEngine(SPECS["vae_decoder"], session, tiny_info, torch.device("cpu"), Precision.FP32,
                              ShapeProfile.static(1, 64, 64))
    engine._device_type = "cuda"  # the CUDA branch, on CPU tensors
    seen = []
    monkeypatch.setattr(ortmod, "_current_stream_handle", lambda device: seen.append(device) or 4242)
    out = engine(latent=torch.zeros(1, tiny_info.latent_channels, 8, 8))
    assert out["image"].shape == (1, 3, 64, 64) and seen
    (_, run_options), = session.runs
    assert run_options is not None
    assert run_options.entries["disable_synchronize_execution_providers"] == "1"


def test_ort_that_does_not_report_its_stream_falls_back_to_host_syncs(fake_ort, tiny_info):
    from sdfast.engines import onnxruntime as ortmod
    from sdfast.model.components import ShapeProfile

    class Silent(FakeCudaSession):
        def get_provider_options(self):
            return {"CUDAExecutionProvider": {"has_user_compute_stream": "1"}}

    class Counting(FakeBinding):
        syncs = 0

        def synchronize_inputs(self):
            Counting.syncs += 1

        def synchronize_outputs(self):
            Counting.syncs += 1

    session = Silent(stream=1)
    session.io_binding = Counting
    engine = ortmod.OrtEngine(SPECS["vae_decoder"], session, tiny_info, torch.device("cpu"), Precision.FP32,
                              ShapeProfile.static(1, 64, 64))
    engine._device_type = "cuda"
    engine(latent=torch.zeros(1, tiny_info.latent_channels, 8, 8))
    assert Counting.syncs == 2 and session.runs[0][1] is None
