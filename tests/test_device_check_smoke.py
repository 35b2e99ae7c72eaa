"""bench/device_check.py --smoke: the GPU machine's script end to end on the CPU (tiny model,
graphs uncaptured, GPU tests skipping, the AOTI section compiling the tiny text encoder).

What matters on a device lease is that a run always brings back what it measured: the JSON is
rewritten after every section, so a run killed at any point leaves a valid file with every
section finished so far, and a section that does not fit the budget is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = [sys.executable, "bench/device_check.py", "--smoke"]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "SDFAST_CACHE": os.environ.get("SDFAST_CACHE", str(tmp_path / "cache")),
            "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_device_check_killed_after_its_first_section_leaves_valid_json(tmp_path):
    out = tmp_path / "dc"
    p = subprocess.Popen([*SCRIPT, "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True, env=_env(tmp_path), start_new_session=True)
    printed = []
    try:
        for line in p.stdout:
            if line.startswith("[device_check]"):
                printed.append(line)
                break
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert printed and "environment: ok" in printed[0], printed
    report = json.loads((out / "device_check.json").read_text())  # whole, though killed mid-run
    assert report["finished"] is False and report["mode"] == "smoke"
    env = report["sections"]["environment"]
    assert env["status"] == "ok" and env["figures"]["diffusers"] and env["seconds"] > 0
    # The next section was running when the kill came: it says so, nothing more.
    assert all(s["status"] in ("ok", "running") for s in report["sections"].values())


def test_section_that_does_not_fit_the_budget_is_skipped_with_the_reason(tmp_path):
    out = tmp_path / "dc"
    # 5 s is less than the first section's smoke estimate: it is skipped, and so is all that needs it.
    p = subprocess.run([*SCRIPT, "--out", str(out), "--budget-s", "5"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=_env(tmp_path))
    report = json.loads((out / "device_check.json").read_text())
    s = report["sections"]
    assert s["environment"]["status"] == "skipped"
    assert "exceeds what is left of --budget-s" in s["environment"]["error"]
    assert all(v["status"] == "skipped" and v["error"].startswith("needs ") for k, v in s.items() if k != "environment")
    assert report["finished"] and report["ok"] and p.returncode == 0  # nothing failed; nothing ran either
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("[device_check]")]
    assert len(lines) == len(s) == 8 and "1/8 environment: skipped" in lines[0]


@pytest.mark.slow  # ~15 s: three sections on the tiny model
def test_only_runs_the_named_sections_and_their_prerequisites(tmp_path):
    out = tmp_path / "dc"
    p = subprocess.run([*SCRIPT, "--out", str(out), "--only", "reference_fp32"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=_env(tmp_path))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    s = json.loads((out / "device_check.json").read_text())["sections"]
    assert [k for k, v in s.items() if v["status"] == "ok"] == ["environment", "model", "reference_fp32"]
    assert all(v["error"] == "not in --only" for k, v in s.items() if v["status"] == "skipped")


@pytest.mark.slow
def test_device_check_smoke_writes_a_complete_report(tmp_path):
    out = tmp_path / "dc"
    p = subprocess.run([*SCRIPT, "--steps", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=_env(tmp_path))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    report = json.loads((out / "device_check.json").read_text())
    assert report["mode"] == "smoke" and report["finished"] and report["ok"]
    sections = report["sections"]
    assert list(sections) == ["environment", "model", "reference_fp32", "sdfast_eager_graphs", "diffusers_eager",
                              "sdfast_eager", "gpu_tests", "aoti"]
    assert all(s["status"] == "ok" for s in sections.values()), {k: s["error"] for k, s in sections.items()}
    assert "skipped" in sections["gpu_tests"]["figures"]["summary"]  # no CUDA here: they skip, and say so
    for name in ("diffusers_eager", "sdfast_eager_graphs", "sdfast_eager"):
        r = report["rows"][name]
        assert r["end_to_end_ms"] > 0 and r["it_per_s"] > 0 and r["tflops"]["unet"] > 0
        assert set(r["stages_ms"]) >= {"text_encoder", "unet_step", "scheduler_step", "vae_decode"}
        assert r["parity"]["finite"] and r["parity"]["pass"]
    assert report["rows"]["sdfast_eager_graphs"]["graphs"] == "uncaptured"
    te = sections["aoti"]["figures"]["components_ms"]["text_encoder"]
    assert te["finite"] and te["aoti_ms"] > 0 and te["rel_vs_eager"] < 1e-2
    # Only small files come back from a device: logs and JSON, no compiled packages under --out.
    assert sorted(f.name for f in out.iterdir()) == ["aoti.log", "device_check.json", "gpu_tests.log",
                                                     "gpu_tests.xml"]


def test_missing_diffusers_is_recorded_with_the_fix_and_the_rest_skips(tmp_path):
    shadow = tmp_path / "shadow" / "diffusers"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named diffusers (shadowed by the test)')\n")
    out = tmp_path / "dc"
    env = {**_env(tmp_path), "PYTHONPATH": str(shadow.parent)}
    p = subprocess.run([*SCRIPT, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 1
    report = json.loads((out / "device_check.json").read_text())
    env_section = report["sections"]["environment"]
    assert env_section["status"] == "failed" and "import diffusers" in env_section["error"]
    assert "bench/README.md" in env_section["error"] and "traceback" not in env_section
    rest = [s for name, s in report["sections"].items() if name != "environment"]
    assert len(rest) == 7 and all(s["status"] == "skipped" and "needs" in s["error"] for s in rest)
    assert report["finished"] and not report["ok"]


def test_a_section_that_overruns_the_budget_is_stopped_and_recorded(tmp_path, monkeypatch):
    import importlib
    import time

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    dc = importlib.import_module("device_check")
    monkeypatch.setattr(dc, "ESTIMATES", {k: (0, 0) for k in dc.ESTIMATES})  # every section "fits"

    def stuck(self, fig):
        fig["started"] = True
        time.sleep(30)

    monkeypatch.setattr(dc.DeviceCheck, "environment", stuck)
    assert dc.main(["--smoke", "--out", str(tmp_path), "--budget-s", "1.5"]) == 1
    s = json.loads((tmp_path / "device_check.json").read_text())["sections"]
    env = s["environment"]
    # failed, not ok: the alarm cut the 30 s section short, and its figures so far are kept
    assert env["status"] == "failed" and env["error"].startswith("BudgetSpent") and env["figures"]["started"]
    assert s["model"]["status"] == "skipped"
