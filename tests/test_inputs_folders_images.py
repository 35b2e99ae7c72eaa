"""Broken model folders and hostile or unusual images.

Every model-folder failure is one line naming the file; images are decoded only after their
header passed the size limit, converted to 8-bit RGB correctly whatever their mode, and the
API's arrays and bytes are accepted in the stated layouts or refused with InvalidArgument.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
from adversarial import refused
from PIL import Image

from sdfast.errors import InvalidArgument, MissingFile
from sdfast.images import BACKGROUND, load_init_image
from sdfast.model.info import load_torch_modules, resolve_model
from sdfast.request import Request

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def model(tiny_info, tmp_path):
    dest = tmp_path / "model"
    shutil.copytree(tiny_info.path, dest)
    return dest


def _json(path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("break_it,needle", [
    (lambda m: (m / WEIGHTS).write_bytes((m / WEIGHTS).read_bytes()[:100_000]), "is truncated"),
    (lambda m: (m / WEIGHTS).write_bytes((m / WEIGHTS).read_bytes()[:3000]), "is truncated"),
    (lambda m: (m / WEIGHTS).write_bytes(b""), "is empty (0 bytes)"),
    (lambda m: (m / WEIGHTS).write_bytes(os.urandom(5000)), "is not a safetensors file"),
    (lambda m: (m / WEIGHTS).write_bytes(struct.pack("<Q", 20) + b"[1, 2, 3, 4, 5, 6, 7]" + b"\0" * 99),
     "is not a safetensors file"),
    (lambda m: _json(m / "unet/config.json", lambda d: d.pop("in_channels")), "lacks 'in_channels'"),
    (lambda m: _json(m / "unet/config.json", lambda d: d.update(sample_size="8")), "sample_size = '8' (str)"),
    (lambda m: _json(m / "vae/config.json", lambda d: d.update(block_out_channels=[])), "non-empty list"),
    (lambda m: _json(m / "text_encoder/config.json", lambda d: d.update(hidden_size=True)), "hidden_size = True"),
    (lambda m: _json(m / "vae/config.json", lambda d: d.update(scaling_factor="0.18")), "scaling_factor"),
    (lambda m: (m / "vae/config.json").write_text("[]"), "holds a JSON list, not an object"),
    (lambda m: (m / "scheduler/scheduler_config.json").write_text("{"), "is not valid JSON"),
    (lambda m: (m / "unet/config.json").unlink(), "lacks unet/config.json"),
])
def test_a_broken_model_folder_is_one_line_naming_the_file(model, tmp_path, capsys, break_it, needle):
    break_it(model)
    line = refused(capsys, ["generate", "x", "--model", str(model), "--steps", "1", "--out",
                            str(tmp_path / "o.png"), "--quiet"], needle)
    assert str(model) in line
    assert not (tmp_path / "o.png").exists()


def test_a_config_diffusers_rejects_is_one_line_at_load(model):
    _json(model / "unet/config.json", lambda d: d.update(down_block_types=["NoSuchBlock", "DownBlock2D"]))
    info = resolve_model(str(model))  # sdfast's own keys are fine
    with pytest.raises(InvalidArgument, match=r"model: cannot load .*unet \(ValueError: NoSuchBlock"):
        load_torch_modules(info, parts=("unet",))


# -- images -----------------------------------------------------------------------------------

def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(w: int, h: int) -> bytes:
    """A valid PNG header claiming w×h, with one tiny compressed row: a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (w + 1)))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [20000, 9000])
def test_a_decompression_bomb_is_refused_from_its_header(tiny_info, tmp_path, capsys, side):
    data = bomb_png(side, side)
    assert len(data) < 100_000
    with pytest.raises(InvalidArgument, match="image: .*(claims|too large)"):
        load_init_image(data)
    (tmp_path / "bomb.png").write_bytes(data)
    refused(capsys, ["generate", "x", "--model", str(tiny_info.path), "--init-image", str(tmp_path / "bomb.png"),
                     "--steps", "2", "--out", str(tmp_path / "o.png")], "image:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.png"]


