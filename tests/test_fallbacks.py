"""Fallback paths, non-finite values and an option that must take effect.

- fsio: the folder swap where the OS has no atomic exchange (renameat2 missing or refused by
  the file system): the final state, the order of its renames seen through a real crash
  (``os._exit``) before each step, and what the next writer makes of the leftovers; a failing
  file rename keeps the old file and leaves no temporary.
- model folders holding plain and variant weights, or safetensors and .bin: which file's
  tensors end up in the module.
- init images with an EXIF orientation 2..8: the pixels come out upright.
- NaN, +inf and -inf in the latents and in the decoded pixels: refused, or redone in fp32, as
  safety.py says.
- OpenVINO's inference precision hint: a bf16 export computes in bf16, an fp32 one in f32.
"""

from __future__ import annotations

import ctypes
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sdfast
from sdfast import fsio

MANIFEST = "manifest.json"
SDFAST_ROOT = str(Path(sdfast.__file__).resolve().parent.parent)


# -- fsio: the swap without an atomic exchange -------------------------------------------------

def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_export(folder: Path, tag: str) -> dict[str, bytes]:
    """A small export-like folder whose every file says ``tag``; returns its tree."""
    (folder / "sub").mkdir(parents=True)
    (folder / "unet.bin").write_bytes(f"unet weights {tag}".encode() * 50)
    (folder / "sub" / "vae.bin").write_bytes(f"vae {tag}".encode())
    (folder / MANIFEST).write_text(json.dumps({"tag": tag}))
    return tree(folder)


def no_exchange(kind: str):
    """A stand-in for fsio's ``ctypes`` on a system without RENAME_EXCHANGE: libc lacks renameat2
    (glibc < 2.28), or the call fails with errno ``kind`` (a file system that does not do it)."""
    if kind == "missing":
        return types.SimpleNamespace(CDLL=lambda *a, **k: types.SimpleNamespace(), get_errno=ctypes.get_errno)
    code = getattr(errno, kind)
    calls = []

    def renameat2(*args):
        calls.append(args)
        return -1

    lib = types.SimpleNamespace(renameat2=renameat2)
    return types.SimpleNamespace(CDLL=lambda *a, **k: lib, get_errno=lambda: code, calls=calls)


def bystanders(parent: Path, out: Path) -> dict[str, bytes]:
    """Files beside ``out`` that sdfast did not write: a note, another folder, another target's
    dead temporary and a live process's (this one's) temporary of ``out``."""
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    (parent / "notes.txt").write_text("mine")
    (parent / "other").mkdir()
    (parent / "other" / "a.bin").write_bytes(b"other export")
    (parent / f".zzz.tmp-{dead}-abcd1234").write_bytes(b"another target's")
    live = parent / f".{out.name}.tmp-{os.getpid()}-efgh5678"
    live.mkdir()
    (live / "x.bin").write_bytes(b"live writer")
    return {k: v for k, v in tree(parent).items() if k.split("/")[0] != out.name}


def same_bystanders(parent: Path, before: dict[str, bytes]) -> bool:
    now = tree(parent)
    return all(now.get(k) == v for k, v in before.items())


@pytest.mark.parametrize("kind", ["missing", "EINVAL", "ENOSYS", "EOPNOTSUPP"])
def test_swap_without_atomic_exchange_replaces_the_folder_and_leaves_nothing_else(tmp_path, monkeypatch, kind):
    out = tmp_path / "engines"
    old = write_export(out, "old")
    others = bystanders(tmp_path, out)
    fake = no_exchange(kind)
    monkeypatch.setattr(fsio, "ctypes", fake)
    with fsio.staging_dir(out) as tmp:
        new = write_export(tmp, "new")
        assert tree(out) == old  # nothing moves before the block is done
    if kind != "missing":
        assert len(fake.calls) == 1  # the exchange was tried first
    assert tree(out) == new
    assert same_bystanders(tmp_path, others)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"engines", *(k.split("/")[0] for k in others)})


