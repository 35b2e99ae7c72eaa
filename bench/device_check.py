"""One command for a CUDA machine: GPU tests, tier-3 parity and the headline benchmark.

    python bench/device_check.py --out results/            # on the GPU machine (~8 min)
    python bench/device_check.py --smoke --out /tmp/dc     # the same script on the CPU, tiny model (CI)

Sections, each recorded in ``DIR/device_check.json`` with its status, reason and seconds:

1. ``gpu_tests``: ``pytest -m gpu tests/test_gpu.py`` (CUDA graphs captured and equal to the
   plain loop, no host sync in replays, fp16 attention, the fp16 VAE fallback, CUDA AOTI).
2. ``parity``: tier 3 — fp16 engines (eager + graphs, inductor + graphs) against the fp32
   eager pipeline end to end: PSNR ≥ 35 dB, no NaN/inf (random weights: informative, the
   real gate needs a real checkpoint).
3. ``bench``: SD 1.5 architecture with random weights ("random-sd15"), 512×512, 50 steps,
   batch 1 with guidance, for diffusers' eager fp16 pipeline, sdfast eager + CUDA graphs and
   sdfast inductor + CUDA graphs: stage ms, it/s, end to end (CUDA events), peak GPU memory
   and the U-Net's share of the fp16 tensor-core peak.

``--smoke`` runs every section's code on the CPU with the tiny model, a few steps and fp32
(graphs run uncaptured, GPU tests are skipped); the AOTI compile is skipped there unless
``--smoke-inductor`` (it takes minutes on a small CPU). The whole GPU run stays inside
``--budget-s`` (480 s): sections that would start past it are skipped with that reason, and
autotuning defaults to "none" (coordinate-descent or max-autotune of the SD U-Net alone takes
longer than the budget).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PSNR_MIN_DB = 35.0  # apple/ml-stable-diffusion's ABSOLUTE_MIN_PSNR, DESIGN.md tier 3
#: FLOPs of SD 1.5 at 512×512 batch 1 (2·MACs, counted on the meta device with sdfast.flops):
#: one guided U-Net step (batch 2) and one VAE decode. Used when the live count is unavailable.
SD15_512_UNET_STEP_FLOP = 1.61e12
SD15_512_VAE_DECODE_FLOP = 2.51e12
PROMPT = "a photograph of an astronaut riding a horse"


# -- small pieces ----------------------------------------------------------------------------------

class Clock:
    """End-to-end time: CUDA events on the GPU, perf_counter on the CPU (both in ms)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)


def psnr(ref: np.ndarray, out: np.ndarray) -> float:
    """20·log10(max|ref| / RMSE) on images in [0, 1] (the Core ML conversion gate's formula)."""
    rmse = float(np.sqrt(np.mean((ref - out) ** 2)))
    return math.inf if rmse == 0 else 20 * math.log10(float(np.abs(ref).max()) / rmse)


def images_array(out) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in out.images])


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


