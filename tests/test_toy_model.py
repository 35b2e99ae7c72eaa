"""The built-in trained toy model draws what the prompt says.

Each check generates "a {colour} {shape} on a {background} background" for a fixed sample of
the toy world's 90 combinations and two seeds (48 images, one batched call per seed), and grades
each image with ``toy.classify``: the centre must show the prompted shape colour and the corners
the prompted background.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import sdfast
from sdfast import toy
from sdfast.model.info import PACKAGED_TINY
from sdfast.schedulers import SCHEDULERS

pytestmark = pytest.mark.skipif(not (PACKAGED_TINY / "model_index.json").is_file(),
                                reason="the trained toy model is not installed")

STEPS = 20
SEEDS = (0, 1)


def eval_combos(n: int = 24) -> list[tuple[str, str, str]]:
    everything = toy.combos()
    pick = np.random.default_rng(0).choice(len(everything), size=n, replace=False)
    return [everything[i] for i in sorted(pick)]


COMBOS = eval_combos()
PROMPTS = [toy.TEMPLATES[0].format(colour=c, shape=s, background=b) for s, c, b in COMBOS]


def accuracy(pipe, scheduler: str, guidance: float, prompts: list[str] = PROMPTS) -> float:
    hits = 0
    for seed in SEEDS:
        out = pipe.generate(prompts, steps=STEPS, guidance_scale=guidance, seed=seed, scheduler=scheduler)
        for (_, colour, background), image in zip(COMBOS, out.images, strict=True):
            hits += toy.classify(image) == (colour, background)
    return hits / (len(COMBOS) * len(SEEDS))


@pytest.fixture(scope="module")
def toy_pipe():
    return sdfast.load("tiny")


@pytest.fixture(scope="module")
def toy_accuracy(toy_pipe):
    """``accuracy(toy_pipe, scheduler, guidance)`` on PROMPTS, computed once per pair in this module."""
    return functools.cache(lambda scheduler, guidance: accuracy(toy_pipe, scheduler, guidance))


#: the multi-step samplers the toy model was trained for and graded with (the few-step ones,
#: lcm and tcd, need a distilled model: tests/test_toy_lcm.py grades those).
MULTI_STEP = ("ddim", "dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_a", "lms")


def test_the_toy_grades_cover_every_multi_step_scheduler():
    assert set(MULTI_STEP) <= set(SCHEDULERS)


@pytest.mark.parametrize("scheduler", MULTI_STEP)
def test_toy_model_draws_the_prompt_at_guidance_7_5(toy_accuracy, scheduler):
    acc = toy_accuracy(scheduler, 7.5)
    print(f"{scheduler}: {acc:.1%} at guidance 7.5")
    assert acc >= 0.95  # measured 100 % for every scheduler here, 98.9-100 % held out


def test_toy_model_lms_at_moderate_guidance(toy_accuracy):
    assert toy_accuracy("lms", 3.0) >= 0.9


def test_guidance_0_scores_clearly_lower(toy_accuracy):
    # Guidance 0 is diffusers' rule "no classifier-free guidance": the conditional half alone. The
    # caption still steers it, but without guidance's push it misses clearly more: guidance takes
    # away at least three quarters of its misses (measured: 75 % -> 100 %; the model before: 69 -> 98).
    plain = toy_accuracy("euler", 0.0)
    guided = toy_accuracy("euler", 7.5)
    print(f"guidance 0: {plain:.1%}, guidance 7.5: {guided:.1%}")
    assert plain <= 0.9 and 1 - guided <= (1 - plain) / 4


def test_guidance_pulls_towards_the_prompt(toy_pipe, toy_accuracy):
    # The unconditional branch alone (empty prompts, no guidance) matches a target prompt only by
    # chance; guidance toward the prompt brings it to >= 90 %. With a swapped or dropped guidance
    # term the second number would fall.
    uncond = accuracy(toy_pipe, "ddim", 1.0, prompts=[""] * len(PROMPTS))
    guided = toy_accuracy("ddim", 7.5)
    print(f"unconditional {uncond:.1%}, guided {guided:.1%}")
    assert uncond <= 0.3 and guided >= 0.9


def test_yellow_shapes_are_drawn_yellow_not_orange(toy_pipe):
    # The model shipped before drew "a yellow X" orange (12 of its 54 held-out misses were
    # yellow drawn red): its VAE put yellow between red and white in latent space. Every yellow
    # caption x both seeds: each shape is graded yellow, and its centre is near the palette's yellow
    # (that model: median 33-48 RGB units off with euler, lms and dpmpp_2m; the retrained one: 11 with euler).
    prompts = [toy.caption(*c) for c in toy.combos() if c[1] == "yellow"]
    graded, distance = [], []
    for seed in SEEDS:
        for image in toy_pipe.generate(prompts, steps=STEPS, guidance_scale=7.5, seed=seed, scheduler="euler").images:
            graded.append(toy.classify(image)[0])
            centre = np.asarray(image, dtype=np.float64)[28:36, 28:36].reshape(-1, 3).mean(axis=0)
            distance.append(float(np.linalg.norm(centre - toy.PALETTE["yellow"])))
    print(f"yellow: {graded.count('yellow')}/{len(graded)}, median distance {np.median(distance):.0f}")
    assert graded.count("yellow") >= len(graded) - 1
    assert np.median(distance) <= 25


@pytest.mark.parametrize("size", [64, 128])
def test_classify_reads_back_every_rendered_combination(size):
    # The grader the accuracy tests rest on: every (shape, colour, background) the toy world can
    # draw, at several random placements and extents, is read back as its own colours.
    wrong = []
    for seed in range(4):
        rng = np.random.default_rng(seed)
        for shape, colour, background in toy.combos():
            got = toy.classify(toy.render(shape, colour, background, size=size, rng=rng))
            if got != (colour, background):
                wrong.append((seed, shape, colour, background, got))
    assert len(toy.combos()) == len(toy.SHAPES) * len(toy.COLOURS) * (len(toy.COLOURS) - 1)
    assert wrong == []


def test_toy_model_same_seed_same_image(toy_pipe):
    a = toy_pipe.generate(PROMPTS[0], steps=8, seed=4).images[0]
    b = toy_pipe.generate(PROMPTS[0], steps=8, seed=4).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_toy_model_is_a_standard_diffusers_folder(toy_pipe):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(PACKAGED_TINY, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    from sdfast.measure.bench import diffusers_scheduler

    ref.scheduler = diffusers_scheduler("ddim", toy_pipe.info.scheduler_config)
    lat = ref(PROMPTS[0], num_inference_steps=8, generator=torch.Generator("cpu").manual_seed(2),
              output_type="latent").images
    ours = toy_pipe.generate(PROMPTS[0], steps=8, seed=2, scheduler="ddim").latents
    assert (ours - lat).abs().max() <= 1e-4 * lat.abs().max()


def test_toy_model_folder_fits_the_size_budget():
    total = sum(p.stat().st_size for p in PACKAGED_TINY.rglob("*") if p.is_file())
    assert total <= 20 * 2**20


@pytest.fixture(scope="module")
def toy_onnx(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from sdfast.export.onnx import export_onnx
    from sdfast.model.components import ShapeProfile
    from sdfast.model.info import resolve_model

    info = resolve_model("tiny")
    out = tmp_path_factory.mktemp("toy-onnx") / "engines"
    export_onnx(info, out, ShapeProfile(1, 24, 24, 64, 64, 64, 64, 64, 64), model_arg="tiny")
    return sdfast.load("tiny", backend="onnxruntime", engines=out)


@pytest.mark.parametrize("scheduler", ["lms", "euler", "dpmpp_2m"])
def test_toy_model_draws_the_prompt_through_onnxruntime(toy_onnx, scheduler):
    acc = accuracy(toy_onnx, scheduler, 7.5)
    print(f"onnxruntime {scheduler}: {acc:.1%}")
    assert acc >= 0.95


def test_bf16_matches_fp32_end_to_end_tier_3(toy_pipe):
    # Tier 3 for the CPU's fast precision (the CLI's default where the CPU has bf16 units).
    fast = sdfast.load("tiny", dtype="bf16")
    ref = toy_pipe.generate(PROMPTS[:4], steps=STEPS, seed=0, scheduler="euler")
    out = fast.generate(PROMPTS[:4], steps=STEPS, seed=0, scheduler="euler")
    assert torch.isfinite(out.latents).all()
    # the one PSNR that sdfast parity and the device check use
    from sdfast.measure.parity import FP16_MIN_PSNR, image_metrics

    psnr = image_metrics(np.stack([np.asarray(im) for im in ref.images]),
                         np.stack([np.asarray(im) for im in out.images]))["psnr_db"]
    print(f"bf16 vs fp32: {psnr:.1f} dB")
    assert psnr >= FP16_MIN_PSNR
