"""The graphed loop (graphs.py) run *uncaptured* on the CPU equals the plain loop.

On CUDA the same static-buffer step is captured once per shape and replayed; here it runs as
plain calls, so these tests prove its logic: static scheduler tables and state, the step index
and guidance living in device tensors, ancestral noise indexed by the step, copy-out.
"""

from __future__ import annotations

import logging

import pytest
import torch

from sdfast.engines import load_engines
from sdfast.model.components import Precision
from sdfast.runtime import Pipeline
from sdfast.schedulers import SCHEDULERS

STEPS = 3
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def engines(tiny_info):
    return load_engines(tiny_info, "torch", torch.device("cpu"), Precision.FP32)


@pytest.fixture(scope="module")
def plain(tiny_info, engines):
    return Pipeline(tiny_info, engines, torch.device("cpu"), Precision.FP32, "torch")


@pytest.fixture(scope="module")
def graphed(tiny_info, engines):
    return Pipeline(tiny_info, engines, torch.device("cpu"), Precision.FP32, "torch", cuda_graphs=True)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_every_scheduler_declares_the_buffers_capture_copies(tiny_info, scheduler):
    """What a CUDA graph copies is declared, never guessed: after set_timesteps + begin every
    tensor a scheduler holds is a declared table or state buffer, and every Python value that
    changes with the step count is a declared host value (read outside ``step`` only)."""
    cfg = tiny_info.scheduler_config
    latents = torch.zeros(1, 4, 8, 8)
    scheds = []
    for steps in (4, 7):
        sched = SCHEDULERS[scheduler](cfg)
        sched.set_timesteps(steps)
        sched.begin(latents)
        scheds.append(sched)
    a, b = scheds
    tensors = {k for k, v in vars(a).items() if isinstance(v, torch.Tensor)}
    assert tensors == set(a.tables) | set(a.state)
    assert set(a.buffers()) == tensors
    for name in a.tables:  # per-step tables: first dim grows with the step count
        assert a.buffers()[name].shape[0] < b.buffers()[name].shape[0], name
    changed = {k for k, v in vars(a).items() if not isinstance(v, torch.Tensor) and vars(b)[k] != v}
    assert changed <= set(a.host_values), f"undeclared per-run Python values: {changed - set(a.host_values)}"


@pytest.mark.parametrize("guidance", [1.0, 6.0], ids=["unguided", "guided"])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_graphed_step_logic_equals_plain_loop(plain, graphed, scheduler, guidance):
    kw = dict(steps=STEPS, guidance_scale=guidance, scheduler=scheduler, seed=5)
    ref = plain.generate(PROMPT, **kw)
    out = graphed.generate(PROMPT, **kw)
    # One guided_step serves both loops: bit for bit, not merely close.
    assert torch.equal(out.latents, ref.latents), f"{scheduler} g={guidance}: {max_diff(out.latents, ref.latents)}"
    assert [im.tobytes() for im in out.images] == [im.tobytes() for im in ref.images]


def test_two_guidance_values_on_one_captured_shape_are_not_stale(plain, graphed):
    for g in (3.0, 9.0):  # same StepKey: the second run must read the new guidance tensor
        ref = plain.generate(PROMPT, steps=STEPS, guidance_scale=g, scheduler="euler", seed=2)
        out = graphed.generate(PROMPT, steps=STEPS, guidance_scale=g, scheduler="euler", seed=2)
        assert torch.equal(out.latents, ref.latents)
    keys = [k for k in graphed.graphs._steps if k.scheduler == "euler" and k.guided]
    assert len(keys) == 1


def test_output_of_request_one_unchanged_after_request_two(graphed):
    first = graphed.generate(PROMPT, steps=STEPS, guidance_scale=5.0, scheduler="lms", seed=1)
    kept = first.latents.clone()
    pixels = first.images[0].tobytes()
    second = graphed.generate("a green square", steps=STEPS, guidance_scale=5.0, scheduler="lms", seed=2)
    assert max_diff(second.latents, kept) > 1e-3  # the second request really computed something else
    assert torch.equal(first.latents, kept)  # no aliasing of the static latents buffer
    assert first.images[0].tobytes() == pixels


@pytest.mark.parametrize("scheduler", ["lms", "euler_a", "dpmpp_2m"])
def test_step_count_changes_and_img2img_reuse_the_static_tables(plain, graphed, scheduler):
    # more steps than the captured capacity (rebuild), then fewer (prefix of the tables)
    for steps in (STEPS + 2, 2):
        ref = plain.generate(PROMPT, steps=steps, guidance_scale=4.0, scheduler=scheduler, seed=3)
        out = graphed.generate(PROMPT, steps=steps, guidance_scale=4.0, scheduler=scheduler, seed=3)
        assert torch.equal(out.latents, ref.latents)
    init = ref.images[0]  # img2img starts at a later step: the step tensor starts there too
    ref = plain.generate(PROMPT, steps=5, guidance_scale=4.0, scheduler=scheduler, seed=4, image=init, strength=0.6)
    out = graphed.generate(PROMPT, steps=5, guidance_scale=4.0, scheduler=scheduler, seed=4, image=init, strength=0.6)
    assert torch.equal(out.latents, ref.latents)


