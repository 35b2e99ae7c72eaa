"""CUDA graphs for the guided loop: one captured step per shape, replayed for every step.

What is captured (tinygrad's "one function per step" and stable-fast's wrapper habits):

- the whole guided step — ``loop.guided_step``, the very function the plain loop runs — once
  per ``StepKey`` (batch, height, width, guided, scheduler); every value that changes per step
  or per request lives in a device tensor of a static ``LoopState``: the step index ``i`` (0-d
  long, incremented *inside* the graph), the per-row guidance scales, the ancestral noise of
  every step (uploaded once per run, indexed by ``i``). The scheduler's declared tables and
  state (``Scheduler.tables`` / ``state``) are static buffers of a scheduler object owned by the
  graph; each run copies a freshly built scheduler's buffers into them (``load_scheduler_state``).
- the text encoder and the VAE decoder, as separate graphs per input shape (``GraphedEngine``).

Warm-up runs on a side stream before capture (cuDNN benchmarking and lazy init must not end
up in the graph); inputs are filled with ``copy_``; results are copied out, so a caller never
holds a buffer that the next replay overwrites. All graphs of a pipeline share one memory pool
and one lock: replays are serialized, which is what a single GPU does with them anyway.

The same static-buffer code runs *uncaptured* when ``capture`` is off (CPU, or
``cuda_graphs=True`` on a CPU pipeline): that is how CI tests the logic of the graphed step
against the plain loop without a GPU. A capture failure logs one warning and the pipeline runs
the plain loop (and plain engine calls) from then on.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .loop import LoopState, StepCallback, Timer, denoise, guided_step
from .model.components import ComponentSpec
from .schedulers import Scheduler, make_scheduler

if TYPE_CHECKING:
    from .engines import Engine

log = logging.getLogger(__name__)

#: Warm-up calls before capture (stable-fast uses 3: cuDNN autotuning and lazy inits settle).
WARMUP_CALLS = 3


@dataclass(frozen=True)
class StepKey:
    """What a captured step is specialized to. Step count and guidance are *not* in it."""

    batch: int
    height: int
    width: int
    guided: bool
    scheduler: str
    #: shapes of the conditioning inputs (the text length grows with long prompts' chunks)
    cond: tuple[tuple[str, tuple[int, ...]], ...] = ()


class GraphRuntime:
    """Capture policy, memory pool and lock shared by every graph of one pipeline."""

    def __init__(self, device: torch.device, capture: bool):
        self.device = device
        self.capture = capture and device.type == "cuda"
        self.lock = threading.RLock()
        self._pool = None

    def build(self, fn: Callable[[], None], reset: Callable[[], None], what: str) -> Callable[[], None] | None:
        """A zero-argument runner of ``fn`` on static buffers: ``graph.replay`` when capturing,
        ``fn`` itself otherwise; None when the capture failed (the caller then runs ungraphed
        from now on; one warning per failing graph).

        ``reset`` puts the static state back in range before each warm-up call and before the
        capture (warm-up runs ``fn`` for real and advances the step index).
        """
        if not self.capture:
            return fn
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # errors here are real (bad input), not capture problems
            for _ in range(WARMUP_CALLS):
                reset()
                fn()
        caller = torch.cuda.current_stream(self.device)
        caller.wait_stream(stream)
        reset()
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
                # stable-fast's guard: a pool whose graphs are all freed (a step graph rebuilt
                # for more steps) trips "use_count > 0" in the caching allocator; one tiny
                # graph that lives as long as the pool keeps it referenced.
                self._keepalive = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self._keepalive, pool=self._pool, capture_error_mode="thread_local"):
                    self._keepalive_out = torch.zeros(1, device=self.device)
            graph = torch.cuda.CUDAGraph()
            # thread_local: another pipeline's thread allocating meanwhile does not break capture.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                fn()
        except Exception as e:  # any capture error means "this cannot be graphed": fall back
            # torch.cuda.graph's __exit__ ends the capture before it restores the caller's stream;
            # when capture_end raises, the thread would stay on the capture stream and the
            # fallback would run on a side stream nothing waits on.
            torch.cuda.set_stream(caller)
            log.warning("CUDA graph capture of %s failed (%s: %s); running it ungraphed from now on",
                        what, type(e).__name__, e)
            torch.cuda.synchronize(self.device)
            return None
        return graph.replay


# -- single engines (text encoder, VAE decoder) ----------------------------------------------------

class _EngineGraph:
    def __init__(self, engine: Engine, inputs: dict[str, torch.Tensor]):
        self.engine = engine
        self.inputs = {k: v.clone() for k, v in inputs.items()}  # static input buffers
        self.outputs: dict[str, torch.Tensor] = {}
        self.run: Callable[[], None] | None = None

    def __call__(self) -> None:
        # Inside a capture the engine's outputs are allocated from the graph's pool: they *are*
        # the static output buffers (the Engine contract's "unless the caller asked for that").
        self.outputs = self.engine(**self.inputs)


class GraphedEngine:
    """An Engine that replays one captured call of ``engine`` per input signature.

    Outputs are copied out of the static buffers, so the Engine contract holds for callers.
    """

    def __init__(self, engine: Engine, runtime: GraphRuntime):
        self.engine = engine
        self.spec: ComponentSpec = engine.spec
        self.device = engine.device
        self.graph_safe = True
        self.failed = False  # a capture failed: plain engine calls from then on
        self._rt = runtime
        self._graphs: dict[tuple, _EngineGraph] = {}

    def __getattr__(self, name: str):
        # The wrapped engine's other attributes (profile, size_multiple, ...) show through.
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(inputs.items()))
        with self._rt.lock, torch.no_grad():
            if self.failed:
                return self.engine(**inputs)
            g = self._graphs.get(key)
            if g is None:
                g = _EngineGraph(self.engine, inputs)
                g.run = self._rt.build(g, lambda: None, f"the {self.spec.name}")
                if g.run is None:
                    self.failed = True
                    return self.engine(**inputs)
                self._graphs[key] = g
            for k, buf in g.inputs.items():
                buf.copy_(inputs[k])
            g.run()
            return {k: v.clone() for k, v in g.outputs.items()}


# -- the guided step ---------------------------------------------------------------------------------

def load_scheduler_state(static: Scheduler, fresh: Scheduler) -> None:
    """Copy the declared buffers of ``fresh`` (tables from set_timesteps, state from begin) into
    those of ``static``; tables fill a prefix of the (longer) static ones. Only declared
    buffers exist for a graph (``Scheduler.tables`` / ``state``): nothing is guessed."""
    dst_all = static.buffers()
    for name, src in fresh.buffers().items():
        dst = dst_all[name]
        if dst.dim() != src.dim() or dst.shape[1:] != src.shape[1:] or (src.dim() and dst.shape[0] < src.shape[0]):
            raise RuntimeError(f"graphs: scheduler buffer {name!r} {tuple(src.shape)} does not fit the "
                               f"captured {tuple(dst.shape)}; this is a bug")
        (dst[: src.shape[0]] if src.dim() else dst).copy_(src)


class StepGraph:
    """Static buffers of one ``StepKey`` and the (captured or plain) runner of its guided step."""

    def __init__(self, key: StepKey, unet: Engine, scheduler_config: dict, run: LoopState,
                 capacity: int, needs_noise: bool, runtime: GraphRuntime):
        dev = run.latents.device
        self.key, self.unet, self.capacity = key, unet, capacity
        latents = run.latents.clone()  # (B, C, h, w) float32, updated in place by every step
        noise = torch.zeros((capacity, *latents.shape), device=dev) if needs_noise else None  # by step index
        cond = {k: v.clone() for k, v in run.cond.items()}
        self.state = LoopState(latents, cond, run.guidance.clone(), key.guided, noise,
                               torch.ones(capacity, dtype=torch.bool, device=dev))
        self.i = torch.zeros((), dtype=torch.long, device=dev)  # step index, advanced in the graph
        # Tables sized for ``capacity`` steps; shorter runs use a prefix. State from begin().
        self.sched = make_scheduler(key.scheduler, scheduler_config)
        self.sched.set_timesteps(capacity, dev)
        self.sched.begin(latents)
        self._state0 = {k: v.clone() for k, v in self.sched.buffers().items() if k in self.sched.state}
        self.run = runtime.build(self.step, self._reset, f"the guided step {key}")

    def _reset(self) -> None:
        self.i.zero_()
        for k, v in self._state0.items():
            getattr(self.sched, k).copy_(v)

    def step(self) -> None:
        """One guided step on the static buffers: the plain loop's ``guided_step`` itself."""
        self.state.latents.copy_(guided_step(self.unet, self.sched, self.state, self.i))
        self.i.add_(1)

    def load(self, sched: Scheduler, run: LoopState, first: int) -> None:
        """Fill the static inputs from a run (the graph path's host-side work)."""
        s, n = self.state, len(sched.timesteps)
        s.latents.copy_(run.latents)
        for k, v in run.cond.items():
            s.cond[k].copy_(v)
        s.guidance.copy_(run.guidance)
        load_scheduler_state(self.sched, sched)
        if run.noise is not None:
            s.noise[:n].copy_(run.noise)
        s.finite.fill_(True)
        self.i.fill_(first)


