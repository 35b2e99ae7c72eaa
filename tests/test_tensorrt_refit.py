"""Issue 28: LoRA on TensorRT plans built with ``--refit``, against a fake ``tensorrt`` (tests/fake_tensorrt.py).

The export runs for real up to TensorRT (the tiny model's ONNX export, the refit table, the base
weights file, the manifest); the builder, runtime and refitter are the fake's, which records every
build flag and refit. What is checked: only the LoRA components are built refittable; a set refits
exactly its layers' weights, each equal to the torch backend's fused weight (lora.FusedLoras:
diffusers' fuse_lora arithmetic); A -> B -> A leaves exactly A and [] exactly the base; a refit
that fails midway is refitted back; LoRAs that do not fit are refused before any refit.
UNVERIFIED on a GPU: the real TensorRT refitter has never run this code.
"""

from __future__ import annotations

import json
import sys

import fake_tensorrt
import numpy as np
import pytest
import torch
from lora_files import make_lora, sd_layers
from safetensors.torch import save_file

from sdfast import artifacts as mf
from sdfast.engines.tensorrt import open_plans
from sdfast.errors import ArtifactMismatch, InvalidArgument
from sdfast.lora import GROUPS, FusedLoras, as_loras
from sdfast.lora_refit import RefitLoras, RefitTable
from sdfast.model.components import COMPONENT_MODULE, ShapeProfile
from sdfast.model.info import load_torch_modules

