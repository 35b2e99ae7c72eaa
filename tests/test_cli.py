"""The command line end to end: PNG + metadata, step frames, animation, and exit 2 on bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdfast.cli import main
from sdfast.media import read_png_metadata


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "sdfast.cli", *args], capture_output=True, text=True, env=env)


def test_generate_writes_png_with_metadata_frames_and_gif(tiny_info, tmp_path, tiny_pipe):
    out, frames, gif = tmp_path / "img.png", tmp_path / "frames", tmp_path / "anim.gif"
    code = main(["generate", "a red circle", "--model", str(tiny_info.path), "--steps", "4", "--seed", "9",
                 "--negative-prompt", "blue", "--scheduler", "euler", "--dtype", "fp32", "--out", str(out),
                 "--save-steps", str(frames), "--animation", str(gif), "--quiet"])
    assert code == 0
    meta = read_png_metadata(out)
    assert meta["prompt"] == "a red circle" and meta["negative_prompt"] == "blue"
    assert (meta["seed"], meta["steps"], meta["scheduler"], meta["guidance_scale"]) == (9, 4, "euler", 7.5)
    assert (meta["height"], meta["width"], meta["backend"]) == (64, 64, "torch")
    assert meta["model"] == tiny_info.path.name
    with Image.open(out) as im:
        assert im.text["prompt"] == "a red circle"  # plain tEXt chunks too, for other viewers
        pixels = np.asarray(im.convert("RGB"))
    assert sorted(p.name for p in frames.iterdir()) == [f"step-{k:04d}.png" for k in range(4)]
    with Image.open(gif) as im:
        assert im.n_frames >= 4
    # The CLI image is the library image for the same request.
    ref = tiny_pipe.generate("a red circle", negative_prompt="blue", steps=4, seed=9, scheduler="euler")
    assert np.array_equal(pixels, np.asarray(ref.images[0]))


def test_generate_mp4_when_ffmpeg_is_available(tiny_info, tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    mp4 = tmp_path / "anim.mp4"
    assert main(["generate", "x", "--model", str(tiny_info.path), "--steps", "2", "--out",
                 str(tmp_path / "o.png"), "--animation", str(mp4), "--quiet"]) == 0
    assert mp4.stat().st_size > 0 and mp4.read_bytes()[4:8] == b"ftyp"


def test_batch_of_prompts_writes_numbered_files(tiny_info, tmp_path):
    assert main(["generate", "-p", "a", "--prompt", "b", "--model", str(tiny_info.path), "--steps", "2",
                 "--out", str(tmp_path / "o.png"), "--quiet"]) == 0
    assert read_png_metadata(tmp_path / "o-1.png")["prompt"] == "b"
    assert (tmp_path / "o-0.png").is_file() and not (tmp_path / "o.png").exists()


def test_num_images_writes_one_file_per_image(tiny_info, tmp_path):
    assert main(["generate", "a cat", "--num-images", "2", "--model", str(tiny_info.path), "--steps", "2",
                 "--out", str(tmp_path / "o.png"), "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o-0.png", "o-1.png"]
    assert read_png_metadata(tmp_path / "o-1.png")["batch_index"] == 1


def test_unquoted_prompt_words_are_one_prompt(tiny_info, tmp_path, capsys):
    # `sdfast generate a red circle`: the shell split one prompt; it must not become a batch of 3.
    assert main(["generate", "a", "red", "circle", "--model", str(tiny_info.path), "--steps", "2",
                 "--out", str(tmp_path / "o.png")]) == 0
    assert read_png_metadata(tmp_path / "o.png")["prompt"] == "a red circle"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]
    line = capsys.readouterr().out
    assert "chosen by --dtype auto" in line  # the precision auto picked is said, not hidden


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--height", "65"], "height: must be a multiple of 8"),
        (["--steps", "0"], "steps: must be an integer from 1 to 1000"),
        (["--guidance-scale", "nan"], "guidance_scale: must be a finite number"),
        (["--guidance-scale", "-2"], "guidance_scale: must be a finite number >= 0"),
        (["--init-image", "/nonexistent.png"], "image: no file"),
        (["--model", "/nonexistent/folder"], "model: no folder"),
        (["--animation", "x.avi"], "animation: 'x.avi' must end in .gif or .mp4"),
        (["--out", "x.jpg"], "out: 'x.jpg' must end in .png"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_output(tiny_info, tmp_path, args, needle, capsys):
    # In process (a subprocess each cost ~2.5 s of start-up); the process-level exit is the next test.
    out = tmp_path / "o.png"
    argv = ["generate", "a cat", "--model", str(tiny_info.path), "--steps", "2", "--out", str(out),
            "--save-steps", str(tmp_path / "frames"), "--quiet"]
    assert main([*argv, *args]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert needle in lines[0]
    assert not out.exists() and not (tmp_path / "frames").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_bad_input_in_a_real_process_exits_2_with_one_line_and_no_output(tiny_info, tmp_path):
    out = tmp_path / "o.png"
    r = run_cli("generate", "a cat", "--model", str(tiny_info.path), "--steps", "2", "--out", str(out),
                "--quiet", "--height", "65")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "height: must be a multiple of 8" in lines[0]
    assert [p.name for p in tmp_path.iterdir()] == []


def test_unknown_scheduler_is_an_argparse_error_listing_choices(tiny_info):
    r = run_cli("generate", "x", "--model", str(tiny_info.path), "--scheduler", "pndm")
    assert r.returncode == 2
    assert "lms" in r.stderr and "dpmpp_2m_karras" in r.stderr


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for flag in ("--negative-prompt", "--guidance-scale", "--save-steps", "--animation", "--init-image"):
        assert flag in text
    # every flag the help names exists (the old text spoke of a --prompt flag that did not)
    import re

    from sdfast.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["generate"]
    parser_flags = {f for a in sub._actions for f in a.option_strings}
    assert set(re.findall(r"(?<![\w-])(--[a-z][\w-]+)", text)) <= parser_flags


def test_info_json_runs(capsys):
    assert main(["info", "--json"]) == 0
    assert '"builtin_models"' in capsys.readouterr().out


def test_default_dtype_is_auto_and_recorded(tiny_info, tmp_path):
    from sdfast.hardware import cpu_bf16_supported

    assert main(["generate", "x", "--model", str(tiny_info.path), "--steps", "2", "--out", str(tmp_path / "o.png"),
                 "--quiet"]) == 0
    assert read_png_metadata(tmp_path / "o.png")["dtype"] == ("bf16" if cpu_bf16_supported() else "fp32")


def test_auto_dtype_takes_the_exported_precision(onnx_dynamic, tiny_info):
    import sdfast

    pipe = sdfast.load(tiny_info, backend="onnxruntime", engines=onnx_dynamic, dtype="auto")
    assert pipe.precision.value == "fp32"


# -- start-up, no command, threads --------------------------------------------------------------

def test_top_help_imports_no_command_module_and_no_torch():
    code = ("import sys\nfrom sdfast.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('sdfast.cli_')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_no_command_prints_the_help_and_exits_0():
    r = subprocess.run([sys.executable, "-m", "sdfast"], capture_output=True, text=True)
    assert r.returncode == 0 and "error" not in r.stderr
    for name in ("generate", "export", "parity", "bench", "serve", "info", "--threads"):
        assert name in r.stdout


def test_the_listing_repeats_each_commands_own_help():
    from sdfast.cli import COMMANDS, build_parser

    def helps(parser):
        action = next(a for a in parser._actions if a.dest == "command")
        return {a.dest: a.help for a in action._choices_actions}

    full, light = helps(build_parser()), helps(build_parser(full=[]))
    assert set(full) == set(COMMANDS) and full == light


def test_every_command_takes_threads():
    from sdfast.cli import COMMANDS, build_parser

    action = next(a for a in build_parser()._actions if a.dest == "command")
    for name in COMMANDS:
        assert "--threads" in {f for a in action.choices[name]._actions for f in a.option_strings}, name


@pytest.mark.parametrize("argv", [["info", "--json", "--threads", "1"], ["--threads", "1", "info", "--json"]])
def test_threads_flag_sets_the_thread_count_the_command_runs_with(argv, capsys):
    import json

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(argv) == 0
        assert json.loads(capsys.readouterr().out)["cpu"]["threads"] == 1
        assert torch.get_num_threads() == 2  # restored for an in-process caller
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "two"])
def test_threads_below_one_or_not_a_number_is_refused(value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["info", "--threads", value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--threads" in err and value in err


def test_default_threads_leaves_the_cores_other_processes_keep_busy(monkeypatch):
    from sdfast import hardware

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(hardware, "usable_cores", lambda: 2)
    for busy, want in ((0, 2), (0.4, 2), (1, 1), (1.7, 1), (2, 1), (8, 1)):
        monkeypatch.setattr(hardware, "busy_cpus", lambda b=busy: b)
        assert hardware.default_threads()[0] == want, busy
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 64)  # a 2-core slice of a big, busy host
    monkeypatch.setattr(hardware, "busy_cpus", lambda: 30)
    assert hardware.default_threads()[0] == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert hardware.default_threads() == (3, "OMP_NUM_THREADS")
    for bad in ("0", "x", ""):
        monkeypatch.setenv("OMP_NUM_THREADS", bad)
        assert hardware.default_threads()[0] == 2


def test_usable_cores_counts_physical_cores_and_the_cgroup_quota(tmp_path, monkeypatch):
    from sdfast import hardware

    cpuinfo = tmp_path / "cpuinfo"
    # 4 logical CPUs: two cores with two hyper-threads each
    cpuinfo.write_text("".join(f"processor\t: {p}\nphysical id\t: 0\ncore id\t\t: {p // 2}\n\n" for p in range(4)))
    monkeypatch.setattr(hardware, "CPUINFO", cpuinfo)
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(hardware, "CGROUP_CPU_MAX", tmp_path / "absent")
    assert hardware.usable_cores() == 2
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 1})  # one core's two threads
    assert hardware.usable_cores() == 1
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(hardware, "CGROUP_CPU_MAX", quota)
    for text, want in (("max 100000", 2), ("100000 100000", 1), ("150000 100000", 1), ("50000 100000", 1)):
        quota.write_text(text)
        assert hardware.usable_cores() == want, text


def test_busy_cpus_reads_the_runnable_count_less_this_process(tmp_path, monkeypatch):
    from sdfast import hardware

    loadavg = tmp_path / "loadavg"
    loadavg.write_text("8.00 7.00 6.00 5/300 12345\n")
    monkeypatch.setattr(hardware, "LOADAVG", loadavg)
    assert hardware.busy_cpus(interval_s=0) == 4
    loadavg.write_text("0.00 0.00 0.00 1/300 12345\n")
    assert hardware.busy_cpus(interval_s=0) == 0
    monkeypatch.setattr(hardware, "LOADAVG", tmp_path / "absent")
    assert hardware.busy_cpus(interval_s=0) == 0