def test_swap_error_other_than_unsupported_keeps_the_old_folder(tmp_path, monkeypatch):
    out = tmp_path / "engines"
    old = write_export(out, "old")
    monkeypatch.setattr(fsio, "ctypes", no_exchange("EACCES"))
    with pytest.raises(PermissionError), fsio.staging_dir(out) as tmp:
        write_export(tmp, "new")
    assert tree(out) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]


CRASHER = textwrap.dedent("""
    import os, shutil, sys, types
    sys.path.insert(0, sys.argv[1])
    from sdfast import fsio
    out, log, crash_at = sys.argv[2], sys.argv[3], sys.argv[4]
    lib = types.SimpleNamespace(renameat2=lambda *a: -1)  # the file system refuses the exchange
    fsio.ctypes = types.SimpleNamespace(CDLL=lambda *a, **k: lib, get_errno=lambda: 22)  # EINVAL
    ops = []

    def step(op, *paths):
        if crash_at == str(len(ops)):
            os._exit(9)  # a kill: no finally, no cleanup
        ops.append(op)
        with open(log, "a") as f:
            f.write(op + " " + " ".join(os.path.relpath(p, os.path.dirname(out)) for p in paths) + "\\n")

    real_replace, real_rmtree = os.replace, shutil.rmtree
    def replace(a, b):
        step("replace", a, b)
        real_replace(a, b)
    def rmtree(p, *a, **k):
        if os.path.basename(str(p)).startswith("." + os.path.basename(out) + "."):
            step("rmtree", p)
        real_rmtree(p, *a, **k)
    os.replace, shutil.rmtree = replace, rmtree
    with fsio.staging_dir(out) as tmp:
        os.makedirs(os.path.join(tmp, "sub"))
        for rel, data in (("unet.bin", b"unet weights new" * 50), ("sub/vae.bin", b"vae new"),
                          ("manifest.json", b'{"tag": "new"}')):
            with open(os.path.join(tmp, rel), "wb") as f:
                f.write(data)
            if crash_at == "block":
                os._exit(9)  # killed while the new export is half written
    if crash_at == str(len(ops)):
        os._exit(9)
""")


def crash_swap(out: Path, crash_at: str) -> list[str]:
    log = out.parent / "ops.log"
    log.unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "-c", CRASHER, SDFAST_ROOT, str(out), str(log), crash_at],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 9, r.stderr[-2000:]
    lines = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return lines


def test_swap_fallback_moves_the_old_folder_aside_then_the_new_one_in_then_deletes_the_old(tmp_path):
    out = tmp_path / "engines"
    write_export(out, "old")
    ops = crash_swap(out, "3")  # every step done, killed just before the staging block returns
    assert len(ops) == 3, ops
    (op1, a1, b1), (op2, a2, b2), (op3, a3) = (o.split() for o in ops)
    assert op1 == "replace" and a1 == "engines" and b1.startswith(".engines.old-") and b1.endswith("/x")
    assert op2 == "replace" and a2.startswith(".engines.tmp-") and b2 == "engines"
    assert op3 == "rmtree" and a3 == b1.removesuffix("/x")


# What is on disk when a kill lands before each step of the fallback, and after the next
# writer's clean-up: the old export is always somewhere whole, never mixed with the new one.
# crash_at: "block" = while writing; "0" = before moving the old folder aside; "1" = before
# moving the new one in; "2" = before deleting the old one.
CRASH_CASES = {"block": ("old", False), "0": ("old", False), "1": (None, True), "2": ("new", True)}


