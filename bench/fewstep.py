"""Issue 26's headline benchmark: time to a correct image.

For each configuration — exact 20-step guided euler (the reference), fewer euler steps, euler with
trailing timestep spacing, a guidance interval, DeepCache, LCM — this measures

- **quality** (``--part accuracy``): held-out toy accuracy through sdfast's pipeline on the trained
  toy models (``tiny`` for the teacher configurations, ``tiny-lcm`` for LCM): the canonical caption
  of all 90 toy combinations with seeds the tests never use (100.., as ``scripts/toy_table.py``),
  64x64, graded by ``sdfast.toy.classify``;
- **speed** (``--part speed``): per-image wall and process CPU time of the same recipe on the SD 1.5
  architecture (``random-sd15``; ``random-sd15-lcm`` for LCM; random weights, so speed only) at
  256x256 on the torch backend, and of diffusers' own pipeline running the same recipe on the very
  same torch modules (``StableDiffusionPipeline`` with the same scheduler, the guidance interval
  as diffusers' documented ``callback_on_step_end`` recipe, DeepCache through the ``DeepCache``
  package's ``DeepCacheSDHelper`` when installed, ``LatentConsistencyModelPipeline`` for LCM), one
  process, ``--threads`` (default 1), every row once per round, rows in the same order each round
  (after one short warm-up call each);
- ``--part report`` joins the two JSON files into the table, ``bench/results/fewstep-<tag>.json``
  and the Pareto plot (accuracy against seconds per image) PNG.

A configuration whose feature this checkout lacks (a scheduler or a request option not there yet,
a missing model) is listed as skipped with the reason, never silently dropped.

    python bench/fewstep.py --part accuracy            # ~20 s per 20-step config and seed, 1 thread
    python bench/fewstep.py --part speed --rounds 2    # ~2-3 s per U-Net call on SD 1.5 256^2
    python bench/fewstep.py --part report
    python bench/fewstep.py --quick --part all         # plumbing check: tiny models, seconds
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sdfast  # noqa: E402
from sdfast.errors import InvalidArgument  # noqa: E402
from sdfast.measure import bench  # noqa: E402
from sdfast.measure import fewstep as fewstep_bench  # noqa: E402
from sdfast.measure.report import write_json, write_pareto_plot  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PROMPT = "a photograph of an astronaut riding a horse"
#: the guidance scale LCM rows pass (LCM U-Nets embed it; diffusers' LCM pipeline default is 8.5).
LCM_GUIDANCE = 8.0


@dataclass(frozen=True)
class Config:
    name: str
    scheduler: str = "euler"
    steps: int = 20
    guidance: float = 7.5
    guidance_until: float | None = None
    cache_interval: int | None = None
    cache_branch: int = 0
    spacing: str | None = None  # "trailing": the Turbo configs' timestep spacing
    lcm: bool = False

    @property
    def reference(self) -> bool:
        return self.name == "euler-20"


CONFIGS = [
    Config("euler-20"),
    Config("euler-10", steps=10),
    Config("euler-8", steps=8),
    Config("euler-6", steps=6),
    Config("euler-trailing-6", steps=6, spacing="trailing"),
    Config("euler-trailing-4", steps=4, spacing="trailing"),
    Config("guidance-until-0.5", guidance_until=0.5),
    Config("euler-10-guidance-until-0.5", steps=10, guidance_until=0.5),
    Config("deepcache-2", cache_interval=2),
    Config("deepcache-3", cache_interval=3),
    Config("deepcache-3-euler-10", steps=10, cache_interval=3),
    Config("lcm-4", scheduler="lcm", steps=4, guidance=LCM_GUIDANCE, lcm=True),
    Config("lcm-2", scheduler="lcm", steps=2, guidance=LCM_GUIDANCE, lcm=True),
    Config("lcm-1", scheduler="lcm", steps=1, guidance=LCM_GUIDANCE, lcm=True),
    Config("tcd-4", scheduler="tcd", steps=4, guidance=LCM_GUIDANCE, lcm=True),
    Config("tcd-2", scheduler="tcd", steps=2, guidance=LCM_GUIDANCE, lcm=True),
]
BY_NAME = {c.name: c for c in CONFIGS}


# -- driving sdfast with a configuration ------------------------------------------------------

def _generate_params(pipe) -> set[str]:
    """The options Pipeline.generate takes: its own keywords plus, where it forwards ``**options``
    to Request.build, that function's (request.DEFAULTS)."""
    params = set(inspect.signature(pipe.generate).parameters)
    try:
        from sdfast.request import DEFAULTS

        params |= set(DEFAULTS)
    except ImportError:
        pass
    return params


