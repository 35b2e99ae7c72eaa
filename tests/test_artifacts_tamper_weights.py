"""An export made with ``--external-data`` keeps its weights in ``NAME.onnx.data`` files (every
large model does). Changing one byte of any of them must be refused on load, like a change to
the graph file: hashing that skipped the weight files would load tampered weights silently."""

from __future__ import annotations

import shutil

import pytest

import sdfast
from sdfast.cli import main
from sdfast.errors import ArtifactMismatch

pytest.importorskip("onnxruntime")

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


@pytest.fixture(scope="module")
def external_export(tiny_info, tmp_path_factory):
    out = tmp_path_factory.mktemp("tamper") / "engines"
    rc = main(["export", "--model", str(tiny_info.path), "--out", str(out), "--format", "onnx",
               "--precision", "fp32", "--height", "64", "--width", "64", "--batch", "1", "--external-data"])
    assert rc == 0
    data = {c: out / f"{c}.onnx.data" for c in COMPONENTS}
    assert all(p.is_file() and p.stat().st_size > 0 for p in data.values()), sorted(out.iterdir())
    return out


def flip_one_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the hash can tell
    path.write_bytes(bytes(data))


@pytest.fixture
def copy(external_export, tmp_path):
    dest = tmp_path / "engines"
    shutil.copytree(external_export, dest)
    return dest


def test_untouched_external_data_export_loads_and_runs(tiny_info, copy):
    pipe = sdfast.load(tiny_info.path, backend="onnxruntime", engines=copy)
    assert pipe.generate("a red circle", steps=1).images[0].size == (64, 64)


@pytest.mark.parametrize("component", COMPONENTS)
def test_one_flipped_byte_in_a_weight_file_is_refused_on_load(tiny_info, copy, component):
    flip_one_byte(copy / f"{component}.onnx.data")
    with pytest.raises(ArtifactMismatch, match=rf"{component}\.onnx\.data") as e:
        sdfast.load(tiny_info.path, backend="onnxruntime", engines=copy)
    assert "sdfast export" in str(e.value)  # says how to rebuild


def test_cli_refuses_tampered_weights_with_exit_2_and_no_output(tiny_info, copy, tmp_path, capsys):
    flip_one_byte(copy / "unet.onnx.data")
    out = tmp_path / "o.png"
    rc = main(["generate", "x", "--model", str(tiny_info.path), "--backend", "onnxruntime",
               "--engines", str(copy), "--steps", "1", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unet.onnx.data" in err[0]
    assert not out.exists()


def test_a_remembered_hash_never_lets_a_changed_weight_file_load(tiny_info, copy, tmp_path, monkeypatch):
    """Loads remember each file's sha256 (sdfast/hash_memo.py): the second load hashes nothing,
    and a byte flipped afterwards, even with the file's mtime put back, is still refused."""
    import os

    from sdfast import artifacts, hash_memo

    monkeypatch.setenv("SDFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hash_memo, "RACY_S", 0.0)  # the copy's files were written just now
    sdfast.load(tiny_info.path, backend="onnxruntime", engines=copy)
    hashed = []
    real = artifacts.file_record
    monkeypatch.setattr(artifacts, "file_record", lambda p: hashed.append(p) or real(p))
    sdfast.load(tiny_info.path, backend="onnxruntime", engines=copy)
    assert hashed == []
    target = copy / "unet.onnx.data"
    st = target.stat()
    flip_one_byte(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ArtifactMismatch, match=r"unet\.onnx\.data does not match its sha256"):
        sdfast.load(tiny_info.path, backend="onnxruntime", engines=copy)