PROFILE = ShapeProfile(1, 1, 2, 64, 64, 128, 64, 64, 96)  # conftest's onnx_dynamic serves it
#: U-Net layers of a second LoRA: some of sd_layers()' (a subset of A's) and one A does not touch
B_LAYERS = [("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
            ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v")]


@pytest.fixture(scope="module")
def trt():
    return fake_tensorrt.make_module()


def _export(info, onnx_dir, out, trt, refit, profile=PROFILE, precision=mf.Precision.FP32):
    from sdfast.export import tensorrt as ex

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "tensorrt", trt)
        mp.setattr(ex, "gpu_record", lambda *a: {"gpu": "fake", "compute_capability": "9.0"})
        return ex.export_tensorrt(info, out, profile, ex.TensorRTBuildOptions(
            precision=precision, onnx_dir=str(onnx_dir), timing_cache=str(out.parent / "timing.cache"),
            refit=refit))


@pytest.fixture(scope="module")
def plans(tiny_info, onnx_dynamic, tmp_path_factory, trt):
    d = tmp_path_factory.mktemp("trt-refit")
    n = len(trt.builds)
    refit = _export(tiny_info, onnx_dynamic, d / "refit", trt, refit=True)
    flags = {name: b["flags"] for name, b in zip(tiny_info.specs, trt.builds[n:], strict=True)}
    return {"refit": refit, "frozen": _export(tiny_info, onnx_dynamic, d / "frozen", trt, refit=False),
            "flags": flags}


def _open(info, root, trt, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    m = mf.load_manifest(root, info, "tensorrt")
    engines = open_plans(info, root, m, "export again", torch.device("cpu"),
                         streams=lambda: fake_tensorrt.FakeStreams(trt.events))
    return {COMPONENT_MODULE[n]: e for n, e in engines.items() if COMPONENT_MODULE[n] in GROUPS}


@pytest.fixture
def engines(tiny_info, plans, trt, monkeypatch):
    return _open(tiny_info, plans["refit"], trt, monkeypatch)


@pytest.fixture(scope="module")
def torch_mods(tiny_info):
    return load_torch_modules(tiny_info, parts=("text_encoder", "unet"))


@pytest.fixture(scope="module")
def files(torch_mods, tmp_path_factory):
    d = tmp_path_factory.mktemp("refit-loras")
    return {"a": make_lora(d / "a.safetensors", torch_mods, sd_layers(), "kohya", seed=61),
            "b": make_lora(d / "b.safetensors", torch_mods, B_LAYERS, "peft", seed=62, alpha=None),
            "c": make_lora(d / "c.safetensors", torch_mods, sd_layers(conv=False), "diffusers", seed=63)}


def held(engines) -> dict[str, dict[str, np.ndarray]]:
    return {g: {n: a.copy() for n, a in e.cuda_engine.weights.items()} for g, e in engines.items()}


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(x.keys() == y.keys() and all(np.array_equal(x[n], y[n]) for n in x)
                                        for x, y in ((a[g], b[g]) for g in a))


def torch_fused(tiny_info, files, items, dtype=torch.float32) -> dict[str, dict[str, torch.Tensor]]:
    """Each group's weights fused by the torch backend's FusedLoras (the reference), by layer."""
    mods = load_torch_modules(tiny_info, dtype=dtype, parts=("text_encoder", "unet"))
    FusedLoras(mods, tiny_info.family).set(as_loras([(files[k], s) for k, s in items]))
    return {g: {n[: -len(".weight")]: p.detach() for n, p in m.named_parameters()} for g, m in mods.items()}


def test_refit_export_builds_the_lora_components_refittable_and_maps_every_layer(tiny_info, plans, torch_mods):
    assert {n for n, f in plans["flags"].items() if "REFIT" in f} == {"text_encoder", "unet"}
    m = json.loads((plans["refit"] / "manifest.json").read_text())
    assert "--refit" in m["export_command"]
    assert "refit" not in m["components"]["vae_decoder"] and "weights" not in m["components"]["vae_decoder"]
    for name, group in (("unet", "unet"), ("text_encoder", "text_encoder")):
        rec = m["components"][name]
        assert rec["weights"] == f"{name}.refit.safetensors" and rec["weights"] in m["files"]  # hashed
        table = RefitTable.from_record(rec["refit"], name)
        want = [n for n, mod in torch_mods[group].named_modules() if isinstance(mod, (torch.nn.Linear,
                                                                                      torch.nn.Conv2d))]
        assert [x.name for x in table.layers] == want
        from safetensors.torch import load_file

        base = load_file(str(plans["refit"] / rec["weights"]))
        for x in table.layers:  # each row names the initializer that holds exactly that weight
            w = torch_mods[group].get_submodule(x.name).weight.detach()
            assert torch.equal(base[x.weight], w.T if x.transposed else w), x
        assert any(x.transposed for x in table.layers)  # MatMul weights: the exporter renamed them
    frozen = json.loads((plans["frozen"] / "manifest.json").read_text())
    assert all("refit" not in c for c in frozen["components"].values()) and "--refit" not in frozen["export_command"]


def test_a_set_refits_exactly_its_layers_with_the_torch_backends_fused_weights(tiny_info, engines, files, trt):
    before = held(engines)
    trt.events.clear()
    pipe = RefitLoras(engines, tiny_info.family)
    pipe.set(as_loras([(files["a"], 0.7), (files["c"], -0.4)]))
    ref = torch_fused(tiny_info, files, [("a", 0.7), ("c", -0.4)])
    touched = {g: set() for g in GROUPS}
    for group, name in sd_layers() + sd_layers(conv=False):
        touched[group].add(name.removeprefix("text_model.") if group != "unet" else name)
    for group, e in engines.items():
        layers = {x.name.removeprefix("text_model."): x for x in e.refit.layers}
        (call,) = e.cuda_engine.refits
        assert set(call) == {layers[n].weight for n in touched[group]}  # only what the set touches
        for n in touched[group]:
            x = layers[n]
            got = torch.from_numpy(e.cuda_engine.weights[x.weight])
            want = ref[group][n] if n in ref[group] else ref[group]["text_model." + n]
            assert torch.equal(got, want.T if x.transposed else want), n
            assert not np.array_equal(e.cuda_engine.weights[x.weight], before[group][x.weight])
        untouched = set(e.cuda_engine.weights) - set(call)
        assert all(np.array_equal(e.cuda_engine.weights[n], before[group][n]) for n in untouched)
    assert trt.events == ["synchronize", "refit"] * 2  # each engine's stream drained before its refit


def test_a_to_b_to_a_is_exactly_a_and_the_empty_set_exactly_the_base(tiny_info, engines, files):
    base = held(engines)
    pipe = RefitLoras(engines, tiny_info.family)
    pipe.set(as_loras([(files["a"], 0.8)]))
    with_a = held(engines)
    pipe.set(as_loras([(files["b"], 1.0)]))
    unet = engines["unet"]
    names = {x.name: x.weight for x in unet.refit.layers}
    # B touches fewer layers: A's others get their base bytes back, B's are computed from the base
    only_a = names["down_blocks.0.resnets.0.conv1"]
    assert np.array_equal(unet.cuda_engine.weights[only_a], base["unet"][only_a])
    te = engines["text_encoder"].cuda_engine  # B has no text-encoder layer: A's there all get their base back
    assert set(te.refits[-1]) == set(te.refits[0]) and same({"t": te.weights}, {"t": base["text_encoder"]})
    pipe.set(as_loras([(files["a"], 0.8)]))
    assert same(held(engines), with_a)  # exact, no blend of A and B
    pipe.set([])
    assert same(held(engines), base) and pipe.active == ()
    assert not same(with_a, base)


def test_a_refit_that_fails_midway_is_refitted_back_to_the_set_before(tiny_info, engines, files):
    pipe = RefitLoras(engines, tiny_info.family)
    pipe.set(as_loras([(files["a"], 1.0)]))
    with_a = held(engines)
    engines["unet"].cuda_engine.fail_refit = 1  # the second engine: the text encoder's refit already took
    with pytest.raises(RuntimeError) as e:
        pipe.set(as_loras([(files["c"], 0.5)]))
    assert "could not refit the unet" in str(e.value) and "refitted back" in str(e.value)
    assert "\n" not in str(e.value)
    assert same(held(engines), with_a) and [lo.file.path.stem for lo in pipe.active] == ["a"]
    engines["unet"].cuda_engine.fail_refit = 2  # and its refit back fails too: say so, never claim the set before
    with pytest.raises(RuntimeError, match="could not refit the unet back .* load the pipeline again"):
        pipe.set(as_loras([(files["c"], 0.5)]))


def test_weights_optimized_together_are_supplied_from_the_base(tiny_info, engines, files):
    unet = engines["unet"]
    w = {x.name: x.weight for x in unet.refit.layers}["down_blocks.0.attentions.0.proj_in"]
    bias = next(n for n in unet.cuda_engine.weights if "proj_in.bias" in n and "down_blocks.0.attentions.0" in n)
    unet.cuda_engine.partners = {w: [bias]}
    pipe = RefitLoras(engines, tiny_info.family)
    pipe.set(as_loras([(files["a"], 1.0)]))
    assert bias in unet.cuda_engine.refits[-1] and np.array_equal(unet.cuda_engine.refits[-1][bias], unet.cuda_engine.built[bias])
    unet.cuda_engine.partners = {w: ["not.in.the.base.file"]}
    before = held(engines)
    with pytest.raises(RuntimeError, match="also needs weight 'not.in.the.base.file'.*; the LoRA set before was "
                       "refitted back$"):
        pipe.set(as_loras([(files["a"], 0.5)]))
    assert same(held(engines), before) and pipe.active[0].scale == 1.0


def test_loras_that_do_not_fit_are_refused_before_any_refit(tiny_info, engines, files, torch_mods, tmp_path):
    pipe = RefitLoras(engines, tiny_info.family)
    pipe.set(as_loras([(files["a"], 1.0)]))
    with_a, calls = held(engines), {g: len(e.cuda_engine.refits) for g, e in engines.items()}
    wide = tmp_path / "wide.safetensors"
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    fan_in = torch_mods["unet"].get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").in_features
    save_file({f"{stem}.lora_down.weight": torch.zeros(2, fan_in + 1),
               f"{stem}.lora_up.weight": torch.zeros(fan_in, 2)}, str(wide))
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(37, 2)}, str(sdxl))
    unet = engines["unet"]
    gone = "down_blocks.0.resnets.0.conv1"  # as if the export had found no initializer for it
    unet.refit = RefitTable("unet", tuple(x for x in unet.refit.layers if x.name != gone))
    for path, message in ((wide, "does not fit the model's weight"), (sdxl, "is for SDXL"),
                          (files["a"], "cannot refit (first: 'down_blocks_0_resnets_0_conv1'")):
        for call in (pipe.check, pipe.set):
            with pytest.raises(InvalidArgument, match=message.replace("(", r"\(")) as e:
                call(as_loras([path]))
            assert "\n" not in str(e.value)
    assert same(held(engines), with_a) and [lo.file.path.stem for lo in pipe.active] == ["a"]
    assert {g: len(e.cuda_engine.refits) for g, e in engines.items()} == calls


