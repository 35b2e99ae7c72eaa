"""One command for a CUDA machine that always brings back what it measured.

    python bench/device_check.py --out "$OUT"            # on the device machine (~6 min; bench/README.md)
    python bench/device_check.py --smoke --out /tmp/dc   # the same code on a CPU, tiny model (< 2 min)

Sections in order, with their estimate in seconds on an H100/H200 (``ESTIMATES``):

1. ``environment`` (5): ``import diffusers`` (or why not), versions, the GPU.
2. ``model`` (5): resolve ``--model`` (random-sd15: SD 1.5 architecture, random weights, no
   download), FLOPs per stage (``sdfast.measure.flops``), the GPU's peak.
3. ``reference_fp32`` (20): ``sdfast.load(dtype="fp32")``, the one tier-3 reference image.
4. ``sdfast_eager_graphs`` (20): ``sdfast.load(dtype="fp16")`` with CUDA graphs: tier-3 parity
   (``sdfast.measure.parity``'s PSNR and bound), then the benchmark; fails if the graphs fell back.
5. ``diffusers_eager`` (15): diffusers' own StableDiffusionPipeline in fp16, same settings.
6. ``sdfast_eager`` (12): sdfast fp16 without CUDA graphs (what the graphs buy).
7. ``gpu_tests`` (45): ``pytest -m "gpu and not slow" tests/test_gpu*.py``, streamed to
   ``gpu_tests.log`` (a timeout keeps what ran), JUnit XML beside it.
8. ``aoti`` (180): AOTInductor compile of the U-Net (``--aoti``) in a subprocess killed at the
   end of the budget; compiled vs eager call time and difference. Packages go to a temporary
   folder, never under ``--out``. ``--aoti all`` also benchmarks the inductor pipeline (raise
   ``--budget-s``: ~8 min).

5+5+20+20+15+12+45+180 = 302 s of the default ``--budget-s 360``. A section whose estimate
exceeds what is left is skipped with that reason; SIGALRM at the budget stops one that
overruns. ``DIR/device_check.json`` is rewritten atomically (temp file + rename) as each
section starts and ends (status, seconds, figures, error) and one line per section is printed
and flushed, so a kill at any point leaves every finished section. ``--smoke``: CPU, tiny model
at 64x64, graphs uncaptured, GPU tests skip, AOTI compiles the text encoder (the tiny U-Net
takes ~80 s on a 2-core CPU). Everything CUDA here is UNVERIFIED until a device run's JSON is
committed under bench/results/.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
REPORT = "device_check.json"
#: section -> (estimate in s on an H100/H200, estimate in s for --smoke on a 2-core CPU).
ESTIMATES: dict[str, tuple[float, float]] = {"environment": (5, 10), "model": (5, 5), "reference_fp32": (20, 5),
    "sdfast_eager_graphs": (20, 5), "diffusers_eager": (15, 5), "sdfast_eager": (12, 5), "gpu_tests": (45, 30),
    "aoti": (180, 45)}
#: run even when --only leaves them out: every other section needs what they find.
PREREQUISITES = ("environment", "model")
GPU_TESTS_TIMEOUT_S = 150  # pytest's hard cap, if the budget leaves that much


class SectionFailed(Exception):
    """A section ran but what it found is a failure (figures so far are kept)."""


class BudgetSpent(Exception):
    """SIGALRM: --budget-s was spent in the middle of a section."""


def clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become null (standard JSON has no NaN/inf)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj if obj is None or isinstance(obj, (bool, int, str)) else str(obj)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write to a temporary name and rename: a reader (or a kill) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(clean(data), fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def run_streamed(cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> int | None:
    """Run ``cmd`` with stdout+stderr streamed into ``log``; its exit status, or None when it
    was killed (with its whole process group) at ``timeout`` or by the budget alarm."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            return None
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def last_line(path: Path) -> str:
    lines = [s for s in path.read_text(errors="replace").splitlines() if s.strip()] if path.is_file() else []
    return lines[-1].strip()[:300] if lines else "(no output)"


