"""DeepCache on the exported backends (sdfast/deepcache.py): ``sdfast export --cache-branch B``
writes two more components, ``unet_deep`` (noise prediction and the cached feature) and
``unet_shallow`` (the shallow path over that feature); ``--cache-interval N`` then runs the torch
DeepCache schedule over them. Held to tier 1 of the torch backend's DeepCache run (latents
relative 1e-4, pixels within 2/255), on rows of a batch that differ; the refusals; the manifest
hashing and I/O-checking both graphs."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from tiers import LATENT_RTOL, assert_tier1

import sdfast
from sdfast.artifacts import MANIFEST, file_record
from sdfast.deepcache import DeepUNet, ShallowUNet, branch_count, for_pipeline
from sdfast.errors import ArtifactMismatch, InvalidArgument
from sdfast.model.components import CACHE_DEEP, CACHE_SHALLOW, ShapeProfile, cache_feature, deepcache_specs

PROMPTS = ["a red circle on a blue background", "a yellow square on a white background"]
PROFILE = ShapeProfile(1, 1, 2, 64, 64, 64, 64, 64, 64)
BRANCH = 0
KW = dict(prompt=PROMPTS, steps=6, guidance_scale=7.5, seed=11)


def _export(backend, info, out):
    if backend == "onnxruntime":
        from sdfast.export.onnx import export_onnx

        return export_onnx(info, out, PROFILE)
    pytest.importorskip("openvino")
    from sdfast.export.openvino import export_openvino

    return export_openvino(info, out, PROFILE)


@pytest.fixture(scope="module")
def onnx_dir(tiny_info, tmp_path_factory):
    return _export("onnxruntime", dataclasses.replace(tiny_info, cache_branch=BRANCH),
                   tmp_path_factory.mktemp("dc") / "onnx")


@pytest.fixture(scope="module")
def torch_runs(tiny_pipe):
    """The torch backend's runs the exported ones are held to: exact, and DeepCache at 2 and 3."""
    return {n: tiny_pipe.generate(**KW, cache_interval=n) for n in (1, 2, 3)}


def _count_calls(pipe, branch=BRANCH) -> dict[str, int]:
    """Spy on the export's two DeepCache engines (loaded on the first DeepCache run)."""
    from sdfast.engines.base import WrappedEngine

    counts = {CACHE_DEEP: 0, CACHE_SHALLOW: 0}
    engines = pipe.cache_engines[branch]
    for name in counts:
        def call(_e=engines[name], _n=name, **inputs):
            counts[_n] += 1
            return _e(**inputs)
        engines[name] = WrappedEngine(engines[name], call)
    return counts


def _check_runs(pipe, torch_runs):
    for n in (2, 3):
        out = pipe.generate(**KW, cache_interval=n)
        assert_tier1(out, torch_runs[n])
        assert out.approximations == torch_runs[n].approximations
    counts = _count_calls(pipe)
    pipe.generate(**KW, cache_interval=3)  # 6 steps: full on 0 and 3, shallow on the other four
    assert counts == {CACHE_DEEP: 2, CACHE_SHALLOW: 4}
    # the approximation is there (not the exact run), and rows of the batch are each their own image
    exact = torch_runs[1].latents
    assert (torch_runs[2].latents - exact).abs().max() > 100 * LATENT_RTOL * exact.abs().max()
    assert not torch.allclose(torch_runs[2].latents[0], torch_runs[2].latents[1])
    assert_tier1(pipe.generate(**KW), torch_runs[1])  # without --cache-interval: the plain U-Net


def test_onnxruntime_deepcache_within_tier1_of_torch_deepcache(tiny_info, onnx_dir, torch_runs):
    _check_runs(sdfast.load(tiny_info, backend="onnxruntime", engines_dir=onnx_dir), torch_runs)


def test_a_batch_row_alone_equals_its_row_in_the_batch(tiny_info, onnx_dir):
    from sdfast.request import Request

    pipe = sdfast.load(tiny_info, backend="onnxruntime", engines_dir=onnx_dir)
    reqs = [Request.build(tiny_info, prompt=p, steps=6, seed=s, cache_interval=2)
            for p, s in zip(PROMPTS, (3, 4), strict=True)]
    both = torch.cat([o.latents for o in pipe.run_batch(reqs)])
    alone = [pipe.run_batch([r])[0].latents for r in reqs]
    # a row's cached features are its own: each image is the one it is alone, and they differ
    for row in range(2):
        torch.testing.assert_close(both[row : row + 1], alone[row], rtol=0, atol=1e-4 * alone[row].abs().max().item())
    assert not torch.allclose(both[0], both[1], atol=1e-2)


