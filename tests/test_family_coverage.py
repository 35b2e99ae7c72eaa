"""Every model family (SD 1.x, SD 2.x v-prediction, SDXL, LCM) and every component of each
(``components.FAMILY_SPECS``, the LCM U-Net with its guidance input): the CUDA-graph runner's
static-buffer logic (graphs.py, run uncaptured on the CPU as in test_graphs.py) handles it, and
artifact verification (artifacts.py) refuses a changed, truncated, missing or unlisted file of
it. Tiny models with real weights for the graph runner; cheap fake export folders (random bytes
sealed by a manifest) for verification, which checks bytes, never parses them."""

from __future__ import annotations

import json
import random
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import sdfast
from sdfast.artifacts import MANIFEST, Manifest, load_manifest, model_record, tensor_records
from sdfast.engines import load_engines
from sdfast.errors import ArtifactMismatch
from sdfast.graphs import GraphedEngine, GraphRunner
from sdfast.model.components import FAMILY_SPECS, Precision, ShapeProfile, sample_inputs
from sdfast.model.info import ModelInfo, load_tokenizer
from sdfast.runtime import Pipeline

#: test family -> its components.FAMILY_SPECS key
FAMILIES = {"sd1": "sd", "sd2-v": "sd", "sdxl": "sdxl", "lcm": "sd"}
CASES = [pytest.param(f, c, id=f"{f}-{c}") for f, key in FAMILIES.items() for c in FAMILY_SPECS[key]]
CPU = torch.device("cpu")
STEPS = 3


# -- the tiny models of each family ------------------------------------------------------------

def _sd2_v_folder(tiny_info, dest):
    """The tiny SD with SD 2.1 768's conventions: a DDIM v-prediction scheduler, and OpenCLIP's
    "!" padding (id 0) instead of <|endoftext|>."""
    shutil.copytree(tiny_info.path, dest)
    cfg = dest / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "_class_name": "DDIMScheduler",
                               "prediction_type": "v_prediction", "timestep_spacing": "leading", "steps_offset": 1}))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        p = dest / "tokenizer" / name
        if p.is_file():
            p.write_text(json.dumps({**json.loads(p.read_text()), "pad_token": "!"}))
    return dest


@pytest.fixture(scope="module")
def infos(tiny_info, tmp_path_factory):
    from sdfast.model.info import TOKENIZER_DIR, resolve_model
    from sdfast.model.random_models import build_tiny_sdxl

    root = tmp_path_factory.mktemp("families")
    return {
        "sd1": tiny_info,
        "sd2-v": ModelInfo.from_folder(_sd2_v_folder(tiny_info, root / "tiny-sd2-v")),
        "sdxl": ModelInfo.from_folder(build_tiny_sdxl(root / "tiny-sdxl", TOKENIZER_DIR)),
        "lcm": resolve_model("tiny-random-lcm"),
    }


@pytest.fixture(scope="module")
def engines(infos):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_engines(infos[family], "torch", CPU, Precision.FP32)
        return cache[family]

    return get


def pipelines(infos, engines, family):
    """(plain, graphed) pipelines on the same engines; the graphed one fresh (no graphs yet)."""
    info, eng = infos[family], engines(family)
    return (Pipeline(info, eng, CPU, Precision.FP32, "torch"),
            Pipeline(info, eng, CPU, Precision.FP32, "torch", cuda_graphs=True))


def test_the_families_are_what_the_cases_cover(infos):
    for family, key in FAMILIES.items():
        info = infos[family]
        assert info.family == key and list(info.specs) == list(FAMILY_SPECS[key]), family
    assert infos["sd2-v"].scheduler_config["prediction_type"] == "v_prediction"
    assert load_tokenizer(infos["sd2-v"]).pad_token_id == 0  # "!"
    assert "timestep_cond" in infos["lcm"].specs["unet"].input_names
    assert infos["sdxl"].specs["unet"].input_names[-2:] == ["text_embeds", "time_ids"]


# -- the graph runner ---------------------------------------------------------------------------

@pytest.mark.parametrize(("family", "component"), CASES)
def test_a_graphed_engine_of_every_component_returns_what_the_engine_computes(infos, engines, family, component):
    """GraphedEngine's static input buffers, one graph per input signature, and copy-out, on each
    component (the text encoders' one or two outputs, the U-Net's family-specific inputs)."""
    info, eng = infos[family], engines(family)
    spec, engine = info.specs[component], eng[component]
    runner = GraphRunner(eng["unet"], CPU, False, info.scheduler_config)
    graphed = runner.wrap(engine)
    assert isinstance(graphed, GraphedEngine) and graphed.spec == spec
    profile = ShapeProfile(1, 1, 2, 64, 64, 64, 64, 64, 64)
    outs = []
    with torch.no_grad():
        for which, seed in ((0, 1), (2, 2), (0, 3)):  # min shape, max shape, min shape again (its graph)
            x = sample_inputs(spec, info, profile, which, seed=seed)
            want, got = engine(**x), graphed(**x)
            assert sorted(got) == sorted(spec.output_names)
            for name in spec.output_names:
                assert torch.equal(got[name], want[name]), (which, name)
            outs.append({k: v.clone() for k, v in got.items()} | {"_got": got})
    assert len(graphed._graphs) == 2  # one per input shape
    first, _, third = outs
    for name in spec.output_names:  # same shape, new inputs: not the first call's (stale) outputs
        assert not torch.equal(first[name], third[name]), name
        assert torch.equal(first["_got"][name], first[name]), name  # the caller's tensors were not overwritten