@pytest.mark.parametrize("crash_at", list(CRASH_CASES))
def test_a_kill_at_each_step_of_the_swap_fallback_never_loses_the_old_export(tmp_path, crash_at):
    out = tmp_path / "engines"
    old = write_export(out, "old")
    others = bystanders(tmp_path, out)
    new = {"unet.bin": b"unet weights new" * 50, "sub/vae.bin": b"vae new", MANIFEST: b'{"tag": "new"}'}
    crash_swap(out, crash_at)
    at_out, held = CRASH_CASES[crash_at]
    assert (tree(out) if out.exists() else None) == {"old": old, "new": new, None: None}[at_out]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".engines.old-")]
    if held:
        assert len(aside) == 1 and tree(aside[0] / "x") == old  # the old export, whole, set aside
    assert same_bystanders(tmp_path, others)
    # The next writer to `out` cleans up first: the dead writer's leftovers go, a missing
    # export is put back, the live writer's temporary and every other file stay.
    fsio.clean_stale(out, MANIFEST)
    assert tree(out) == (new if crash_at == "2" else old)
    assert same_bystanders(tmp_path, others)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"engines", *(k.split("/")[0] for k in others)})


def test_a_held_old_folder_without_its_manifest_is_not_put_back(tmp_path):
    out = tmp_path / "engines"
    write_export(out, "old")
    crash_swap(out, "1")
    aside = next(p for p in tmp_path.iterdir() if p.name.startswith(".engines.old-"))
    (aside / "x" / MANIFEST).unlink()  # not a complete export: nothing to restore
    fsio.clean_stale(out, MANIFEST)
    assert not out.exists() and not aside.exists()


def test_a_crashed_swap_of_one_folder_is_not_restored_into_another_whose_name_it_prefixes(tmp_path):
    short = tmp_path / "eng"
    old = write_export(short, "old")
    crash_swap(short, "1")  # 'eng' is missing, its old export held aside
    fsio.clean_stale(tmp_path / "engines", MANIFEST)  # a write to another folder, 'engines'
    assert not (tmp_path / "engines").exists()
    fsio.clean_stale(short, MANIFEST)
    assert tree(short) == old


@pytest.mark.parametrize("fails", ["replace", "chmod"])
def test_atomic_write_whose_final_step_fails_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch, fails):
    target = tmp_path / "out.png"
    target.write_bytes(b"old image")
    (tmp_path / "keep.txt").write_text("not ours")

    def refuse(*a, **k):
        raise OSError(errno.EPERM, "operation not permitted")

    monkeypatch.setattr(os, fails, refuse)
    with pytest.raises(OSError):
        fsio.atomic_write(target, b"new image")
    monkeypatch.undo()
    assert target.read_bytes() == b"old image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "out.png"]
    fsio.atomic_write(target, b"new image")
    assert target.read_bytes() == b"new image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "out.png"]


# -- model folders: which weights file is loaded -----------------------------------------------

UNET_WEIGHTS = "diffusion_pytorch_model"
#: one tensor per module, by the end of its name (transformers versions differ on the text_model. prefix)
PROBE = {"unet": "conv_in.bias", "text_encoder": "final_layer_norm.bias"}