# -- measuring ---------------------------------------------------------------------------------------

def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """ms of one call, synchronized before and after (generate ends in a host copy anyway)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda device: None)
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return 1e3 * (time.perf_counter() - t0)


def images_u8(out) -> np.ndarray:
    return np.stack([np.asarray(im) for im in out.images])  # (B, H, W, 3) uint8


def parity_figures(ref: np.ndarray | None, img: np.ndarray, finite: bool) -> dict[str, Any]:
    """Tier 3 with sdfast.measure.parity's own PSNR and bound: PSNR >= 35 dB and finite."""
    from sdfast.measure.parity import FP16_MIN_PSNR, image_metrics

    if ref is None:
        return {"parity": None, "parity_note": "no fp32 reference (reference_fp32 did not finish ok)"}
    m = image_metrics(ref, img)
    return {"parity": {**m, "finite": finite, "min_psnr_db": FP16_MIN_PSNR,
                       "pass": finite and m["psnr_db"] >= FP16_MIN_PSNR}}


def bench_row(run: Callable[[], dict[str, float]], plain: Callable[[], Any], cfg: dict[str, Any],
              device: torch.device, flops, peak: float | None) -> dict[str, Any]:
    """``sdfast bench``'s own measurement (warm-up, then ``repeat`` runs timed stage by stage,
    synchronized around each stage) plus the best of ``repeat`` plain, unsynchronized calls."""
    from sdfast.measure.bench import BenchConfig, add_throughput, measure

    free_memory(device)
    row = measure(run, BenchConfig(steps=cfg["steps"], repeat=cfg["repeat"], warmup=1), device)
    row["it_per_s"] = 1e3 / (row["stages_ms"]["unet_step"] + row["stages_ms"]["scheduler_step"])
    row["end_to_end_ms"] = min(timed(plain, device) for _ in range(cfg["repeat"]))
    if flops is not None:
        add_throughput(row, flops, cfg["steps"], 1, peak)
    return row


def sdfast_figures(pipe, cfg: dict[str, Any], device: torch.device, reference: np.ndarray | None,
                   flops=None, peak: float | None = None) -> dict[str, Any]:
    """Tier-3 parity at ``parity_steps``, then the benchmark at ``steps``, of one sdfast pipeline."""
    from sdfast.measure.bench import BenchConfig, sdfast_runner

    kw = dict(height=cfg["height"], width=cfg["width"], guidance_scale=cfg["guidance"], scheduler=cfg["scheduler"])
    out = pipe.generate(PROMPT, steps=cfg["parity_steps"], **kw)
    fig = parity_figures(reference, images_u8(out), bool(torch.isfinite(out.latents).all()))
    bc = BenchConfig(steps=cfg["steps"], guidance_scale=cfg["guidance"], scheduler=cfg["scheduler"], prompt=PROMPT)
    runner = sdfast_runner(pipe, bc, 1, cfg["height"], cfg["width"])
    fig.update(bench_row(runner, lambda: pipe.generate(PROMPT, steps=cfg["steps"], **kw), cfg, device, flops, peak))
    fig["graphs"] = None if pipe.graphs is None else pipe.graphs.mode
    return fig


# -- the run --------------------------------------------------------------------------------------