def _init_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def _two_runs(info, component: str) -> list[dict]:
    """Two requests of one shape that differ in what reaches ``component`` (and only there)."""
    sdxl = info.family == "sdxl"
    base = dict(prompt="a red circle", steps=STEPS, guidance_scale=6.0, seed=4) | ({"prompt_2": "blue sky"} if sdxl else {})
    change = {
        "text_encoder": [{"prompt": "a red circle"}, {"prompt": "a green square"}],
        "text_encoder_2": [{"prompt_2": "blue sky"}, {"prompt_2": "white triangle"}],
        "unet": [{"guidance_scale": 3.0}, {"guidance_scale": 8.0}],
        "vae_decoder": [{"seed": 1}, {"seed": 2}],
        "vae_encoder": [{"image": _init_image(1), "strength": 0.7, "steps": 4},
                        {"image": _init_image(2), "strength": 0.7, "steps": 4}],
    }[component]
    if sdxl and component == "unet":  # the size conditioning (time_ids) changes too
        change = [change[0] | {"original_size": (64, 64)}, change[1] | {"original_size": (96, 48)}]
    return [base | c for c in change]


@pytest.mark.parametrize(("family", "component"), CASES)
def test_the_graphed_pipeline_equals_the_plain_one_for_every_component(infos, engines, family, component):
    info = infos[family]
    plain, graphed = pipelines(infos, engines, family)
    outs = []
    for kw in _two_runs(info, component):
        ref, out = plain.generate(**kw), graphed.generate(**kw)
        assert torch.equal(out.latents, ref.latents), kw  # one guided_step serves both loops
        assert [im.tobytes() for im in out.images] == [im.tobytes() for im in ref.images]
        outs.append(out.latents)
    assert not torch.equal(outs[0], outs[1])  # the change reached the result: staleness would show
    spec = info.specs[component]
    if spec.rows == "guided":  # the U-Net: inside the one captured step, every conditioning input static
        assert graphed.graphs.mode == "uncaptured" and len(graphed.graphs._steps) == 1
        (key,) = graphed.graphs._steps
        assert {name for name, _ in key.cond} == set(spec.input_names) - {"sample", "timestep"}
    elif spec.graphed:
        engine = graphed.engines[component]
        assert isinstance(engine, GraphedEngine) and not engine.failed
        (sig,) = engine._graphs  # the second run replayed the first one's graph with new inputs
        assert [name for name, _, _ in sig] == sorted(spec.input_names)
    else:
        assert graphed.engines[component] is plain.engines[component]  # called as it is


def _long(n: int) -> str:
    return " ".join("abcdefghijklmnopqrstuvwxyz"[i % 26] for i in range(n))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_graphed_loop_serves_one_and_two_chunk_prompts_on_one_image_shape(infos, engines, family):
    info = infos[family]
    plain, graphed = pipelines(infos, engines, family)
    text = "prompt_2" if info.family == "sdxl" else "prompt"  # SDXL: the second tokenizer's text is long
    runs = [{"prompt": "a red circle"}, {"prompt": "a red circle"} | {text: _long(90)},
            {"prompt": "a red circle"} | {text: _long(100)}]
    for kw in runs:
        kw.update(steps=STEPS, guidance_scale=5.0, seed=3, long_prompt="chunk")
        ref, out = plain.generate(**kw), graphed.generate(**kw)
        assert torch.equal(out.latents, ref.latents)
    lengths = sorted(dict(key.cond)["encoder_hidden_states"][1] for key in graphed.graphs._steps)
    assert lengths == [77, 154]  # one static step per text length, the two long prompts share one


# -- artifact verification ------------------------------------------------------------------------

#: layout -> (format, graph file suffix, weight file suffix, the manifest field naming the weights)
LAYOUTS = {"onnx": ("onnx", ".onnx", ".onnx.data", None), "openvino": ("openvino", ".xml", ".bin", "weights")}


