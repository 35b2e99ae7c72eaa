"""The help a newcomer reads matches the code: `python -m sdfast`, help
without RST markup, every backend and format listed, `sdfast info` says per backend whether it
runs here and why not."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from sdfast.backends import BACKENDS, FORMATS
from sdfast.cli import build_parser, main
from sdfast.cli import info as cli_info


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_python_dash_m_sdfast_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "sdfast", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("sdfast ")


def test_top_help_lists_every_backend_and_format():
    text = build_parser().format_help()
    for name in BACKENDS:
        assert f"\n  {name} " in text
    for fmt in FORMATS:
        assert fmt in text
    assert "inductor" in text


@pytest.mark.parametrize("command", ["top", "generate", "export", "parity", "bench", "info"])
def test_help_has_no_rst_markup(command):
    parser = build_parser()
    text = parser.format_help() if command == "top" else _subparsers(parser)[command].format_help()
    assert "``" not in text and ":func:" not in text and ":class:" not in text


def test_parity_and_bench_help_list_allowed_values():
    subs = _subparsers(build_parser())
    parity = subs["parity"].format_help()
    bench = subs["bench"].format_help()
    assert all(name in parity for name in BACKENDS)
    assert all(name in bench for name in BACKENDS)
    assert "fp32, fp16, bf16" in " ".join(bench.split())


def test_parity_rejects_an_unknown_backend_listing_the_choices(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["parity", "--backend", "nope"])
    assert e.value.code == 2 and "onnxruntime" in capsys.readouterr().err


def test_parity_json_says_it_wrote_the_file(tmp_path, monkeypatch, capsys):
    import sdfast.measure.parity

    class Report:
        passed = True

        def table(self):
            return "parity PASSED"

        def to_json(self):
            return json.dumps({"passed": True})

    monkeypatch.setattr(sdfast.measure.parity, "run_parity", lambda *a, **k: Report())
    out = tmp_path / "parity.json"
    assert main(["parity", "--json", str(out)]) == 0
    assert json.loads(out.read_text()) == {"passed": True}
    assert f"wrote {out}" in capsys.readouterr().out


def test_info_lists_backends_with_availability_and_reason(monkeypatch):
    info = cli_info.collect()
    assert set(info["backends"]) == set(BACKENDS)
    assert info["backends"]["torch"] == {"available": True, "format": None, "reason": None}
    assert info["cpu"]["model"].strip()
    # a backend whose package is missing says so, with the install command
    record = BACKENDS["onnxruntime"]
    monkeypatch.setattr(type(record), "missing", lambda self: "needs onnxruntime; pip install 'sdfast[onnx]'"
                        if self.name == "onnxruntime" else None)
    text = cli_info.format_text(cli_info.collect())
    line = next(x for x in text.split("backends:\n")[1].splitlines() if x.startswith("  onnxruntime"))
    assert "NOT available" in line and "pip install 'sdfast[onnx]'" in line
    assert "  torch (runs the model folder): available" in text
    assert "0: torch" not in text


def test_info_says_none_without_cuda_devices():
    info = cli_info.collect()
    info["cuda_devices"] = []
    assert "cuda_devices: none" in cli_info.format_text(info).splitlines()
    info["cuda_devices"] = ["NVIDIA H100"]
    assert "  0: NVIDIA H100" in cli_info.format_text(info).splitlines()


def test_cpu_model_name_reads_proc_cpuinfo(tmp_path, monkeypatch):
    import platform

    from sdfast import hardware

    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t: avx\n")
    monkeypatch.setattr(hardware, "CPUINFO", fake)
    hardware.cpu_name.cache_clear()
    try:
        assert cli_info.collect()["cpu"]["model"] == "Test CPU 9000"
        monkeypatch.setattr(hardware, "CPUINFO", tmp_path / "absent")
        monkeypatch.setattr(platform, "processor", lambda: "")
        hardware.cpu_name.cache_clear()
        assert cli_info.collect()["cpu"]["model"] == "unknown"  # never blank
    finally:
        hardware.cpu_name.cache_clear()
