"""Issue 3: the TensorRT path's GPU-free logic (profiles, buffers, manifest checks).

The build and the engine themselves need TensorRT and a GPU; those tests are marked
``tensorrt`` and skip here with the reason. Everything TensorRT-related is unverified on a GPU.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from sdfast import artifacts as mf
from sdfast.artifacts import Manifest, model_record, tensor_records
from sdfast.components import SPECS, Precision, ShapeProfile
from sdfast.engines.tensorrt import allocate_buffers, buffer_shapes
from sdfast.errors import ArtifactMismatch, InvalidArgument
from sdfast.export.tensorrt import onnx_covers, profile_triples

HAS_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
PROFILE = ShapeProfile(1, 1, 2, 64, 64, 128, 64, 64, 96)


def test_profile_triples_are_min_opt_max_input_shapes(tiny_info):
    t = profile_triples(tiny_info, PROFILE, "unet")
    assert t["sample"] == ((1, 4, 8, 8), (2, 4, 8, 8), (4, 4, 16, 12))
    assert t["timestep"] == ((1,), (1,), (1,))
    assert t["encoder_hidden_states"] == ((1, 77, 32), (2, 77, 32), (4, 77, 32))
    assert profile_triples(tiny_info, PROFILE, "text_encoder")["input_ids"][2] == (4, 77)
    assert profile_triples(tiny_info, PROFILE, "vae_encoder")["image"] == ((1, 3, 64, 64), (1, 3, 64, 64),
                                                                         (2, 3, 128, 96))
    static = profile_triples(tiny_info, ShapeProfile.static(1, 64, 64), "vae_decoder")["latent"]
    assert static[0] == static[1] == static[2] == (1, 4, 8, 8)


def test_buffers_are_sized_for_the_profile_max(tiny_info):
    comp = tensor_records("vae_decoder", PROFILE, tiny_info)
    assert buffer_shapes(comp) == {"latent": (2, 4, 16, 12), "image": (2, 3, 128, 96)}
    bufs = allocate_buffers(comp, {"latent": torch.float16, "image": torch.float32}, torch.device("cpu"))
    assert bufs["image"].numel() == 2 * 3 * 128 * 96 and bufs["latent"].dtype == torch.float16
    # A smaller call takes a view of the buffer's front: same storage, no reallocation.
    view = bufs["image"][: 1 * 3 * 64 * 64].view(1, 3, 64, 64)
    assert view.data_ptr() == bufs["image"].data_ptr()


def test_onnx_export_must_cover_the_tensorrt_profile():
    assert onnx_covers(PROFILE, ShapeProfile.static(2, 128, 96)) == []
    assert onnx_covers(ShapeProfile.static(1, 64, 64), PROFILE) == [
        "batch 1..2 is outside the ONNX export's 1..1", "height 64..128 is outside the ONNX export's 64..64",
        "width 64..96 is outside the ONNX export's 64..64"]


def fake_plan_dir(tmp_path, info, trt_version="10.3.0", gpu="NVIDIA H100 80GB HBM3", cc="9.0"):
    root = tmp_path / "plans"
    root.mkdir()
    comps = {}
    for name in SPECS:
        (root / f"{name}.plan").write_bytes(b"not a real plan " + name.encode())
        comps[name] = {"file": f"{name}.plan", "precision": "fp16", **tensor_records(name, PROFILE, info)}
    m = Manifest(format="tensorrt", model=model_record(info), profile=PROFILE, components=comps,
                 device={"gpu": gpu, "compute_capability": cc},
                 export_command=mf.export_command("tiny-random", root, "tensorrt", "fp16", PROFILE))
    m.versions["tensorrt"] = trt_version
    m.seal(root)
    return root


def test_plans_from_another_tensorrt_version_are_refused(tiny_info, tmp_path, monkeypatch):
    root = fake_plan_dir(tmp_path, tiny_info)
    monkeypatch.setattr(mf, "package_version", lambda m: "10.9.0" if m == "tensorrt" else None)
    with pytest.raises(ArtifactMismatch, match="built with TensorRT 10.3.0 but TensorRT 10.9.0") as e:
        mf.load_manifest(root, tiny_info, "tensorrt", device={"gpu": "NVIDIA H100 80GB HBM3",
                                                              "compute_capability": "9.0"})
    assert "sdfast export --model" in str(e.value) and "--format tensorrt" in str(e.value)


def test_plans_for_another_gpu_are_refused(tiny_info, tmp_path, monkeypatch):
    root = fake_plan_dir(tmp_path, tiny_info)
    monkeypatch.setattr(mf, "package_version", lambda m: "10.3.0" if m == "tensorrt" else None)
    m = mf.load_manifest(root, tiny_info, "tensorrt", device={"gpu": "NVIDIA H100 80GB HBM3",
                                                              "compute_capability": "9.0"})
    assert m.precision("unet") is Precision.FP16 and m.device["compute_capability"] == "9.0"
    with pytest.raises(ArtifactMismatch, match="built for GPU 'NVIDIA H100 80GB HBM3' .* 'NVIDIA L4'"):
        mf.load_manifest(root, tiny_info, "tensorrt", device={"gpu": "NVIDIA L4", "compute_capability": "8.9"})
    (root / "unet.plan").write_bytes(b"tampered")
    with pytest.raises(ArtifactMismatch, match="unet.plan has 8 bytes"):
        mf.load_manifest(root, tiny_info, "tensorrt", device={"gpu": "NVIDIA H100 80GB HBM3",
                                                              "compute_capability": "9.0"})
    assert json.loads((root / "manifest.json").read_text())["device"]["gpu"] == "NVIDIA H100 80GB HBM3"


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_tensorrt_export_without_tensorrt_says_how_to_get_it(tiny_info, tmp_path):
    from sdfast.export.tensorrt import export_tensorrt

    with pytest.raises(InvalidArgument, match="needs the tensorrt Python package"):
        export_tensorrt(tiny_info, tmp_path / "x", ShapeProfile.static(1, 64, 64))
    assert not (tmp_path / "x").exists()


def test_tensorrt_backend_refuses_cpu_device(tiny_info, tmp_path):
    from sdfast.engines.tensorrt import load

    with pytest.raises(InvalidArgument, match="--device cuda"):
        load(tiny_info, torch.device("cpu"), Precision.FP16, engines=str(tmp_path))


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT and a CUDA GPU (neither exists on CPU CI)")
def test_tensorrt_fp16_engines_match_eager(tiny_info, tiny_pipe, tmp_path):
    import sdfast
    from sdfast.export.tensorrt import TensorRTBuildOptions, export_tensorrt
    from sdfast.parity import end_to_end_parity

    out = export_tensorrt(tiny_info, tmp_path / "trt", PROFILE, TensorRTBuildOptions(precision=Precision.FP16))
    pipe = sdfast.load(tiny_info.path, backend="tensorrt", device="cuda", dtype="fp16", engines=out)
    rows = end_to_end_parity(tiny_pipe, pipe, PROFILE, Precision.FP16, ("lms",), steps=8)
    assert all(r.passed for r in rows), rows
