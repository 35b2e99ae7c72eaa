"""A disk that fills mid-write: one line (``errors.NoSpace``, exit 1), nothing half-written, and the
earlier output at the path untouched — for files, folders (exports) and a run's output group.

Most cases make the writer fail the way a full disk does (errno ENOSPC / EDQUOT, a library's
"No space left on device", or an opaque library error with the disk left nearly full); the last
ones fill a real 2 MiB tmpfs where the machine lets us mount one.
"""

from __future__ import annotations

import collections
import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdfast import fsio
from sdfast.cli import main
from sdfast.errors import NoSpace

Usage = collections.namedtuple("Usage", "total used free")


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


FULL_ERRORS = {
    "enospc": OSError(errno.ENOSPC, "No space left on device"),
    "edquot": OSError(errno.EDQUOT, "Disk quota exceeded"),
    "library-text": RuntimeError("[ONNXRuntimeError] : 1 : FAIL : write: No space left on device"),
    "wrapped-cause": RuntimeError("serialization failed"),  # raised `from` an ENOSPC OSError below
}


def _raise(kind: str):
    e = FULL_ERRORS[kind]
    if kind == "wrapped-cause":
        raise e from OSError(errno.ENOSPC, "No space left on device")
    raise e


@pytest.mark.parametrize("kind", sorted(FULL_ERRORS))
def test_atomic_write_on_full_disk_keeps_the_old_file(tmp_path, kind):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(NoSpace) as got:
        with fsio.atomic_path(target) as tmp:
            tmp.write_text("half")
            _raise(kind)
    assert got.value.errno == errno.ENOSPC and str(target) in got.value.strerror
    assert "MiB free" in got.value.strerror and "write somewhere else" in got.value.strerror
    assert target.read_text() == "old" and _listing(tmp_path) == ["report.json"]  # no temporary left


@pytest.mark.parametrize("kind", sorted(FULL_ERRORS))
def test_staging_dir_on_full_disk_keeps_the_old_folder(tmp_path, kind):
    out = tmp_path / "engines"
    out.mkdir()
    (out / "manifest.json").write_text("old manifest")
    with pytest.raises(NoSpace, match="while writing the folder"):
        with fsio.staging_dir(out) as tmp:
            (tmp / "unet.onnx").write_bytes(b"x" * 100)
            _raise(kind)
    assert _listing(out) == ["manifest.json"] and (out / "manifest.json").read_text() == "old manifest"
    assert _listing(tmp_path) == ["engines"]


def test_staging_dir_into_new_parents_removes_them_on_full_disk(tmp_path):
    out = tmp_path / "a" / "b" / "engines"
    with pytest.raises(NoSpace):
        with fsio.staging_dir(out):
            _enospc()
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("error", [OSError(errno.EACCES, "Permission denied"), OSError(errno.EIO, "I/O error"),
                                   RuntimeError("iostream error"), ValueError("No space left on device")],
                         ids=["eacces", "eio", "opaque-runtime", "valueerror-with-the-words"])
def test_other_write_errors_pass_through_unchanged(tmp_path, error):
    """Near misses: not ENOSPC/EDQUOT, no such words, the disk not full — the error is the writer's own."""
    target = tmp_path / "x.png"
    with pytest.raises(type(error)) as got:
        with fsio.atomic_path(target):
            raise error
    assert got.value is error and not isinstance(got.value, NoSpace)
    with pytest.raises(type(error)) as got:
        with fsio.staging_dir(tmp_path / "out"):
            raise error
    assert got.value is error and _listing(tmp_path) == []


@pytest.mark.parametrize("free, full", [(0, True), (fsio._NEARLY_FULL - 1, True), (fsio._NEARLY_FULL, False),
                                        (10 * fsio._NEARLY_FULL, False)])
def test_an_opaque_library_error_on_a_nearly_full_disk_is_the_disk(tmp_path, monkeypatch, free, full):
    """OpenVINO's writer says only "basic_ios::clear: iostream error" when the disk fills: below
    1 MiB free that is reported as the disk, quoting the library; at or above it, unchanged."""
    monkeypatch.setattr(fsio.shutil, "disk_usage", lambda _p: Usage(1 << 30, (1 << 30) - free, free))
    error = RuntimeError("basic_ios::clear: iostream error")
    for writer in (fsio.atomic_path(tmp_path / "m.xml"), fsio.staging_dir(tmp_path / "ov")):
        with pytest.raises(NoSpace if full else RuntimeError) as got:
            with writer:
                raise error
        if full:
            assert "basic_ios::clear: iostream error" in str(got.value.__cause__)
        else:
            assert got.value is error
    assert _listing(tmp_path) == []


