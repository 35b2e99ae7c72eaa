"""The distilled toy model (``tiny-lcm``, scripts/distill_lcm.py) draws the prompt in few steps.

Graded like the toy model (``toy.classify`` on the centre and the corners) on the tests' own
captions and seeds; the held-out figures (all 90 captions, seeds 100-103) are in the model's
TRAINING.md. The teacher at the same step count draws far worse, which is what distillation buys.
"""

from __future__ import annotations

import numpy as np
import pytest

import sdfast
from sdfast import toy
from sdfast.model.info import PACKAGED_TINY_LCM

pytestmark = pytest.mark.skipif(not (PACKAGED_TINY_LCM / "model_index.json").is_file(),
                                reason="the distilled toy model is not installed")

SEEDS = (0, 1)
_pick = np.random.default_rng(0).choice(len(toy.combos()), size=24, replace=False)
COMBOS = [toy.combos()[i] for i in sorted(_pick)]
PROMPTS = [toy.TEMPLATES[0].format(colour=c, shape=s, background=b) for s, c, b in COMBOS]


def accuracy(pipe, steps: int, guidance: float = 7.5, **options) -> float:
    hits = 0
    for seed in SEEDS:
        out = pipe.generate(PROMPTS, steps=steps, guidance_scale=guidance, seed=seed, **options)
        hits += sum(toy.classify(im) == (c, b) for (_, c, b), im in zip(COMBOS, out.images, strict=True))
    return hits / (len(COMBOS) * len(SEEDS))


@pytest.fixture(scope="module")
def lcm_pipe():
    return sdfast.load("tiny-lcm")


def test_the_folder_names_its_scheduler_so_lcm_is_the_default(lcm_pipe):
    assert lcm_pipe.info.timestep_cond_dim
    out = lcm_pipe.generate(PROMPTS[:1], steps=2)
    assert out.metadata(0)["scheduler"] == "lcm"
    assert out.approximations  # a few-step distilled model is never silent


@pytest.mark.parametrize("steps, bar", [(4, 0.95), (2, 0.9)])
def test_the_distilled_model_draws_the_prompt_in_few_steps(lcm_pipe, steps, bar):
    acc = accuracy(lcm_pipe, steps, scheduler="lcm")
    print(f"tiny-lcm, lcm, {steps} steps: {acc:.1%}")
    assert acc >= bar


@pytest.mark.slow
def test_the_teacher_at_the_same_steps_does_not(lcm_pipe):
    teacher = sdfast.load("tiny")
    assert accuracy(teacher, 4, scheduler="euler") < 0.6  # measured 26.7 % held out (90 captions, seed 100)
