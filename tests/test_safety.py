"""fp16 safety nets and concurrency: NaN latents stop the run naming the step (checked once
after the loop, no per-step host sync); an fp16 VAE decode that overflows is redone in fp32
with one warning; two threads sharing one pipeline both get their own correct images."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch

import sdfast
from sdfast.engines import load_engines
from sdfast.errors import NumericalError
from sdfast.model.components import Precision
from sdfast.runtime import Pipeline

PROMPT = "a yellow square"


@pytest.fixture(scope="module")
def engines(tiny_info):
    return load_engines(tiny_info, "torch", torch.device("cpu"), Precision.FP32)


class NaNAfter:
    """Engine spy: passes calls through, but returns NaN from call number ``bad`` on."""

    def __init__(self, engine, bad: int, output: str):
        self.engine, self.bad, self.output = engine, bad, output
        self.spec, self.device, self.graph_safe = engine.spec, engine.device, True
        self.precision, self.profile, self.size_multiple = engine.precision, engine.profile, engine.size_multiple
        self.calls = 0

    def __call__(self, **inputs):
        out = self.engine(**inputs)
        self.calls += 1
        if self.calls > self.bad:
            out = {k: torch.full_like(v, float("nan")) for k, v in out.items()}
        return out


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["plain", "graphed"])
def test_nan_latents_stop_the_run_naming_the_first_bad_step(tiny_info, engines, cuda_graphs):
    spy = NaNAfter(engines["unet"], bad=2, output="noise_pred")  # steps 0 and 1 fine, step 2 NaN
    pipe = Pipeline(tiny_info, {**engines, "unet": spy}, torch.device("cpu"), Precision.FP32, "torch",
                    cuda_graphs=cuda_graphs)
    with pytest.raises(NumericalError, match=r"NaN or inf at step 2 of 5"):
        pipe.generate(PROMPT, steps=5, scheduler="euler", seed=0)
    assert spy.calls == 5  # the loop ran to the end: the flags are read once, after it


def test_fp16_vae_overflow_is_redone_in_fp32_with_one_warning(tiny_info, caplog):
    fp16 = sdfast.load(tiny_info.path, dtype="fp16")
    fp16.engines["vae_decoder"] = NaNAfter(fp16.engines["vae_decoder"], bad=0, output="image")
    fp32 = sdfast.load(tiny_info.path)
    with caplog.at_level(logging.WARNING, logger="sdfast.safety"):
        outs = [fp16.generate(PROMPT, steps=2, seed=s) for s in (0, 1)]
    warnings = [r for r in caplog.records if "fp32" in r.getMessage()]
    assert len(warnings) == 1
    for out in outs:
        arr = np.asarray(out.images[0]).astype(int)
        ref = np.asarray(fp32.to_pil(fp32.decode(out.latents))[0]).astype(int)
        assert np.abs(arr - ref).max() == 0  # the fallback decoder is the fp32 VAE of the folder
        assert arr.max() > 0  # not the black image


def test_decode_nan_at_full_precision_is_an_error(tiny_info, engines):
    pipe = Pipeline(tiny_info, {**engines, "vae_decoder": NaNAfter(engines["vae_decoder"], 0, "image")},
                    torch.device("cpu"), Precision.FP32, "torch")
    with pytest.raises(NumericalError, match="vae_decoder"):
        pipe.generate(PROMPT, steps=1, seed=0)


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["plain", "graphed"])
def test_two_threads_on_one_pipeline_both_get_correct_images(tiny_info, engines, cuda_graphs):
    pipe = Pipeline(tiny_info, engines, torch.device("cpu"), Precision.FP32, "torch", cuda_graphs=cuda_graphs)
    jobs = [dict(prompt="a red circle", seed=1, scheduler="lms", guidance_scale=7.5),
            dict(prompt="a blue triangle", seed=2, scheduler="euler_a", guidance_scale=3.0)]
    expected = [pipe.generate(steps=3, **job) for job in jobs]  # one at a time
    results: list = [None, None]
    barrier = threading.Barrier(2)

    def work(n):
        barrier.wait()
        for _ in range(2):
            results[n] = pipe.generate(steps=3, **jobs[n])

    threads = [threading.Thread(target=work, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected, strict=True):
        assert torch.equal(got.latents, want.latents)
        assert got.images[0].tobytes() == want.images[0].tobytes()