class GraphRunner:
    """The graphed denoising loop of one pipeline; same signature as ``loop.denoise``."""

    def __init__(self, unet: Engine, device: torch.device, capture: bool, scheduler_config: dict):
        self.runtime = GraphRuntime(device, capture)
        self.unet = unet
        self.scheduler_config = scheduler_config
        self._steps: dict[StepKey, StepGraph] = {}
        self.failed = False  # the step's capture failed (or cannot work): the plain loop runs
        if self.runtime.capture and not unet.graph_safe:
            log.warning("the %s U-Net engine is not CUDA-graph safe; running the ungraphed loop",
                        type(unet).__name__)
            self.failed = True

    @property
    def mode(self) -> str:
        """'captured' (CUDA graphs replay), 'fallback' (a capture failed) or 'uncaptured' (CPU)."""
        if not self.runtime.capture:
            return "uncaptured"
        return "fallback" if self.failed else "captured"

    def wrap(self, engine: Engine) -> Engine:
        """Graph an engine's calls (text encoder, VAE decoder) when it says it is graph safe."""
        if self.runtime.capture and not engine.graph_safe:
            return engine
        return GraphedEngine(engine, self.runtime)

    def denoise(self, unet: Engine, sched: Scheduler, run: LoopState, first: int, timer: Timer | None = None,
                callback: StepCallback | None = None, progress: bool = False) -> torch.Tensor:
        from tqdm.auto import tqdm

        timer = timer or (lambda stage: contextlib.nullcontext())
        n = len(sched.timesteps)
        b, _, h, w = run.latents.shape
        key = StepKey(b, h, w, run.guided, sched.name, tuple((k, tuple(v.shape)) for k, v in sorted(run.cond.items())))
        if run.cut is not None and run.cut < n:
            # guidance_until changes the batch mid-loop: the plain loop runs it (no graph per half yet)
            return denoise(unet, sched, run, first, timer, callback, progress)
        with self.runtime.lock, torch.no_grad():
            g = None if self.failed else self._steps.get(key)
            if not self.failed and (g is None or g.capacity < n):
                with timer("graph_capture"):  # once per shape (and when a run needs more steps)
                    g = StepGraph(key, self.unet, self.scheduler_config, run,
                                  max(n, 0 if g is None else g.capacity), sched.needs_noise, self.runtime)
                if g.run is None:
                    self.failed = True
                else:
                    self._steps[key] = g
            if self.failed:
                return denoise(unet, sched, run, first, timer, callback, progress)
            with timer("scheduler"):  # filling the static inputs is the graph path's host-side work
                g.load(sched, run, first)
            # "unet" covers the whole captured step here: U-Net + guidance + scheduler update.
            for k in tqdm(range(first, n), disable=not progress, unit="step"):
                with timer("unet"):
                    g.run()
                if callback is not None:
                    callback(k, sched.timesteps[k : k + 1], g.state.latents.clone())
            run.finite.copy_(g.state.finite[:n])
            run.latents = g.state.latents.clone()
            return run.latents