def fake_export(info: ModelInfo, root, layout: str = "onnx"):
    """A sealed export folder of ``info``'s components whose files are random bytes."""
    fmt, graph, weights, field = LAYOUTS[layout]
    root.mkdir()
    rng = random.Random(0)
    profile = ShapeProfile.static(1, 64, 64)
    comps = {}
    for c in info.specs:
        (root / f"{c}{graph}").write_bytes(rng.randbytes(300))
        (root / f"{c}{weights}").write_bytes(rng.randbytes(2000))
        comps[c] = {"file": f"{c}{graph}", "precision": "fp32", **tensor_records(c, profile, info)}
        if field:
            comps[c][field] = f"{c}{weights}"
    Manifest(format=fmt, model=model_record(info), profile=profile, components=comps).seal(root)
    return root


def edit_manifest(root, edit) -> None:
    d = json.loads((root / MANIFEST).read_text())
    edit(d)
    (root / MANIFEST).write_text(json.dumps(d))


def flip_one_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the hash tells
    path.write_bytes(bytes(data))


def file_of(component: str, kind: str, layout: str = "onnx") -> str:
    _, graph, weights, _ = LAYOUTS[layout]
    return component + (graph if kind == "graph" else weights)


def refused(info, root, pattern: str, layout: str = "onnx"):
    with pytest.raises(ArtifactMismatch, match=pattern) as e:
        load_manifest(root, info, LAYOUTS[layout][0])
    assert "rebuild with: sdfast export" in str(e.value)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_an_untouched_fake_export_of_every_family_verifies(infos, family, layout, tmp_path):
    root = fake_export(infos[family], tmp_path / "engines", layout)
    m = load_manifest(root, infos[family], LAYOUTS[layout][0])
    assert sorted(m.components) == sorted(infos[family].specs)
    assert len(m.files) == 2 * len(infos[family].specs)


@pytest.mark.parametrize("kind", ["graph", "weights"])
@pytest.mark.parametrize(("family", "component"), CASES)
def test_a_changed_byte_in_any_file_of_any_component_is_refused(infos, family, component, kind, tmp_path):
    root = fake_export(infos[family], tmp_path / "engines")
    rel = file_of(component, kind)
    flip_one_byte(root / rel)
    refused(infos[family], root, rf"{re.escape(str(root / rel))} does not match its sha256")


@pytest.mark.parametrize(("family", "component"), CASES)
def test_a_truncated_file_of_any_component_is_refused(infos, family, component, tmp_path):
    root = fake_export(infos[family], tmp_path / "engines")
    rel = file_of(component, "weights")
    (root / rel).write_bytes((root / rel).read_bytes()[:100])
    refused(infos[family], root, rf"{re.escape(str(root / rel))} has 100 bytes but the manifest says 2000")


@pytest.mark.parametrize("kind", ["graph", "weights"])
@pytest.mark.parametrize(("family", "component"), CASES)
def test_a_listed_file_of_any_component_that_is_missing_is_refused(infos, family, component, kind, tmp_path):
    root = fake_export(infos[family], tmp_path / "engines")
    rel = file_of(component, kind)
    (root / rel).unlink()
    refused(infos[family], root, rf"{re.escape(str(root / rel))} is listed in the manifest but missing")


@pytest.mark.parametrize(("family", "component"), CASES)
def test_a_component_file_on_disk_but_not_in_the_manifests_files_is_refused(infos, family, component, tmp_path):
    root = fake_export(infos[family], tmp_path / "engines")
    rel = file_of(component, "graph")
    edit_manifest(root, lambda d: d["files"].pop(rel))
    flip_one_byte(root / rel)  # nothing vouches for these bytes now
    refused(infos[family], root, rf"lists no hash for {re.escape(rel)}")


@pytest.mark.parametrize(("family", "component"), CASES)
def test_a_component_absent_from_the_manifest_is_refused(infos, family, component, tmp_path):
    root = fake_export(infos[family], tmp_path / "engines")
    edit_manifest(root, lambda d: d["components"].pop(component))
    refused(infos[family], root, rf"lacks component\(s\) {component};")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(("family", "component"), CASES)
def test_a_weight_file_on_disk_but_not_in_the_manifests_files_is_refused(infos, family, component, layout,
                                                                          tmp_path):
    root = fake_export(infos[family], tmp_path / "engines", layout)
    rel = file_of(component, "weights", layout)
    edit_manifest(root, lambda d: d["files"].pop(rel))
    flip_one_byte(root / rel)
    refused(infos[family], root, re.escape(rel), layout)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loading_a_tampered_export_of_every_family_is_refused_before_any_engine_reads_it(infos, family, tmp_path):
    pytest.importorskip("onnxruntime")
    info = infos[family]
    root = fake_export(info, tmp_path / "engines")
    last = list(info.specs)[-1]
    flip_one_byte(root / file_of(last, "weights"))
    with pytest.raises(ArtifactMismatch, match=rf"{re.escape(file_of(last, 'weights'))} does not match its sha256"):
        sdfast.load(info.path, backend="onnxruntime", engines=root)