def _scheduler_name(cfg: Config) -> str:
    """The sdfast scheduler name for ``cfg`` (trailing spacing: a scheduler of its own, if there)."""
    from sdfast.schedulers import SCHEDULERS

    if cfg.spacing is None:
        return cfg.scheduler
    for name in (f"{cfg.scheduler}_{cfg.spacing}", f"{cfg.scheduler}-{cfg.spacing}"):
        if name in SCHEDULERS:
            return name
    return cfg.scheduler  # spacing then goes as a request option (see sdfast_kwargs)


def unsupported(pipe, cfg: Config) -> str | None:
    """Why this checkout cannot run ``cfg`` through sdfast, or None."""
    from sdfast.schedulers import SCHEDULERS

    params = _generate_params(pipe)
    name = _scheduler_name(cfg)
    if name not in SCHEDULERS:
        return f"sdfast has no {name!r} scheduler in this checkout"
    if cfg.spacing is not None and name == cfg.scheduler and "timestep_spacing" not in params:
        from sdfast.schedulers import base

        if "timestep_spacing" not in inspect.getsource(base):  # the schedulers do not read it from the config
            return f"sdfast has no {cfg.spacing} timestep spacing for {cfg.scheduler} in this checkout"
    if cfg.guidance_until is not None and "guidance_until" not in params:
        return "Pipeline.generate has no guidance_until in this checkout"
    return None


def sdfast_kwargs(pipe, cfg: Config) -> dict[str, Any]:
    params = _generate_params(pipe)
    kw: dict[str, Any] = {"steps": cfg.steps, "guidance_scale": cfg.guidance, "scheduler": _scheduler_name(cfg)}
    if cfg.spacing is not None and kw["scheduler"] == cfg.scheduler and "timestep_spacing" in params:
        kw["timestep_spacing"] = cfg.spacing
    if cfg.guidance_until is not None:
        kw["guidance_until"] = cfg.guidance_until
    if cfg.cache_interval is not None and "cache_interval" in params:
        kw["cache_interval"] = cfg.cache_interval
        if "cache_branch" in params:
            kw["cache_branch"] = cfg.cache_branch
    return kw


def sdfast_generate(pipe, cfg: Config, **request):
    """One sdfast generation of ``cfg``. Where Pipeline.generate does not take ``cache_interval``
    yet, DeepCache goes in by swapping the U-Net engine for sdfast.deepcache's wrapper (reset
    first) for the call."""
    kw = {**sdfast_kwargs(pipe, cfg), **request}
    if cfg.spacing is not None and "timestep_spacing" not in kw:
        # sdfast reads the spacing from the model folder's scheduler_config.json (as an SD-Turbo
        # folder carries it): the call runs on the model's info with that one key changed
        import dataclasses

        info = pipe.info
        pipe.info = dataclasses.replace(info, scheduler_config={**info.scheduler_config,
                                                                "timestep_spacing": cfg.spacing})
        try:
            return sdfast_generate(pipe, dataclasses.replace(cfg, spacing=None), **request)
        finally:
            pipe.info = info
    if cfg.cache_interval is None or "cache_interval" in kw:
        return pipe.generate(**kw)
    from sdfast.deepcache import wrap_unet

    plain = pipe.engines["unet"]
    wrapped = wrap_unet(plain, cfg.cache_interval, cfg.cache_branch)
    pipe.engines["unet"] = wrapped
    try:
        return pipe.generate(**kw)
    finally:
        pipe.engines["unet"] = plain


# -- the sdfast pipeline of a row --------------------------------------------------------------