class Section:
    """Runs one part of the check, recording status, reason, seconds and its result."""

    def __init__(self, report: dict[str, Any], name: str, deadline: float):
        self.report, self.name, self.deadline = report, name, deadline

    def run(self, fn, *args, skip: str | None = None) -> Any:
        entry: dict[str, Any] = {"status": "skipped", "reason": skip}
        self.report["sections"][self.name] = entry
        if skip is None and time.monotonic() > self.deadline:
            entry["reason"] = "the run's time budget (--budget-s) was spent before this section"
        if entry["reason"] is not None:
            print(f"[{self.name}] skipped: {entry['reason']}", flush=True)
            return None
        t0 = time.monotonic()
        try:
            result = fn(*args)
            entry.update(status="ok", reason=None, result=result)
        except Exception as e:  # the check goes on and reports which section failed and why
            entry.update(status="failed", reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            print(f"[{self.name}] FAILED: {type(e).__name__}: {e}", flush=True)
            result = None
        entry["seconds"] = round(time.monotonic() - t0, 1)
        return result


# -- configuration -----------------------------------------------------------------------------------

def config(args: argparse.Namespace) -> dict[str, Any]:
    if args.smoke:
        return dict(model="tiny-random", device="cpu", dtype="fp32", height=64, width=64, steps=args.steps or 4,
                    parity_steps=3, guidance=7.5, scheduler="lms", repeat=1)
    return dict(model=args.model, device="cuda", dtype="fp16", height=512, width=512, steps=args.steps or 50,
                parity_steps=20, guidance=7.5, scheduler="lms", repeat=args.repeat)


# -- sections ----------------------------------------------------------------------------------------

def gpu_tests(out: Path, timeout: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "tests/test_gpu.py",
           f"--junitxml={out / 'gpu_tests.xml'}"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    (out / "gpu_tests.log").write_text(p.stdout + p.stderr)
    summary = [line for line in p.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
    if p.returncode not in (0, 5):
        raise RuntimeError(f"pytest exited {p.returncode}: {summary[0]} (see gpu_tests.log)")
    return {"summary": summary[0], "returncode": p.returncode}


def load_modules(info, dtype: torch.dtype, device: torch.device) -> dict[str, torch.nn.Module]:
    from sdfast.models import load_torch_modules

    return load_torch_modules(info, dtype=dtype, device=device)


def eager_pipeline(info, mods, device: torch.device, precision, cuda_graphs: bool):
    from sdfast.engines import torch as torch_engines
    from sdfast.runtime import Pipeline

    engines = torch_engines.load(info, device, precision, modules=mods)
    return Pipeline(info, engines, device, precision, "torch", cuda_graphs=cuda_graphs)


def inductor_pipeline(info, device: torch.device, precision, out: Path, autotune: str, height: int,
                      width: int) -> tuple[Any, dict[str, float]]:
    """Compile text encoder, U-Net and VAE decoder (txt2img needs no VAE encoder: its compile
    is left out to save budget) and a graphed pipeline on them; returns it and compile seconds."""
    from sdfast.components import SPECS, ShapeProfile, size_multiple
    from sdfast.engines.inductor import InductorEngine
    from sdfast.export.inductor import InductorExportOptions, export_inductor
    from sdfast.runtime import Pipeline

    profile = ShapeProfile.static(1, height, width)
    options = InductorExportOptions(precision=precision, vae_precision=precision, device=device.type,
                                    autotune=autotune)
    dest = out / "aoti"
    parts = ("text_encoder", "unet", "vae_decoder")
    t0 = time.monotonic()
    export_inductor(info, dest, profile, options, components=parts)
    manifest = json.loads((dest / "manifest.json").read_text())
    compile_s = {name: manifest["components"][name]["compile_s"] for name in parts}
    compile_s["total_with_module_build"] = round(time.monotonic() - t0, 1)
    engines = {}
    for name in parts:
        runner = torch._inductor.aoti_load_package(str(dest / f"{name}.pt2"),
                                                   run_single_threaded=device.type == "cuda")
        engines[name] = InductorEngine(SPECS[name], runner, device, precision, profile, size_multiple(info))
    return Pipeline(info, engines, device, precision, "inductor", cuda_graphs=True), compile_s


def run_sdfast(pipe, cfg: dict[str, Any], clock: Clock, steps: int) -> dict[str, Any]:
    kw = dict(height=cfg["height"], width=cfg["width"], steps=steps, guidance_scale=cfg["guidance"],
              scheduler=cfg["scheduler"], seed=0)
    reset_memory(pipe.device)
    t0 = time.monotonic()
    pipe.generate(PROMPT, **kw)  # warm-up: lazy init, cuDNN autotuning, graph capture
    warmup_s = time.monotonic() - t0
    e2e = [clock.time(lambda: pipe.generate(PROMPT, **kw)) for _ in range(cfg["repeat"])]
    t = pipe.generate(PROMPT, profile=True, **kw).timings  # synchronized per stage
    n = t["steps"]
    loop_s = t["unet"] + t["scheduler"]
    return {
        "warmup_s": round(warmup_s, 2),
        "end_to_end_ms": min(e2e),
        "it_per_s": n / loop_s,
        "stages_ms": {"text_encoder": 1e3 * t["text_encoder"], "unet_step": 1e3 * t["unet"] / n,
                      "scheduler_step": 1e3 * t["scheduler"] / n, "vae_decode": 1e3 * t["vae_decode"],
                      "total_profiled": 1e3 * t["total"]},
        "peak_gpu_mem_mb": peak_memory_mb(pipe.device),
        "graphs": None if pipe.graphs is None else pipe.graphs.mode,
    }


def run_diffusers(info, mods, cfg: dict[str, Any], clock: Clock, device: torch.device) -> dict[str, Any]:
    from sdfast.bench import BenchConfig, diffusers_pipeline, diffusers_runner

    pipe = diffusers_pipeline(info, mods, cfg["scheduler"])
    bc = BenchConfig(steps=cfg["steps"], guidance_scale=cfg["guidance"], scheduler=cfg["scheduler"], prompt=PROMPT)
    kw = dict(prompt=PROMPT, height=cfg["height"], width=cfg["width"], num_inference_steps=cfg["steps"],
              guidance_scale=cfg["guidance"], output_type="pil")
    reset_memory(device)
    t0 = time.monotonic()
    pipe(**kw, generator=torch.Generator("cpu").manual_seed(0))
    warmup_s = time.monotonic() - t0
    e2e = [clock.time(lambda: pipe(**kw, generator=torch.Generator("cpu").manual_seed(0)))
           for _ in range(cfg["repeat"])]
    stages = diffusers_runner(pipe, bc, 1, cfg["height"], cfg["width"], device)()
    loop_ms = cfg["steps"] * (stages["unet_step"] + stages["scheduler_step"])
    return {"warmup_s": round(warmup_s, 2), "end_to_end_ms": min(e2e), "it_per_s": 1e3 * cfg["steps"] / loop_ms,
            "stages_ms": {**{k: v for k, v in stages.items() if k != "total"}, "total_profiled": stages["total"]},
            "peak_gpu_mem_mb": peak_memory_mb(device), "graphs": None}


def add_share_of_peak(row: dict[str, Any], info, cfg: dict[str, Any], device: torch.device) -> None:
    unet_flop, vae_flop, source = None, None, None
    try:
        from sdfast.flops import count_stage_flops, device_peak

        f = count_stage_flops(info, cfg["height"], cfg["width"], 1, guided=True)
        unet_flop, vae_flop, source = f.unet_step, f.vae_decode, "sdfast.flops (meta-device count)"
        peak = device_peak(device, torch.float16 if device.type == "cuda" else torch.float32)
    except Exception as e:  # flops.py missing or changed: the SD 1.5 512² constants still apply
        peak, source = None, f"constants (live count failed: {type(e).__name__})"
        if info.name == "random-sd15" and (cfg["height"], cfg["width"]) == (512, 512):
            unet_flop, vae_flop = SD15_512_UNET_STEP_FLOP, SD15_512_VAE_DECODE_FLOP
    st = row["stages_ms"]
    row["flop"] = {"unet_step": unet_flop, "vae_decode": vae_flop, "source": source}
    if unet_flop is None:
        return
    row["tflops"] = {"unet": unet_flop / st["unet_step"] / 1e9, "vae_decode": vae_flop / st["vae_decode"] / 1e9}
    if peak is not None and peak.tflops:
        row["peak_tflops"] = {"value": peak.tflops, "source": peak.source}
        row["pct_of_peak"] = {k: 100 * v / peak.tflops for k, v in row["tflops"].items()}


def bench_and_parity(args: argparse.Namespace, cfg: dict[str, Any], out: Path, report: dict[str, Any],
                     deadline: float) -> None:
    from sdfast.components import Precision
    from sdfast.models import resolve_model

    device = torch.device(cfg["device"])
    precision = Precision(cfg["dtype"])
    info = resolve_model(cfg["model"])
    clock = Clock(device)
    rows: dict[str, Any] = {}
    images: dict[str, np.ndarray] = {}
    pkw = dict(height=cfg["height"], width=cfg["width"], steps=cfg["parity_steps"], guidance_scale=cfg["guidance"],
               scheduler=cfg["scheduler"], seed=0)

    def reference() -> dict[str, Any]:  # fp32 eager, the one reference every fp16 path is held to
        mods32 = load_modules(info, torch.float32, device)
        ref = eager_pipeline(info, mods32, device, Precision.FP32, cuda_graphs=False).generate(PROMPT, **pkw)
        images["reference"] = images_array(ref)
        del mods32
        reset_memory(device)
        return {"steps": cfg["parity_steps"]}

    sec = lambda name: Section(report, name, deadline)  # noqa: E731
    sec("parity_reference").run(reference)
    mods = load_modules(info, precision.torch_dtype, device)

    def bench_diffusers():
        rows["diffusers_eager"] = run_diffusers(info, mods, cfg, clock, device)
        add_share_of_peak(rows["diffusers_eager"], info, cfg, device)
        return rows["diffusers_eager"]

    def bench_eager():
        pipe = eager_pipeline(info, mods, device, precision, cuda_graphs=True)
        images["sdfast_eager_graphs"] = images_array(pipe.generate(PROMPT, **pkw))
        rows["sdfast_eager_graphs"] = run_sdfast(pipe, cfg, clock, cfg["steps"])
        add_share_of_peak(rows["sdfast_eager_graphs"], info, cfg, device)
        return rows["sdfast_eager_graphs"]

    def bench_inductor():
        pipe, compile_s = inductor_pipeline(info, device, precision, out, args.autotune, cfg["height"],
                                            cfg["width"])
        images["sdfast_inductor_graphs"] = images_array(pipe.generate(PROMPT, **pkw))
        rows["sdfast_inductor_graphs"] = run_sdfast(pipe, cfg, clock, cfg["steps"])
        rows["sdfast_inductor_graphs"]["compile_s"] = compile_s
        add_share_of_peak(rows["sdfast_inductor_graphs"], info, cfg, device)
        return rows["sdfast_inductor_graphs"]

    # sdfast first: diffusers' row hooks timers (with syncs) onto the shared modules, which
    # must not be inside a CUDA graph capture.
    sec("bench_sdfast_eager_graphs").run(bench_eager)
    sec("bench_diffusers_eager").run(bench_diffusers, skip=None if args.diffusers else "--no-diffusers")
    mods.clear()  # free the fp16 eager weights before compiling
    reset_memory(device)
    skip_inductor = None
    if args.smoke and not args.smoke_inductor:
        skip_inductor = ("smoke mode: compiling the tiny model with AOTInductor takes minutes on a small CPU "
                         "(pass --smoke-inductor to include it; tests/test_inductor.py -m slow covers it)")
    elif args.skip_inductor:
        skip_inductor = "--skip-inductor"
    sec("bench_sdfast_inductor_graphs").run(bench_inductor, skip=skip_inductor)

    def parity() -> dict[str, Any]:
        if "reference" not in images:
            raise RuntimeError("no fp32 reference image (parity_reference failed)")
        result = {}
        for name, img in images.items():
            if name == "reference":
                continue
            finite = bool(np.isfinite(img).all())
            db = psnr(images["reference"], img)
            # JSON has no infinity: identical images report psnr_db null and identical true.
            result[name] = {"psnr_db": None if math.isinf(db) else db, "identical": math.isinf(db),
                            "finite": finite, "pass": finite and db >= PSNR_MIN_DB}
        result["rule"] = f"PSNR >= {PSNR_MIN_DB} dB against the fp32 eager image, no NaN/inf"
        return result

    sec("parity").run(parity)
    report["bench"] = rows


def print_table(report: dict[str, Any]) -> None:
    print("\nsection                        status   seconds  note")
    for name, s in report["sections"].items():
        print(f"{name:30s} {s['status']:8s} {s.get('seconds', 0):7.1f}  {s.get('reason') or ''}")
    rows = report.get("bench", {})
    if rows:
        print("\nrun                      text_enc  unet/step  sched/step  vae_dec   e2e_ms   it/s  peak_MB  %peak(unet)")
        for name, r in rows.items():
            st = r["stages_ms"]
            pct = (r.get("pct_of_peak") or {}).get("unet")
            mem = r.get("peak_gpu_mem_mb")
            print(f"{name:24s} {st['text_encoder']:8.2f} {st['unet_step']:10.2f} {st['scheduler_step']:11.3f} "
                  f"{st['vae_decode']:8.2f} {r['end_to_end_ms']:8.1f} {r['it_per_s']:6.2f} "
                  f"{'-' if mem is None else f'{mem:.0f}':>8s} {'-' if pct is None else f'{pct:.1f}':>11s}")
    par = report["sections"].get("parity", {}).get("result") or {}
    for name, p in par.items():
        if isinstance(p, dict):
            db = "identical" if p["identical"] else f"{p['psnr_db']:.1f} dB"
            print(f"parity {name}: PSNR {db}, finite={p['finite']}, pass={p['pass']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR", help="folder for device_check.json and logs")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, few steps: the script end to end (CI)")
    p.add_argument("--smoke-inductor", action="store_true", help="with --smoke: also compile the tiny model")
    p.add_argument("--model", default="random-sd15", help="benchmark model (default random-sd15)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; smoke 4)")
    p.add_argument("--repeat", type=int, default=2, help="timed end-to-end runs per row (default 2)")
    p.add_argument("--autotune", default="none", choices=["none", "default", "max"],
                   help="AOTInductor autotuning (default none: anything more exceeds the 8-minute budget)")
    p.add_argument("--budget-s", type=float, default=480.0, help="whole-run time budget in seconds")
    p.add_argument("--skip-tests", action="store_true", help="skip the pytest -m gpu section")
    p.add_argument("--skip-inductor", action="store_true", help="skip the AOTInductor compile and row")
    p.add_argument("--no-diffusers", dest="diffusers", action="store_false", help="skip the diffusers row")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.smoke and not torch.cuda.is_available():
        print("device_check: no CUDA device is visible to torch; run with --smoke on a CPU machine", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    cfg = config(args)
    from sdfast.bench import machine_info

    report: dict[str, Any] = {"mode": "smoke" if args.smoke else "gpu", "config": cfg,
                              "machine": machine_info(torch.device(cfg["device"])), "sections": {}}
    skip_tests = "smoke mode (no GPU)" if args.smoke else ("--skip-tests" if args.skip_tests else None)
    Section(report, "gpu_tests", deadline).run(gpu_tests, out, int(min(240, args.budget_s / 2)), skip=skip_tests)
    bench_and_parity(args, cfg, out, report, deadline)
    report["seconds"] = round(time.monotonic() - t_start, 1)
    report["ok"] = all(s["status"] != "failed" for s in report["sections"].values())
    (out / "device_check.json").write_text(json.dumps(report, indent=2, default=str))
    print_table(report)
    print(f"\nwrote {out / 'device_check.json'} in {report['seconds']:.0f} s; ok={report['ok']}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