@pytest.mark.slow
def test_openvino_deepcache_within_tier1_of_torch_deepcache(tiny_info, torch_runs, tmp_path):
    out = _export("openvino", dataclasses.replace(tiny_info, cache_branch=BRANCH), tmp_path / "ov")
    _check_runs(sdfast.load(tiny_info, backend="openvino", engines_dir=out), torch_runs)


def test_the_manifest_records_and_hashes_both_graphs(onnx_dir):
    m = json.loads((onnx_dir / MANIFEST).read_text())
    for name in (CACHE_DEEP, CACHE_SHALLOW):
        assert m["components"][name]["cache_branch"] == BRANCH
        assert m["files"][m["components"][name]["file"]]["sha256"]
    assert m["components"][CACHE_DEEP]["outputs"]["feature"]["opt"][0] == 2  # guided rows
    assert "--cache-branch 0" in m["export_command"]


def test_a_tampered_unet_shallow_is_refused(tiny_info, onnx_dir, tmp_path):
    bad = shutil.copytree(onnx_dir, tmp_path / "bad")
    path = bad / "unet_shallow.onnx"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactMismatch, match=r"unet_shallow\.onnx does not match its sha256"):
        sdfast.load(tiny_info, backend="onnxruntime", engines_dir=bad)


def test_a_swapped_graph_under_a_recomputed_hash_is_refused_by_its_io(tiny_info, onnx_dir, tmp_path):
    bad = shutil.copytree(onnx_dir, tmp_path / "swapped")
    shutil.copy(bad / "unet.onnx", bad / "unet_shallow.onnx")
    m = json.loads((bad / MANIFEST).read_text())
    m["files"]["unet_shallow.onnx"] = file_record(bad / "unet_shallow.onnx")
    (bad / MANIFEST).write_text(json.dumps(m))
    pipe = sdfast.load(tiny_info, backend="onnxruntime", engines_dir=bad)  # not loaded until DeepCache runs
    with pytest.raises(ArtifactMismatch, match=r"unet_shallow\.onnx has inputs .* but unet_shallow has .*feature"):
        pipe.generate(**KW, cache_interval=2)


def test_an_export_without_the_graphs_refuses_cache_interval_saying_how(tiny_info, onnx_dir, tmp_path):
    plain = shutil.copytree(onnx_dir, tmp_path / "plain")
    m = json.loads((plain / MANIFEST).read_text())
    for name in (CACHE_DEEP, CACHE_SHALLOW):
        rec = m["components"].pop(name)
        (plain / rec["file"]).unlink()
        m["files"].pop(rec["file"])
    (plain / MANIFEST).write_text(json.dumps(m))
    pipe = sdfast.load(tiny_info, backend="onnxruntime", engines_dir=plain)
    pipe.generate(**dict(KW, steps=2))  # it runs as an export without them
    with pytest.raises(InvalidArgument, match=r"^cache_interval: .*exported without DeepCache.*--cache-branch 0"):
        pipe.generate(**KW, cache_interval=2)


def test_a_run_branch_other_than_the_exported_one_is_refused_naming_both(tiny_info, onnx_dir):
    pipe = sdfast.load(tiny_info, backend="onnxruntime", engines_dir=onnx_dir)
    with pytest.raises(InvalidArgument, match=r"^cache_branch: .*cut at branch 0, but this run asks for branch 1; "
                                              r"pass --cache-branch 0"):
        pipe.generate(**KW, cache_interval=2, cache_branch=1)


def test_backends_without_the_graphs_refuse_by_name(tiny_info, tmp_path):
    class Pipe:
        backend, engines, manifest = "inductor", {"unet": None}, None

    with pytest.raises(InvalidArgument, match=r"^cache_interval: DeepCache runs on the torch backend and on onnx "
                                              r"and openvino exports, not on inductor"):
        for_pipeline(Pipe(), 2)
    from sdfast.export.base import export_components

    cached = dataclasses.replace(tiny_info, cache_branch=0)
    for fmt in ("inductor", "tensorrt"):
        with pytest.raises(InvalidArgument, match=rf"^cache-branch: .* not {fmt}"):
            export_components(cached, tmp_path / fmt, PROFILE, fmt, None, build=None)
        assert not (tmp_path / fmt).exists()


