"""GPU-only checks: ``pytest -m "gpu and not slow" tests/test_gpu*.py`` (bench/device_check.py
runs exactly that on the device machine). A ``-m`` on the command line replaces pyproject's
addopts, so ``-m gpu`` alone also runs the slow AOTInductor compile below.

They prove what the CPU tests cannot: that the guided step really is captured and replayed as
a CUDA graph and still equals the plain loop (also after a rebuild for more steps, and for
img2img), that SDPA fp16 attention agrees with the math path (xformers too, where it is
installed: it is not on the device image, and that test says so when it skips), that the fp16
VAE fallback gives a finite image, and (slow) that compiled CUDA packages load.
All of it is UNVERIFIED until a device run has passed it.
"""

from __future__ import annotations

import threading

import pytest
import torch

import sdfast
from sdfast.schedulers import SCHEDULERS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none is visible to torch)"),
]
PROMPT = "a red circle on a blue background"
FP16_REL = 2e-3  # graphed vs plain replay the same kernels; slack for cuBLAS/cuDNN algorithm choice


@pytest.fixture(scope="module")
def cuda_pipes(tiny_info):
    plain = sdfast.load(tiny_info.path, device="cuda", dtype="fp16", cuda_graphs=False)
    graphed = sdfast.load(tiny_info.path, device="cuda", dtype="fp16", cuda_graphs=True)
    return plain, graphed


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_captured_step_equals_plain_loop_on_cuda(cuda_pipes, scheduler):
    plain, graphed = cuda_pipes
    for g in (1.0, 4.0, 9.0):  # unguided, then two guidance values on one captured shape
        kw = dict(steps=4, guidance_scale=g, scheduler=scheduler, seed=3)
        ref, out = plain.generate(PROMPT, **kw), graphed.generate(PROMPT, **kw)
        assert rel_err(out.latents, ref.latents) <= FP16_REL
    assert graphed.graphs.mode == "captured"  # really captured, not the fallback
    assert not graphed.engines["text_encoder"].failed and not graphed.engines["vae_decoder"].failed


def test_captured_outputs_are_copied_out(cuda_pipes):
    _, graphed = cuda_pipes
    first = graphed.generate(PROMPT, steps=3, seed=1)
    kept = first.latents.clone()
    graphed.generate("a green square", steps=3, seed=2)
    assert torch.equal(first.latents, kept)


def test_replays_do_not_sync_the_host(cuda_pipes):
    _, graphed = cuda_pipes
    graphed.generate(PROMPT, steps=3, seed=1)  # capture outside the check
    step = next(iter(graphed.graphs._steps.values()))
    step._reset()  # step index back to 0: three replays stay inside the 3-step tables
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step.run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_two_threads_share_one_graphed_cuda_pipeline(cuda_pipes):
    _, graphed = cuda_pipes
    jobs = [dict(seed=1, scheduler="lms"), dict(seed=2, scheduler="euler_a")]
    want = [graphed.generate(PROMPT, steps=3, **j).latents for j in jobs]
    got = [None, None]

    def work(n):
        got[n] = graphed.generate(PROMPT, steps=3, **jobs[n]).latents

    threads = [threading.Thread(target=work, args=(n,)) for n in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_graph_rebuilt_for_more_steps_still_equals_the_plain_loop(cuda_pipes):
    plain, graphed = cuda_pipes
    for steps in (2, 9):  # 9 is more than any capture before it: the step graph is rebuilt
        kw = dict(steps=steps, seed=5, scheduler="euler")
        assert rel_err(graphed.generate(PROMPT, **kw).latents, plain.generate(PROMPT, **kw).latents) <= FP16_REL
    assert graphed.graphs.mode == "captured"


def test_img2img_under_graphs_equals_the_plain_loop(cuda_pipes):
    plain, graphed = cuda_pipes
    init = plain.generate(PROMPT, steps=3, seed=1).images[0]
    for scheduler in ("ddim", "euler_a"):
        kw = dict(steps=6, seed=2, image=init, strength=0.5, scheduler=scheduler)
        assert rel_err(graphed.generate(PROMPT, **kw).latents, plain.generate(PROMPT, **kw).latents) <= FP16_REL
    assert graphed.graphs.mode == "captured"


def test_graphs_still_capture_after_the_diffusers_bench_row_on_the_same_modules(tiny_info):
    """The diffusers row's timing hooks synchronize CUDA; left on the shared
    modules they made the sdfast row's capture fail and fall back."""
    from sdfast.measure.bench import BenchConfig, diffusers_pipeline, diffusers_runner
    from sdfast.model.info import load_torch_modules

    mods = load_torch_modules(tiny_info, dtype=torch.float16, device="cuda")
    run = diffusers_runner(diffusers_pipeline(tiny_info, mods, "euler"), BenchConfig(steps=3, scheduler="euler"),
                           1, 64, 64, torch.device("cuda"))
    assert run()["unet_step"] > 0
    pipe = sdfast.load(tiny_info.path, device="cuda", dtype="fp16", cuda_graphs=True, modules=mods)
    pipe.generate(PROMPT, steps=3, scheduler="euler")
    assert pipe.graphs.mode == "captured"


def test_sdpa_attention_agrees_with_math_in_fp16(tiny_info):
    kw = dict(steps=3, seed=0, scheduler="euler")
    a = sdfast.load(tiny_info.path, device="cuda", dtype="fp16", attention="sdpa").generate(PROMPT, **kw)
    b = sdfast.load(tiny_info.path, device="cuda", dtype="fp16", attention="math").generate(PROMPT, **kw)
    assert rel_err(a.latents, b.latents) <= 1e-2


def test_xformers_attention_agrees_with_math_in_fp16(tiny_info):
    pytest.importorskip("xformers", reason="xformers is not installed (pip install 'sdfast[gpu]'); SDPA is "
                                           "checked by the test above")
    kw = dict(steps=3, seed=0, scheduler="euler")
    a = sdfast.load(tiny_info.path, device="cuda", dtype="fp16", attention="xformers").generate(PROMPT, **kw)
    b = sdfast.load(tiny_info.path, device="cuda", dtype="fp16", attention="math").generate(PROMPT, **kw)
    assert rel_err(a.latents, b.latents) <= 1e-2


def test_fp16_vae_decode_of_large_latents_is_finite(tiny_info):
    pipe = sdfast.load(tiny_info.path, device="cuda", dtype="fp16")
    shape = (1, tiny_info.latent_channels, 8, 8)
    latents = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(0)).cuda() * 3e3
    image = pipe.decode(latents)  # falls back to fp32 if fp16 overflows
    assert torch.isfinite(image).all()


@pytest.mark.slow
def test_inductor_cuda_packages_load_and_match_eager(tiny_info, tmp_path):
    from sdfast.export.inductor import InductorExportOptions, export_inductor
    from sdfast.model.components import ShapeProfile

    out = export_inductor(tiny_info, tmp_path / "aoti", ShapeProfile.static(1, 64, 64),
                          InductorExportOptions(precision=sdfast.model.components.Precision.FP16, device="cuda",
                                                autotune="none"))
    kw = dict(steps=3, seed=0, scheduler="euler")
    ref = sdfast.load(tiny_info.path, device="cuda", dtype="fp32").generate(PROMPT, **kw)
    got = sdfast.load(tiny_info.path, backend="inductor", engines=out, device="cuda", dtype="fp16").generate(PROMPT, **kw)
    assert torch.isfinite(got.latents).all()
    assert rel_err(got.latents.cpu(), ref.latents.cpu()) <= 5e-2