class DeviceCheck:
    def __init__(self, args: argparse.Namespace, out: Path, work: Path):
        self.args, self.out, self.work, self.smoke = args, out, work, args.smoke
        self.t0 = time.monotonic()
        self.cfg = self.config(args)
        self.device = torch.device(self.cfg["device"])
        self.state: dict[str, Any] = {"reference": None}
        self.running = False
        self.report: dict[str, Any] = {
            "schema": 1, "mode": "smoke" if args.smoke else "gpu", "config": self.cfg, "budget_s": args.budget_s,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "finished": False,
            "sections": {}, "rows": {},
        }
        self.write()

    @staticmethod
    def config(args: argparse.Namespace) -> dict[str, Any]:
        if args.smoke:
            return dict(model="tiny", device="cpu", dtype="fp16", height=64, width=64, steps=args.steps or 4,
                        parity_steps=3, guidance=7.5, scheduler="lms", repeat=1, aoti=args.aoti or "text_encoder")
        return dict(model=args.model, device="cuda", dtype="fp16", height=512, width=512, steps=args.steps or 50,
                    parity_steps=20, guidance=7.5, scheduler="lms", repeat=args.repeat, aoti=args.aoti or "unet")

    def write(self) -> None:
        self.report["elapsed_s"] = time.monotonic() - self.t0
        write_json(self.out / REPORT, self.report)

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t0)

    def ok(self, name: str) -> bool:
        return self.report["sections"].get(name, {}).get("status") == "ok"

    def section(self, name: str, fn: Callable[[dict[str, Any]], str | None], needs: tuple[str, ...] = (),
                skip: str | None = None) -> None:
        est = ESTIMATES[name][1 if self.smoke else 0]
        fig: dict[str, Any] = {}
        entry: dict[str, Any] = {"status": "skipped", "estimate_s": est, "seconds": 0.0, "figures": fig,
                                 "error": None}
        self.report["sections"][name] = entry
        missing = [n for n in needs if not self.ok(n)]
        if skip is None and self.args.only and name not in self.args.only | set(PREREQUISITES):
            skip = "not in --only"
        if skip is None and missing:
            skip = f"needs {', '.join(missing)}, which did not finish ok"
        if skip is None and est > self.left():
            skip = f"its estimate ({est:.0f} s) exceeds what is left of --budget-s ({max(0, self.left()):.0f} s)"
        if skip is not None:
            entry["error"] = skip
            self.write()
            self.line(name, entry, skip)
            return
        entry.update(status="running", started_at_s=time.monotonic() - self.t0)
        self.write()
        t0 = time.monotonic()
        note = None
        try:
            self.running = True
            note = fn(fig)
            entry["status"] = "ok"
        except Exception as e:  # every failure is recorded; the next sections still run
            entry.update(status="failed", error=f"{type(e).__name__}: {e}".splitlines()[0][:500])
            if not isinstance(e, (SectionFailed, BudgetSpent)):
                entry["traceback"] = traceback.format_exc()[-4000:]
        finally:
            self.running = False
        free_memory(self.device)  # what the section loaded went out of scope with it
        entry["seconds"] = time.monotonic() - t0
        self.write()
        self.line(name, entry, note if entry["status"] == "ok" else entry["error"])

    def line(self, name: str, entry: dict[str, Any], note: str | None) -> None:
        n = list(ESTIMATES).index(name) + 1
        print(f"[device_check] {n}/{len(ESTIMATES)} {name}: {entry['status']} in {entry['seconds']:.1f} s "
              f"(estimate {entry['estimate_s']:.0f} s, {max(0, self.left()):.0f} s left)"
              + (f" - {note}" if note else ""), flush=True)

    # -- sections ---------------------------------------------------------------------------------
    def environment(self, fig: dict[str, Any]) -> str:
        fig.update(python=sys.version.split()[0], torch=torch.__version__, torch_cuda=torch.version.cuda,
                   cuda_available=torch.cuda.is_available())
        try:
            import diffusers
            import transformers
        except Exception as e:
            raise SectionFailed(f"import diffusers/transformers failed ({type(e).__name__}: {e}); carry their "
                                "wheels and install them first: bench/README.md, 'The device call'") from None
        fig.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise SectionFailed("no CUDA device is visible to torch; run with --smoke on a CPU machine")
            props = torch.cuda.get_device_properties(self.device)
            fig.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                       gpu_memory_gb=props.total_memory / 2**30)
        from sdfast.measure.bench import machine_info

        self.report["machine"] = machine_info(self.device)
        return f"diffusers {fig['diffusers']}, torch {torch.__version__}, {fig.get('gpu', 'cpu')}"

    def model(self, fig: dict[str, Any]) -> str:
        from sdfast.measure.flops import count_stage_flops, device_peak
        from sdfast.model.info import resolve_model

        info = resolve_model(self.cfg["model"])
        self.state["info"] = info
        fig.update(name=info.name, random_weights=info.random_weights, fingerprint=info.fingerprint[:12])
        f = count_stage_flops(info, self.cfg["height"], self.cfg["width"], 1, guided=True)
        self.state["flops"] = f
        fig["gflop"] = f.as_gflop(self.cfg["steps"])
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        peak = device_peak(self.device, dtype)
        self.state["peak"] = peak.tflops
        fig.update(peak_tflops=peak.tflops, peak_source=peak.source)
        return f"{info.name}: U-Net step {f.unet_step / 1e9:.4g} GFLOP, peak {peak.tflops:.4g} TFLOP/s"

    def reference_fp32(self, fig: dict[str, Any]) -> str:
        import sdfast

        pipe = sdfast.load(self.state["info"], device=self.device, dtype="fp32", cuda_graphs=False)
        c = self.cfg
        out = pipe.generate(PROMPT, height=c["height"], width=c["width"], steps=c["parity_steps"],
                            guidance_scale=c["guidance"], scheduler=c["scheduler"])
        ref = images_u8(out)
        fig.update(steps=self.cfg["parity_steps"], finite=bool(torch.isfinite(out.latents).all()))
        self.state["reference"] = ref
        np.save(self.work / "reference.npy", ref)  # for the AOTI subprocess
        return f"{self.cfg['parity_steps']} steps"

    def sdfast_row(self, name: str, cuda_graphs: bool) -> Callable[[dict[str, Any]], str]:
        def run(fig: dict[str, Any]) -> str:
            import sdfast

            pipe = sdfast.load(self.state["info"], device=self.device, dtype=self.cfg["dtype"], cuda_graphs=cuda_graphs,
                               modules=self.modules())
            fig.update(sdfast_figures(pipe, self.cfg, self.device, self.state["reference"], self.state.get("flops"),
                                      self.state.get("peak")))
            self.report["rows"][name] = fig
            if cuda_graphs and self.device.type == "cuda" and fig["graphs"] != "captured":
                raise SectionFailed(f"CUDA graphs mode is {fig['graphs']!r}, not 'captured': the capture failed "
                                    "(its warning is in the log) and the row measured the plain loop")
            return row_note(fig)

        return run

    def modules(self) -> dict[str, torch.nn.Module]:
        """The fp16 torch modules the three fp16 rows share, as in ``sdfast bench`` (one random
        init of SD 1.5 costs seconds); loaded by the first row that runs, inside its section."""
        if "modules" not in self.state:
            from sdfast.model.components import Precision
            from sdfast.model.info import load_torch_modules

            self.state["modules"] = load_torch_modules(self.state["info"], device=self.device,
                                                       dtype=Precision(self.cfg["dtype"]).torch_dtype)
        return self.state["modules"]

    def diffusers_eager(self, fig: dict[str, Any]) -> str:
        from sdfast.measure.bench import BenchConfig, diffusers_pipeline, diffusers_runner

        c, dev = self.cfg, self.device
        pipe = diffusers_pipeline(self.state["info"], self.modules(), c["scheduler"])

        def generate(steps: int):
            return pipe(prompt=PROMPT, height=c["height"], width=c["width"], guidance_scale=c["guidance"],
                        output_type="pil", num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(0))

        img = images_u8(generate(c["parity_steps"]))
        fig.update(parity_figures(self.state["reference"], img, True))  # uint8 PIL images: finite by type
        bc = BenchConfig(steps=c["steps"], guidance_scale=c["guidance"], scheduler=c["scheduler"], prompt=PROMPT)
        runner = diffusers_runner(pipe, bc, 1, c["height"], c["width"], dev)  # hooks only during its calls
        fig.update(bench_row(runner, lambda: generate(c["steps"]), c, dev, self.state.get("flops"),
                             self.state.get("peak")), graphs=None)
        self.report["rows"]["diffusers_eager"] = fig
        return row_note(fig)

    def gpu_tests(self, fig: dict[str, Any]) -> str:
        log, xml = self.out / "gpu_tests.log", self.out / "gpu_tests.xml"
        files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_gpu*.py"))
        # The marker expression on the command line replaces pyproject's addopts, so it has to
        # say "not slow" itself: `-m gpu` alone would pull the slow AOTI test into this timeout.
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu and not slow", "-q", "-rs", "-p", "no:cacheprovider",
               f"--junitxml={xml}", *files]
        timeout = min(GPU_TESTS_TIMEOUT_S, self.left())
        fig.update(command=" ".join(cmd[2:]), timeout_s=timeout, log=log.name)
        rc = run_streamed(cmd, log, timeout)
        fig.update(returncode=rc, summary=last_line(log))
        if rc is None:
            raise SectionFailed(f"pytest killed at its {timeout:.0f} s timeout; what ran is in {log.name}")
        if rc != 0:
            raise SectionFailed(f"pytest exited {rc}: {fig['summary']} (see {log.name})")
        return fig["summary"]

    def aoti(self, fig: dict[str, Any]) -> str:
        spec = {**self.cfg, "work": str(self.work / "aoti"), "result": str(self.work / "aoti_result.json"),
                "reference": str(self.work / "reference.npy") if self.state["reference"] is not None else None,
                "autotune": self.args.autotune}
        spec_path = self.work / "aoti_spec.json"
        write_json(spec_path, spec)
        log = self.out / "aoti.log"
        timeout = self.left() - 3  # the hard stop: what is left of the budget
        fig.update(components=self.cfg["aoti"], autotune=self.args.autotune, timeout_s=timeout, log=log.name)
        rc = run_streamed([sys.executable, str(ROOT / "bench" / "device_aoti.py"), str(spec_path)], log, timeout)
        result = Path(spec["result"])
        if result.is_file():
            fig.update(json.loads(result.read_text()))
        if rc is None:
            raise SectionFailed(f"killed at its hard timeout ({timeout:.0f} s) in stage {fig.get('stage', 'start')!r}")
        if rc != 0:
            raise SectionFailed(f"exited {rc}: {last_line(log)}")
        if "pipeline" in fig:
            self.report["rows"]["sdfast_inductor_graphs"] = fig["pipeline"]
        return "; ".join(f"{k} {v['aoti_ms']:.2f} ms vs eager {v['eager_ms']:.2f} ms"
                         for k, v in fig.get("components_ms", {}).items())

    def run(self) -> bool:
        self.section("environment", self.environment)
        self.section("model", self.model, needs=("environment",))
        self.section("reference_fp32", self.reference_fp32, needs=("model",))
        self.section("sdfast_eager_graphs", self.sdfast_row("sdfast_eager_graphs", True), needs=("model",))
        self.section("diffusers_eager", self.diffusers_eager, needs=("model",),
                     skip=None if self.args.diffusers else "--no-diffusers")
        self.section("sdfast_eager", self.sdfast_row("sdfast_eager", False), needs=("model",))
        self.state.pop("modules", None)  # free the fp16 weights before the tests and the compile
        free_memory(self.device)
        self.section("gpu_tests", self.gpu_tests, needs=("environment",),
                     skip="--skip-tests" if self.args.skip_tests else None)
        self.section("aoti", self.aoti, needs=("model",), skip="--aoti none" if self.cfg["aoti"] == "none" else None)
        self.report["summary"] = summary(self.report)
        self.report["finished"] = True
        self.report["ok"] = all(s["status"] != "failed" for s in self.report["sections"].values())
        self.write()
        return self.report["ok"]


