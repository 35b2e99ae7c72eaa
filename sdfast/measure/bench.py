"""``sdfast bench``: every backend against diffusers' own pipeline, stage by stage.

For each dtype and batch size the same model, scheduler, steps, size and seed run through
diffusers' ``StableDiffusionPipeline`` (``StableDiffusionXLPipeline`` for SDXL; built from the
very torch modules our torch backend runs) and through each sdfast backend asked for, in this
process: ``warmup`` untimed runs, then ``repeat`` timed ones. How each stage is timed:

- sdfast backends: ``Pipeline.generate(profile=True)``, whose StageTimer wraps every stage
  with ``perf_counter`` and, on CUDA, synchronizes before and after it. ``scheduler_step`` is
  everything in the loop but the U-Net (batch concat, input scaling, guidance, the update).
- diffusers: forward pre/post hooks on its text encoder (SDXL: both), U-Net and VAE decoder (+
  post_quant_conv) add up the wall time inside those modules (synchronizing on CUDA), and
  ``callback_on_step_end`` marks the end of each step; ``scheduler_step`` is the loop's span
  (first U-Net call to the last step's end) minus U-Net time, per step: the same definition
  as ours, less the first step's concat/scaling (microseconds).
- ``total`` is the whole call to the PIL images, both sides.

Per stage the report has p50 and p90 over the timed runs, latency p50/p99 of the whole call
(nearest-rank on few runs: with 3 runs p99 is the slowest), images/s from the p50 total, peak
memory, achieved TFLOP/s (FLOPs from ``sdfast.measure.flops``) and the share of the device's peak.
Peak host memory is the process's peak RSS (``VmHWM``, reset per row through
``/proc/self/clear_refs`` where the kernel allows); on CUDA, ``torch.cuda.max_memory_allocated``.
The table, JSON and plot are written by ``sdfast.measure.report``.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidArgument
from ..model.components import Precision
from ..model.info import (
    ModelInfo,
    builtin_models,
    cache_dir,
    load_tokenizer,
    load_torch_modules,
    resolve_model,
)
from .flops import StageFlops, count_stage_flops, device_peak

log = logging.getLogger(__name__)

STAGES = ("text_encoder", "unet_step", "scheduler_step", "vae_decode", "total")
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"


@dataclass
class BenchConfig:
    model: str = "tiny"
    backends: list[str] = field(default_factory=lambda: ["torch"])
    dtypes: list[str] = field(default_factory=lambda: ["fp32"])
    batches: list[int] = field(default_factory=lambda: [1])
    steps: int = 10
    height: int | None = None
    width: int | None = None
    repeat: int = 3
    warmup: int = 1
    scheduler: str = "lms"
    guidance_scale: float = 7.5
    seed: int = 0
    device: str = "cpu"
    engines: str | None = None
    prompt: str = DEFAULT_PROMPT
    diffusers: bool = True


# -- small pieces ------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: an observed value, never interpolated past the slowest run."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _read_status_kb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device) -> bool:
    """Reset the peak counters; False if the host's peak RSS could not be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def peak_memory_mb(device: torch.device) -> dict[str, float | None]:
    hwm = _read_status_kb("VmHWM")
    out: dict[str, float | None] = {"peak_rss_mb": None if hwm is None else hwm / 1024, "cuda_max_allocated_mb": None}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def machine_info(device: torch.device) -> dict[str, Any]:
    from ..hardware import cpu_bf16_supported, cpu_name

    cpu = cpu_name()
    from ..artifacts import versions as artifact_versions

    versions = {"python": platform.python_version(), **artifact_versions()}  # the one version list
    info = {
        "device": str(device),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16": cpu_bf16_supported(),
        "platform": platform.platform(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- one timed runner per kind ---------------------------------------------------------------

Runner = Callable[[], dict[str, float]]  # one generation -> stage times in ms


def sdfast_runner(pipe, cfg: BenchConfig, batch: int, height: int, width: int) -> Runner:
    prompts = [cfg.prompt] * batch

    def run() -> dict[str, float]:
        out = pipe.generate(prompts, height=height, width=width, steps=cfg.steps,
                            guidance_scale=cfg.guidance_scale, seed=cfg.seed, scheduler=cfg.scheduler,
                            profile=True)
        t, n = out.timings, out.steps
        return {"text_encoder": 1e3 * t["text_encoder"], "unet_step": 1e3 * t["unet"] / n,
                "scheduler_step": 1e3 * t["scheduler"] / n, "vae_decode": 1e3 * t["vae_decode"],
                "total": 1e3 * t["total"]}

    return run


def diffusers_scheduler(name: str, config: dict[str, Any]):
    """diffusers' scheduler that computes what sdfast's scheduler ``name`` computes."""
    import diffusers as d

    classes = {
        "lms": (d.LMSDiscreteScheduler, {}),
        "euler": (d.EulerDiscreteScheduler, {}),
        "euler_a": (d.EulerAncestralDiscreteScheduler, {}),
        "ddim": (d.DDIMScheduler, {}),
        "dpmpp_2m": (d.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        "dpmpp_2m_karras": (d.DPMSolverMultistepScheduler,
                            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
        "lcm": (d.LCMScheduler, {}),
        "tcd": (d.TCDScheduler, {}),  # a diffusers pipeline must also pass eta = gamma (schedulers/tcd.py)
    }
    cls, kw = classes[name]
    return cls.from_config(config, **kw)


#: the diffusers pipeline class each model family is timed against (its parity reference).


def diffusers_pipeline(info: ModelInfo, modules: dict[str, torch.nn.Module], scheduler: str):
    """diffusers' own pipeline for ``info``'s family, built from ``modules`` (the very modules the
    sdfast torch row runs) and diffusers' scheduler for ``scheduler``."""
    import diffusers

    cls = getattr(diffusers, info.family_record.diffusers_pipeline)
    common = dict(vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=load_tokenizer(info),
                  unet=modules["unet"], scheduler=diffusers_scheduler(scheduler, info.scheduler_config))
    if info.family_record.size_conditioning:  # SDXL's pipeline: two encoders, no safety checker
        pipe = cls(**common, text_encoder_2=modules["text_encoder_2"],
                   tokenizer_2=load_tokenizer(info, "tokenizer_2"),
                   force_zeros_for_empty_prompt=info.force_zeros_for_empty_prompt, add_watermarker=False)
    else:
        pipe = cls(**common, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _HookTimer:
    """Wall time inside hooked modules, per stage; first entry time of each stage.

    The hooks synchronize CUDA, so they must never outlive the diffusers row: the modules are
    shared with the sdfast torch row, whose CUDA-graph capture fails on a sync (and would then
    time diffusers' hooks too). ``attach`` keeps every handle and ``detach`` removes them all.
    Several modules may share a stage (SDXL's two text encoders) as long as they run one after
    the other, never one inside another: the entry time is kept per stage."""

    def __init__(self, device: torch.device):
        self.device = device
        self._handles: list = []
        self.reset()

    def reset(self) -> None:
        self.totals: dict[str, float] = {}
        self.first: dict[str, float] = {}
        self.step_end = 0.0
        self._t0: dict[str, float] = {}

    def attach(self, module: torch.nn.Module, stage: str) -> None:
        def pre(mod, args):
            sync(self.device)
            now = time.perf_counter()
            self._t0[stage] = now
            self.first.setdefault(stage, now)

        def post(mod, args, out):
            sync(self.device)
            self.totals[stage] = self.totals.get(stage, 0.0) + time.perf_counter() - self._t0[stage]

        self._handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def on_step_end(self, pipe, i, t, kwargs):
        sync(self.device)
        self.step_end = time.perf_counter()
        return kwargs


def diffusers_runner(pipe, cfg: BenchConfig, batch: int, height: int, width: int,
                     device: torch.device) -> Runner:
    """One timed diffusers generation per call. The timing hooks are attached for the call
    and removed when it ends, failed or not (see ``_HookTimer``)."""
    timer = _HookTimer(device)
    # SDXL's two text encoders run one after the other; both count as text_encoder.
    hooked = [(pipe.text_encoder, "text_encoder"), (getattr(pipe, "text_encoder_2", None), "text_encoder"),
              (pipe.unet, "unet"), (pipe.vae.post_quant_conv, "vae_decode"), (pipe.vae.decoder, "vae_decode")]
    prompts = [cfg.prompt] * batch
    # As the sdfast row: no negative prompt. SD pipelines encode "" for it (passed explicitly, as
    # before); SDXL's zeroes it under force_zeros_for_empty_prompt, and sdfast does the same.
    negative = None if hasattr(pipe, "text_encoder_2") else [""] * batch

    def run() -> dict[str, float]:
        timer.reset()
        for module, stage in hooked:
            if module is not None:
                timer.attach(module, stage)
        try:
            t0 = time.perf_counter()
            pipe(prompt=prompts, negative_prompt=negative, height=height, width=width,
                 num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                 generator=torch.Generator("cpu").manual_seed(cfg.seed), output_type="pil",
                 callback_on_step_end=timer.on_step_end)
            sync(device)
            total = time.perf_counter() - t0
        finally:
            timer.detach()
        tt, n = timer.totals, cfg.steps
        loop = timer.step_end - timer.first["unet"]
        return {"text_encoder": 1e3 * tt["text_encoder"], "unet_step": 1e3 * tt["unet"] / n,
                "scheduler_step": 1e3 * (loop - tt["unet"]) / n, "vae_decode": 1e3 * tt["vae_decode"],
                "total": 1e3 * total}

    return run


# -- measuring one row -----------------------------------------------------------------------

def measure(run: Runner, cfg: BenchConfig, device: torch.device) -> dict[str, Any]:
    """Warm-up runs, then timed runs; stage p50/p90, latency p50/p99, peak memory."""
    peak_reset = reset_peak_memory(device)
    t0 = time.perf_counter()
    for _ in range(cfg.warmup):
        run()
    warmup_s = time.perf_counter() - t0
    samples = [run() for _ in range(cfg.repeat)]
    mem = peak_memory_mb(device)
    totals = [s["total"] for s in samples]
    return {
        "stages_ms": {k: percentile([s[k] for s in samples], 50) for k in STAGES},
        "stages_ms_p90": {k: percentile([s[k] for s in samples], 90) for k in STAGES},
        "latency_ms": {"p50": percentile(totals, 50), "p99": percentile(totals, 99), "runs": len(totals)},
        "warmup_s": warmup_s,
        "peak_mem_mb": mem["cuda_max_allocated_mb"] if device.type == "cuda" else mem["peak_rss_mb"],
        **mem,
        "peak_rss_is_process_lifetime": not peak_reset,
    }


def add_throughput(row: dict[str, Any], flops: StageFlops, steps: int, batch: int,
                   peak_tflops: float | None) -> None:
    st = row["stages_ms"]
    row["images_per_s"] = batch / (st["total"] / 1e3)
    row["gflop"] = flops.as_gflop(steps)
    tflops = {
        "text_encoder": flops.text_encoder / (st["text_encoder"] / 1e3) / 1e12,
        "unet": flops.unet_step / (st["unet_step"] / 1e3) / 1e12,
        "vae_decode": flops.vae_decode / (st["vae_decode"] / 1e3) / 1e12,
        "total": flops.total(steps) / (st["total"] / 1e3) / 1e12,
    }
    row["tflops"] = tflops
    row["share_of_peak"] = {k: (v / peak_tflops if peak_tflops else None) for k, v in tflops.items()}


# -- engines for exported backends -----------------------------------------------------------

def ensure_engines(cfg: BenchConfig, info: ModelInfo, backend: str, dtype: str, batch: int,
                   height: int, width: int) -> tuple[Path | None, float | None, str | None]:
    """(engines dir, export seconds or None if reused, skip reason)."""
    from .. import backends

    if cfg.engines is not None:
        return Path(cfg.engines), None, None
    record = backends.get(backend)
    fmt = record.format
    if dtype not in record.precisions:
        return None, None, (f"`sdfast export --format {fmt}` builds {' and '.join(record.precisions)} engines, "
                            f"not {dtype}; bench {backend} with --dtype {record.precisions[0]}")
    missing = record.missing()
    if missing:
        return None, None, f"{backend} {missing}, and no --engines folder was given"
    dest = (cache_dir() / "engines" /
            f"{info.name.replace('/', '--')}-{info.fingerprint[:12]}-{fmt}-{dtype}-{height}x{width}-b{batch}")
    if (dest / "manifest.json").is_file():
        return dest, None, None
    model_arg = cfg.model if cfg.model in builtin_models() else str(info.path)
    cmd = [sys.executable, "-m", "sdfast.cli", "export", "--model", model_arg, "--out", str(dest),
           "--format", fmt, "--precision", dtype, "--height", str(height), "--width", str(width),
           "--batch", str(batch)]
    log.info("exporting %s engines: %s", backend, " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        return None, None, f"export failed (exit {proc.returncode}): {last}"
    return dest, seconds, None


# -- the whole benchmark ---------------------------------------------------------------------

def validate(cfg: BenchConfig) -> tuple[ModelInfo, torch.device, int, int]:
    """Check every value before anything runs; returns (info, device, height, width)."""
    from .. import backends
    from ..hardware import resolve_device
    from ..request import Request

    if not cfg.backends:
        raise InvalidArgument("backends: the list is empty; pass e.g. --backends torch,onnxruntime")
    for b in cfg.backends:
        backends.get(b, arg="backends")
    for d in cfg.dtypes:
        Precision.parse(d)
    for b in cfg.batches:
        if not isinstance(b, int) or b < 1:
            raise InvalidArgument(f"batch: must be a positive integer but is {b!r}")
    if cfg.repeat < 1:
        raise InvalidArgument(f"repeat: must be at least 1 but is {cfg.repeat}")
    if cfg.warmup < 0:
        raise InvalidArgument(f"warmup: must be 0 or more but is {cfg.warmup}")
    if cfg.engines is not None and not Path(cfg.engines).is_dir():
        raise InvalidArgument(f"engines: {cfg.engines!r} is not a folder; pass the --out folder of `sdfast export`")
    if cfg.diffusers and cfg.scheduler == "lms" and importlib.util.find_spec("scipy") is None:
        # diffusers' LMSDiscreteScheduler integrates with scipy (sdfast's lms does not)
        raise InvalidArgument("scheduler: the diffusers row's lms needs scipy, which is not installed; "
                              "pip install scipy, or bench another --scheduler (e.g. euler)")
    device = resolve_device(cfg.device)
    info = resolve_model(cfg.model)
    req = Request.build(info, prompt=cfg.prompt, height=cfg.height, width=cfg.width, steps=cfg.steps,
                        guidance_scale=cfg.guidance_scale, seed=cfg.seed, scheduler=cfg.scheduler)
    return info, device, req.height, req.width


def make_runner(backend: str, cfg: BenchConfig, info: ModelInfo, device: torch.device, precision: Precision,
                modules: dict[str, torch.nn.Module] | None, batch: int, height: int, width: int,
                engines_dir: str | None) -> Runner:
    """The diffusers row and the torch rows share ``modules``; every sdfast row is assembled by
    ``sdfast.load``, so it runs with the same graphs and safety setup users get."""
    from ..runtime import load

    if backend == "diffusers":
        pipe = diffusers_pipeline(info, modules, cfg.scheduler)
        return diffusers_runner(pipe, cfg, batch, height, width, device)
    pipe = load(info, backend=backend, device=device, dtype=precision.value, engines=engines_dir,
                modules=modules if backend == "torch" else None)
    return sdfast_runner(pipe, cfg, batch, height, width)


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns ``{"machine", "config", "results"}`` (docs/architecture.md's schema).
    ``progress`` gets one line as each row starts (rows of a big model take minutes)."""
    info, device, height, width = validate(cfg)
    guided = cfg.guidance_scale > 1.0
    skipped: list[dict[str, str]] = []
    results: list[dict[str, Any]] = []
    common = {"model": info.name, "random_weights": info.random_weights, "device": str(device),
              "steps": cfg.steps, "height": height, "width": width, "scheduler": cfg.scheduler}

    for dtype in cfg.dtypes:
        precision = Precision.parse(dtype)
        peak = device_peak(device, precision.torch_dtype)
        modules = None
        if "torch" in cfg.backends or cfg.diffusers:
            modules = load_torch_modules(info, dtype=precision.torch_dtype, device=device)
        for batch in cfg.batches:
            flops = count_stage_flops(info, height, width, batch, guided)
            rows: list[dict[str, Any]] = []
            kinds = (["diffusers"] if cfg.diffusers else []) + list(cfg.backends)
            for backend in kinds:
                extra: dict[str, Any] = {"timing": "sdfast Pipeline profile=True"}
                if backend == "diffusers":
                    extra["timing"] = f"diffusers {info.family_record.diffusers_pipeline}, forward hooks"
                elif backend != "torch":
                    engines_dir, export_s, reason = ensure_engines(cfg, info, backend, dtype, batch, height, width)
                    if reason:
                        log.warning("%s %s batch %d skipped: %s", backend, dtype, batch, reason)
                        skipped.append({"backend": backend, "dtype": dtype, "batch": batch, "reason": reason})
                        continue
                    extra.update(engines=str(engines_dir), export_s=export_s)
                log.info("bench %s %s batch %d", backend, dtype, batch)
                if progress is not None:
                    progress(f"{backend} {dtype} batch {batch}: {cfg.warmup} warm-up + {cfg.repeat} timed runs")
                try:
                    runner = make_runner(backend, cfg, info, device, precision, modules, batch, height, width,
                                         extra.get("engines"))
                except InvalidArgument as e:
                    skipped.append({"backend": backend, "dtype": dtype, "batch": batch, "reason": str(e)})
                    continue
                row = {"backend": backend, "dtype": dtype, "batch": batch, **common, **extra,
                       **measure(runner, cfg, device)}
                add_throughput(row, flops, cfg.steps, batch, peak.tflops)
                row["peak_tflops"], row["peak_source"] = peak.tflops, peak.source
                rows.append(row)
                del runner
                gc.collect()
            ref = next((r for r in rows if r["backend"] == "diffusers"), None)
            for r in rows:
                r["speedup_vs_diffusers"] = ref["stages_ms"]["total"] / r["stages_ms"]["total"] if ref else None
            results.extend(rows)
        modules = None
        gc.collect()

    config = {k: v for k, v in asdict(cfg).items()}
    config.update(height=height, width=width, model_name=info.name, random_weights=info.random_weights,
                  guided=guided, skipped=skipped)
    return {"machine": machine_info(device), "config": config, "results": results}
