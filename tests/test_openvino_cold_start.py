"""The OpenVINO backend compiles only what a request needs, and keeps
each compiled model in a cache keyed so that a stale entry is never used.

What a user sees: a second load imports every compiled model from the cache folder and draws
the same pixels; a changed export (weights, precision, threads) compiles afresh; a cache folder
that cannot be written, or a broken entry, still loads and draws the same pixels; the off switch
writes nothing; text to image never compiles the VAE encoder, img2img still runs it. The tiny
model, one static export per module; each test has its own cache folder.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

import sdfast  # noqa: E402
from sdfast.artifacts import Manifest, read_manifest  # noqa: E402
from sdfast.engines import openvino as ove  # noqa: E402
from sdfast.measure.parity import FP32_MAX_PIXEL  # noqa: E402
from sdfast.model.components import Precision, ShapeProfile  # noqa: E402

PROFILE = ShapeProfile.static(1, 64, 64)
KW = dict(steps=2, seed=5, height=64, width=64)
TXT2IMG = ("text_encoder", "unet", "vae_decoder")


@pytest.fixture(scope="module")
def export(tiny_info, tmp_path_factory):
    from sdfast.export.openvino import export_openvino

    return export_openvino(tiny_info, tmp_path_factory.mktemp("ov-cold") / "tiny-fp32", PROFILE)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "ov-cache"
    monkeypatch.setenv(ove.CACHE_ENV, str(folder))
    return folder


def load(tiny_info, root):
    return sdfast.load(tiny_info.path, backend="openvino", engines=root)


def pixels(pipe, **kw) -> np.ndarray:
    return np.asarray(pipe.generate("a red circle", **{**KW, **kw}).images[0])


def hits(pipe) -> dict[str, list[bool]]:
    return {n: list(e.from_cache.values()) for n, e in pipe.engines.items()}


def entries(folder, component: str = "") -> list[str]:
    return sorted(p.name for p in folder.glob(f"{component}-*.blob")) if folder.is_dir() else []


def test_second_load_imports_every_compiled_model_from_the_cache_and_draws_the_same_pixels(
        tiny_info, export, cache, monkeypatch):
    first = load(tiny_info, export)
    assert hits(first) == {**{n: [False] for n in TXT2IMG}, "vae_encoder": []}
    assert [n.split("-")[0] for n in entries(cache, "*")] == sorted(TXT2IMG)  # one entry each, written on load
    a = pixels(first)
    second = load(tiny_info, export)
    assert hits(second) == {**{n: [True] for n in TXT2IMG}, "vae_encoder": []}
    b = pixels(second)
    monkeypatch.setenv(ove.CACHE_ENV, "off")
    c = pixels(load(tiny_info, export))
    assert np.array_equal(a, b) and np.array_equal(a, c)


def test_text_to_image_never_compiles_the_vae_encoder_and_img2img_still_runs_it(
        tiny_info, tiny_pipe, export, cache, monkeypatch):
    pipe = load(tiny_info, export)
    pixels(pipe)
    encoder = pipe.engines["vae_encoder"]
    assert not encoder._requests and encoder._dynamic is None and not entries(cache, "vae_encoder")
    init = tiny_pipe.generate("a blue square", **KW).images[0]
    kw = dict(KW, image=init, strength=0.6, scheduler="euler")
    ref, out = tiny_pipe.generate("a red circle", **kw), pipe.generate("a red circle", **kw)
    assert list(encoder.from_cache.values()) == [False] and len(entries(cache, "vae_encoder")) == 1
    px = np.abs(np.asarray(ref.images[0]).astype(int) - np.asarray(out.images[0]).astype(int)).max()
    assert (ref.latents - out.latents).abs().max().item() <= 1e-4 * max(1.0, ref.latents.abs().max().item())
    assert px <= FP32_MAX_PIXEL
    again = load(tiny_info, export).generate("a red circle", **kw)  # the encoder now from the cache
    monkeypatch.setenv(ove.CACHE_ENV, "off")
    plain = load(tiny_info, export).generate("a red circle", **kw)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(out.images[0]))
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(out.images[0]))


def test_changed_weights_in_the_same_folder_compile_afresh_and_replace_the_stale_entry(
        tiny_info, export, cache, tmp_path):
    root = tmp_path / "export"
    shutil.copytree(export, root)
    load(tiny_info, root)
    old = entries(cache, "unet")
    data = bytearray((root / "unet.bin").read_bytes())  # a re-export with other U-Net weights:
    data[len(data) // 2] ^= 0x01  # same names, sizes and (to the second) mtime
    (root / "unet.bin").write_bytes(bytes(data))
    m = read_manifest(root)
    Manifest(format=m.format, model=m.model, profile=m.profile, components=m.components, versions=m.versions,
             export_command=m.export_command).seal(root)
    pipe = load(tiny_info, root)
    assert hits(pipe) == {"text_encoder": [True], "unet": [False], "vae_decoder": [True], "vae_encoder": []}
    new = entries(cache, "unet")
    assert len(old) == len(new) == 1 and old != new  # the stale entry is gone, not kept beside


def test_the_key_follows_manifest_hashes_precision_threads_shapes_and_openvino(tiny_info, export, tmp_path):
    import openvino as ov

    m = read_manifest(export)
    c = ove.CompileCache(tmp_path, export, ov.Core())
    cfg, shapes = ove.compile_config("f32", threads=1), ((2, 77),)
    base = c.path(m, "text_encoder", cfg, shapes)
    assert base == c.path(m, "text_encoder", dict(cfg), shapes)  # deterministic
    other = json.loads(m.to_json())
    other["files"]["text_encoder.bin"]["sha256"] = "0" * 64
    changed = [c.path(Manifest.from_dict(other), "text_encoder", cfg, shapes),
               c.path(m, "text_encoder", ove.compile_config("bf16", threads=1), shapes),
               c.path(m, "text_encoder", ove.compile_config("f32", threads=2), shapes),
               c.path(m, "text_encoder", cfg, ((1, 77),)),
               c.path(m, "unet", cfg, shapes)]
    c.device = {**c.device, "openvino": c.device["openvino"] + "-other"}
    changed.append(c.path(m, "text_encoder", cfg, shapes))
    assert len({base, *changed}) == len(changed) + 1
    assert ove.CompileCache(None, export, None).path(m, "text_encoder", cfg, shapes) is None


def test_other_threads_miss_the_cache(tiny_info, export, cache):
    first = ove.load(tiny_info, torch.device("cpu"), Precision.FP32, str(export), threads=1)
    second = ove.load(tiny_info, torch.device("cpu"), Precision.FP32, str(export), threads=2)
    third = ove.load(tiny_info, torch.device("cpu"), Precision.FP32, str(export), threads=1)
    assert [list(first[n].from_cache.values()) for n in TXT2IMG] == [[False]] * 3
    assert [list(second[n].from_cache.values()) for n in TXT2IMG] == [[False]] * 3
    assert [list(third[n].from_cache.values()) for n in TXT2IMG] == [[True]] * 3
    assert second["unet"].compiled.get_property("INFERENCE_NUM_THREADS") == 2
    assert third["unet"].compiled.get_property("INFERENCE_NUM_THREADS") == 1


def test_an_unwritable_cache_folder_still_loads_and_draws_the_same_pixels(tiny_info, export, tmp_path, monkeypatch,
                                                                          caplog):
    monkeypatch.setenv(ove.CACHE_ENV, "off")
    want = pixels(load(tiny_info, export))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(ove.CACHE_ENV, str(blocker / "cache"))  # cannot be made, whoever runs this
    with caplog.at_level(logging.WARNING, logger=ove.__name__):
        pipe = load(tiny_info, export)
    warnings = [r.getMessage() for r in caplog.records if "openvino cache" in r.getMessage()]
    assert len(warnings) == 1 and "cannot write" in warnings[0] and ove.CACHE_ENV in warnings[0]
    assert hits(pipe) == {**{n: [False] for n in TXT2IMG}, "vae_encoder": []}
    assert np.array_equal(pixels(pipe), want)


def test_a_broken_entry_is_compiled_over_with_the_same_pixels(tiny_info, export, cache, caplog):
    want = pixels(load(tiny_info, export))
    (blob,) = (cache / name for name in entries(cache, "unet"))
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 3])  # a cache file cut short
    with caplog.at_level(logging.WARNING, logger=ove.__name__):
        pipe = load(tiny_info, export)
    assert any("does not import" in r.getMessage() for r in caplog.records)
    assert hits(pipe)["unet"] == [False] and np.array_equal(pixels(pipe), want)
    assert hits(load(tiny_info, export))["unet"] == [True]  # rewritten whole


def test_the_off_switch_writes_nothing_and_the_export_folder_is_left_alone(tiny_info, export, tmp_path,
                                                                           monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in export.iterdir()}
    monkeypatch.setenv("SDFAST_CACHE", str(tmp_path / "sdfast"))
    for off in ("off", "0", ""):
        monkeypatch.setenv(ove.CACHE_ENV, off)
        assert ove.cache_root() is None
        pipe = load(tiny_info, export)
        assert hits(pipe) == {**{n: [False] for n in TXT2IMG}, "vae_encoder": []}
    assert not (tmp_path / "sdfast" / "openvino").exists()  # (verified-hashes/ is the hash memo's)
    monkeypatch.delenv(ove.CACHE_ENV)
    load(tiny_info, export)  # the default under $SDFAST_CACHE
    assert [n.split("-")[0] for n in entries(tmp_path / "sdfast" / "openvino", "*")] == sorted(TXT2IMG)
    assert {p.name: p.stat().st_mtime_ns for p in export.iterdir()} == before


def test_the_default_folder_follows_sdfast_cache_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.delenv(ove.CACHE_ENV, raising=False)
    monkeypatch.setenv("SDFAST_CACHE", str(tmp_path / "s"))
    assert ove.cache_root() == tmp_path / "s" / "openvino"
    monkeypatch.delenv("SDFAST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert ove.cache_root() == tmp_path / "x" / "sdfast" / "openvino"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert ove.cache_root() == tmp_path / "h" / ".cache" / "sdfast" / "openvino"
    monkeypatch.setenv(ove.CACHE_ENV, str(tmp_path / "mine"))
    assert ove.cache_root() == tmp_path / "mine"


def test_an_entry_others_could_have_written_is_never_imported(tiny_info, export, cache, caplog):
    want = pixels(load(tiny_info, export))
    cache.chmod(0o777)  # e.g. SDFAST_OV_CACHE=/tmp/shared: anyone could have put a blob there
    with caplog.at_level(logging.WARNING, logger=ove.__name__):
        pipe = load(tiny_info, export)
    assert any("writable by anyone" in r.getMessage() for r in caplog.records)
    assert hits(pipe) == {**{n: [False] for n in TXT2IMG}, "vae_encoder": []} and np.array_equal(pixels(pipe), want)
    cache.chmod(0o755)
    assert hits(load(tiny_info, export)) == {**{n: [True] for n in TXT2IMG}, "vae_encoder": []}


def test_past_the_size_limit_the_least_recently_used_entries_of_other_exports_go(tiny_info, export, cache,
                                                                                 monkeypatch):
    import os

    cache.mkdir()
    stale = cache / f"unet-{'a' * 16}-{'b' * 16}-{'c' * 64}.blob"  # a deleted temp export's entry
    stale.write_bytes(b"x" * 1000)
    os.utime(stale, (1, 1))
    load(tiny_info, export)
    assert stale.exists()  # under the default limit nothing goes
    monkeypatch.setenv(ove.CACHE_MAX_ENV, "1e-9")  # 1 byte: everything but the set being written
    ove.load(tiny_info, torch.device("cpu"), Precision.FP32, str(export), threads=3)
    assert not stale.exists()
    left = entries(cache, "*")
    assert {n.split("-")[0] for n in left} >= set(TXT2IMG)  # this export's newest set stays