def row_note(fig: dict[str, Any]) -> str:
    par = fig.get("parity") or {}
    psnr = f", PSNR {par['psnr_db']:.1f} dB" if par else ""
    return (f"unet {fig['stages_ms']['unet_step']:.2f} ms/step, {fig['it_per_s']:.2f} it/s, "
            f"end to end {fig['end_to_end_ms']:.0f} ms{psnr}")


def summary(report: dict[str, Any]) -> dict[str, Any]:
    rows = report["rows"]
    base = rows.get("diffusers_eager", {}).get("end_to_end_ms")
    return {
        "speedup_vs_diffusers": {k: base / r["end_to_end_ms"] for k, r in rows.items() if base and "end_to_end_ms" in r},
        "parity_pass": {k: (r.get("parity") or {}).get("pass") for k, r in rows.items()},
        "sections": {k: s["status"] for k, s in report["sections"].items()},
    }


# -- command line -------------------------------------------------------------------------------------

def print_table(report: dict[str, Any]) -> None:
    print("\nrow                     text_enc  unet/step  sched/step  vae_dec   e2e_ms   it/s  peak_MB  PSNR_dB")
    for name, r in report["rows"].items():
        st, par, mem = r.get("stages_ms") or {}, r.get("parity") or {}, r.get("peak_mem_mb")
        if st:
            print(f"{name:23s} {st['text_encoder']:8.2f} {st['unet_step']:10.2f} {st['scheduler_step']:11.3f} "
                  f"{st['vae_decode']:8.2f} {r['end_to_end_ms']:8.1f} {r['it_per_s']:6.2f} "
                  f"{'-' if mem is None else format(mem, '.0f'):>8s} "
                  f"{'-' if not par else format(par['psnr_db'], '.1f'):>8s}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--out", metavar="DIR", required=True, help="folder for device_check.json and the logs (small files only)")
    add("--smoke", action="store_true", help="CPU, tiny model, few steps: every section end to end")
    add("--model", default="random-sd15", help="benchmark model (default random-sd15)")
    add("--steps", type=int, default=None, help="benchmark denoising steps (default 50; smoke 4)")
    add("--repeat", type=int, default=2, help="timed runs per row (default 2)")
    add("--budget-s", type=float, default=360.0, help="whole-run budget (default 360 s: room for a rerun)")
    add("--aoti", default=None, choices=["none", "all", "text_encoder", "unet", "vae_decoder", "vae_encoder"],
        help="what the aoti section compiles (default unet; smoke text_encoder)")
    add("--autotune", default="none", choices=["none", "default", "max"], help="AOTInductor autotuning (default none)")
    add("--only", type=lambda v: set(v.split(",")), default=None, metavar="A,B", help="run only these sections")
    add("--skip-tests", action="store_true", help="skip the gpu_tests section")
    add("--no-diffusers", dest="diffusers", action="store_false", help="skip the diffusers row")
    args = p.parse_args(argv)
    if args.only and not args.only <= set(ESTIMATES):
        p.error(f"--only: unknown {', '.join(sorted(args.only - set(ESTIMATES)))}; choose from {', '.join(ESTIMATES)}")
    if args.budget_s <= 0:
        p.error(f"--budget-s: must be positive but is {args.budget_s:g}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sdfast-device-check-"))  # packages, reference image: never --out

    check = DeviceCheck(args, out, work)

    def alarm(signum, frame):  # stops a section that overruns; between sections the budget check skips
        if check.running:
            raise BudgetSpent(f"--budget-s {args.budget_s:g} was spent during this section (hard stop)")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, args.budget_s)
    try:
        ok = check.run()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        shutil.rmtree(work, ignore_errors=True)
    print_table(check.report)
    print(f"\nwrote {out / REPORT} after {check.report['elapsed_s']:.0f} s; ok={ok}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