def test_output_group_on_full_disk_writes_none_of_the_outputs(tmp_path):
    old = tmp_path / "o-0.png"
    old.write_bytes(b"old")
    with pytest.raises(NoSpace, match="o-1.png"):
        with fsio.output_group() as group:
            group.path(old).write_bytes(b"new")
            group.path(tmp_path / "frames" / "o-1.png")
            _enospc()
    assert old.read_bytes() == b"old" and _listing(tmp_path) == ["o-0.png"]  # no frames/, no temporaries


def test_output_group_passes_other_errors_through(tmp_path):
    with pytest.raises(OSError) as got:
        with fsio.output_group() as group:
            group.path(tmp_path / "a.png")
            raise OSError(errno.EACCES, "Permission denied")
    assert not isinstance(got.value, NoSpace) and _listing(tmp_path) == []


def test_generate_on_full_disk_is_one_line_and_exit_1(tiny_info, tmp_path, monkeypatch, capsys):
    import sdfast.media

    monkeypatch.setattr(sdfast.media, "write_png", _enospc)  # the frames land, the image hits the full disk
    (tmp_path / "keep.png").write_bytes(b"mine")
    code = main(["generate", "a red circle", "--model", str(tiny_info.path), "--steps", "2", "--quiet",
                 "--out", str(tmp_path / "o.png"), "--save-steps", str(tmp_path / "frames")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("sdfast generate: error: the disk filled") and err.count("\n") == 1
    assert "Traceback" not in err
    assert _listing(tmp_path) == ["keep.png"]  # neither frames nor the image appeared


def test_user_errors_still_exit_2_beside_no_space(tiny_info, tmp_path, capsys):
    assert main(["generate", "x", "--model", str(tiny_info.path), "--steps", "0",
                 "--out", str(tmp_path / "o.png")]) == 2


class _FullAfter(io.RawIOBase):
    """A file that takes ``room`` bytes, then fails every write with ENOSPC."""

    def __init__(self, room: int) -> None:
        self.room, self.data, self.calls = room, bytearray(), 0

    def write(self, b) -> int:
        self.calls += 1
        b = bytes(b)
        if len(self.data) + len(b) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.data += b
        return len(b)

    def seek(self, offset, whence=io.SEEK_SET):
        return offset

    def tell(self):
        return len(self.data)


def test_inductor_package_writer_keeps_the_first_failure_and_drops_later_writes():
    from sdfast.export.inductor import _LatchingWriter

    raw = _FullAfter(room=10)
    sink = _LatchingWriter(raw)
    assert sink.writable() and sink.seekable()
    assert sink.write(b"12345") == 5 and sink.error is None
    assert sink.write(memoryview(b"abcdefgh")) == 8  # torch's writer is told it went: no error for it to rethrow
    first = sink.error
    assert isinstance(first, OSError) and first.errno == errno.ENOSPC
    assert sink.write(b"more") == 4 and sink.error is first and raw.calls == 2  # later writes never reach the file
    assert bytes(raw.data) == b"12345"


def _mount_tmpfs(path: Path) -> bool:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _mount_tmpfs(disk):
        pytest.skip("mounting a 2 MiB tmpfs needs root and mount rights")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdfast.cli", *args], capture_output=True, text=True)


def test_onnx_export_onto_a_real_full_disk(tiny_info, small_disk):
    r = _cli("export", "--model", str(tiny_info.path), "-o", str(small_disk / "e"), "--format", "onnx")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "sdfast export: error: the disk filled while writing the folder" in r.stderr
    assert "Traceback" not in r.stderr and _listing(small_disk) == []


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["openvino", "inductor"])
def test_openvino_and_inductor_exports_onto_a_real_full_disk(tiny_info, small_disk, fmt):
    """OpenVINO says only "iostream error"; torch's package writer used to abort the process
    (``std::terminate`` at exit, status 134) after the message."""
    if fmt == "openvino":
        pytest.importorskip("openvino")
    r = _cli("export", "--model", str(tiny_info.path), "-o", str(small_disk / "e"), "--format", fmt)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "the disk filled while writing the folder" in r.stderr
    assert "Traceback" not in r.stderr and "terminate" not in r.stderr and _listing(small_disk) == []