def weights_folder(tiny_info, tmp_path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(tiny_info.path, dest)
    return dest


def plain_state(folder: Path, sub: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (f,) = [p for p in (folder / sub).glob("*.safetensors") if p.name.count(".") == 1]
    return load_file(f)


def save_shifted(state: dict[str, torch.Tensor], path: Path, shift: float, dtype=torch.float32) -> None:
    """The same tensors plus ``shift`` (so the file a module was loaded from shows in its values)."""
    shifted = {k: (v.float() + shift).to(dtype).contiguous() for k, v in state.items()}
    if path.suffix == ".bin":
        torch.save(shifted, path)
    else:
        from safetensors.torch import save_file

        save_file(shifted, str(path))


def loaded_shift(info, sub: str, plain: dict[str, torch.Tensor]) -> float:
    """By how much the module sdfast loads from ``sub`` differs from the plain weights (0, 1, 2, ...)."""
    from sdfast.model.info import load_torch_modules

    def probe(state):
        (key,) = [k for k in state if k == PROBE[sub] or k.endswith("." + PROBE[sub])]
        return state[key].float()

    module = load_torch_modules(info, parts=(sub,))[sub]
    got, want = probe(module.state_dict()), probe(plain)
    shift = round(float((got - want).mean()))
    assert torch.allclose(got, want + shift, atol=2e-3), "a mix of files"
    return shift


def test_plain_weights_win_over_a_variant_when_none_is_asked_for(tiny_info, tmp_path):
    from sdfast.model.info import resolve_model

    folder = weights_folder(tiny_info, tmp_path)
    plain = plain_state(folder, "unet")
    save_shifted(plain, folder / "unet" / f"{UNET_WEIGHTS}.fp16.safetensors", 1.0, torch.float16)
    info = resolve_model(folder)
    assert info.variant is None
    assert loaded_shift(info, "unet", plain) == 0


def test_a_variant_only_component_loads_that_variant(tiny_info, tmp_path):
    from sdfast.model.info import resolve_model

    folder = weights_folder(tiny_info, tmp_path)
    plain = plain_state(folder, "unet")
    save_shifted(plain, folder / "unet" / f"{UNET_WEIGHTS}.fp16.safetensors", 1.0, torch.float16)
    (folder / "unet" / f"{UNET_WEIGHTS}.safetensors").unlink()
    info = resolve_model(folder)
    assert info.variant == "fp16"
    assert loaded_shift(info, "unet", plain) == 1


@pytest.mark.parametrize("beside", ["plain", "ema"])
def test_a_requested_variant_is_loaded_whatever_else_the_folder_holds(tiny_info, tmp_path, beside):
    from sdfast.model.info import resolve_model

    folder = weights_folder(tiny_info, tmp_path)
    plain = plain_state(folder, "unet")
    save_shifted(plain, folder / "unet" / f"{UNET_WEIGHTS}.fp16.safetensors", 1.0, torch.float16)
    if beside == "ema":  # two variants, no plain weights ("ema" sorts before "fp16")
        save_shifted(plain, folder / "unet" / f"{UNET_WEIGHTS}.ema.safetensors", 2.0)
        (folder / "unet" / f"{UNET_WEIGHTS}.safetensors").unlink()
    info = resolve_model(folder, variant="fp16")
    assert info.variant == "fp16"
    assert loaded_shift(info, "unet", plain) == 1  # what diffusers loads with variant="fp16"


@pytest.mark.parametrize("sub, stem", [("unet", UNET_WEIGHTS), ("text_encoder", "pytorch_model")])
def test_safetensors_win_over_bin_weights_beside_them(tiny_info, tmp_path, sub, stem):
    from sdfast.model.info import resolve_model

    folder = weights_folder(tiny_info, tmp_path)
    plain = plain_state(folder, sub)
    save_shifted(plain, folder / sub / f"{stem}.bin", 1.0)
    info = resolve_model(folder)
    assert loaded_shift(info, sub, plain) == 0
    # and the .bin file alone is what loads once the safetensors file is gone
    next(p for p in (folder / sub).glob("*.safetensors")).unlink()
    assert loaded_shift(resolve_model(folder), sub, plain) == 1


def test_a_sharded_variant_only_component_loads_that_variant(tiny_info, tmp_path):
    from diffusers import UNet2DConditionModel

    from sdfast.model.info import resolve_model

    folder = weights_folder(tiny_info, tmp_path)
    plain = plain_state(folder, "unet")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(1.0)
    (folder / "unet" / f"{UNET_WEIGHTS}.safetensors").unlink()
    unet.save_pretrained(folder / "unet", variant="fp16", max_shard_size="200KB")
    assert len(list((folder / "unet").glob(f"{UNET_WEIGHTS}.fp16-0*.safetensors"))) > 1
    info = resolve_model(folder)
    assert info.variant == "fp16"
    assert loaded_shift(info, "unet", plain) == 1


# -- init images: EXIF orientation -------------------------------------------------------------

#: EXIF 2.32, tag 0x0112: which side of the upright picture the stored image's first row and
#: first column show.
ORIENTATION_SIDES = {1: ("top", "left"), 2: ("top", "right"), 3: ("bottom", "right"), 4: ("bottom", "left"),
                     5: ("left", "top"), 6: ("right", "top"), 7: ("right", "bottom"), 8: ("left", "bottom")}


def stored_from_upright(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores for the ``upright`` picture under ``orientation``, built from
    the side table alone: stored[a, b] is the upright pixel on the row side's a-th line from
    that side and the column side's b-th line from that side."""
    h, w = upright.shape[:2]
    row_side, col_side = ORIENTATION_SIDES[orientation]
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # upright coordinates
    dist = {"top": r, "bottom": h - 1 - r, "left": c, "right": w - 1 - c}
    a, b = dist[row_side], dist[col_side]  # the stored coordinates of upright pixel (r, c)
    stored = np.zeros((a.max() + 1, b.max() + 1, upright.shape[2]), upright.dtype)
    stored[a, b] = upright[r, c]
    return stored


def with_orientation(stored: np.ndarray, orientation: int, fmt: str) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    kw = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
    Image.fromarray(stored).save(buf, format=fmt, exif=exif.tobytes(), **kw)
    return buf.getvalue()


def upright_picture() -> np.ndarray:
    """A 6x10 picture (wider than tall: a transposition shows in the shape) of distinct pixels."""
    return np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)


def test_the_orientation_table_matches_the_named_transforms():
    # The table read as transforms: 2 mirrors, 3 turns 180°, 4 flips, 5 transposes, 6 was
    # turned 90° counter-clockwise when stored, 7 transverses, 8 was turned clockwise.
    u = upright_picture()
    named = {1: u, 2: u[:, ::-1], 3: u[::-1, ::-1], 4: u[::-1], 5: u.transpose(1, 0, 2),
             6: np.rot90(u, 1), 7: u[::-1, ::-1].transpose(1, 0, 2), 8: np.rot90(u, -1)}
    for o, want in named.items():
        assert np.array_equal(stored_from_upright(u, o), want), o


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("source", ["path", "bytes", "pil"])
def test_an_init_image_with_an_exif_orientation_is_loaded_upright(tmp_path, orientation, source):
    from sdfast.images import load_init_image

    upright = upright_picture()
    data = with_orientation(stored_from_upright(upright, orientation), orientation, "PNG")
    if source == "path":
        (tmp_path / "photo.png").write_bytes(data)
        data = tmp_path / "photo.png"
    if source == "pil":  # an Image.open()ed photo keeps its orientation tag
        data = Image.open(io.BytesIO(data))
    got = np.asarray(load_init_image(data))
    assert got.shape == upright.shape
    assert np.array_equal(got, upright)


@pytest.mark.parametrize("orientation", range(2, 9))
def test_a_camera_jpeg_with_an_exif_orientation_is_loaded_upright(orientation):
    from sdfast.images import load_init_image

    # 2x3 blocks of 16 px in six flat colours: JPEG keeps flat blocks within a few levels.
    colours = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]], [[255, 255, 0], [0, 255, 255], [255, 0, 255]]],
                       np.uint8)
    upright = np.kron(colours, np.ones((16, 16, 1), np.uint8))  # (32, 48, 3)
    got = np.asarray(load_init_image(with_orientation(stored_from_upright(upright, orientation), orientation,
                                                      "JPEG"))).astype(int)
    assert got.shape == upright.shape
    centres = got[8::16, 8::16]  # the middle of each block, away from JPEG's block edges
    assert np.abs(centres - colours.astype(int)).max() <= 12


