"""LoRA slots: ONNX Runtime and OpenVINO engines exported with ``--lora-rank R`` take a
LoRA set as inputs, so ``set_loras`` swaps without re-export. Held to the eager pipeline with the
same set (tier 1), A -> B -> A and the return to the base exact on the engines, and every set that
does not fit the slots refused in one line with the set before kept."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from lora_files import make_lora, sd_layers
from PIL import Image
from safetensors.torch import save_file
from test_pipeline_parity import LATENT_RTOL

import sdfast
from sdfast.cli import main
from sdfast.errors import ArtifactMismatch, InvalidArgument
from sdfast.lora_slots import MAX_RANK, check_rank, is_slot
from sdfast.model.components import ShapeProfile

pytest.importorskip("onnxruntime")

RANK = 8
PROFILE = ShapeProfile.static(1, 64, 64)
KW = dict(steps=3, seed=5, scheduler="euler", height=64, width=64)
PROMPT = "a red circle on a blue background"
#: slot layers of every kind: attention linears (both levels), a feed-forward linear, the 1x1
#: proj_in convolution of the tiny U-Net, the text encoder's first layer
LAYERS = sd_layers(conv=False) + [("unet", "down_blocks.0.attentions.0.proj_in")]


@pytest.fixture(scope="module")
def eager(tiny_info):
    return sdfast.load(tiny_info.path)


@pytest.fixture(scope="module")
def loras(eager, tmp_path_factory):
    d = tmp_path_factory.mktemp("slot-loras")
    mods = eager._lora_modules()
    return {"a": make_lora(d / "a.safetensors", mods, LAYERS, "kohya", seed=41, rank=4),
            "b": make_lora(d / "b.safetensors", mods, LAYERS, "peft", seed=42, rank=4, alpha=None),
            "c": make_lora(d / "c.safetensors", mods, LAYERS, "diffusers", seed=43, rank=4),
            "resnet": make_lora(d / "resnet.safetensors", mods, sd_layers(conv=True), "kohya", seed=44, rank=2)}


@pytest.fixture(scope="module")
def slot_exports(tiny_info, tmp_path_factory):
    from sdfast.export.onnx import OnnxExportOptions, export_onnx

    d = tmp_path_factory.mktemp("slot-engines")
    out = {"onnxruntime": export_onnx(tiny_info, d / "onnx", PROFILE, OnnxExportOptions(lora_rank=RANK))}
    try:
        from sdfast.export.openvino import OpenVinoExportOptions, export_openvino
    except ImportError:  # pragma: no cover
        return out
    out["openvino"] = export_openvino(tiny_info, d / "ov", PROFILE, OpenVinoExportOptions(lora_rank=RANK))
    return out


@pytest.fixture(params=["onnxruntime", "openvino"])
def engines(request, tiny_info, slot_exports):
    if request.param not in slot_exports:  # pragma: no cover
        pytest.skip("openvino is not installed")
    return sdfast.load(tiny_info.path, backend=request.param, engines_dir=slot_exports[request.param])


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= LATENT_RTOL * b.abs().max().item()


def latents(pipe, loras=None) -> torch.Tensor:
    return pipe.generate(PROMPT, loras=loras, **KW).latents


def test_slot_engines_with_a_set_equal_eager_with_that_set(engines, tiny_info, loras):
    base = latents(sdfast.load(tiny_info.path))
    assert close(latents(engines), base)  # zero slots: the base model
    for pair in ([(loras["a"], 0.7)], [(loras["a"], 0.7), (loras["b"], -1.5)]):
        want = latents(sdfast.load(tiny_info.path, loras=pair))
        engines.set_loras(pair)
        got = engines.generate(PROMPT, **KW)
        assert close(got.latents, want) and not close(got.latents, base)
        assert [r["name"] for r in got.loras] == [p.stem for p, _ in pair]
        assert [r["scale"] for r in got.loras] == [s for _, s in pair]


def test_the_scale_reaches_the_slots(engines, tiny_info, loras):
    for scale in (0.3, 2.0):
        want = latents(sdfast.load(tiny_info.path, loras=[(loras["a"], scale)]))
        assert close(latents(engines, [(loras["a"], scale)]), want)


def test_a_then_b_then_a_and_the_base_again_are_exact(engines, loras):
    base = latents(engines)
    a = latents(engines, [(loras["a"], 1.0)])
    b = latents(engines, [(loras["b"], 1.0)])
    assert not close(a, b)
    assert torch.equal(latents(engines, [(loras["a"], 1.0)]), a)
    engines.set_loras([])
    assert engines.loras == () and torch.equal(latents(engines), base)


def test_the_full_rank_fits_and_one_more_is_refused_keeping_the_set(engines, tiny_info, loras):
    two = [(loras["a"], 1.0), (loras["b"], 1.0)]  # 4 + 4 = RANK at every layer: fits
    engines.set_loras(two)
    before = latents(engines)
    assert close(before, latents(sdfast.load(tiny_info.path, loras=two)))
    with pytest.raises(InvalidArgument) as e:
        engines.set_loras([*two, (loras["c"], 1.0)])  # 12 > 8
    msg = str(e.value)
    assert "\n" not in msg and "needs rank 12 at" in msg and "--lora-rank 8" in msg and "--lora-rank 12 or more" in msg
    assert [lo.file.path.stem for lo in engines.loras] == ["a", "b"] and torch.equal(latents(engines), before)


def test_a_lora_on_a_layer_without_a_slot_is_refused_keeping_the_set(engines, loras):
    engines.set_loras([(loras["a"], 1.0)])
    before = latents(engines)
    for call in (engines.check_loras, engines.set_loras):
        with pytest.raises(InvalidArgument) as e:
            call([(loras["resnet"], 1.0)])
        msg = str(e.value)
        assert "\n" not in msg and "no LoRA slot" in msg and "down_blocks_0_resnets_0_conv1" in msg
        assert "sdfast export --lora" in msg
    assert [lo.file.path.stem for lo in engines.loras] == ["a"] and torch.equal(latents(engines), before)


def test_a_lora_of_another_width_is_refused(engines, loras, tmp_path):
    bad = tmp_path / "wide.safetensors"
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    w = engines._lora_target().engines["unet"].lora_slots
    (slot,) = [s for s in w.slots if s.name == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    save_file({f"{stem}.lora_down.weight": torch.zeros(2, slot.fan_in + 1),
               f"{stem}.lora_up.weight": torch.zeros(slot.fan_out, 2)}, str(bad))
    with pytest.raises(InvalidArgument, match="does not fit the model's weight"):
        engines.set_loras([bad])
    assert engines.loras == ()


def test_the_manifest_lists_every_slot_layer(tiny_info, slot_exports, eager):
    for fmt, folder in slot_exports.items():
        m = json.loads((folder / "manifest.json").read_text())
        assert f"--lora-rank {RANK}" in m["export_command"], fmt
        assert "lora_slots" not in m["components"]["vae_decoder"]
        for component, group in (("unet", "unet"), ("text_encoder", "text_encoder")):
            rec = m["components"][component]["lora_slots"]
            module = eager._lora_modules()[group]
            want = [n for n, mod in module.named_modules() if is_slot(group, n, mod)]
            assert rec["rank"] == RANK and [row[0] for row in rec["layers"]] == want
            assert len(want) > 6


def _edited(folder, tmp_path, edit):
    out = tmp_path / folder.name
    shutil.copytree(folder, out)
    m = json.loads((out / "manifest.json").read_text())
    edit(m["components"]["unet"])
    (out / "manifest.json").write_text(json.dumps(m))
    return out


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.pop("lora_slots"), "inputs"),
    (lambda c: c["lora_slots"].update(rank=4), r"the manifest's slot is float32 \[4, "),
    (lambda c: c["lora_slots"]["layers"].pop(), "LoRA slots"),
    (lambda c: c["lora_slots"].update(rank=0), "not a slot table"),
    (lambda c: c["lora_slots"].update(group="text_encoder"), "lora_slots are for text_encoder"),
])
def test_an_engine_file_whose_slots_differ_from_the_manifest_is_refused(tiny_info, slot_exports, tmp_path, edit,
                                                                        message):
    for backend, folder in slot_exports.items():
        with pytest.raises(ArtifactMismatch, match=message) as e:
            sdfast.load(tiny_info.path, backend=backend, engines_dir=_edited(folder, tmp_path / backend, edit))
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("value,ok", [(0, True), (1, True), (MAX_RANK, True), (-1, False), (MAX_RANK + 1, False),
                                      (True, False), (1.5, False), ("8", False)])
def test_slot_rank_bounds(value, ok):
    if ok:
        assert check_rank(value) == value
    else:
        with pytest.raises(InvalidArgument, match="lora_rank: .* is not a slot rank"):
            check_rank(value)


@pytest.mark.parametrize("extra,message", [
    (["--format", "inductor", "--lora-rank", "8"], "--lora-rank: LoRA slots are built for --format onnx or openvino"),
    (["--lora-rank", "513"], "--lora-rank: 513 is not a slot rank"),
    (["--lora-rank", "-1"], "--lora-rank: -1 is not a slot rank"),
])
def test_cli_export_refuses_bad_slot_flags_before_any_work(tiny_info, tmp_path, capsys, extra, message):
    out = tmp_path / "engines"
    assert main(["export", "--model", str(tiny_info.path), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


def test_cli_generate_swaps_a_set_onto_slot_engines(tiny_info, slot_exports, loras, tmp_path, capsys):
    png = tmp_path / "o.png"
    assert main(["generate", PROMPT, "--model", str(tiny_info.path), "--engines", str(slot_exports["onnxruntime"]),
                 "--steps", "2", "--out", str(png), "--lora", f"{loras['a']}:0.7"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("lora: a at scale 0.7 (kohya")
    assert json.loads(Image.open(png).info["loras"])[0]["scale"] == 0.7
    assert main(["generate", PROMPT, "--model", str(tiny_info.path), "--engines", str(slot_exports["onnxruntime"]),
                 "--steps", "2", "--out", str(tmp_path / "p.png"), "--lora", str(loras["resnet"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no LoRA slot" in err[0]
    assert not (tmp_path / "p.png").exists()


def test_the_server_swaps_request_sets_on_slot_engines(tiny_info, slot_exports, loras, tmp_path):
    pytest.importorskip("fastapi")
    import numpy as np
    from test_serve import client, generate, serving
    from test_serve_lora import pixels, png_meta

    folder = tmp_path / "served"
    folder.mkdir()
    for name in ("a", "b"):
        shutil.copy(loras[name], folder / f"style-{name}.safetensors")
    pipe = sdfast.load(tiny_info.path, backend="onnxruntime", engines_dir=slot_exports["onnxruntime"])
    with serving(pipe, lora_dir=str(folder), batch_invariance="allow") as (url, _):
        c = client(url)
        got = {name: generate(c, seed=4, **({"loras": v} if v else {}))
               for name, v in (("base", None), ("a", "style-a:0.7"), ("ab", "style-a:0.7,style-b"), ("base2", None))}
    from test_serve import STEPS

    for name, lo in (("base", []), ("a", [(folder / "style-a.safetensors", 0.7)]),
                     ("ab", [(folder / "style-a.safetensors", 0.7), (folder / "style-b.safetensors", 1.0)]),
                     ("base2", [])):
        want = pipe.generate("a red circle", seed=4, steps=STEPS, loras=lo)
        assert np.array_equal(pixels(got[name]), np.asarray(want.images[0])), name
        assert png_meta(got[name]).get("loras") == (want.loras or None), name
    assert not np.array_equal(pixels(got["base"]), pixels(got["a"]))
    assert np.array_equal(pixels(got["base"]), pixels(got["base2"]))
