"""The shipped toy LoRA (sdfast/data/loras/toy-orange.safetensors) teaches the toy model orange.

The toy world has six colours; scripts/train_toy_lora.py trained a LoRA that adds orange (its RGB
is in the file's ``sdfast_toy_lora`` metadata). With it, "a orange {shape} on a {bg} background"
draws an orange shape; without it the base model draws some other colour; the old colours stay
right. Graded like tests/test_toy_model.py (toy.classify's centre and corner patches), with orange
added to the palette for the new colour. scripts/eval_toy_lora.py grades the full caption sets.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import sdfast
from sdfast import toy
from sdfast.model.info import PACKAGED_TINY

LORA = Path(sdfast.__file__).parent / "data" / "loras" / "toy-orange.safetensors"

pytestmark = pytest.mark.skipif(not ((PACKAGED_TINY / "model_index.json").is_file() and LORA.is_file()),
                                reason="the trained toy model or its LoRA is not installed")

STEPS = 20
SEED = 7
#: orange shapes on five backgrounds, one of each shape at least
ORANGE = [("circle", "black"), ("square", "green"), ("triangle", "white"), ("circle", "yellow"), ("square", "black")]
ORANGE_PROMPTS = [f"a orange {s} on a {b} background" for s, b in ORANGE]
OLD = [("circle", "yellow", "blue"), ("square", "red", "white"), ("triangle", "green", "black")]
OLD_PROMPTS = [toy.caption(*c) for c in OLD]


def orange_rgb() -> tuple[int, int, int]:
    with safe_open(str(LORA), "pt") as fh:
        return tuple(json.loads(fh.metadata()["sdfast_toy_lora"])["rgb"])


def centre_colour(image) -> str:
    """The dominant colour of toy.classify's centre patch, among the palette and orange."""
    names = [*toy.COLOURS, "orange"]
    palette = np.array([*toy.PALETTE.values(), orange_rgb()], dtype=np.float32)
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = arr.shape[:2]
    ph, pw = h // 8, w // 8
    patch = arr[(h - ph) // 2 : (h - ph) // 2 + ph, (w - pw) // 2 : (w - pw) // 2 + pw].reshape(-1, 3)
    idx = ((patch[:, None] - palette[None]) ** 2).sum(-1).argmin(1)
    return names[int(np.bincount(idx, minlength=len(names)).argmax())]


@pytest.fixture(scope="module")
def lora_pipe():
    return sdfast.load("tiny", loras=[(LORA, 1.0)])


def generate(pipe, prompts):
    return pipe.generate(prompts, steps=STEPS, guidance_scale=7.5, seed=SEED, scheduler="lms").images


def test_shipped_lora_loads_into_the_packaged_toy_model(lora_pipe):
    assert Path(lora_pipe.info.path).resolve() == PACKAGED_TINY.resolve()  # "tiny" is the shipped model
    assert [(lo.file.name, lo.file.format, lo.scale) for lo in lora_pipe.loras] == [("toy-orange", "peft", 1.0)]
    groups = {layer.group for lo in lora_pipe.loras for layer in lo.file.layers}
    assert groups == {"unet", "text_encoder"}
    rgb = orange_rgb()  # a colour of its own: far from every palette colour
    assert all(np.linalg.norm(np.subtract(rgb, c)) > 80 for c in toy.PALETTE.values())


def test_lora_draws_orange_and_the_base_model_does_not(lora_pipe):
    with_lora = [centre_colour(im) for im in generate(lora_pipe, ORANGE_PROMPTS)]
    base = [centre_colour(im) for im in generate(sdfast.load("tiny"), ORANGE_PROMPTS)]
    assert sum(c == "orange" for c in with_lora) >= 4, with_lora
    assert sum(c == "orange" for c in base) <= 1, base


def test_old_colours_stay_right_with_the_lora(lora_pipe):
    got = [toy.classify(im) for im in generate(lora_pipe, OLD_PROMPTS)]
    assert got == [(c, b) for _s, c, b in OLD]
