"""Load to first image, each run in a fresh process: sdfast's OpenVINO backend (cold and warm
compiled-model cache, and the cache switched off) beside openvino-genai's Text2ImagePipeline.

    sdfast export --model random-sd15 --out /tmp/sd15-ov-bf16 --format openvino --precision bf16 \\
        --height 256 --width 256 --batch 1
    python bench/studies/cold_start.py --engines /tmp/sd15-ov-bf16 --rounds 5 --steps 2 --threads 1 \\
        [--genai-python /tmp/gvenv/bin/python] [--baseline-src /tmp/sdfast-before] \\
        --json bench/results/cold-start-sd15-256-1t.json

Each row is one child process (``python bench/studies/cold_start.py --child ROW``) that imports, loads
and makes one image (``--steps`` guided steps at ``--height`` x ``--width``, seed 0), printing
its timings; the parent runs every row once per round (rows interleaved, so load that drifts
on a shared CPU touches every row alike) and reports medians. Every process runs with
``--threads`` threads (torch's, OMP_NUM_THREADS and OpenVINO's INFERENCE_NUM_THREADS, which
sdfast takes from torch) and reports its CPU time (all of its threads) beside wall time. The
export's files are read once before the first round, so every row starts with them in the OS
page cache ("second start").

Rows:

- ``sdfast warm``: ``SDFAST_OV_CACHE`` pointing at a cache that an untimed run filled;
- ``sdfast cold``: a new empty cache folder per run (it compiles, then writes the cache);
- ``sdfast no cache``: ``SDFAST_OV_CACHE=off``;
- ``sdfast warm, hash memo off``: the warm row with ``SDFAST_HASH_MEMO=off``: every file's sha256
  computed again, as every load did before sdfast/hash_memo.py;
- ``sdfast warm, hashes not checked``: a what-if, never how sdfast runs: the warm row with the
  manifest's sha256 check of every file skipped (``verify(check_hashes=False)``), i.e. what a
  verified-hash memo in ``artifacts.py`` (outside the engine) would give;
- ``sdfast before`` (with ``--baseline-src``): the same run on another checkout of sdfast (the
  commit before the cold-start work: every component compiled on load, no cache);
- ``genai warm`` / ``genai cold`` (with ``--genai-python``, a Python with openvino-genai of
  the installed openvino's version): ``openvino_genai.Text2ImagePipeline`` on an
  optimum-intel-layout folder converted from the same model's torch modules (fp32 weights, as
  sdfast's IR; OpenVINO tokenizer from openvino-tokenizers), reshaped to the static shape and
  compiled with ``CACHE_DIR``, the same threads and precision hint. It cannot read sdfast's
  folder (other port names, bf16 I/O, no tokenizer IR), so the folder is built once by
  ``--make-genai DIR`` (the conversion needs this venv's torch, the tokenizer the genai venv).

Per-stage timings inside the sdfast children come from wrapping, in that process only, the
calls load makes: the manifest check (``artifacts.verify``, of which ``file_record`` is the
sha256 of every file), ``ov.Core.read_model`` per file, each engine's compile
(``OpenVinoEngine.request_for``: reshape + compile_model or cache import), the tokenizer and
``Pipeline`` construction; the first image's stages are ``generate(profile=True)``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

T0 = time.perf_counter()
C0 = time.process_time()
ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a photograph of an astronaut riding a horse"


# -- children ---------------------------------------------------------------------------------

class Stages:
    """Wall and process-CPU seconds added up per stage name."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def add(self, name: str, wall: float, cpu: float) -> None:
        self.wall[name] = self.wall.get(name, 0.0) + wall
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu

    def wrap(self, owner, attr: str, name):
        """Replace ``owner.attr`` by a timed call; ``name(*args)`` gives the stage name."""
        fn = getattr(owner, attr)
        stages = self

        def timed(*args, **kwargs):
            w, c = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                stages.add(name(*args, **kwargs), time.perf_counter() - w, time.process_time() - c)

        setattr(owner, attr, timed)


