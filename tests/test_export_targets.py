"""`sdfast export` never destroys what it did not write.

Every refused attempt exits 2 with one line, before any work, and leaves the user's files
byte for byte as they were; replacing an earlier export is atomic; what a killed export left
is cleaned by the next one, and only that.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from adversarial import refused, snapshot

from sdfast.artifacts import MANIFEST
from sdfast.errors import InvalidArgument
from sdfast.export import onnx as onnx_export
from sdfast.export.base import check_export_out, is_export_folder
from sdfast.model.components import ShapeProfile

STATIC = ShapeProfile.static(1, 64, 64)


def export_argv(tiny_info, out, *extra: str) -> list[str]:
    return ["export", "--model", str(tiny_info.path), "--out", str(out), "--format", "onnx", *extra]


@pytest.fixture(autouse=True)
def _no_export_work(monkeypatch):
    """A refusal must come before any work: tracing a component here fails the test."""
    def traced(*a, **k):
        raise AssertionError("export started work before refusing")

    monkeypatch.setattr(onnx_export, "export_component", traced)


def test_a_plain_file_at_out_is_refused_and_kept(tiny_info, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("my notes")
    before = snapshot(tmp_path)
    refused(capsys, export_argv(tiny_info, target), "is a file")
    assert snapshot(tmp_path) == before


def test_a_user_folder_with_other_files_is_refused_and_kept(tiny_info, tmp_path, capsys):
    user = tmp_path / "photos"
    (user / "2024").mkdir(parents=True)
    (user / "2024" / "a.jpg").write_bytes(b"\xff\xd8 not really")
    (user / "todo.md").write_text("x")
    before = snapshot(tmp_path)
    line = refused(capsys, export_argv(tiny_info, user), "sdfast export did not write")
    assert "--out" in line or "out:" in line
    assert snapshot(tmp_path) == before


def test_a_folder_with_a_foreign_manifest_is_still_not_ours(tiny_info, onnx_dynamic, tmp_path, capsys):
    # A copied manifest does not make the rest of the folder ours: an unlisted file blocks it.
    user = tmp_path / "web"
    shutil.copytree(onnx_dynamic, user)
    (user / "index.html").write_text("<html>")
    before = snapshot(tmp_path)
    refused(capsys, export_argv(tiny_info, user), "sdfast export did not write")
    assert snapshot(tmp_path) == before
    (user / MANIFEST).write_text('{"name": "my web app", "icons": []}')  # a web manifest, not ours
    (user / "index.html").unlink()
    refused(capsys, export_argv(tiny_info, user), "sdfast export did not write")


def test_the_model_folder_and_its_parents_are_refused(tiny_info, tmp_path, capsys):
    model = tmp_path / "models" / "sd"
    shutil.copytree(tiny_info.path, model)
    before = snapshot(tmp_path)
    for out in (model, model.parent, tmp_path):
        refused(capsys, export_argv(tiny_info, out, "--model", str(model)), "model folder")
    assert snapshot(tmp_path) == before


def test_the_current_folder_is_refused(tiny_info, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("k")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    for out in (".", "./", str(work), ".."):
        refused(capsys, export_argv(tiny_info, out), "current folder")
    assert snapshot(tmp_path) == before  # no ..old-* or .tmp-* left behind either


def test_out_under_a_file_and_a_symlink_to_a_user_folder_are_refused(tiny_info, tmp_path, capsys):
    (tmp_path / "file").write_text("f")
    user = tmp_path / "user"
    user.mkdir()
    (user / "data.csv").write_text("1,2")
    (tmp_path / "link").symlink_to(user)
    before = snapshot(tmp_path)
    refused(capsys, export_argv(tiny_info, tmp_path / "file" / "eng"), "is a file")
    refused(capsys, export_argv(tiny_info, tmp_path / "link"), "sdfast export did not write")
    assert snapshot(tmp_path) == before


def test_a_name_longer_than_the_file_system_allows_is_refused_first(tiny_info, tmp_path, capsys):
    refused(capsys, export_argv(tiny_info, tmp_path / ("e" * 300)), "this file system allows")
    assert list(tmp_path.iterdir()) == []


def test_unavailable_format_and_bad_opset_write_nothing(tiny_info, tmp_path, capsys):
    pytest.importorskip("onnx")
    if shutil.which("nvidia-smi") is None:
        refused(capsys, export_argv(tiny_info, tmp_path / "e")[:-1] + ["tensorrt"], "tensorrt")
    with pytest.raises(SystemExit) as e:  # argparse: --opset lists its choices
        from sdfast.cli import main

        main(export_argv(tiny_info, tmp_path / "e", "--opset", "99"))
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(InvalidArgument, match="opset: 99 is not an opset"):  # the API too
        onnx_export.export_onnx(tiny_info, tmp_path / "e", STATIC, onnx_export.OnnxExportOptions(opset=99))
    assert list(tmp_path.iterdir()) == []


def test_allowed_targets_new_empty_and_earlier_export(tiny_info, onnx_dynamic, tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_export_out(tmp_path / "new" / "eng", tiny_info.path) == (tmp_path / "new" / "eng").resolve()
    assert check_export_out(tmp_path / "empty", tiny_info.path) == (tmp_path / "empty").resolve()
    assert is_export_folder(onnx_dynamic)
    assert check_export_out(onnx_dynamic, tiny_info.path) == onnx_dynamic.resolve()
    assert not (tmp_path / "new").exists()  # checking creates nothing


# -- real exports (one component each, to stay fast) --------------------------------------------

@pytest.fixture
def real_export(monkeypatch):
    monkeypatch.undo()  # the tracing guard above does not apply here


def _export(tiny_info, out):
    return onnx_export.export_onnx(tiny_info, out, STATIC, components=("text_encoder",))


def test_replacing_an_earlier_export_is_atomic_and_leaves_no_temporaries(real_export, tiny_info, tmp_path,
                                                                          monkeypatch):
    out = tmp_path / "eng"
    _export(tiny_info, out)
    first = snapshot(out)
    (tmp_path / "sibling.txt").write_text("unrelated")

    def die(*a, **k):
        raise RuntimeError("killed mid-export")

    monkeypatch.setattr(onnx_export, "export_component", die)
    with pytest.raises(RuntimeError, match="killed"):
        _export(tiny_info, out)
    assert snapshot(out) == first  # the earlier export survives the crash, byte for byte
    monkeypatch.undo()
    _export(tiny_info, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng", "sibling.txt"]  # no .tmp-/.old- folders


def test_stale_staging_folders_of_dead_exports_are_cleaned_live_ones_kept(real_export, tiny_info, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".eng.tmp-{dead_pid}-abcd1234"
    stale.mkdir()
    (stale / "unet.onnx").write_bytes(b"half")
    live = tmp_path / f".eng.tmp-{os.getppid()}-efgh5678"  # a running process's staging folder
    live.mkdir()
    other = tmp_path / f".other.tmp-{dead_pid}-ijkl9012"  # another target's: not ours to judge
    other.mkdir()
    _export(tiny_info, tmp_path / "eng")
    assert not stale.exists() and live.is_dir() and other.is_dir()
    assert is_export_folder(tmp_path / "eng")


def test_a_crash_between_the_two_renames_is_repaired(real_export, tiny_info, tmp_path):
    """Where the OS cannot swap folders atomically, the earlier export waits in .NAME.old-PID-*/x
    for a moment; if the process dies there, the next write puts it back before anything else."""
    out = tmp_path / "eng"
    _export(tiny_info, out)
    first = snapshot(out)
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    held = tmp_path / f".eng.old-{dead}-abcd1234"
    held.mkdir()
    os.replace(out, held / "x")
    from sdfast.fsio import clean_stale

    clean_stale(out, MANIFEST)
    assert snapshot(out) == first and not held.exists()


def test_a_failed_export_leaves_no_folder_it_made(real_export, tiny_info, tmp_path, monkeypatch):
    def die(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(onnx_export, "export_component", die)
    with pytest.raises(RuntimeError, match="disk full"):
        _export(tiny_info, tmp_path / "new" / "deep" / "eng")
    assert list(tmp_path.iterdir()) == []
