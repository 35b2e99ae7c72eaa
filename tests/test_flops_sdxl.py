"""`sdfast bench` and `sdfast.measure.flops` on SDXL: the diffusers row is diffusers' own
StableDiffusionXLPipeline on the same modules, with both text encoders timed as text_encoder,
and every SDXL stage is counted (both CLIPs, the U-Net with text_embeds/time_ids)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from sdfast.cli import main
from sdfast.measure import bench
from sdfast.measure.flops import count_stage_flops, text_rows
from sdfast.model.info import load_torch_modules, resolve_model


@pytest.fixture(scope="session")
def sdxl_info(tmp_path_factory):
    from sdfast.model.info import TOKENIZER_DIR
    from sdfast.model.random_models import build_tiny_sdxl

    return resolve_model(build_tiny_sdxl(tmp_path_factory.mktemp("flops-sdxl") / "x", TOKENIZER_DIR))


def clip_flops(cfg: dict, tokens: int, rows: int, projection: bool) -> float:
    """An independent count of one CLIP text transformer from its config: per layer the
    q/k/v/out projections (4·D²) and the MLP (2·D·I) on every token, QKᵀ and AV (2·S²·D);
    with a projection, one (D → P) matmul on the pooled token. 2 FLOP per multiply-add."""
    d, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    per_layer = tokens * 2 * (4 * d * d + 2 * d * i) + 2 * 2 * tokens * tokens * d
    return rows * (n * per_layer + (2 * d * cfg["projection_dim"] if projection else 0))


@pytest.mark.parametrize("model", ["tiny-sdxl", "random-sdxl"])
@pytest.mark.parametrize("guided", [True, False])
def test_sdxl_text_stage_counts_both_clips(sdxl_info, model, guided):
    info = sdxl_info if model == "tiny-sdxl" else resolve_model(model)
    assert info.family == "sdxl"
    flops = count_stage_flops(info, 64, 64, batch=2, guided=guided)  # the text stage has no image size
    # SDXL zeroes the absent negative prompt: the text encoders see the 2 prompts, guided or not.
    rows = text_rows(info, 2, guided)
    assert rows == 2
    s = info.max_tokens
    expected = (clip_flops(info.text_encoder_config, s, rows, projection=False)
                + clip_flops(info.text_encoder_2_config, s, rows, projection=True))
    assert flops.text_encoder == pytest.approx(expected, rel=1e-9)


def test_sd_still_encodes_the_empty_negative(tiny_info):
    guided = count_stage_flops(tiny_info, 64, 64, batch=1, guided=True)
    plain = count_stage_flops(tiny_info, 64, 64, batch=1, guided=False)
    assert guided.text_encoder == pytest.approx(2 * plain.text_encoder, rel=1e-9)
    assert plain.text_encoder == pytest.approx(clip_flops(tiny_info.text_encoder_config, tiny_info.max_tokens, 1,
                                                          projection=False), rel=1e-9)


def test_sdxl_stage_flops_scale_as_their_shapes_do(sdxl_info):
    small = count_stage_flops(sdxl_info, 64, 64, batch=1, guided=True)
    plain = count_stage_flops(sdxl_info, 64, 64, batch=1, guided=False)
    large = count_stage_flops(sdxl_info, 128, 128, batch=1, guided=True)
    two = count_stage_flops(sdxl_info, 64, 64, batch=2, guided=True)
    for f in (small, plain, large, two):
        assert f.text_encoder > 0 and f.unet_step > 0 and f.vae_decode > 0
    # The guided U-Net call has twice the rows; the VAE decodes the same one image.
    assert small.unet_step == pytest.approx(2 * plain.unet_step, rel=1e-9)
    assert small.vae_decode == plain.vae_decode
    # Two images: every stage doubles (text: 2 prompts, negatives zeroed).
    assert two.text_encoder == pytest.approx(2 * small.text_encoder, rel=1e-9)
    assert two.unet_step == pytest.approx(2 * small.unet_step, rel=1e-9)
    assert two.vae_decode == pytest.approx(2 * small.vae_decode, rel=1e-9)
    # 4× the pixels: convolutions grow 4×, self-attention faster; the text encoders not at all.
    assert large.text_encoder == small.text_encoder
    assert 4 * 0.9 * small.unet_step < large.unet_step < 16 * small.unet_step
    assert 4 * 0.9 * small.vae_decode < large.vae_decode < 16 * small.vae_decode
    # The denoising step outweighs encoding the prompt once.
    assert small.unet_step > small.text_encoder


def test_sdxl_unet_count_includes_the_added_conditioning(sdxl_info):
    # The text_time embedding (a linear layer on the pooled text + 6 × Fourier size features)
    # runs only when text_embeds/time_ids reach the U-Net; without them diffusers raises.
    from sdfast.measure.flops import _meta_modules

    unet = _meta_modules(sdxl_info)["unet"]
    counted = []
    handle = unet.add_embedding.register_forward_hook(lambda m, a, o: counted.append(tuple(o.shape)))
    try:
        count_stage_flops(sdxl_info, 96, 64, batch=1, guided=True)
    finally:
        handle.remove()
    assert counted == [(2, unet.config.block_out_channels[0] * 4)]


def test_bench_on_tiny_sdxl_has_the_xl_pipeline_row_and_ours(sdxl_info, tmp_path):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(sdxl_info.path), "--backends", "torch", "--steps", "2", "--height", "64",
               "--width", "64", "--repeat", "1", "--warmup", "0", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    rows = {r["backend"]: r for r in report["results"]}
    assert set(rows) == {"diffusers", "torch"}
    assert rows["diffusers"]["timing"] == "diffusers StableDiffusionXLPipeline, forward hooks"
    for r in rows.values():
        assert all(v > 0 for v in r["stages_ms"].values())
        g = r["gflop"]
        assert g["text_encoder"] > 0 and g["unet_step"] > g["text_encoder"] and g["vae_decode"] > 0
        assert g["total"] == pytest.approx(g["text_encoder"] + 2 * g["unet_step"] + g["vae_decode"])
        assert r["tflops"]["total"] > 0
    assert rows["torch"]["gflop"] == rows["diffusers"]["gflop"]  # one count for both sides


def test_diffusers_runner_times_both_text_encoders_and_unhooks_them(sdxl_info):
    modules = load_torch_modules(sdxl_info)
    pipe = bench.diffusers_pipeline(sdxl_info, modules, "euler")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.text_encoder_2 is modules["text_encoder_2"] and pipe.unet is modules["unet"]
    te2 = modules["text_encoder_2"]
    calls = []
    forward = te2.forward

    def slow_forward(*args, **kwargs):  # 0.2 s inside text_encoder_2 only
        calls.append(1)
        time.sleep(0.2)
        return forward(*args, **kwargs)

    te2.forward = slow_forward
    cfg = bench.BenchConfig(steps=1, scheduler="euler")
    run = bench.diffusers_runner(pipe, cfg, 1, 64, 64, torch.device("cpu"))
    times = run()
    assert calls == [1]  # the prompt only: the empty negative is zeros, as in the sdfast row
    assert times["text_encoder"] >= 200.0
    # transformers adds its own output-capturing hooks on the first call; ours must not stay.
    hooks = _hook_counts(pipe)
    run()
    assert _hook_counts(pipe) == hooks and calls == [1, 1]


def _hook_counts(pipe) -> list[tuple[int, int]]:
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for c in pipe.components.values()
            if isinstance(c, torch.nn.Module) for m in c.modules()]


def test_sd_folders_still_get_the_sd_pipeline(tiny_info):
    modules = load_torch_modules(tiny_info)
    pipe = bench.diffusers_pipeline(tiny_info, modules, "lms")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert not hasattr(pipe, "text_encoder_2")


@pytest.mark.parametrize("part", ["unet", "vae"])
def test_random_weights_built_at_bf16_equal_fp32_built_then_cast(sdxl_info, part):
    # random-sdxl's U-Net is built child by child at the bench dtype so its fp32 build (10 GB)
    # never sits in memory whole: the weights must be exactly those of building in fp32 and
    # casting, or a bf16 bench would run other weights than an fp32 export of the same model.
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from sdfast.model.info import _random_module

    cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[part]
    cfg = getattr(sdxl_info, f"{part}_config")
    ref = _random_module(cls, cfg, 1).to(torch.bfloat16).state_dict()
    built = _random_module(cls, cfg, 1, torch.bfloat16).state_dict()
    assert ref.keys() == built.keys()
    for k in ref:
        assert built[k].dtype == torch.bfloat16 and torch.equal(built[k], ref[k]), k
