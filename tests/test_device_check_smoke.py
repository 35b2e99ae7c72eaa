"""bench/device_check.py --smoke runs the GPU machine's script end to end on the CPU (tiny
model, few steps, graphs uncaptured, no GPU tests, no AOTI compile) and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_smoke_writes_a_complete_report(tmp_path):
    out = tmp_path / "dc"
    env = {**os.environ, "SDFAST_CACHE": os.environ.get("SDFAST_CACHE", str(tmp_path / "cache"))}
    p = subprocess.run([sys.executable, "bench/device_check.py", "--smoke", "--steps", "2", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    report = json.loads((out / "device_check.json").read_text())
    assert report["mode"] == "smoke" and report["ok"]
    sections = report["sections"]
    assert sections["gpu_tests"]["status"] == "skipped"
    assert sections["bench_sdfast_inductor_graphs"]["status"] == "skipped"
    for name in ("parity_reference", "bench_diffusers_eager", "bench_sdfast_eager_graphs", "parity"):
        assert sections[name]["status"] == "ok", sections[name]
    for row in ("diffusers_eager", "sdfast_eager_graphs"):
        r = report["bench"][row]
        assert r["end_to_end_ms"] > 0 and r["it_per_s"] > 0
        assert set(r["stages_ms"]) >= {"text_encoder", "unet_step", "scheduler_step", "vae_decode"}
    assert report["bench"]["sdfast_eager_graphs"]["graphs"] == "uncaptured"
    par = sections["parity"]["result"]["sdfast_eager_graphs"]
    assert par["finite"] and par["pass"]
