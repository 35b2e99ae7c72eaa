"""LoRA on exported engines: `sdfast export --lora` fuses the set into the exported
weights and the manifest records it (name, sha256, scale); the engines then equal the eager
pipeline with the same set (tier 1) and load only with that set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lora_files import make_lora, sd_layers
from PIL import Image
from test_pipeline_parity import LATENT_RTOL

import sdfast
from sdfast.cli import main
from sdfast.errors import ArtifactMismatch
from sdfast.model.components import ShapeProfile

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def lora_path(tiny_info, tmp_path_factory):
    pipe = sdfast.load(tiny_info.path)
    return make_lora(tmp_path_factory.mktemp("lx") / "style.safetensors", pipe._lora_modules(), sd_layers(), "kohya",
                     seed=41)


@pytest.fixture(scope="module")
def fused_onnx(tiny_info, lora_path, tmp_path_factory):
    from sdfast.export.onnx import export_onnx

    return export_onnx(tiny_info.with_loras([(lora_path, 0.7)]), tmp_path_factory.mktemp("onnx") / "fused",
                       ShapeProfile.static(1, 64, 64))


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= LATENT_RTOL * b.abs().max().item()


def test_fused_onnx_engines_equal_eager_with_the_same_lora(tiny_info, lora_path, fused_onnx):
    eager = sdfast.load(tiny_info.path, loras=[(lora_path, 0.7)])
    ort = sdfast.load(tiny_info.with_loras([(lora_path, 0.7)]), backend="onnxruntime", engines_dir=fused_onnx)
    kw = dict(steps=4, seed=6, scheduler="euler")
    want, got = eager.generate("a red cube", **kw), ort.generate("a red cube", **kw)
    assert close(got.latents, want.latents)
    base = sdfast.load(tiny_info.path).generate("a red cube", **kw)
    assert not close(got.latents, base.latents)  # the LoRA is in the exported weights
    assert got.loras == want.loras == [{"name": "style", "sha256": want.loras[0]["sha256"], "scale": 0.7,
                                        "format": "kohya"}]


def test_the_manifest_records_the_set_and_its_rebuild_command(fused_onnx, lora_path):
    m = json.loads((fused_onnx / "manifest.json").read_text())
    (record,) = m["model"]["loras"]
    assert record["name"] == "style" and record["scale"] == 0.7 and len(record["sha256"]) == 64
    assert f"--lora {lora_path}:0.7" in m["export_command"]


@pytest.mark.parametrize("asked,message", [
    ([], r"exported with LoRAs style:0\.7 .* asks for none"),
    ([0.5], r"exported with LoRAs style:0\.7 .* asks for style:0\.5"),
])
def test_fused_engines_load_only_with_their_set(tiny_info, lora_path, fused_onnx, asked, message):
    info = tiny_info.with_loras([(lora_path, s) for s in asked])
    with pytest.raises(ArtifactMismatch, match=message) as e:
        sdfast.load(info, backend="onnxruntime", engines_dir=fused_onnx)
    assert "\n" not in str(e.value) and "export again" in str(e.value)


def test_base_engines_refuse_a_lora_set(tiny_info, lora_path, onnx_dynamic):
    with pytest.raises(ArtifactMismatch, match=r"exported with LoRAs none .* asks for style:0\.7"):
        sdfast.load(tiny_info.with_loras([(lora_path, 0.7)]), backend="onnxruntime", engines_dir=onnx_dynamic)


def test_cli_generate_with_fused_engines(tiny_info, lora_path, fused_onnx, tmp_path, capsys):
    png = tmp_path / "o.png"
    assert main(["generate", "a", "cat", "--model", str(tiny_info.path), "--engines", str(fused_onnx), "--steps", "2",
                 "--out", str(png), "--lora", f"{lora_path}:0.7"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("lora: style at scale 0.7 (kohya")
    assert json.loads(Image.open(png).info["loras"])[0]["sha256"] == json.loads(
        (fused_onnx / "manifest.json").read_text())["model"]["loras"][0]["sha256"]
    assert main(["generate", "a", "--model", str(tiny_info.path), "--engines", str(fused_onnx), "--steps", "2",
                 "--out", str(tmp_path / "p.png"), "--lora", f"{lora_path}:0.6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "asks for style:0.6" in err[0]
    assert not (tmp_path / "p.png").exists()


def test_cli_export_and_generate_with_a_fused_lora(tiny_info, lora_path, tmp_path, capsys):
    out = tmp_path / "engines"
    assert main(["export", "--model", str(tiny_info.path), "--out", str(out), "--format", "openvino",
                 "--lora", f"{lora_path}:0.7"]) == 0
    png = tmp_path / "o.png"
    assert main(["generate", "a", "cat", "--model", str(tiny_info.path), "--engines", str(out), "--steps", "2",
                 "--out", str(png), "--lora", f"{lora_path}:0.7"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("lora: style at scale 0.7 (kohya")
    assert json.loads(Image.open(png).info["loras"])[0]["scale"] == 0.7
    want = sdfast.load(tiny_info.path, loras=[(lora_path, 0.7)]).generate("a cat", steps=2)
    got = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert np.abs(got - np.asarray(want.images[0]).astype(int)).max() <= 2  # tier 1 pixels: OpenVINO vs eager
    assert main(["generate", "a", "--model", str(tiny_info.path), "--engines", str(out), "--steps", "2",
                 "--out", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exported with LoRAs style:0.7" in err[0]
    assert not (tmp_path / "p.png").exists()
