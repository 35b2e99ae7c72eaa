"""Micro-benchmarks (pytest-benchmark): scheduler step, guidance combine, guided step, one U-Net step.

    pytest bench/ --benchmark-only                      # fast ones (tiny model)
    pytest bench/ --benchmark-only -m slow              # SD 1.5 architecture U-Net at 256x256
    pytest bench/ --benchmark-only --benchmark-autosave # save JSON for --benchmark-compare
    pytest bench/ --benchmark-disable                   # each once, untimed: the CI smoke

Shapes follow SD 1.5 at 512x512 unless said otherwise: latents (1, 4, 64, 64), guided U-Net
batch 2. Each benchmark checks its output (shape and finiteness, or the value where it is known),
so a broken fast path fails instead of timing garbage.
"""

from __future__ import annotations

import pytest
import torch

from sdfast.model.components import Precision
from sdfast.model.info import SD15_SCHEDULER_CONFIG, resolve_model
from sdfast.schedulers import SCHEDULERS, make_scheduler

LATENT_SHAPE = (1, 4, 64, 64)  # (B, C, h, w): one 512x512 image
STEPS = 10


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_step(benchmark, name):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(LATENT_SHAPE, generator=g)
    eps = torch.randn(LATENT_SHAPE, generator=g)
    noise = torch.randn(LATENT_SHAPE, generator=g)
    sched = make_scheduler(name, SD15_SCHEDULER_CONFIG)
    sched.set_timesteps(STEPS, "cpu")
    sched.begin(latents)
    i = STEPS // 2
    out = benchmark(sched.step, eps, i, latents, noise if sched.needs_noise else None)
    assert out.shape == LATENT_SHAPE and torch.isfinite(out).all()


def test_guidance_combine(benchmark):
    """sdfast's own combine (``loop.guide``, what every guided step runs) on SD 1.5's shape."""
    from sdfast.loop import guide

    g = torch.Generator().manual_seed(0)
    uncond = torch.randn(LATENT_SHAPE, generator=g)
    cond = torch.randn(LATENT_SHAPE, generator=g)
    eps = torch.cat([uncond, cond])  # (2B, C, h, w): [uncond, cond], as the U-Net returns them
    scale = torch.full((LATENT_SHAPE[0], 1, 1, 1), 7.5)  # (B, 1, 1, 1) per-row guidance
    out = benchmark(guide, eps, scale)
    torch.testing.assert_close(out, uncond + 7.5 * (cond - uncond))  # u + g·(t − u); swapped halves fail


def test_guided_step_without_unet(benchmark):
    """One whole guided step (``loop.guided_step``: batching, input scaling, combine, scheduler
    update, finiteness flag) around a U-Net that costs nothing: sdfast's per-step overhead."""
    from sdfast.loop import LoopState, guided_step

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(LATENT_SHAPE, generator=g)
    uncond, cond = torch.randn(LATENT_SHAPE, generator=g), torch.randn(LATENT_SHAPE, generator=g)
    text = torch.zeros((2 * LATENT_SHAPE[0], 77, 768))  # (2B, S, D): SD 1.5's CLIP output
    rows = []

    def unet(sample, timestep, encoder_hidden_states):
        rows.append(sample.shape[0])
        return {"noise_pred": torch.cat([uncond, cond])}

    sched = make_scheduler("euler", SD15_SCHEDULER_CONFIG)
    sched.set_timesteps(STEPS, "cpu")
    sched.begin(latents)
    state = LoopState.create(latents, {"encoder_hidden_states": text}, [7.5], True, None, STEPS)
    i = STEPS // 2
    out = benchmark(guided_step, unet, sched, state, i)
    assert set(rows) == {2 * LATENT_SHAPE[0]}  # the U-Net saw [uncond, cond] rows
    ref = make_scheduler("euler", SD15_SCHEDULER_CONFIG)  # euler keeps no state between steps
    ref.set_timesteps(STEPS, "cpu")
    ref.begin(latents)
    torch.testing.assert_close(out, ref.step(uncond + 7.5 * (cond - uncond), i, latents, None))


def _unet_inputs(info, height: int, width: int, batch: int = 1) -> dict[str, torch.Tensor]:
    f = info.vae_scale_factor
    rows = 2 * batch  # guided
    g = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn((rows, info.latent_channels, height // f, width // f), generator=g),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn((rows, info.max_tokens, info.text_hidden_size), generator=g),
    }


def _unet_engine(info, backend: str, dtype: str, height: int, width: int):
    from sdfast.engines import load_engines
    from sdfast.measure import bench

    if backend == "torch":
        return load_engines(info, "torch", torch.device("cpu"), Precision.parse(dtype))["unet"]
    cfg = bench.BenchConfig(model=info.name)
    engines, _, reason = bench.ensure_engines(cfg, info, backend, dtype, 1, height, width)
    if reason:
        pytest.skip(f"{backend}: {reason}")
    return load_engines(info, backend, torch.device("cpu"), Precision.parse(dtype), str(engines))["unet"]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_unet_step_tiny(benchmark, backend):
    info = resolve_model("tiny-random")
    size = info.native_size
    unet = _unet_engine(info, backend, "fp32", size, size)
    inputs = _unet_inputs(info, size, size)
    out = benchmark(lambda: unet(**inputs)["noise_pred"])
    assert out.shape == inputs["sample"].shape and torch.isfinite(out).all()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_unet_step_sd15_256(benchmark, backend, dtype):
    """SD 1.5 architecture (random weights), 256x256, guided batch 2: seconds per call on a CPU."""
    if backend == "onnxruntime" and dtype == "bf16":
        pytest.skip("onnxruntime: `sdfast export` offers fp32 and fp16 only")
    info = resolve_model("random-sd15")
    unet = _unet_engine(info, backend, dtype, 256, 256)
    inputs = _unet_inputs(info, 256, 256)
    out = benchmark.pedantic(lambda: unet(**inputs)["noise_pred"], rounds=3, iterations=1, warmup_rounds=1)
    assert out.shape == inputs["sample"].shape and torch.isfinite(out).all()