def test_export_flags_refused_with_cache_branch(tiny_info, tiny_pipe, tmp_path, capsys):
    from sdfast.cli import main
    from sdfast.export.onnx import OnnxExportOptions, export_onnx

    cached = dataclasses.replace(tiny_info, cache_branch=0)
    with pytest.raises(InvalidArgument, match=r"^lora-rank: DeepCache's graphs"):
        export_onnx(cached, tmp_path / "lr", PROFILE, OnnxExportOptions(lora_rank=4))
    deepest = branch_count(tiny_pipe.engines["unet"]) - 1
    model = str(tiny_info.path)
    for flags, message in (
            (["--cache-branch", str(deepest + 1)], f"cache_branch: this U-Net has branches 0 .. {deepest}"),
            (["--cache-branch", "-1"], f"cache_branch: this U-Net has branches 0 .. {deepest}"),
            (["--format", "inductor", "--cache-branch", "0"], "cache-branch: DeepCache's graphs are exported for "
                                                              "--format onnx or openvino, not inductor")):
        assert main(["export", "--model", model, "--out", str(tmp_path / "x"), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "lr").exists()
    # the deepest branch is a valid one (both sides of the bound)
    assert deepcache_specs(tiny_info.specs["unet"], tiny_info.unet_config, deepest)


def test_the_feature_spec_from_the_config_is_what_the_cut_emits(tiny_info):
    """components.cache_feature (read by export, engines and checks) against the torch modules'
    real feature, on every branch of the tiny U-Net and of an SD-shaped one (3 levels, 2 layers)."""
    from diffusers import UNet2DConditionModel

    from sdfast.model.info import load_torch_modules

    sd_like = UNet2DConditionModel(
        block_out_channels=(32, 64, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4).eval()
    tiny = load_torch_modules(tiny_info, parts=("unet",))["unet"]
    unet_spec = tiny_info.specs["unet"]
    for unet in (tiny, sd_like):
        config = dict(unet.config)
        h = w = 16
        x, t = torch.randn(2, 4, h, w), torch.tensor([500.0])
        ehs = torch.randn(2, 7, config["cross_attention_dim"])
        branches = [b for b in range(20) if _valid(config, b)]
        assert len(branches) == branch_count_of_unet(unet)
        for b in branches:
            with torch.no_grad():
                out, feature = DeepUNet(unet, b, unet_spec.input_names)(x, t, ehs)
                shallow = ShallowUNet(unet, b, unet_spec.input_names)(x, t, ehs, feature)
            torch.testing.assert_close(shallow, out, rtol=0, atol=0)  # same input: the shallow pass is exact
            dims = cache_feature(config, b).dims
            known = {"B": 2, "h": h, "w": w}
            want = tuple(known[d] if d in known else known[d[0]] // int(d[2:]) if "/" in d else int(d) for d in dims)
            assert tuple(feature.shape) == want, b
        specs = deepcache_specs(unet_spec, config, 0)
        assert specs[CACHE_SHALLOW].inputs[-1] == specs[CACHE_DEEP].outputs[-1]


def _valid(config, b) -> bool:
    try:
        cache_feature(config, b)
    except InvalidArgument:
        return False
    return True


def branch_count_of_unet(unet) -> int:
    from sdfast.deepcache import _structure

    return len(_structure(unet)[0]) + 1


def test_generate_cli_runs_deepcache_on_the_export(tiny_info, onnx_dir, tmp_path):
    from sdfast.cli import main
    from sdfast.media import read_png_metadata

    out = tmp_path / "dc.png"
    assert main(["generate", "a red circle", "--model", str(tiny_info.path), "--backend", "onnxruntime",
                 "--engines", str(onnx_dir), "--steps", "4", "--cache-interval", "2", "--out", str(out),
                 "--quiet"]) == 0
    meta = read_png_metadata(out)
    assert meta["cache_interval"] == 2 and meta["cache_branch"] == 0