def test_plans_built_without_refit_have_no_table_and_refuse_a_refit(tiny_info, plans, trt, monkeypatch):
    frozen = _open(tiny_info, plans["frozen"], trt, monkeypatch)
    assert all(e.refit is None and e.refit_base is None for e in frozen.values())
    with pytest.raises(InvalidArgument) as err:  # what set_loras says on these plans
        RefitLoras.of(frozen, tiny_info.family)
    assert "\n" not in str(err.value) and "built without --refit" in str(err.value)
    assert "sdfast export --format tensorrt --refit" in str(err.value)
    assert isinstance(RefitLoras.of(_open(tiny_info, plans["refit"], trt, monkeypatch), tiny_info.family), RefitLoras)
    e = frozen["unet"]
    name = next(iter(e.cuda_engine.weights))
    with pytest.raises(RuntimeError, match=f"refused weight {name!r}"):
        e.refit_weights({name: torch.from_numpy(e.cuda_engine.weights[name])}, lambda n: None)


def test_a_changed_base_weights_file_or_refit_table_is_refused(tiny_info, plans, trt, monkeypatch, tmp_path):
    import shutil

    root = tmp_path / "p"
    shutil.copytree(plans["refit"], root)
    m = json.loads((root / "manifest.json").read_text())
    rows = m["components"]["unet"]["refit"]["layers"]
    rows[0][3] = [rows[0][3][0] + 1, *rows[0][3][1:]]
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactMismatch, match="which the manifest's refit table gives layer"):
        _open(tiny_info, root, trt, monkeypatch)
    m["components"]["unet"]["refit"]["group"] = "vae"
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactMismatch, match="not a refit table"):
        _open(tiny_info, root, trt, monkeypatch)
    shutil.rmtree(root)
    shutil.copytree(plans["refit"], root)
    data = bytearray((root / "unet.refit.safetensors").read_bytes())
    data[-1] ^= 1
    (root / "unet.refit.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactMismatch, match="unet.refit.safetensors does not match its sha256"):
        _open(tiny_info, root, trt, monkeypatch)


def test_fp16_plans_refit_torchs_fp16_fused_weights_and_return_to_their_own(tiny_info, onnx_fp16, files, trt,
                                                                             tmp_path, monkeypatch):
    root = _export(tiny_info, onnx_fp16, tmp_path / "fp16", trt, refit=True, profile=ShapeProfile.static(1, 64, 64),
                   precision=mf.Precision.FP16)
    engines = _open(tiny_info, root, trt, monkeypatch)
    base = held(engines)
    assert base["unet"][engines["unet"].refit.layers[0].weight].dtype == np.float16
    pipe = RefitLoras(engines, tiny_info.family)
    pipe.set(as_loras([(files["a"], 0.9)]))
    ref = torch_fused(tiny_info, files, [("a", 0.9)], dtype=torch.float16)
    x = {x.name: x for x in engines["unet"].refit.layers}["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    got = torch.from_numpy(engines["unet"].cuda_engine.weights[x.weight])
    want = ref["unet"][x.name]
    assert got.dtype == torch.float16 and torch.equal(got, want.T if x.transposed else want)
    pipe.set([])
    assert same(held(engines), base)