def test_img2img_starts_from_the_upright_picture(tiny_pipe, tmp_path):
    rng = np.random.default_rng(1)
    upright = np.kron(rng.integers(0, 256, (4, 8, 3), dtype=np.uint8), np.ones((16, 16, 1), np.uint8))  # 64x128
    path = tmp_path / "photo.png"
    path.write_bytes(with_orientation(stored_from_upright(upright, 6), 6, "PNG"))  # stored 128 tall, 64 wide
    kw = dict(steps=2, strength=0.5, seed=0, guidance_scale=1.0)
    got = tiny_pipe.generate("a red circle", image=path, **kw)
    want = tiny_pipe.generate("a red circle", image=upright, **kw)
    assert got.images[0].size == (128, 64)
    assert torch.equal(got.latents, want.latents)


# -- non-finite values: the latents after the loop, the decoded pixels -------------------------

KINDS = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
STEPS = 3
PROMPT_NF = "a yellow square"


def kind_of(x: torch.Tensor) -> set[str]:
    return {k for k, bad in (("nan", torch.isnan(x)), ("+inf", x == float("inf")), ("-inf", x == float("-inf")))
            if bool(bad.any())}


class Poison:
    """Engine spy: passes calls through, then puts ``value`` into one element of output ``output``
    of the calls ``when(inputs)`` picks (the rest of the tensor stays as computed)."""

    def __init__(self, engine, output: str, value: float, when=lambda inputs: True):
        self.engine, self.output, self.value, self.when = engine, output, value, when
        self.spec, self.device, self.graph_safe = engine.spec, engine.device, True
        self.precision, self.profile, self.size_multiple = engine.precision, engine.profile, engine.size_multiple
        self.poisoned = 0

    def __call__(self, **inputs):
        out = dict(self.engine(**inputs))
        if self.when(inputs):
            bad = out[self.output].clone()
            bad.view(-1)[bad.numel() // 3] = self.value
            out[self.output] = bad
            self.poisoned += 1
        return out


@pytest.fixture(scope="module")
def fp32_engines(tiny_info):
    from sdfast.engines import load_engines
    from sdfast.model.components import Precision

    return load_engines(tiny_info, "torch", torch.device("cpu"), Precision.FP32)


def last_timestep(tiny_info) -> float:
    from sdfast.schedulers import make_scheduler

    sched = make_scheduler("euler", tiny_info.scheduler_config)
    sched.set_timesteps(STEPS, torch.device("cpu"))
    return float(sched.timesteps[-1])


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["plain", "graphed"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_non_finite_latents_of_each_kind_stop_the_run_naming_the_step(tiny_info, fp32_engines, kind, cuda_graphs):
    from sdfast.errors import NumericalError
    from sdfast.model.components import Precision
    from sdfast.runtime import Pipeline

    # An Euler step turns a noise prediction of +inf into latents of -inf (x0 = x - sigma·eps):
    # poison the last step's prediction with the opposite sign of the latents' kind wanted.
    eps = {"nan": float("nan"), "+inf": float("-inf"), "-inf": float("inf")}[kind]
    t_last = last_timestep(tiny_info)
    spy = Poison(fp32_engines["unet"], "noise_pred", eps, lambda inputs: float(inputs["timestep"][0]) == t_last)
    pipe = Pipeline(tiny_info, {**fp32_engines, "unet": spy}, torch.device("cpu"), Precision.FP32, "torch",
                    cuda_graphs=cuda_graphs)
    seen = []
    with pytest.raises(NumericalError, match=rf"latents became NaN or inf at step {STEPS - 1} of {STEPS}"):
        pipe.generate(PROMPT_NF, steps=STEPS, scheduler="euler", seed=0, guidance_scale=1.0,
                      callback=lambda i, t, lat: seen.append((i, kind_of(lat))))
    assert spy.poisoned >= 1
    assert seen[-1] == (STEPS - 1, {kind})  # the latents really held that kind, and only it
    assert all(not k for _, k in seen[:-1])


@pytest.mark.parametrize("kind", list(KINDS))
def test_non_finite_pixels_of_each_kind_from_an_fp32_decode_are_refused(tiny_info, fp32_engines, kind):
    from sdfast.errors import NumericalError
    from sdfast.model.components import Precision
    from sdfast.runtime import Pipeline

    spy = Poison(fp32_engines["vae_decoder"], "image", KINDS[kind])
    pipe = Pipeline(tiny_info, {**fp32_engines, "vae_decoder": spy}, torch.device("cpu"), Precision.FP32, "torch")
    with pytest.raises(NumericalError, match="vae_decoder: the fp32 decode produced NaN or inf"):
        pipe.generate(PROMPT_NF, steps=1, seed=0)
    assert spy.poisoned == 1


@pytest.fixture(scope="module")
def bf16_pipe(tiny_info):
    return sdfast.load(tiny_info.path, dtype="bf16")


@pytest.mark.parametrize("kind", list(KINDS))
def test_non_finite_pixels_of_each_kind_from_a_bf16_decode_are_redone_in_fp32(tiny_info, tiny_pipe, bf16_pipe,
                                                                                kind, monkeypatch):
    spy = Poison(bf16_pipe.engines["vae_decoder"], "image", KINDS[kind])
    monkeypatch.setitem(bf16_pipe.engines, "vae_decoder", spy)
    out = bf16_pipe.generate(PROMPT_NF, steps=1, seed=0)
    assert spy.poisoned == 1
    got = np.asarray(out.images[0]).astype(int)
    want = np.asarray(tiny_pipe.to_pil(tiny_pipe.decode(out.latents))[0]).astype(int)  # the fp32 VAE's
    assert np.array_equal(got, want)


class FixedDecoder:
    """A stand-in fp32 decoder returning ``image`` whatever the latents."""

    def __init__(self, image: torch.Tensor):
        self.image, self.calls = image, 0

    def __call__(self, **inputs):
        self.calls += 1
        return {"image": self.image}


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_fallback_decode_of_each_non_finite_kind(kind):
    from sdfast.errors import NumericalError
    from sdfast.safety import DecodeFallback

    latent = torch.zeros(1, 4, 8, 8)
    good = torch.full((1, 3, 64, 64), 0.25)
    bad = good.clone()
    bad[0, 1, 5, 7] = KINDS[kind]
    fixed = FixedDecoder(good)
    assert DecodeFallback(lambda: fixed)(good, latent) is good and fixed.calls == 0  # finite: kept, no redo
    assert torch.equal(DecodeFallback(lambda: fixed)(bad, latent), good) and fixed.calls == 1  # redone
    with pytest.raises(NumericalError, match="fp32 decode produced NaN or inf too"):
        DecodeFallback(lambda: FixedDecoder(bad))(bad, latent)  # redone, and broken again
    with pytest.raises(NumericalError, match="no eager fp32 decoder"):
        DecodeFallback(None)(bad, latent)
    with pytest.raises(NumericalError, match="the fp32 decode produced NaN or inf"):
        DecodeFallback(lambda: fixed, enabled=False)(bad, latent)  # the decode was fp32 already


@pytest.mark.parametrize("kind", list(KINDS))
def test_check_finite_reports_the_first_bad_step_from_the_start_step_on(kind):
    from sdfast.errors import NumericalError
    from sdfast.loop import LoopState, guided_step

    class Sched:  # a scheduler whose step returns the latents with one element of `kind` at step 2
        timesteps = torch.tensor([900.0, 600.0, 300.0, 100.0])

        def scale_model_input(self, x, i):
            return x

        def step(self, eps, i, x, noise):
            y = x.clone()
            if i >= 2:
                y[0, 0, 0, 0] = KINDS[kind]
            return y

    from sdfast.safety import check_finite

    s = LoopState.create(torch.zeros(1, 4, 8, 8), {}, [1.0], False, None, 4)
    unet = lambda **inputs: {"noise_pred": torch.zeros_like(inputs["sample"])}  # noqa: E731
    for i in range(1, 4):  # an img2img run starting at step 1
        s.latents = guided_step(unet, Sched(), s, i)
    assert s.finite.tolist() == [True, True, False, False]
    with pytest.raises(NumericalError, match=r"at step 2 of 4 \(timestep 300\)"):
        check_finite(s.finite, 1, Sched.timesteps, "hint")
    check_finite(s.finite[:2], 0, Sched.timesteps, "hint")  # the steps before are fine


# -- OpenVINO: the inference precision hint takes effect ---------------------------------------

@pytest.fixture(scope="module")
def ov_bf16(tiny_info, tmp_path_factory):
    ov = pytest.importorskip("openvino")
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16 units: OpenVINO runs a bf16 hint in f32")
    from sdfast.export.openvino import OpenVinoExportOptions, export_openvino
    from sdfast.model.components import Precision, ShapeProfile

    out = export_openvino(tiny_info, tmp_path_factory.mktemp("ov") / "tiny-bf16", ShapeProfile.static(1, 64, 64),
                          OpenVinoExportOptions(precision=Precision.BF16))
    return sdfast.load(tiny_info.path, backend="openvino", engines=out, dtype="bf16")


def bf16_exact(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float inputs rounded to bf16 values (so a bf16 input port changes nothing)."""
    return {k: v.bfloat16().float() if v.is_floating_point() else v for k, v in inputs.items()}


def test_bf16_openvino_engines_compute_in_bf16_and_the_f32_hint_computes_in_f32(tiny_info, tiny_pipe, ov_bf16):
    import openvino as ov

    from sdfast.engines.openvino import OpenVinoEngine, compile_config
    from sdfast.model.components import ShapeProfile, sample_inputs

    for engine in ov_bf16.engines.values():
        assert engine.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
    for name in ("unet", "vae_decoder"):
        bf16 = ov_bf16.engines[name]
        # The same IR (bf16 ports, fp32 weights) compiled with the f32 hint instead.
        f32 = OpenVinoEngine(bf16.spec, bf16.model, bf16.core, compile_config("f32"), tiny_info, bf16.device,
                             bf16.precision, bf16.profile, bf16.static_shapes)
        inputs = bf16_exact(sample_inputs(tiny_info.specs[name], tiny_info, ShapeProfile.static(1, 64, 64)))
        (key,) = bf16.spec.output_names
        ref = tiny_pipe.engines[name](**inputs)[key]  # eager fp32
        got_f32, got_bf16 = f32(**inputs)[key], bf16(**inputs)[key]
        assert f32.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
        # f32 compute: the eager result up to the bf16 output port's rounding (half a bf16 ulp).
        assert bool(((got_f32 - ref).abs() <= ref.abs() * 2.0**-8 + 1e-5).all()), name
        # bf16 compute: errors far beyond that rounding, yet still close to eager fp32.
        err = (got_bf16 - ref).abs()
        assert torch.isfinite(got_bf16).all()
        assert float((err > ref.abs() * 2.0**-8 + 1e-5).float().mean()) > 0.05, name
        assert float(err.max()) > 4 * float((got_f32 - ref).abs().max()), name
        cos = torch.nn.functional.cosine_similarity(got_bf16.flatten(), ref.flatten(), dim=0)
        assert float(cos) > 0.999, name


def test_bf16_openvino_images_stay_within_the_reduced_precision_tier(tiny_pipe, ov_bf16):
    from sdfast.measure.parity import FP16_MIN_PSNR, image_metrics

    kw = dict(steps=4, seed=0, scheduler="euler", height=64, width=64)
    ref, out = tiny_pipe.generate("a red circle", **kw), ov_bf16.generate("a red circle", **kw)
    assert torch.isfinite(out.latents).all()
    m = image_metrics(np.asarray(ref.images[0])[None], np.asarray(out.images[0])[None])
    assert FP16_MIN_PSNR <= m["psnr_db"] < 100 and m["max_pixel"] > 0  # close, and not the f32 result