def test_callback_sees_the_same_latents_as_in_the_plain_loop(plain, graphed):
    seen: dict[str, list] = {"plain": [], "graphed": []}
    for name, pipe in (("plain", plain), ("graphed", graphed)):
        pipe.generate(PROMPT, steps=STEPS, guidance_scale=4.0, scheduler="ddim", seed=7,
                      callback=lambda i, t, x, n=name: seen[n].append((i, float(t), x.clone())))
    assert [(i, t) for i, t, _ in seen["plain"]] == [(i, t) for i, t, _ in seen["graphed"]]
    for (_, _, a), (_, _, b) in zip(seen["plain"], seen["graphed"], strict=True):
        assert torch.equal(a, b)


class _FakeCuda:
    """Just enough of torch.cuda for GraphRuntime.build to reach a capture that fails the way
    a real one does: ``torch.cuda.graph`` switches the thread to its capture stream on enter,
    and its exit (``capture_end``) raises before it switches back."""

    class Stream:
        def __init__(self, *a):
            pass

        def wait_stream(self, other):
            pass

    caller = Stream()
    current = caller

    @staticmethod
    def current_stream(*a):
        return _FakeCuda.current

    @staticmethod
    def set_stream(s):
        _FakeCuda.current = s

    class stream:  # noqa: N801 - mirrors torch.cuda.stream
        def __init__(self, s):
            self.s = s

        def __enter__(self):
            self.prev, _FakeCuda.current = _FakeCuda.current, self.s
            return self

        def __exit__(self, *exc):
            _FakeCuda.current = self.prev
            return False

    @staticmethod
    def graph_pool_handle():
        return None

    class CUDAGraph:
        pass

    class graph:  # noqa: N801 - mirrors torch.cuda.graph
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            _FakeCuda.current = _FakeCuda.Stream()  # the capture stream
            return self

        def __exit__(self, *exc):
            raise RuntimeError("operation not permitted when stream is capturing")

    @staticmethod
    def synchronize(*a):
        pass


def test_capture_failure_falls_back_to_the_plain_loop_with_one_warning(tiny_info, engines, plain, monkeypatch,
                                                                       caplog):
    pipe = Pipeline(tiny_info, engines, torch.device("cpu"), Precision.FP32, "torch", cuda_graphs=True)
    pipe.graphs.runtime.capture = True  # pretend to be on CUDA; every torch.cuda call is faked
    for name in ("Stream", "current_stream", "set_stream", "stream", "graph_pool_handle", "CUDAGraph", "graph",
                 "synchronize"):
        monkeypatch.setattr(torch.cuda, name, getattr(_FakeCuda, name))
    _FakeCuda.current = _FakeCuda.caller
    with caplog.at_level(logging.WARNING, logger="sdfast.graphs"):
        outs = [pipe.generate(PROMPT, steps=STEPS, guidance_scale=g, scheduler="euler", seed=1) for g in (2.0, 6.0)]
    # the thread is back on its own stream after each failed capture, not on the capture stream
    assert _FakeCuda.current is _FakeCuda.caller
    warnings = [r.getMessage() for r in caplog.records if "capture" in r.getMessage()]
    # one warning per graph that failed (text encoder, guided step, VAE decoder), none on request 2
    assert len(warnings) == 3 and all("ungraphed" in w for w in warnings)
    assert pipe.graphs.mode == "fallback" and pipe.engines["text_encoder"].failed
    for g, out in zip((2.0, 6.0), outs, strict=True):
        ref = plain.generate(PROMPT, steps=STEPS, guidance_scale=g, scheduler="euler", seed=1)
        assert torch.equal(out.latents, ref.latents)


class NoHostSync(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on the ops that make the host wait for the device (``.item()``, ``bool(t)``,
    ``t[i]`` with a 0-d tensor i, ``nonzero``) and on tensors made from host data
    (``torch.tensor(...)``: ``lift_fresh``), which on CUDA is a host→device copy: a CUDA graph
    capture refuses all of them. (A CPU run cannot see a ``.to("cuda")`` of a CPU tensor; the
    GPU tests capture for real.)"""

    SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal", "aten.lift_fresh")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket).replace("aten::", "aten.") in self.SYNCING or \
                any(str(func).startswith(s) for s in self.SYNCING):
            raise AssertionError(f"{func} inside the graphed step would sync the host and break capture")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_graphed_step_has_no_host_sync(graphed, scheduler):
    graphed.generate(PROMPT, steps=STEPS, guidance_scale=5.0, scheduler=scheduler, seed=0)
    step = next(g for k, g in graphed.graphs._steps.items() if k.scheduler == scheduler and k.guided)
    step._reset()
    with NoHostSync():
        step.run()
    text = graphed.engines["text_encoder"]
    vae = graphed.engines["vae_decoder"]
    with NoHostSync():
        for engine in (text, vae):
            for g in engine._graphs.values():
                g.run()


def test_the_no_host_sync_detector_catches_tensor_indexing():
    table, i = torch.arange(4.0), torch.tensor(2)
    with pytest.raises(AssertionError, match="sync the host"), NoHostSync():
        table[i]  # what the schedulers' at() avoids


def test_the_no_host_sync_detector_catches_tensors_made_from_host_data():
    with pytest.raises(AssertionError, match="sync the host"), NoHostSync():
        torch.tensor([1.0, 2.0])  # a host->device copy on CUDA
