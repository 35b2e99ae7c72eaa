"""Every output path of `sdfast generate` is checked before any
work, and a run that fails leaves none of its outputs (images, step frames, animation)."""

from __future__ import annotations

import os

import pytest
from adversarial import refused, snapshot

from sdfast import runtime
from sdfast.cli import main
from sdfast.media import read_png_metadata


@pytest.fixture
def argv(tiny_info, tmp_path):
    def make(*extra: str) -> list[str]:
        return ["generate", "a cat", "--model", str(tiny_info.path), "--steps", "2", "--dtype", "fp32",
                "--quiet", *extra]

    return make


@pytest.fixture
def no_work(monkeypatch):
    """A refusal must come before the model loads: loading a pipeline here fails the test."""
    def loaded(*a, **k):
        raise AssertionError("generate loaded the model before refusing")

    monkeypatch.setattr(runtime, "load", loaded)


def test_out_that_is_a_folder_is_refused_first(argv, tmp_path, capsys, no_work):
    (tmp_path / "o.png").mkdir()
    before = snapshot(tmp_path)
    refused(capsys, argv("--out", str(tmp_path / "o.png")), "is a folder")
    assert snapshot(tmp_path) == before


def test_out_under_a_file_is_refused_first(argv, tmp_path, capsys, no_work):
    (tmp_path / "f").write_text("x")
    refused(capsys, argv("--out", str(tmp_path / "f" / "sub" / "o.png")), "which is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the check cannot be seen")
def test_out_in_a_read_only_folder_is_refused_first(argv, tmp_path, capsys, no_work):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        refused(capsys, argv("--out", str(ro / "o.png")), "not writable")
    finally:
        ro.chmod(0o755)


def test_an_unwritable_folder_is_refused_first_even_as_root(argv, tmp_path, capsys, no_work, monkeypatch):
    # Root passes permission checks, so emulate a read-only mount for one folder (EROFS).
    import sdfast.fsio as fsio

    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(fsio.os, "access", lambda p, mode: False if os.fspath(p) == str(ro) else real(p, mode))
    for extra in (["--out", str(ro / "o.png")], ["--out", str(tmp_path / "o.png"), "--save-steps", str(ro)],
                  ["--out", str(tmp_path / "o.png"), "--animation", str(ro / "sub" / "a.gif")]):
        refused(capsys, argv(*extra), "not writable")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["ro"]


def test_names_longer_than_the_file_system_allows_are_refused_first(argv, tmp_path, capsys, no_work):
    long = "n" * 300 + ".png"
    for flag, value in (("--out", tmp_path / long), ("--animation", tmp_path / ("a" * 300 + ".gif")),
                        ("--save-steps", tmp_path / ("d" * 300))):
        extra = [flag, str(value)] + (["--out", str(tmp_path / "o.png")] if flag != "--out" else [])
        refused(capsys, argv(*extra), "this file system allows")
    assert list(tmp_path.iterdir()) == []


def test_a_long_but_legal_name_works_though_its_temporary_name_would_not_fit(argv, tmp_path):
    name = "n" * (255 - 4) + ".png"  # exactly the limit: ".NAME.tmp-PID-XXXXXXXX.png" would be longer
    assert main(argv("--out", str(tmp_path / name))) == 0
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_a_batch_whose_second_output_is_a_folder_writes_nothing(argv, tmp_path, capsys, no_work):
    (tmp_path / "o-1.png").mkdir()
    cmd = ["generate", "-p", "a", "-p", "b"] + argv("--out", str(tmp_path / "o.png"))[2:]
    refused(capsys, cmd, "o-1.png' is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o-1.png"]


def _file(path, target=None):
    path.write_text("x")
    return target or path


def _folder(path):
    path.mkdir()
    return path


@pytest.mark.parametrize("flag,make,needle", [
    ("--save-steps", lambda t: _file(t / "frames"), "is a file, not a folder"),
    ("--save-steps", lambda t: _file(t / "f", t / "f" / "frames"), "which is a file"),
    ("--animation", lambda t: _folder(t / "a.gif"), "is a folder"),
    ("--animation", lambda t: _file(t / "f", t / "f" / "a.gif"), "which is a file"),
    ("--animation", lambda t: t / "a.avi", "must end in .gif or .mp4"),
    ("--animation", lambda t: t / "o.png", "must end in .gif or .mp4"),
])
def test_bad_frame_and_animation_targets_are_refused_first(argv, tmp_path, capsys, no_work, flag, make, needle):
    target = make(tmp_path)
    before = snapshot(tmp_path)
    refused(capsys, argv("--out", str(tmp_path / "o.png"), flag, str(target)), needle)
    assert snapshot(tmp_path) == before


def test_a_run_that_fails_leaves_none_of_its_outputs(argv, tmp_path, monkeypatch, capsys):
    """Frames and the GIF are written only with the images, at the end; a failure while
    writing (here: the PNG encoder on a full disk) discards every one of them, and the folders
    it made, and ends as one line and exit 1."""
    from sdfast import media

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(media, "write_png", broken)
    out, frames, gif = tmp_path / "out" / "o.png", tmp_path / "frames", tmp_path / "anim.gif"
    assert main(argv("--out", str(out), "--save-steps", str(frames), "--animation", str(gif))) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the disk filled while writing" in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_run_writes_nothing(argv, tmp_path, monkeypatch, capsys):
    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runtime.Pipeline, "run", interrupted)
    assert main(argv("--out", str(tmp_path / "o.png"), "--animation", str(tmp_path / "a.gif"))) == 130
    assert list(tmp_path.iterdir()) == []


def test_the_wrote_line_lists_every_output(tiny_info, tmp_path, capsys):
    assert main(["generate", "a", "cat", "--model", str(tiny_info.path), "--steps", "2", "--dtype", "fp32",
                 "--out", str(tmp_path / "o.png"), "--save-steps", str(tmp_path / "fr"),
                 "--animation", str(tmp_path / "a.gif")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert str(tmp_path / "o.png") in line and "2 frames in" in line and str(tmp_path / "a.gif") in line
    assert "fp32" in line and "chosen by --dtype auto" not in line


def test_positional_prompt_and_p_together_are_refused(argv, tmp_path, capsys, no_work):
    refused(capsys, argv("-p", "b", "--out", str(tmp_path / "o.png")), "both a positional prompt")
    refused(capsys, ["generate", "--out", str(tmp_path / "o.png")], "prompt: none given")
    assert list(tmp_path.iterdir()) == []


def test_engines_without_backend_run_on_the_manifests_backend(tiny_info, onnx_dynamic, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "o.png"
    assert main(["generate", "x", "--model", str(tiny_info.path), "--engines", str(onnx_dynamic), "--steps", "1",
                 "--out", str(out), "--quiet"]) == 0
    assert read_png_metadata(out)["backend"] == "onnxruntime"


def test_huge_guidance_is_refused_before_work(argv, tmp_path, capsys, no_work):
    # 1e20 used to pass validation and end in a NumericalError traceback after the whole run.
    refused(capsys, argv("--guidance-scale", "1e20", "--out", str(tmp_path / "o.png")), "guidance_scale")
    assert list(tmp_path.iterdir()) == []
