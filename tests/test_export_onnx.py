"""ONNX export of the tiny model and the ONNX Runtime engines against eager fp32."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch

import sdfast
from sdfast.artifacts import read_manifest
from sdfast.errors import InvalidArgument
from sdfast.measure.parity import component_parity
from sdfast.model.components import SPECS, Precision, ShapeProfile, sample_inputs, size_multiple

IMAGE_ATOL = 2  # of 255: docs/architecture.md's end-to-end bound for fp32 engines


@pytest.fixture(scope="module")
def ort_pipe(tiny_info, onnx_dynamic):
    return sdfast.load(tiny_info.path, backend="onnxruntime", engines=onnx_dynamic)


def assert_engines_match(ref, out) -> None:
    """DESIGN's end-to-end bounds for exported fp32 engines against eager: latents <= 1e-4
    relative to their largest magnitude, pixels <= 2/255 max and <= 1/255 mean."""
    err = (ref.latents - out.latents).abs().max().item()
    assert err <= 1e-4 * ref.latents.abs().max().item(), err
    pix = np.abs(np.stack([np.asarray(i) for i in ref.images]).astype(int)
                 - np.stack([np.asarray(i) for i in out.images]).astype(int))
    assert pix.max() <= IMAGE_ATOL and pix.mean() <= 1.0


def test_profile_dims_cover_guided_and_unguided_unet_batch(tiny_info):
    p = ShapeProfile(1, 1, 2, 64, 64, 128, 64, 64, 96)
    dims = p.component_dims(SPECS["unet"], tiny_info)
    assert dims["B"] == (1, 2, 4)  # images 1..2 → U-Net 1 (unguided) .. 4 (guided)
    assert dims["h"] == (8, 8, 16) and dims["w"] == (8, 8, 12)
    assert p.component_dims(SPECS["vae_decoder"], tiny_info)["B"] == (1, 1, 2)
    assert p.shapes(SPECS["vae_decoder"], tiny_info, "outputs")["image"][2] == (2, 3, 128, 96)
    static = ShapeProfile.static(1, 64, 64)
    # Only dims whose range is open stay symbolic in the graph.
    assert static.dynamic_axes(SPECS["vae_decoder"], tiny_info) == {}
    assert static.dynamic_axes(SPECS["unet"], tiny_info)["sample"] == {0: "B"}
    with pytest.raises(InvalidArgument, match="multiple of 16"):
        ShapeProfile.static(1, 72, 64).validate(tiny_info)
    assert size_multiple(tiny_info) == 16


def test_export_writes_checked_optimized_graphs_and_manifest(tiny_info, onnx_dynamic):
    m = read_manifest(onnx_dynamic)
    assert m.format == "onnx" and m.model["fingerprint"] == tiny_info.fingerprint
    assert set(m.components) == set(SPECS) and all(m.precision(c) is Precision.FP32 for c in SPECS)
    assert m.profile.max_height == 128 and m.versions["onnxruntime"] and m.versions["torch"]
    for name in SPECS:
        path = m.file(onnx_dynamic, name)
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path), load_external_data=False)
        assert model.opset_import[0].version >= 17
        ops = {n.op_type for n in model.graph.node}
        if name == "unet":
            # Plain attention for TensorRT's fMHA / ORT's attention fusion (see export/onnx.py).
            assert {"MatMul", "Softmax", "InstanceNormalization", "LayerNormalization"} <= ops
        inputs = [i.name for i in model.graph.input]
        assert inputs == SPECS[name].input_names
    assert json.loads((onnx_dynamic / "manifest.json").read_text())["format_version"] == 1


def test_every_component_within_tier1_tolerance(tiny_pipe, ort_pipe, onnx_dynamic):
    m = read_manifest(onnx_dynamic)
    rows = component_parity(tiny_pipe, ort_pipe, m.profile, {c: m.precision(c) for c in SPECS})
    for r in rows:
        print(r.name, r.metrics["max_abs"], r.limit)
    assert len(rows) == 6 and all(r.passed for r in rows)


@pytest.mark.parametrize("scheduler", ["lms", "dpmpp_2m"])
def test_pipeline_on_onnxruntime_matches_eager(tiny_pipe, ort_pipe, scheduler):
    kw = dict(steps=6, seed=5, scheduler=scheduler)
    ref = tiny_pipe.generate("a red circle on a blue background", **kw)
    out = ort_pipe.generate("a red circle on a blue background", **kw)
    assert_engines_match(ref, out)


@pytest.mark.parametrize("case", [dict(height=128, width=96), dict(prompt=["a red circle", "a yellow square"]),
                                  dict(guidance_scale=1.0)], ids=["128x96", "batch-2", "unguided"])
def test_dynamic_export_serves_sizes_and_batches(tiny_pipe, ort_pipe, case):
    kw = dict(prompt="a blue triangle", steps=4, seed=2, scheduler="euler") | case
    ref, out = tiny_pipe.generate(**kw), ort_pipe.generate(**kw)
    assert out.latents.shape == ref.latents.shape
    assert_engines_match(ref, out)


def test_engine_outputs_are_fresh_tensors(ort_pipe, tiny_info):
    engine = ort_pipe.engines["vae_decoder"]
    x = sample_inputs(engine.spec, tiny_info, engine.profile)
    first = engine(**x)["image"]
    kept = first.clone()
    engine(latent=torch.randn_like(x["latent"]))
    assert torch.equal(first, kept) and first.dtype == torch.float32


@pytest.mark.parametrize("req,flag", [
    (dict(height=192), "--max-height 192"),
    (dict(width=64, height=64, prompt=["a", "b", "c"]), "--max-batch 3"),
])
def test_request_outside_profile_is_refused_before_any_work(ort_pipe, req, flag, monkeypatch):
    calls = []
    monkeypatch.setattr(type(ort_pipe.engines["text_encoder"]), "__call__", lambda *a, **k: calls.append(1))
    prompt = req.pop("prompt", "x")
    with pytest.raises(InvalidArgument, match="outside the exported profile") as e:
        ort_pipe.generate(prompt, steps=2, **req)
    assert flag in str(e.value) and "batch 1..2" in str(e.value) and not calls


def test_side_off_the_unet_grid_is_refused(ort_pipe):
    with pytest.raises(InvalidArgument, match="multiples of 16"):
        ort_pipe.generate("x", height=72, width=64, steps=2)


def test_cli_refuses_out_of_profile_request_with_exit_2(tiny_info, onnx_dynamic, tmp_path, capsys):
    from sdfast.cli import main

    out = tmp_path / "o.png"
    rc = main(["generate", "x", "--model", str(tiny_info.path), "--backend", "onnxruntime",
               "--engines", str(onnx_dynamic), "--height", "256", "--steps", "2", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--max-height 256" in err[0] and not out.exists()


def test_fp16_export_runs_on_cpu_provider(tiny_pipe, tiny_info, onnx_fp16, caplog):
    m = read_manifest(onnx_fp16)
    assert m.precision("unet") is Precision.FP16 and m.precision("text_encoder") is Precision.FP16
    assert m.precision("vae_decoder") is Precision.FP32  # kept fp32 unless --vae-precision fp16
    unet = onnx.load(str(m.file(onnx_fp16, "unet")), load_external_data=False)
    assert unet.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    pipe = sdfast.load(tiny_info.path, backend="onnxruntime", engines=onnx_fp16, dtype="fp16")
    kw = dict(steps=4, seed=0, scheduler="euler")
    ref, out = tiny_pipe.generate("a red circle", **kw), pipe.generate("a red circle", **kw)
    assert torch.isfinite(out.latents).all()
    # the one PSNR that sdfast parity and the device check use
    from sdfast.measure.parity import FP16_MIN_PSNR, image_metrics

    m = image_metrics(np.asarray(ref.images[0])[None], np.asarray(out.images[0])[None])
    assert m["psnr_db"] >= FP16_MIN_PSNR  # DESIGN tier 3 bound
    with pytest.raises(InvalidArgument, match="--dtype fp16"):
        sdfast.load(tiny_info.path, backend="onnxruntime", engines=onnx_fp16, dtype="fp32")


def test_cli_export_forced_external_data_loads_after_moving(tiny_pipe, tiny_info, tmp_path, capsys):
    from sdfast.cli import main

    first = tmp_path / "first"
    rc = main(["export", "--model", str(tiny_info.path), "--out", str(first), "--format", "onnx",
               "--precision", "fp32", "--height", "64", "--width", "64", "--batch", "1", "--external-data"])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    m = read_manifest(first)
    assert all((first / f"{c}.onnx.data").is_file() for c in SPECS)
    assert "--external-data" in m.export_command and m.profile.is_static
    # The .onnx files hold only the graph: the weights live in the .data files.
    unet = m.file(first, "unet")
    assert unet.stat().st_size < (first / "unet.onnx.data").stat().st_size / 2
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(first, moved)
    pipe = sdfast.load(tiny_info.path, backend="onnxruntime", engines=moved)
    kw = dict(steps=4, seed=1, scheduler="ddim")
    assert_engines_match(tiny_pipe.generate("a square", **kw), pipe.generate("a square", **kw))


def test_cli_export_rejects_bad_profile_with_exit_2(tiny_info, tmp_path, capsys):
    from sdfast.cli import main

    rc = main(["export", "--model", str(tiny_info.path), "--out", str(tmp_path / "x"), "--height", "128",
               "--max-height", "96"])
    assert rc == 2 and "--max-height" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_onnx_runtime_never_imports_diffusers(tiny_info, onnx_dynamic):
    code = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(1)
        import sdfast
        p = sdfast.load({str(tiny_info.path)!r}, backend="onnxruntime", engines={str(onnx_dynamic)!r})
        out = p.generate("a red circle", steps=2)
        assert out.images[0].size == (64, 64)
        assert "diffusers" not in sys.modules, "diffusers was imported"
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("ok")


def test_export_prints_no_torch_constant_folding_warnings(tiny_info, tmp_path, recwarn):
    # The VAE encoder's strided slices made the tracer warn once per op.
    import warnings

    from sdfast.export.onnx import export_onnx

    warnings.simplefilter("always")
    export_onnx(tiny_info, tmp_path / "e", ShapeProfile.static(1, 64, 64), components=("vae_encoder",))
    noise = [str(w.message)[:80] for w in recwarn if issubclass(w.category, UserWarning)]
    assert noise == []
