"""CUDA graphs for the guided loop: one captured step per shape, replayed for every step.

What is captured (tinygrad's "one function per step" and stable-fast's wrapper habits):

- the whole guided step — U-Net engine call, guidance ``u + g·(t − u)``, scheduler update and
  a device-side "latents still finite" flag — once per ``StepKey`` (batch, height, width,
  guided, scheduler); every value that changes per step or per request lives in a device
  tensor the graph reads: the step index ``i`` (0-d long, incremented *inside* the graph), the
  guidance scale ``g`` (0-d float32), the ancestral noise of every step (uploaded once per run,
  indexed by ``i``). The scheduler's per-step tables and per-run state are static buffers of a
  scheduler object owned by the graph; each run copies a freshly built scheduler's tables and
  zeroed state into them (``load_scheduler_state``).
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

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .components import ComponentSpec
from .schedulers import Scheduler, make_scheduler
from .schedulers.base import at

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
        torch.cuda.current_stream(self.device).wait_stream(stream)
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
    """Copy every tensor of ``fresh`` (tables from set_timesteps, state from begin) into the
    same-named static buffer of ``static``; tables fill a prefix of the (longer) static ones."""
    for name, src in vars(fresh).items():
        if not isinstance(src, torch.Tensor):
            continue
        dst = getattr(static, name, None)
        if not isinstance(dst, torch.Tensor) or dst.dim() != src.dim() or dst.shape[1:] != src.shape[1:] \
                or (src.dim() and dst.shape[0] < src.shape[0]):
            raise RuntimeError(f"graphs: scheduler buffer {name!r} {tuple(src.shape)} does not fit the "
                               f"captured {None if dst is None else tuple(dst.shape)}; this is a bug")
        (dst[: src.shape[0]] if src.dim() else dst).copy_(src)


class StepGraph:
    """Static buffers of one ``StepKey`` and the (captured or plain) runner of its guided step."""

    def __init__(self, key: StepKey, unet: Engine, scheduler_config: dict, latents: torch.Tensor,
                 text: torch.Tensor, capacity: int, needs_noise: bool, runtime: GraphRuntime):
        dev = latents.device
        self.key, self.unet, self.capacity = key, unet, capacity
        self.latents = latents.clone()  # (B, C, h, w) float32, updated in place by every step
        self.text = text.clone()  # (2B|B, S, D)
        self.i = torch.zeros((), dtype=torch.long, device=dev)  # step index, advanced in the graph
        self.g = torch.ones((), dtype=torch.float32, device=dev)  # guidance scale
        # Tables sized for ``capacity`` steps; shorter runs use a prefix. State from begin().
        self.sched = make_scheduler(key.scheduler, scheduler_config)
        self.sched.set_timesteps(capacity, dev)
        self.sched.begin(self.latents)
        self._state0 = {k: v.clone() for k, v in vars(self.sched).items() if isinstance(v, torch.Tensor)}
        # Ancestral noise of every step, indexed by the absolute step index.
        self.noise = torch.zeros((capacity, *latents.shape), device=dev) if needs_noise else None
        self.finite = torch.ones(capacity, dtype=torch.bool, device=dev)
        self.run = runtime.build(self.step, self._reset, f"the guided step {key}")

    def _reset(self) -> None:
        self.i.zero_()
        for k, v in self._state0.items():
            getattr(self.sched, k).copy_(v)

    def step(self) -> None:
        """One guided step on the static buffers: exactly the plain loop's math."""
        i, sched = self.i, self.sched
        x = torch.cat([self.latents, self.latents]) if self.key.guided else self.latents  # (2B|B, C, h, w)
        x = sched.scale_model_input(x, i)
        t = at(sched.timesteps, i).reshape(1)  # (1,); at(): a tensor index without .item()
        eps = self.unet(sample=x, timestep=t, encoder_hidden_states=self.text)["noise_pred"]
        if self.key.guided:
            uncond, cond = eps.chunk(2)
            eps = uncond + self.g * (cond - uncond)  # u + g·(t − u)
        noise = None if self.noise is None else at(self.noise, i)
        new = sched.step(eps, i, self.latents, noise)
        # Checked once after the loop. (finite[i] = ... would call i.item(): a host sync.)
        self.finite.index_copy_(0, i.reshape(1), torch.isfinite(new).all().reshape(1))
        self.latents.copy_(new)
        i.add_(1)


class GraphRunner:
    """The graphed denoising loop of one pipeline; same signature as ``Pipeline.denoise``."""

    def __init__(self, unet: Engine, device: torch.device, capture: bool, scheduler_config: dict,
                 plain_denoise: Callable[..., torch.Tensor]):
        self.runtime = GraphRuntime(device, capture)
        self.unet = unet
        self.scheduler_config = scheduler_config
        self.plain_denoise = plain_denoise
        self._steps: dict[StepKey, StepGraph] = {}
        self.failed = False  # the step's capture failed (or cannot work): the plain loop runs
        if self.runtime.capture and not getattr(unet, "graph_safe", False):
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
        if self.runtime.capture and not getattr(engine, "graph_safe", False):
            return engine
        return GraphedEngine(engine, self.runtime)

    def denoise(self, sched: Scheduler, latents: torch.Tensor, text: torch.Tensor, guidance_scale: float,
                guided: bool, first: int, step_noise: torch.Tensor | None, timer, callback, progress: bool,
                finite: torch.Tensor | None = None) -> torch.Tensor:
        from tqdm.auto import tqdm

        n = len(sched.timesteps)
        b, _, h, w = latents.shape
        key = StepKey(b, h, w, guided, sched.name)
        with self.runtime.lock, torch.no_grad():
            g = None if self.failed else self._steps.get(key)
            if not self.failed and (g is None or g.capacity < n):
                with timer("graph_capture"):  # once per shape (and when a run needs more steps)
                    g = StepGraph(key, self.unet, self.scheduler_config, latents, text,
                                  max(n, 0 if g is None else g.capacity), sched.needs_noise, self.runtime)
                if g.run is None:
                    self.failed = True
                else:
                    self._steps[key] = g
            if self.failed:
                return self.plain_denoise(sched, latents, text, guidance_scale, guided, first, step_noise,
                                          timer, callback, progress, finite)
            with timer("scheduler"):  # filling the static inputs is the graph path's host-side work
                g.latents.copy_(latents)
                g.text.copy_(text)
                g.g.fill_(guidance_scale)
                load_scheduler_state(g.sched, sched)
                if step_noise is not None:
                    g.noise[first:n].copy_(step_noise)
                g.finite.fill_(True)
                g.i.fill_(first)
            # "unet" covers the whole captured step here: U-Net + guidance + scheduler update.
            for k in tqdm(range(first, n), disable=not progress, unit="step"):
                with timer("unet"):
                    g.run()
                if callback is not None:
                    callback(k, sched.timesteps[k : k + 1], g.latents.clone())
            if finite is not None:
                finite[first:n].copy_(g.finite[first:n])
            return g.latents.clone()