def child_sdfast(a) -> dict[str, Any]:
    import torch

    torch.set_num_threads(a.threads)
    import openvino as ov

    import sdfast
    import sdfast.artifacts as artifacts
    import sdfast.runtime as runtime
    from sdfast.engines import openvino as ove

    t_import = time.perf_counter() - T0
    c_import = time.process_time() - C0
    if os.environ.get("COLD_START_SKIP_HASHES") == "1":  # the what-if row only: never how sdfast runs
        verify = artifacts.verify
        artifacts.verify = lambda *a, **k: verify(*a, **{**k, "check_hashes": False})
    st = Stages()
    st.wrap(artifacts, "verify", lambda *a, **k: "verify manifest (total)")
    st.wrap(artifacts, "file_record", lambda p, *a, **k: "sha256 of the files")
    st.wrap(ov.Core, "read_model", lambda self, path, *a, **k: f"read_model {Path(str(path)).stem}")
    st.wrap(ove.OpenVinoEngine, "request_for", lambda self, *a, **k: f"compile {self.spec.name}")
    st.wrap(runtime, "load_tokenizer", lambda *a, **k: "tokenizer")
    st.wrap(runtime.Pipeline, "__init__", lambda *a, **k: "Pipeline() (tokenizer, text setup)")
    calls: dict[str, int] = {}
    first_call = Stages()
    call = ove.OpenVinoEngine.__call__

    def counted(self, **inputs):
        n = calls[self.spec.name] = calls.get(self.spec.name, 0) + 1
        w, c = time.perf_counter(), time.process_time()
        try:
            return call(self, **inputs)
        finally:
            if n == 1:
                first_call.add(self.spec.name, time.perf_counter() - w, time.process_time() - c)

    ove.OpenVinoEngine.__call__ = counted
    w, c = time.perf_counter(), time.process_time()
    pipe = sdfast.load(a.model, backend="openvino", dtype="auto", engines=a.engines)
    load_s, load_cpu = time.perf_counter() - w, time.process_time() - c
    compiled_on_load = sorted(n for n, e in pipe.engines.items() if getattr(e, "_requests", None))
    w, c = time.perf_counter(), time.process_time()
    out = pipe.generate(PROMPT, steps=a.steps, height=a.height, width=a.width, seed=0, profile=True)
    gen_s, gen_cpu = time.perf_counter() - w, time.process_time() - c
    import numpy as np

    engines = pipe.engines
    cached = {n: _from_cache(e) for n, e in engines.items()}
    return {"import_s": t_import, "import_cpu_s": c_import, "load_s": load_s, "load_cpu_s": load_cpu,
            "first_image_s": gen_s, "first_image_cpu_s": gen_cpu, "load_to_image_s": load_s + gen_s,
            "load_to_image_cpu_s": load_cpu + gen_cpu, "stages_s": st.wall, "stages_cpu_s": st.cpu,
            "first_call_s": first_call.wall, "first_call_cpu_s": first_call.cpu,
            "generate_timings_s": dict(out.timings), "compiled_on_load": compiled_on_load,
            "compiled_after_image": sorted(n for n, e in engines.items() if getattr(e, "_requests", None)),
            "loaded_from_cache": cached, "image_mean": float(np.asarray(out.images[0]).mean()),
            "threads": torch.get_num_threads(), "openvino": ov.get_version(), "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float | None:
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return None


def _from_cache(engine) -> list[bool]:
    """Per compiled shape, whether it came from sdfast's cache (False for each on a checkout without one)."""
    return [bool(v) for v in getattr(engine, "from_cache", {}).values()] or \
        [False] * len(getattr(engine, "_requests", {}))


def child_genai(a) -> dict[str, Any]:
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    t_import = time.perf_counter() - T0
    c_import = time.process_time() - C0
    w, c = time.perf_counter(), time.process_time()
    pipe = ov_genai.Text2ImagePipeline(a.genai_dir)
    read_s, read_cpu = time.perf_counter() - w, time.process_time() - c
    w2, c2 = time.perf_counter(), time.process_time()
    pipe.reshape(1, a.height, a.width, 7.5)  # num_images_per_prompt, h, w, guidance (guided: U-Net batch 2)
    props = {"INFERENCE_NUM_THREADS": a.threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
             "INFERENCE_PRECISION_HINT": a.precision_hint}
    if a.cache_dir:
        props["CACHE_DIR"] = a.cache_dir
    pipe.compile("CPU", **props)
    compile_s, compile_cpu = time.perf_counter() - w2, time.process_time() - c2
    load_s, load_cpu = time.perf_counter() - w, time.process_time() - c
    w, c = time.perf_counter(), time.process_time()
    image = pipe.generate(PROMPT, width=a.width, height=a.height, num_inference_steps=a.steps,
                          guidance_scale=7.5, rng_seed=0)
    gen_s, gen_cpu = time.perf_counter() - w, time.process_time() - c
    return {"import_s": t_import, "import_cpu_s": c_import, "load_s": load_s, "load_cpu_s": load_cpu,
            "first_image_s": gen_s, "first_image_cpu_s": gen_cpu, "load_to_image_s": load_s + gen_s,
            "load_to_image_cpu_s": load_cpu + gen_cpu,
            "stages_s": {"Text2ImagePipeline(dir) (read models, tokenizer)": read_s,
                         "reshape + compile": compile_s},
            "stages_cpu_s": {"Text2ImagePipeline(dir) (read models, tokenizer)": read_cpu,
                             "reshape + compile": compile_cpu},
            "image_mean": float(np.asarray(image.data).mean()), "openvino": ov.get_version(),
            "peak_rss_mb": peak_rss_mb(),
            "openvino_genai": ov_genai.__version__}


# -- the genai folder -------------------------------------------------------------------------

def make_genai(a) -> None:
    """An optimum-intel-layout folder of ``--model`` for openvino-genai: IR converted from the
    torch modules with fp32 weights and optimum-intel's port names, the model's configs, and
    (through ``--genai-python``) openvino-tokenizers' tokenizer IR."""
    import openvino as ov
    import torch

    from sdfast.model.components import SPECS, ShapeProfile, sample_inputs
    from sdfast.model.info import component_modules, load_torch_modules, resolve_model

    info = resolve_model(a.model)
    out = Path(a.make_genai)
    if out.exists():
        shutil.rmtree(out)
    mods = load_torch_modules(info, dtype=torch.float32)
    wrappers = component_modules(mods)
    profile = ShapeProfile.static(1, a.height, a.width)
    # optimum-intel's names for the ports genai reads (sdfast's in brackets): text encoder
    # input_ids -> last_hidden_state; U-Net sample, timestep (one per row), encoder_hidden_states
    # -> out_sample; VAE decoder latent_sample -> sample.
    names = {"text_encoder": (["input_ids"], ["last_hidden_state"]),
             "unet": (["sample", "timestep", "encoder_hidden_states"], ["out_sample"]),
             "vae_decoder": (["latent_sample"], ["sample"])}
    for name, (ins, outs) in names.items():
        spec = SPECS[name]
        ex = sample_inputs(spec, info, profile, which=1)
        shapes = {t.name: [-1] * len(t.dims) for t in spec.inputs}
        if name == "unet":
            ex["timestep"] = ex["timestep"].expand(ex["sample"].shape[0]).contiguous()
        with torch.no_grad():
            model = ov.convert_model(wrappers[name], example_input=tuple(ex[k] for k in spec.input_names))
        model.reshape({i: ov.PartialShape(shapes[t.name]) for i, t in enumerate(spec.inputs)})
        for port, n in zip(model.inputs, ins, strict=True):
            port.get_tensor().set_names({n})
        for port, n in zip(model.outputs, outs, strict=True):
            port.get_tensor().set_names({n})
        if name == "unet":  # genai feeds the timestep as int64 (optimum-intel's U-Net takes it so)
            ppp = ov.preprocess.PrePostProcessor(model)
            ppp.input("timestep").tensor().set_element_type(ov.Type.i64)
            model = ppp.build()
        (out / name).mkdir(parents=True)
        ov.save_model(model, out / name / "openvino_model.xml", compress_to_fp16=False)
        del model
    src = Path(info.path)
    for folder, target in (("text_encoder", "text_encoder"), ("unet", "unet"), ("vae", "vae_decoder"),
                           ("scheduler", "scheduler")):
        (out / target).mkdir(exist_ok=True)
        for f in (src / folder).glob("*.json"):
            shutil.copy(f, out / target / f.name)
    for f in out.glob("*/*.json"):  # genai's JSON reader takes no nulls
        f.write_text(json.dumps({k: v for k, v in json.loads(f.read_text()).items() if v is not None}, indent=2))
    index = json.loads((src / "model_index.json").read_text())
    # optimum-intel's index: "vae" names the class, its IR lives in vae_decoder/ (and vae_encoder/)
    index = {k: v for k, v in index.items() if k not in ("safety_checker", "feature_extractor",
                                                         "requires_safety_checker") and not k.startswith("_sdfast")}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    shutil.copytree(src / "tokenizer", out / "tokenizer_src")
    code = ("import sys, openvino as ov; from transformers import CLIPTokenizerFast; "
            "from openvino_tokenizers import convert_tokenizer; "
            "tok = convert_tokenizer(CLIPTokenizerFast.from_pretrained(sys.argv[1])); "
            "ov.save_model(tok, sys.argv[2])")
    (out / "tokenizer").mkdir()
    subprocess.run([a.genai_python, "-c", code, str(out / "tokenizer_src"), str(out / "tokenizer" /
                                                                              "openvino_tokenizer.xml")], check=True)
    for f in (out / "tokenizer_src").iterdir():
        if f.suffix in (".json", ".txt"):
            shutil.copy(f, out / "tokenizer" / f.name)
    shutil.rmtree(out / "tokenizer_src")
    print(f"wrote {out}")


# -- the parent -------------------------------------------------------------------------------

def run_child(argv: list[str], env: dict[str, str], python: str = sys.executable) -> dict[str, Any]:
    w = time.perf_counter()
    r = subprocess.run([python, __file__, *argv], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - w
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode or not line:
        raise SystemExit(f"child {argv} failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    res = json.loads(line[-1][len("RESULT "):])
    res["process_wall_s"] = wall
    return res


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def stage_medians(runs: list[dict[str, Any]], key: str) -> dict[str, float]:
    names = sorted({n for r in runs for n in r.get(key, {})})
    return {n: statistics.median(r.get(key, {}).get(n, 0.0) for r in runs) for n in names}


def machine() -> dict[str, Any]:
    from sdfast.hardware import cpu_flags, cpu_name

    cpu, flags = cpu_name(), cpu_flags()
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(),
            "isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni") if f in flags]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random-sd15")
    ap.add_argument("--engines", help="sdfast export --format openvino folder")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rows", default="sdfast-warm,sdfast-cold,sdfast-nocache,before,genai-warm,genai-cold,"
                    "sdfast-warm-nohash")
    ap.add_argument("--baseline-src", help="another sdfast checkout for the 'sdfast before' row")
    ap.add_argument("--genai-python", help="a python with openvino-genai (its rows run in it)")
    ap.add_argument("--genai-dir", help="the optimum-layout folder (default: made under the scratch folder)")
    ap.add_argument("--make-genai", metavar="DIR", help="only build the genai folder DIR and exit")
    ap.add_argument("--scratch", help="where caches go (default: a temp folder, removed)")
    ap.add_argument("--json")
    ap.add_argument("--child", choices=("sdfast", "genai"), help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    ap.add_argument("--precision-hint", default="bf16", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        res = child_sdfast(a) if a.child == "sdfast" else child_genai(a)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    if a.make_genai:
        make_genai(a)
        return 0
    if not a.engines:
        ap.error("--engines is required")
    sys.path.insert(0, str(ROOT))
    from sdfast.artifacts import read_manifest, versions

    m = read_manifest(a.engines)
    hint = {"fp32": "f32", "bf16": "bf16"}[m.precision("unet").value]
    rows = a.rows.split(",")
    if not a.baseline_src:
        rows = [r for r in rows if r != "before"]
    if not a.genai_python:
        rows = [r for r in rows if not r.startswith("genai")]
    scratch = Path(a.scratch or tempfile.mkdtemp(prefix="cold-start-"))
    scratch.mkdir(parents=True, exist_ok=True)
    base_env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": str(ROOT)}
    common = ["--model", a.model, "--engines", str(a.engines), "--steps", str(a.steps), "--height", str(a.height),
              "--width", str(a.width), "--threads", str(a.threads)]
    genai_dir = a.genai_dir
    if any(r.startswith("genai") for r in rows) and not genai_dir:
        genai_dir = str(scratch / "genai-model")
        run = subprocess.run([sys.executable, __file__, "--make-genai", genai_dir, "--model", a.model, "--height",
                              str(a.height), "--width", str(a.width), "--genai-python", a.genai_python],
                             env=base_env)
        if run.returncode:
            return run.returncode
    gcommon = [*common, "--genai-dir", str(genai_dir or ""), "--precision-hint", hint]
    for f in Path(a.engines).iterdir():  # the export in the page cache: every row is a second start
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass

    def spec(row: str, k: int) -> tuple[list[str], dict[str, str], str]:
        if row == "sdfast-warm":
            return ["--child", "sdfast", *common], {**base_env, "SDFAST_OV_CACHE": str(scratch / "sdfast-warm")}, \
                sys.executable
        if row == "sdfast-cold":
            d = scratch / f"sdfast-cold-{k}"
            return ["--child", "sdfast", *common], {**base_env, "SDFAST_OV_CACHE": str(d)}, sys.executable
        if row == "sdfast-warm-nohash":
            return ["--child", "sdfast", *common], {**base_env, "SDFAST_OV_CACHE": str(scratch / "sdfast-warm"),
                                                    "COLD_START_SKIP_HASHES": "1"}, sys.executable
        if row == "sdfast-warm-memo-off":  # every file hashed again (sdfast/hash_memo.py switched off)
            return ["--child", "sdfast", *common], {**base_env, "SDFAST_OV_CACHE": str(scratch / "sdfast-warm"),
                                                    "SDFAST_HASH_MEMO": "off"}, sys.executable
        if row == "sdfast-nocache":
            return ["--child", "sdfast", *common], {**base_env, "SDFAST_OV_CACHE": "off"}, sys.executable
        if row == "before":
            return ["--child", "sdfast", *common], {**base_env, "PYTHONPATH": a.baseline_src}, sys.executable
        if row == "genai-warm":
            return ["--child", "genai", *gcommon, "--cache-dir", str(scratch / "genai-warm")], base_env, \
                a.genai_python
        if row == "genai-cold":
            return ["--child", "genai", *gcommon, "--cache-dir", str(scratch / f"genai-cold-{k}")], base_env, \
                a.genai_python
        raise SystemExit(f"--rows: unknown row {row!r}")

    for row in ("sdfast-warm", "genai-warm"):  # fill the warm caches, untimed
        if row in rows or (row == "sdfast-warm" and {"sdfast-warm-nohash", "sdfast-warm-memo-off"} & set(rows)):
            argv, env, py = spec(row, -1)
            run_child(argv, env, py)
    runs: dict[str, list[dict[str, Any]]] = {r: [] for r in rows}
    loads = []
    for k in range(a.rounds):
        loads.append(os.getloadavg())
        order = rows if k % 2 == 0 else rows[::-1]  # alternate the order: no row always runs first
        for row in order:
            argv, env, py = spec(row, k)
            res = run_child(argv, env, py)
            res["loadavg_before"] = loads[-1]
            runs[row].append(res)
            print(f"round {k} {row:15s} load->image {res['load_to_image_s']:6.2f} s wall, "
                  f"{res['load_to_image_cpu_s']:6.2f} s CPU  (import {res['import_s']:.2f} s)", flush=True)
            if row == "sdfast-cold":
                shutil.rmtree(scratch / f"sdfast-cold-{k}", ignore_errors=True)
            if row == "genai-cold":
                shutil.rmtree(scratch / f"genai-cold-{k}", ignore_errors=True)
    loads.append(os.getloadavg())
    summary = {}
    for row, rs in runs.items():
        summary[row] = {k: median_of(rs, k) for k in ("load_to_image_s", "load_to_image_cpu_s", "load_s",
                                                      "load_cpu_s", "first_image_s", "first_image_cpu_s",
                                                      "import_s", "import_cpu_s", "process_wall_s", "peak_rss_mb")}
        summary[row]["stages_s"] = stage_medians(rs, "stages_s")
        summary[row]["stages_cpu_s"] = stage_medians(rs, "stages_cpu_s")
        summary[row]["first_call_s"] = stage_medians(rs, "first_call_s")
        summary[row]["generate_timings_s"] = stage_medians(rs, "generate_timings_s")
    print(f"\nload-to-first-image, median of {a.rounds} fresh processes, {a.threads} thread(s), {a.steps} steps "
          f"{a.height}x{a.width}, {m.precision('unet').value} (load average {loads[0][0]:.2f} .. {loads[-1][0]:.2f})")
    print(f"{'row':20s}{'wall s':>9s}{'CPU s':>9s}{'load s':>9s}{'image s':>9s}{'import s':>10s}{'RSS MB':>9s}")
    for row, s in summary.items():
        print(f"{row:20s}{s['load_to_image_s']:9.2f}{s['load_to_image_cpu_s']:9.2f}{s['load_s']:9.2f}"
              f"{s['first_image_s']:9.2f}{s['import_s']:10.2f}{s['peak_rss_mb']:9.0f}")
    if a.json:
        doc = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
               "versions": versions(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
               "loadavg_per_round": loads, "config": {k: v for k, v in vars(a).items() if k != "child"},
               "summary_medians": summary, "runs": runs}
        if a.baseline_src and (Path(a.baseline_src) / "COMMIT").is_file():  # `git archive` leaves none: write one
            doc["baseline_commit"] = (Path(a.baseline_src) / "COMMIT").read_text().strip()
        if a.genai_python and any(r.startswith("genai") for r in rows):
            doc["versions"]["openvino_genai"] = runs[next(r for r in rows if r.startswith("genai"))][0].get(
                "openvino_genai")
        Path(a.json).write_text(json.dumps(doc, indent=2))
    if not a.scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
