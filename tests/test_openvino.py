"""OpenVINO export of the tiny model and the OpenVINO engines against eager fp32.

One fp32 export with a bounded profile serves the fast tests (export, load, tier 1, the
pipeline, profile checks, refusal of tampered or foreign IR); the bf16 / toy-model tiers are in
tests/test_openvino_toy.py (slow).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

import sdfast  # noqa: E402
from sdfast.artifacts import Manifest, package_version, read_manifest  # noqa: E402
from sdfast.errors import ArtifactMismatch, InvalidArgument  # noqa: E402
from sdfast.measure.parity import FP32_COMPONENT_ATOL, FP32_MAX_PIXEL, component_parity  # noqa: E402
from sdfast.model.components import SPECS, Precision, ShapeProfile, sample_inputs  # noqa: E402

PROFILE = ShapeProfile(1, 1, 2, 64, 64, 128, 64, 64, 96)


@pytest.fixture(scope="module")
def ov_fp32(tiny_info, tmp_path_factory):
    """fp32 OpenVINO export of the tiny model serving batch 1..2, height 64..128, width 64..96."""
    from sdfast.export.openvino import export_openvino

    return export_openvino(tiny_info, tmp_path_factory.mktemp("ov") / "tiny-fp32", PROFILE)


@pytest.fixture(scope="module")
def ov_pipe(tiny_info, ov_fp32):
    return sdfast.load(tiny_info.path, backend="openvino", engines=ov_fp32)


def copy_export(src, tmp_path):
    dest = tmp_path / "copy"
    shutil.copytree(src, dest)
    return dest


def reseal(root) -> None:
    """Rewrite the manifest's hashes over what is in ``root`` now (a forger's fixed hash)."""
    m = read_manifest(root)
    Manifest(format=m.format, model=m.model, profile=m.profile, components=m.components, versions=m.versions,
             export_command=m.export_command).seal(root)


def test_export_writes_ir_with_the_spec_names_and_profile_bounds(tiny_info, ov_fp32):
    import openvino as ov

    m = read_manifest(ov_fp32)
    assert m.format == "openvino" and m.model["fingerprint"] == tiny_info.fingerprint
    assert m.versions["openvino"] == package_version("openvino") is not None
    assert all(m.precision(c) is Precision.FP32 for c in SPECS)
    for name, spec in SPECS.items():
        assert f"{name}.xml" in m.files and f"{name}.bin" in m.files  # weights hashed too
        model = ov.Core().read_model(str(m.file(ov_fp32, name)))
        assert [sorted(p.get_names())[0] for p in model.inputs] == spec.input_names
        assert [sorted(p.get_names())[0] for p in model.outputs] == spec.output_names
    unet = ov.Core().read_model(str(m.file(ov_fp32, "unet")))
    sample = unet.input("sample").get_partial_shape()
    # Guided and unguided batch 1..4, latent sides 64/8..128/8 and 64/8..96/8; channels static.
    assert (sample[0].get_min_length(), sample[0].get_max_length()) == (1, 4)
    assert sample[1].is_static and sample[1].get_length() == tiny_info.latent_channels
    assert (sample[2].get_min_length(), sample[2].get_max_length()) == (8, 16)
    assert (sample[3].get_min_length(), sample[3].get_max_length()) == (8, 12)
    assert unet.input("timestep").get_partial_shape().is_static


def test_every_component_within_tier1_tolerance(tiny_pipe, ov_pipe):
    rows = component_parity(tiny_pipe, ov_pipe, PROFILE, {c: Precision.FP32 for c in SPECS})
    for r in rows:
        print(r.name, r.metrics["max_abs"], r.limit)
    assert len(rows) == 6 and all(r.passed for r in rows)
    assert all(r.metrics["max_abs"] <= FP32_COMPONENT_ATOL[r.name.split()[0]] for r in rows)


def test_fp32_engines_compile_in_f32_although_the_plugin_defaults_to_bf16(ov_pipe):
    import openvino as ov

    # On AMX / AVX512-BF16 CPUs the CPU plugin's default inference precision is bf16; an fp32
    # export that did not ask for f32 would silently run bf16 (and fail tier 1).
    for engine in ov_pipe.engines.values():
        assert engine.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
        assert engine.compiled.get_property("NUM_STREAMS") == 1


@pytest.mark.parametrize("size", [(64, 64), (128, 96)])
def test_pipeline_on_openvino_matches_eager(tiny_pipe, ov_pipe, size):
    h, w = size
    kw = dict(steps=5, seed=3, scheduler="euler", height=h, width=w)
    ref, out = tiny_pipe.generate("a red circle", **kw), ov_pipe.generate("a red circle", **kw)
    px = np.abs(np.asarray(ref.images[0]).astype(int) - np.asarray(out.images[0]).astype(int)).max()
    err = (ref.latents - out.latents).abs().max().item()
    print(f"{h}x{w}: latents max abs {err:.3g}, max pixel {px}")
    assert err <= 1e-4 * max(1.0, ref.latents.abs().max().item()) and px <= FP32_MAX_PIXEL


def test_a_returned_tensor_is_not_overwritten_by_the_next_call(tiny_info, ov_pipe):
    engine = ov_pipe.engines["unet"]
    a = sample_inputs(SPECS["unet"], tiny_info, PROFILE, which=1, seed=0)
    b = sample_inputs(SPECS["unet"], tiny_info, PROFILE, which=1, seed=1)
    first = engine(**a)["noise_pred"]
    kept = first.clone()
    engine(**b)
    assert torch.equal(first, kept)


def test_requests_outside_the_profile_are_refused_before_any_engine_runs(ov_pipe):
    with pytest.raises(InvalidArgument, match="outside the exported profile"):
        ov_pipe.generate("a red circle", steps=2, height=160, width=64)
    with pytest.raises(InvalidArgument, match="outside the exported profile"):
        ov_pipe.generate(["a", "b", "c"], steps=2, height=64, width=64)


def test_dtype_other_than_the_export_is_refused(tiny_info, ov_fp32):
    with pytest.raises(InvalidArgument, match="--dtype fp32"):
        sdfast.load(tiny_info.path, backend="openvino", engines=ov_fp32, dtype="bf16")


def test_flipped_weight_byte_is_refused(tiny_info, ov_fp32, tmp_path):
    root = copy_export(ov_fp32, tmp_path)
    data = bytearray((root / "unet.bin").read_bytes())
    data[len(data) // 2] ^= 0x01
    (root / "unet.bin").write_bytes(bytes(data))
    with pytest.raises(ArtifactMismatch, match="unet.bin does not match its sha256"):
        sdfast.load(tiny_info.path, backend="openvino", engines=root)


def test_swapped_ir_under_a_recomputed_hash_is_refused(tiny_info, ov_fp32, tmp_path):
    root = copy_export(ov_fp32, tmp_path)
    for ext in ("xml", "bin"):
        shutil.copy(root / f"vae_encoder.{ext}", root / f"vae_decoder.{ext}")
    reseal(root)
    with pytest.raises(ArtifactMismatch, match="vae_decoder.xml has inputs"):
        sdfast.load(tiny_info.path, backend="openvino", engines=root)


def test_widened_profile_in_the_manifest_is_refused(tiny_info, ov_fp32, tmp_path):
    root = copy_export(ov_fp32, tmp_path)
    d = json.loads((root / "manifest.json").read_text())
    d["profile"]["max_height"] = 160  # the IR's intervals still end at 128
    (root / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactMismatch, match="spans 8..16 on axis 2 but the manifest's profile spans 8..20"):
        sdfast.load(tiny_info.path, backend="openvino", engines=root)


def test_edited_precision_in_the_manifest_is_refused(tiny_info, ov_fp32, tmp_path):
    root = copy_export(ov_fp32, tmp_path)
    d = json.loads((root / "manifest.json").read_text())
    for comp in d["components"].values():
        comp["precision"] = "bf16"
    (root / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactMismatch, match="is float32 but the manifest says bfloat16"):
        sdfast.load(tiny_info.path, backend="openvino", engines=root, dtype="bf16")


def test_other_model_and_other_format_are_refused(tiny_info, ov_fp32, onnx_dynamic, tmp_path):
    with pytest.raises(ArtifactMismatch, match="holds openvino artifacts, not onnx"):
        sdfast.load(tiny_info.path, backend="onnxruntime", engines=ov_fp32)
    with pytest.raises(ArtifactMismatch, match="holds onnx artifacts, not openvino"):
        sdfast.load(tiny_info.path, backend="openvino", engines=onnx_dynamic)
    root = copy_export(ov_fp32, tmp_path)
    d = json.loads((root / "manifest.json").read_text())
    d["model"]["fingerprint"] = "0" * 64
    (root / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactMismatch, match="exported from a different model"):
        sdfast.load(tiny_info.path, backend="openvino", engines=root)


def test_missing_engines_and_gpu_device_are_one_line_errors(tiny_info, ov_fp32):
    with pytest.raises(InvalidArgument, match="--format openvino"):
        sdfast.load(tiny_info.path, backend="openvino")
    from sdfast.engines.openvino import load

    with pytest.raises(InvalidArgument, match="runs on the CPU"):
        load(tiny_info, torch.device("cuda"), Precision.FP32, str(ov_fp32))


def test_export_refuses_fp16_in_one_line(tiny_info, tmp_path):
    from sdfast.export.openvino import OpenVinoExportOptions, export_openvino

    with pytest.raises(InvalidArgument, match="fp32 or bf16"):
        export_openvino(tiny_info, tmp_path / "x", PROFILE, OpenVinoExportOptions(precision=Precision.FP16))
    assert not (tmp_path / "x").exists()
    out = subprocess.run([sys.executable, "-m", "sdfast.cli", "export", "--model", str(tiny_info.path), "--out",
                          str(tmp_path / "y"), "--format", "openvino", "--precision", "fp16"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "fp32 or bf16" in out.stderr
    assert not (tmp_path / "y").exists()


def test_cpu_settings_follow_torch_threads_and_the_pinning_switch(monkeypatch):
    from sdfast.engines.openvino import compile_config

    monkeypatch.delenv("SDFAST_OV_PINNING", raising=False)
    cfg = compile_config("bf16", threads=3)
    assert cfg["INFERENCE_NUM_THREADS"] == 3 and cfg["PERFORMANCE_HINT"] == "LATENCY" and cfg["NUM_STREAMS"] == "1"
    assert cfg["INFERENCE_PRECISION_HINT"] == "bf16" and cfg["ENABLE_CPU_PINNING"] is False
    monkeypatch.setenv("SDFAST_OV_PINNING", "1")
    assert compile_config("f32")["ENABLE_CPU_PINNING"] is True
    assert compile_config("f32")["INFERENCE_NUM_THREADS"] == torch.get_num_threads()


def test_loading_the_openvino_backend_imports_no_diffusers():
    code = "import sys, sdfast.engines.openvino, sdfast.runtime; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_each_shape_compiles_static_until_the_limit_then_the_interval_model_serves(tiny_info, tiny_pipe, ov_fp32):
    from sdfast.engines.openvino import load

    engine = load(tiny_info, torch.device("cpu"), Precision.FP32, str(ov_fp32), static_shapes=2)["unet"]
    tuned = next(iter(engine._requests))  # compiled on load: the guided batch at the tuned size
    assert tuned[0] == (2, tiny_info.latent_channels, 8, 8)
    g = torch.Generator().manual_seed(0)
    for b, h, w in ((1, 8, 8), (4, 16, 12), (2, 12, 8)):  # unguided, biggest, a third shape
        x = dict(sample=torch.randn(b, tiny_info.latent_channels, h, w, generator=g), timestep=torch.tensor([500.0]),
                 encoder_hidden_states=torch.randn(b, tiny_info.max_tokens, tiny_info.text_hidden_size, generator=g))
        err = (engine(**x)["noise_pred"] - tiny_pipe.engines["unet"](**x)["noise_pred"]).abs().max().item()
        assert err <= FP32_COMPONENT_ATOL["unet"]
    assert set(engine._requests) == {tuned, ((1, tiny_info.latent_channels, 8, 8), (1,), (1, tiny_info.max_tokens, tiny_info.text_hidden_size))}
    assert engine._dynamic is not None  # the two shapes past the limit ran on the interval model
    assert engine._dynamic.get_compiled_model().input("sample").get_partial_shape().is_dynamic


def test_sdfast_parity_passes_every_tier_on_openvino_fp32(tiny_info, ov_fp32):
    from sdfast.measure.parity import run_parity

    report = run_parity(str(tiny_info.path), "openvino", engines=str(ov_fp32), steps=4)
    print(report.table())
    assert report.passed and len(report.rows) == 8  # 6 component rows, 2 schedulers end to end