def engines_folder(args, model: str, size: int, given: str | None, batch: int = 1,
                   cache_branch: int | None = None) -> Path:
    """The `sdfast export` folder for ``model`` on ``args.backend``: ``given``, else one exported
    once (static ``batch`` images per call, ``size``^2, ``args.dtype``; with DeepCache's two graphs
    when ``cache_branch`` is not None) into sdfast's cache and reused."""
    from sdfast import backends
    from sdfast.model.folder import cache_dir

    if given is not None:
        return Path(given)
    fmt = backends.get(args.backend).format
    dc = [] if cache_branch is None else ["--cache-branch", str(cache_branch)]
    dest = cache_dir() / "bench-engines" / (f"{model.replace('/', '--')}-{fmt}-{args.dtype}-{size}-b{batch}"
                                            + (f"-dc{cache_branch}" if dc else ""))
    if not (dest / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "sdfast.cli", "export", "--model", model, "--out", str(dest), "--format", fmt,
               "--precision", args.dtype, "--height", str(size), "--width", str(size), "--batch", str(batch),
               "--threads", str(args.threads), *dc]
        print("exporting:", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise InvalidArgument(f"export of {model} for {args.backend} failed: "
                                  f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return dest


def load_pipe(args, model: str, size: int, given: str | None = None, modules=None, batch: int = 1,
              cache: bool = False):
    """sdfast's pipeline for a row: the torch backend (on ``modules`` when given), or the exported
    engines of ``args.backend`` (``cache``: with DeepCache's graphs at ``args.cache_branch``)."""
    if args.backend == "torch":
        return sdfast.load(model, dtype=args.dtype, modules=modules)
    branch = args.cache_branch if cache else None
    return sdfast.load(model, backend=args.backend, engines_dir=engines_folder(args, model, size, given, batch, branch),
                       dtype=args.dtype)


def cache_refusal(args, cfg: Config) -> str | None:
    """Why ``cfg``'s DeepCache cannot run on ``args.backend``, or None."""
    from sdfast import backends
    from sdfast.model.components import CACHE_FORMATS

    if not cfg.cache_interval or args.backend == "torch" or backends.get(args.backend).format in CACHE_FORMATS:
        return None
    return f"DeepCache runs on torch, onnxruntime and openvino, not {args.backend}"


# -- quality ----------------------------------------------------------------------------------

def run_accuracy(args, configs: list[Config]) -> dict[str, Any]:
    from sdfast import toy

    combos = toy.combos()[:: 5] if args.quick else None
    out: dict[str, Any] = {"seeds": args.seeds, "size": 64, "rows": {}, "skipped": {}, "started": _stamp()}
    pipes: dict[str, Any] = {}
    path = args.accuracy_json
    previous = json.loads(path.read_text()) if path.is_file() and not args.quick else {}
    # the exact run (euler-20 on the teacher) first: every row's PSNR is against its images
    configs = [BY_NAME["euler-20"]] + [c for c in configs if not c.reference]
    exact: dict[int, list] = {}
    for cfg in configs:
        model = args.toy_lcm if cfg.lcm else args.toy
        try:
            pipe = pipes.get(model) or pipes.setdefault(model, load_pipe(args, model, 64, batch=len(combos or toy.combos()),
                                                                         cache=args.cache_branch is not None
                                                                         and not cfg.lcm))
        except (InvalidArgument, FileNotFoundError) as e:
            out["skipped"][cfg.name] = f"model {model!r}: {e}"
            print(f"skip {cfg.name}: {out['skipped'][cfg.name]}", flush=True)
            continue
        reason = unsupported(pipe, cfg)
        reason = reason or cache_refusal(args, cfg)
        if reason:
            out["skipped"][cfg.name] = reason
            print(f"skip {cfg.name}: {reason}", flush=True)
            continue
        t0 = time.time()

        def generate(prompts, seed, cfg=cfg, pipe=pipe):
            return sdfast_generate(pipe, cfg, prompt=prompts, seed=seed).images

        if cfg.reference:
            row = fewstep_bench.toy_accuracy(generate, args.seeds, combos, keep=exact)
        else:
            row = fewstep_bench.toy_accuracy(generate, args.seeds, combos, reference=exact or None)
        row.update(model=model, config=asdict(cfg), seconds=time.time() - t0)
        out["rows"][cfg.name] = row
        psnr = f", {row['psnr_db']:.1f} dB vs exact" if "psnr_db" in row else ""
        print(f"{cfg.name:28s} {row['accuracy']:6.1%} of {row['images']}{psnr} ({row['seconds']:.0f} s) "
              f"wrong: {dict(list(row['wrong'].items())[:4]) or '-'}", flush=True)
        merged = {**previous, **out, "rows": {**previous.get("rows", {}), **out["rows"]},
                  "skipped": {k: v for k, v in {**previous.get("skipped", {}), **out["skipped"]}.items()
                              if k not in out["rows"] and k not in previous.get("rows", {})}}
        write_json(merged, path)  # after every row: an interrupted run keeps what it measured
    return out


# -- speed ------------------------------------------------------------------------------------

def diffusers_runner(cfg: Config, info, modules, size: int, steps: int):
    """A no-argument callable running diffusers' pipeline with ``cfg``'s recipe, or a skip reason."""
    import diffusers

    sched_cfg = info.scheduler_config
    kwargs: dict[str, Any] = {}
    if cfg.scheduler == "tcd":  # diffusers' generic pipeline with its TCDScheduler, eta = TCD's gamma
        from sdfast.schedulers.tcd import read_gamma

        pipe = bench.diffusers_pipeline(info, modules, "tcd")
        kwargs["eta"] = read_gamma(sched_cfg)
    elif cfg.lcm:
        pipe = diffusers.LatentConsistencyModelPipeline(
            vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=sdfast.model.info.load_tokenizer(info),
            unet=modules["unet"], scheduler=diffusers.LCMScheduler.from_config(sched_cfg), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = bench.diffusers_pipeline(info, modules, cfg.scheduler)
        if cfg.spacing is not None:
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, timestep_spacing=cfg.spacing)
    pipe.set_progress_bar_config(disable=True)
    helper = None
    if cfg.cache_interval is not None:
        try:
            from DeepCache import DeepCacheSDHelper
        except ImportError:
            return "diffusers row needs the DeepCache package (pip install DeepCache), not installed"
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=cfg.cache_interval, cache_branch_id=cfg.cache_branch)
    if cfg.guidance_until is not None:
        cutoff = cfg.guidance_until * steps

        def stop_guidance(p, i, t, cb):  # diffusers' documented dynamic-CFG recipe
            if i + 1 >= cutoff and p._guidance_scale > 1:
                p._guidance_scale = 0.0
                cb["prompt_embeds"] = cb["prompt_embeds"].chunk(2)[-1]
            return cb

        kwargs.update(callback_on_step_end=stop_guidance, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    negative = {} if cfg.lcm else {"negative_prompt": [""]}

    def run():
        if helper is not None:
            helper.enable()
        try:
            pipe(prompt=[PROMPT], height=size, width=size, num_inference_steps=steps, guidance_scale=cfg.guidance,
                 generator=torch.Generator("cpu").manual_seed(0), output_type="pil", **negative, **kwargs)
        finally:
            if helper is not None:
                helper.disable()  # the modules are shared with the sdfast rows

    return run


def run_speed(args, configs: list[Config]) -> dict[str, Any]:
    from sdfast.model.components import Precision
    from sdfast.model.info import load_torch_modules, resolve_model

    precision = Precision.parse(args.dtype)
    loaded: dict[str, Any] = {}
    runners: dict[str, Any] = {}
    warm: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    meta: dict[str, dict[str, Any]] = {}
    theirs = Precision.parse(args.diffusers_dtype or args.dtype)
    for cfg in configs:
        model = args.speed_lcm if cfg.lcm else args.speed
        if model not in loaded:
            try:
                info = resolve_model(model)
                modules = load_torch_modules(info, dtype=theirs.torch_dtype, device=torch.device("cpu"))
                pipe = load_pipe(args, model, args.size, args.engines_lcm if cfg.lcm else args.engines,
                                 modules=modules if theirs == precision else None,
                                 cache=args.cache_branch is not None and not cfg.lcm)
            except (InvalidArgument, FileNotFoundError) as e:
                skipped[cfg.name] = f"model {model!r}: {e}"
                continue
            loaded[model] = (info, modules, pipe)
        info, modules, pipe = loaded[model]
        reason = unsupported(pipe, cfg)
        reason = reason or cache_refusal(args, cfg)
        if reason:
            skipped[cfg.name] = reason
            continue

        def ours(cfg=cfg, pipe=pipe, steps=None):
            c = cfg if steps is None else Config(**{**asdict(cfg), "steps": steps})
            sdfast_generate(pipe, c, prompt=[PROMPT], height=args.size, width=args.size, seed=0)

        runners[f"{cfg.name}/sdfast"] = ours
        warm[f"{cfg.name}/sdfast"] = lambda f=ours, cfg=cfg: f(steps=min(cfg.steps, 2))
        meta[f"{cfg.name}/sdfast"] = {"config": cfg.name, "kind": "sdfast", "model": model}
        if args.diffusers:
            run = diffusers_runner(cfg, info, modules, args.size, cfg.steps)
            if isinstance(run, str):
                skipped[f"{cfg.name}/diffusers"] = run
            else:
                short = diffusers_runner(cfg, info, modules, args.size, min(cfg.steps, 2))
                runners[f"{cfg.name}/diffusers"] = run
                warm[f"{cfg.name}/diffusers"] = short
                meta[f"{cfg.name}/diffusers"] = {"config": cfg.name, "kind": "diffusers", "model": model}
    for name in runners:
        print(f"warm-up {name}", flush=True)
        warm[name]()
    load_before = _uptime()
    samples = fewstep_bench.interleaved(runners, args.rounds, progress=lambda s: print(s, flush=True))
    rows = {}
    for name, s in samples.items():
        walls, cpus = [x["wall_s"] for x in s], [x["cpu_s"] for x in s]
        rows[name] = {**meta[name], "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
                      "wall_min_s": min(walls), "cpu_min_s": min(cpus), "samples": s}
    return {"size": args.size, "dtype": args.dtype, "backend": args.backend,
            "diffusers_dtype": theirs.value, "threads": torch.get_num_threads(), "rounds": args.rounds,
            "models": {"teacher": args.speed, "lcm": args.speed_lcm}, "rows": rows, "skipped": skipped,
            "load_before": load_before, "load_after": _uptime(), "machine": _machine()}


# -- report -----------------------------------------------------------------------------------

def report(args) -> dict[str, Any]:
    acc = json.loads(args.accuracy_json.read_text()) if args.accuracy_json.is_file() else {"rows": {}}
    # Several speed runs may be joined (--speed-runs): each row's ratio to exact euler-20 is taken
    # against the euler-20 row of its own run (the rows interleaved with it), never across runs.
    runs = {tag: json.loads((RESULTS / f"fewstep-speed-{tag}.json").read_text())
            for tag in (args.speed_runs or [args.tag])}
    speed = next(iter(runs.values()))
    rows: dict[str, Any] = {}
    refs: dict[str, Any] = {}
    for tag, run in runs.items():
        for name, row in run["rows"].items():
            if name not in rows:
                rows[name] = {**row, "run": tag}
        refs[tag] = run["rows"].get("euler-20/sdfast")
    table = []
    for cfg in CONFIGS:
        ours, theirs = rows.get(f"{cfg.name}/sdfast"), rows.get(f"{cfg.name}/diffusers")
        a = acc["rows"].get(cfg.name)
        if ours is None and a is None:
            continue
        ref = refs.get(ours["run"]) if ours else None
        table.append({
            "config": cfg.name, "run": ours and ours["run"], "accuracy": None if a is None else a["accuracy"],
            "accuracy_images": None if a is None else a["images"],
            "psnr_vs_exact_db": None if a is None else a.get("psnr_db"),
            "sdfast_wall_s": ours and ours["wall_s"], "sdfast_cpu_s": ours and ours["cpu_s"],
            "diffusers_wall_s": theirs and theirs["wall_s"], "diffusers_cpu_s": theirs and theirs["cpu_s"],
            "speedup_vs_exact_wall": ref and ours and ref["wall_s"] / ours["wall_s"],
            "speedup_vs_exact_cpu": ref and ours and ref["cpu_s"] / ours["cpu_s"],
            "vs_diffusers_wall": theirs and ours and theirs["wall_s"] / ours["wall_s"],
            "vs_diffusers_cpu": theirs and ours and theirs["cpu_s"] / ours["cpu_s"],
        })
    good = [r for r in table if r["accuracy"] is not None and r["accuracy"] >= 0.95 and r["sdfast_cpu_s"]]
    best = min(good, key=lambda r: r["sdfast_cpu_s"]) if good else None
    verdict = None
    if best is not None:
        verdict = {"fastest_config_at_95": best["config"], "speedup_vs_exact_cpu": best["speedup_vs_exact_cpu"],
                   "speedup_vs_exact_wall": best["speedup_vs_exact_wall"],
                   "vs_diffusers_cpu": best["vs_diffusers_cpu"], "vs_diffusers_wall": best["vs_diffusers_wall"],
                   "bar_5x_met": bool(best["speedup_vs_exact_cpu"] and best["speedup_vs_exact_cpu"] >= 5
                                      and best["speedup_vs_exact_wall"] and best["speedup_vs_exact_wall"] >= 5),
                   "faster_than_diffusers": bool(best["vs_diffusers_cpu"] and best["vs_diffusers_cpu"] > 1
                                                 and best["vs_diffusers_wall"] and best["vs_diffusers_wall"] > 1)}
    out = {"table": table, "verdict": verdict, "accuracy": acc, "speed_runs": runs}
    print(format_table(table, runs, acc))
    if verdict:
        print(f"\nfastest config >= 95 %: {verdict['fastest_config_at_95']}: "
              f"{verdict['speedup_vs_exact_cpu']:.2f}x CPU / {verdict['speedup_vs_exact_wall']:.2f}x wall vs exact "
              f"euler-20; vs diffusers same recipe: {_fmt(verdict['vs_diffusers_cpu'], 'x')} CPU / "
              f"{_fmt(verdict['vs_diffusers_wall'], 'x')} wall")
    tag = args.tag
    write_json(out, RESULTS / f"fewstep-{tag}.json")
    points = []
    for r in table:
        if r["sdfast_wall_s"]:
            points.append({"label": r["config"], "seconds": r["sdfast_cpu_s"], "accuracy": r["accuracy"],
                           "kind": "sdfast"})
        if r["diffusers_wall_s"]:
            points.append({"label": r["config"], "seconds": r["diffusers_cpu_s"], "accuracy": r["accuracy"],
                           "kind": "diffusers"})
    seeds = acc.get("seeds") or []
    title = (f"time to a correct image: held-out toy accuracy (90 captions x seeds {', '.join(map(str, seeds))})\n"
             f"vs CPU s/image on {speed['models']['teacher']} (LCM: {speed['models']['lcm']}) "
             f"{speed['size']}x{speed['size']} {speed['dtype']}, {speed['threads']} thread(s)")
    write_pareto_plot(points, RESULTS / f"fewstep-{tag}.png", title, "process CPU seconds per image (median)")
    print(f"wrote {RESULTS / f'fewstep-{tag}.json'} and .png")
    return out


def _fmt(v, unit="") -> str:
    return "-" if v is None else f"{v:.2f}{unit}"


def format_table(table, runs, acc) -> str:
    head = ("config", "toy acc", "PSNR vs exact", "sdfast wall", "sdfast CPU", "diffusers wall", "diffusers CPU",
            "vs exact (CPU)", "vs diffusers (CPU)")
    body = [(r["config"], "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%",
             _fmt(r.get("psnr_vs_exact_db"), " dB"),
             _fmt(r["sdfast_wall_s"], " s"), _fmt(r["sdfast_cpu_s"], " s"), _fmt(r["diffusers_wall_s"], " s"),
             _fmt(r["diffusers_cpu_s"], " s"), _fmt(r["speedup_vs_exact_cpu"], "x"),
             _fmt(r["vs_diffusers_cpu"], "x")) for r in table]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    fmt = " | ".join(f"{{:{w}}}" for w in widths)
    lines = [fmt.format(*head), "-+-".join("-" * w for w in widths)] + [fmt.format(*b) for b in body]
    by_config = {r["config"]: r for r in table}
    for name, why in acc.get("skipped", {}).items():
        if by_config.get(name, {}).get("accuracy") is None:
            lines.append(f"no accuracy for {name}: {why}")
    timed = {name for run in runs.values() for name in run["rows"]}
    for run in runs.values():
        for name, why in run.get("skipped", {}).items():
            key = name if "/" in name else f"{name}/sdfast"
            if key not in timed:
                lines.append(f"not timed: {key}: {why}")
    for tag, run in runs.items():
        lines.append(f"speed run {tag}: {run['rounds']} round(s), {run['threads']} thread(s), sdfast "
                     f"{run.get('backend', 'torch')} {run['dtype']}, diffusers {run.get('diffusers_dtype', run['dtype'])}, "
                     f"{run['size']}^2; load before/after: {run['load_before']} / {run['load_after']}")
    return "\n".join(lines)


def _stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "unknown"


def _machine() -> dict[str, Any]:
    info = bench.machine_info(torch.device("cpu"))
    proc = subprocess.run([sys.executable, "-m", "sdfast", "info"], capture_output=True, text=True, check=False)
    info["sdfast_info"] = proc.stdout
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["accuracy", "speed", "report", "all"], default="all")
    ap.add_argument("--configs", nargs="+", choices=list(BY_NAME), help="default: all")
    ap.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102, 103], help="held-out toy seeds (default 100-103)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--toy", default="tiny")
    ap.add_argument("--toy-lcm", default="tiny-lcm")
    ap.add_argument("--speed", default="random-sd15")
    ap.add_argument("--speed-lcm", default="random-sd15-lcm")
    ap.add_argument("--no-diffusers", dest="diffusers", action="store_false")
    ap.add_argument("--backend", default="torch",
                    help="speed: the sdfast rows' backend (default torch; openvino etc. need --engines/--engines-lcm)")
    ap.add_argument("--engines", help="speed: `sdfast export` folder of --speed (non-torch --backend)")
    ap.add_argument("--engines-lcm", help="speed: `sdfast export` folder of --speed-lcm (non-torch --backend)")
    ap.add_argument("--diffusers-dtype", help="speed: the diffusers rows' precision (default --dtype)")
    ap.add_argument("--speed-runs", nargs="+", metavar="TAG",
                    help="report: join these speed runs (fewstep-speed-TAG.json), each row against its own run's euler-20")
    ap.add_argument("--tag", default=None, help="output name: fewstep-<tag>.json/.png (default from the settings)")
    ap.add_argument("--quick", action="store_true",
                    help="plumbing check: 18 captions x 1 seed, tiny-random(-lcm) at 64^2, 1 round, into /tmp")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = [BY_NAME[n] for n in args.configs] if args.configs else CONFIGS
    branches = {c.cache_branch for c in configs if c.cache_interval}
    if len(branches) > 1:
        raise SystemExit(f"--configs: DeepCache rows of one run share a branch (one export), not {sorted(branches)}")
    args.cache_branch = branches.pop() if branches else None  # exported engines carry DeepCache's graphs
    if args.quick:
        args.seeds, args.rounds, args.size = args.seeds[:1], 1, 64
        args.speed, args.speed_lcm = "tiny-random", "tiny-random-lcm"
        global RESULTS
        RESULTS = Path("/tmp") / "fewstep-quick"
        RESULTS.mkdir(exist_ok=True)
    backend = "" if args.backend == "torch" else f"-{args.backend}"
    args.tag = args.tag or ("quick" if args.quick else f"sd15-{args.size}-{args.threads}t-{args.dtype}{backend}")
    on = "" if args.backend == "torch" else f"-{args.backend}-{args.dtype}"
    args.accuracy_json = RESULTS / ("fewstep-accuracy-quick.json" if args.quick else f"fewstep-accuracy{on}.json")
    args.speed_json = RESULTS / f"fewstep-speed-{args.tag}.json"
    if args.part in ("accuracy", "all"):
        run_accuracy(args, configs)
    if args.part in ("speed", "all"):
        speed = run_speed(args, configs)
        if args.speed_json.is_file() and args.configs:  # a partial run adds its rows to the last full one
            old = json.loads(args.speed_json.read_text())
            speed["rows"] = {**old.get("rows", {}), **speed["rows"]}
            speed["skipped"] = {k: v for k, v in {**old.get("skipped", {}), **speed["skipped"]}.items()
                                if k not in speed["rows"]}
        write_json(speed, args.speed_json)
    if args.part in ("report", "all"):
        report(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