def test_a_16_bit_gradient_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 256).reshape(64, 256).round().astype(np.uint16)
    (tmp_path / "g16.png").write_bytes(png_bytes(Image.fromarray(ramp)))
    got = np.asarray(load_init_image(tmp_path / "g16.png"))
    assert got.shape == (64, 256, 3) and got.dtype == np.uint8
    assert np.abs(got[..., 0].astype(int) - np.rint(ramp / 257)).max() <= 1  # was 99.6 % white
    assert (got == 255).mean() < 0.01 and len(np.unique(got)) == 256
    assert np.array_equal(np.asarray(load_init_image(ramp)), got)  # a uint16 array reads the same


def test_alpha_is_composited_on_the_stated_background():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red, alpha 0 / 128 / 255 in three columns
    rgba[:, 1, 3], rgba[:, 2, 3] = 128, 255
    got = np.asarray(load_init_image(Image.fromarray(rgba)))
    assert tuple(got[0, 0]) == BACKGROUND  # fully transparent: the background, not black
    assert tuple(got[0, 2]) == (200, 0, 0)
    half = got[0, 1].astype(int)  # 128/255 of red over white
    assert abs(half[0] - (200 * 128 + 255 * 127) / 255) <= 1 and abs(half[1] - 255 * 127 / 255) <= 1
    la = Image.new("LA", (2, 2), (0, 0))  # grey + alpha, fully transparent
    assert tuple(np.asarray(load_init_image(la))[0, 0]) == BACKGROUND


def test_palette_transparency_and_cmyk_convert():
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 200, 30])
    p.info["transparency"] = 1
    assert tuple(np.asarray(load_init_image(png_bytes(p)))[0, 0]) == BACKGROUND
    p.info.pop("transparency")
    assert tuple(np.asarray(load_init_image(p))[0, 0]) == (10, 200, 30)
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in ink
    assert tuple(np.asarray(load_init_image(cmyk))[0, 0]) == (255, 0, 0)
    assert load_init_image(Image.new("1", (3, 3), 1)).mode == "RGB"


def test_arrays_and_bytes_in_the_stated_layouts_are_accepted():
    rgb = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    ref = np.asarray(load_init_image(Image.fromarray(rgb)))
    assert np.array_equal(np.asarray(load_init_image(rgb)), ref)
    assert np.array_equal(np.asarray(load_init_image(png_bytes(Image.fromarray(rgb)))), ref)
    assert np.array_equal(np.asarray(load_init_image(bytearray(png_bytes(Image.fromarray(rgb))))), ref)
    assert np.array_equal(np.asarray(load_init_image(rgb / 255.0)), ref)
    grey = load_init_image(rgb[..., 0])
    assert grey.size == (24, 16) and np.array_equal(np.asarray(grey)[..., 1], rgb[..., 0])
    assert load_init_image(rgb[..., :1]).size == (24, 16)


@pytest.mark.parametrize("bad,needle", [
    (np.zeros((3, 16, 16), np.uint8), "channel-first"),
    (np.zeros((2, 16, 16, 3), np.uint8), "pass one image"),
    (np.zeros((16, 16, 2), np.uint8), "pass one image"),
    (np.zeros((16, 16), np.int32), "dtype is int32"),
    (np.full((16, 16), 2.0), "finite values in [0, 1]"),
    (np.full((16, 16), np.nan), "finite values in [0, 1]"),
    (np.zeros((0, 16), np.uint8), "pass one image"),
    (b"", "the bytes are empty"),
    (b"GIF89a-not-really", "not a readable image"),
    (bomb_png(64, 64)[:40], "not a readable image"),
    (12, "builtins.int is not an image"),
    ([[0, 0], [0, 0]], "builtins.list is not an image"),
])
def test_other_arrays_and_objects_are_refused_with_invalid_argument(bad, needle):
    with pytest.raises(InvalidArgument) as e:
        load_init_image(bad)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_request_takes_the_same_inputs(tiny_info):
    rgb = np.full((64, 64, 3), 128, np.uint8)
    req = Request.build(tiny_info, prompt="x", image=rgb, steps=4)
    assert req.image.size == (64, 64) and req.image.mode == "RGB"
    with pytest.raises(InvalidArgument, match="channel-first"):
        Request.build(tiny_info, prompt="x", image=np.zeros((3, 64, 64), np.uint8), steps=4)
    with pytest.raises(MissingFile, match="no file at"):
        Request.build(tiny_info, prompt="x", image="/no/such.png", steps=4)
