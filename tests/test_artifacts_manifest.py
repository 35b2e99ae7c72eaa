"""Artifact manifests refuse anything that does not match, and exports are atomic."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

import sdfast
from sdfast.artifacts import MANIFEST, load_manifest, read_manifest
from sdfast.errors import ArtifactMismatch, MissingFile
from sdfast.export import onnx as onnx_export


@pytest.fixture
def export_copy(onnx_copy):
    return onnx_copy


def load(info, path):
    return sdfast.load(info.path, backend="onnxruntime", engines=path)


def test_good_export_loads(tiny_info, onnx_dynamic):
    m = load_manifest(onnx_dynamic, tiny_info, "onnx")
    assert m.files["unet.onnx"]["size"] == (onnx_dynamic / "unet.onnx").stat().st_size


def test_modified_file_is_refused_naming_file_and_rebuild_command(tiny_info, export_copy):
    path = export_copy / "unet.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactMismatch, match="unet.onnx does not match its sha256") as e:
        load(tiny_info, export_copy)
    assert f"sdfast export --model {tiny_info.path} --out {export_copy} --format onnx" in str(e.value)
    assert "--min-height 64 --max-height 128" in str(e.value)


def test_truncated_file_is_refused(tiny_info, export_copy):
    path = export_copy / "vae_decoder.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ArtifactMismatch, match="vae_decoder.onnx has 1000 bytes .*truncated"):
        load(tiny_info, export_copy)


def test_missing_listed_file_is_refused(tiny_info, export_copy):
    (export_copy / "text_encoder.onnx").unlink()
    with pytest.raises(ArtifactMismatch, match="text_encoder.onnx is listed in the manifest but missing"):
        load(tiny_info, export_copy)


def test_export_of_another_model_is_refused(tiny_info, onnx_dynamic, tmp_path):
    from sdfast.model.info import ModelInfo, build_tiny_random

    other = ModelInfo.from_folder(build_tiny_random(tmp_path / "other-model", seed=7))
    with pytest.raises(ArtifactMismatch, match="different model .*same configs, different weights") as e:
        load(other, onnx_dynamic)
    assert f"--model {other.path}" in str(e.value)


def test_changed_config_is_named(tiny_info, export_copy):
    m = json.loads((export_copy / MANIFEST).read_text())
    m["model"]["fingerprint"] = "0" * 64
    m["model"]["configs"]["unet"]["sample_size"] = 64
    (export_copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactMismatch, match="unet config sample_size: export has 64, model has 8"):
        load(tiny_info, export_copy)


def test_wrong_format_and_format_version_are_refused(tiny_info, export_copy):
    from sdfast.artifacts import verify

    with pytest.raises(ArtifactMismatch, match="holds onnx artifacts, not tensorrt"):
        verify(read_manifest(export_copy), export_copy, tiny_info, "tensorrt")
    m = json.loads((export_copy / MANIFEST).read_text())
    m["format_version"] = 99
    (export_copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactMismatch, match="format version 99"):
        load(tiny_info, export_copy)


def test_a_pinned_package_version_is_held_only_for_the_formats_that_pin_it(tiny_info, export_copy):
    """AOTInductor packages load only on the torch that compiled them; ONNX graphs on any torch."""
    from sdfast.artifacts import package_version, verify

    m = read_manifest(export_copy)
    m.versions = {**m.versions, "torch": "0.0.1"}
    verify(m, export_copy, tiny_info, "onnx")  # not pinned: an ONNX graph outlives the torch that traced it
    m.format = "inductor"
    with pytest.raises(ArtifactMismatch, match=rf"built with torch 0\.0\.1 but torch {re.escape(package_version('torch'))}"):
        verify(m, export_copy, tiny_info, "inductor")
    m.versions["torch"] = package_version("torch")
    verify(m, export_copy, tiny_info, "inductor")  # the same torch: accepted


def test_folder_without_manifest_is_refused(tiny_info, export_copy):
    (export_copy / MANIFEST).unlink()
    with pytest.raises(MissingFile, match="no manifest.json.*rebuild with: sdfast export --model") as e:
        load(tiny_info, export_copy)
    assert str(tiny_info.path) in str(e.value)


def test_export_interrupted_halfway_leaves_nothing_loadable(tiny_info, tmp_path, monkeypatch):
    from sdfast.model.components import ShapeProfile

    real = onnx_export.export_component
    done = []

    def export_then_die(*args, **kw):
        if done:
            raise KeyboardInterrupt  # as if Ctrl-C hit during the second component
        done.append(real(*args, **kw))

    monkeypatch.setattr(onnx_export, "export_component", export_then_die)
    out = tmp_path / "engines"
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_onnx(tiny_info, out, ShapeProfile.static(1, 64, 64), components=("text_encoder", "unet"))
    assert done and not out.exists() and list(tmp_path.iterdir()) == []  # the staging dir is gone too
    with pytest.raises(MissingFile):
        load(tiny_info, out)


def test_export_killed_halfway_leaves_previous_export_intact(tiny_info, onnx_dynamic, tmp_path):
    out = tmp_path / "engines"
    shutil.copytree(onnx_dynamic, out)
    before = (out / MANIFEST).read_text()
    # A hard kill (no cleanup runs) after the first component of a re-export into `out`.
    code = textwrap.dedent(f"""
        import os, torch
        torch.set_num_threads(1)
        from sdfast.model.components import ShapeProfile
        from sdfast.export import onnx as e
        from sdfast.model.info import ModelInfo
        real = e.export_component
        def die_after(*a, **k):
            real(*a, **k)
            os._exit(9)
        e.export_component = die_after
        e.export_onnx(ModelInfo.from_folder({str(tiny_info.path)!r}), {str(out)!r}, ShapeProfile.static(1, 64, 64))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert r.returncode == 9, r.stderr[-2000:]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "engines"]
    assert leftovers and all(n.startswith(".engines.tmp-") for n in leftovers)  # hidden, no manifest
    assert not any((tmp_path / n / MANIFEST).exists() for n in leftovers)
    assert (out / MANIFEST).read_text() == before
    load_manifest(out, tiny_info, "onnx")  # the previous export still verifies
    # The staging folder names the dead writer's pid: the next write to `out` removes it.
    from sdfast.fsio import clean_stale

    clean_stale(out, MANIFEST)
    assert [p.name for p in tmp_path.iterdir()] == ["engines"]


def test_the_export_first_hint_names_a_built_in_by_name_and_a_folder_by_path(tiny_info):
    # A user who ran `--model tiny` is told to export `--model tiny`, not the package folder it lives in.
    import sdfast
    from sdfast.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=r"`sdfast export --model tiny --out DIR --format onnx") as e:
        sdfast.load("tiny", backend="onnxruntime")
    assert "sdfast/data" not in str(e.value)
    with pytest.raises(InvalidArgument) as e:
        sdfast.load(tiny_info.path, backend="onnxruntime")
    assert f"--model {tiny_info.path} --out DIR" in str(e.value)
