"""Every request rule at its edges: the smallest and largest accepted values next to the first
refused ones on either side (for floats, the neighbouring float), through ``Request.build`` and
through ``sdfast generate``'s flags. A refusal is an InvalidArgument whose message starts with the
argument's name and states the rule.

The limits are the documented ones, written out here: sides 64..2048 in multiples of the VAE
factor (8 for SD), 1..num_train_timesteps steps, guidance 0..100, seeds 0..2**64-1, 1..64 images
per prompt, strength in (0, 1] with at least one step run, guidance_until in [0, 1] and
cache_interval >= 1.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from PIL import Image

import sdfast.runtime
from sdfast import rules
from sdfast.cli import main
from sdfast.errors import InvalidArgument
from sdfast.request import Request


def below(x: float) -> float:
    return math.nextafter(x, -math.inf)


def above(x: float) -> float:
    return math.nextafter(x, math.inf)


def build(info, **kw) -> Request:
    return Request.build(info, **({"prompt": "a cat", "steps": 2} | kw))


def refused(info, arg: str, rule: str, **kw) -> str:
    with pytest.raises(InvalidArgument) as e:
        build(info, **kw)
    msg = str(e.value)
    assert msg.startswith(f"{arg}: "), msg
    assert rule in msg, msg
    assert "\n" not in msg
    return msg


# -- Request.build ----------------------------------------------------------------------------

STEPS_RULE = "must be an integer from 1 to 1000"


@pytest.mark.parametrize("steps", [1, 2, 999, 1000, np.int64(1000)])
def test_steps_from_one_to_the_training_schedule_are_accepted(tiny_info, steps):
    assert build(tiny_info, steps=steps).steps == steps


@pytest.mark.parametrize("steps", [0, -1, 1001, 10**6, 1.0, 2.5, "2", True, None])
def test_steps_outside_or_not_integers_are_refused(tiny_info, steps):
    refused(tiny_info, "steps", STEPS_RULE, steps=steps)


def test_the_steps_limit_is_the_models_training_schedule(tiny_info):
    info = dataclasses.replace(tiny_info, scheduler_config={**tiny_info.scheduler_config, "num_train_timesteps": 500})
    assert build(info, steps=500).steps == 500
    refused(info, "steps", "must be an integer from 1 to 500", steps=501)
    refused(info, "steps", "from 1 to 500", steps=0)


GUIDANCE_RULE = "must be a finite number >= 0 and <= 100"


@pytest.mark.parametrize("g", [0, 0.0, -0.0, 5e-324, 1.0, above(1.0), 7.5, 7, below(100.0), 100, 100.0])
def test_guidance_from_zero_to_one_hundred_is_accepted(tiny_info, g):
    req = build(tiny_info, guidance_scale=g)
    assert req.guidance_scale == float(g) and isinstance(req.guidance_scale, float)


@pytest.mark.parametrize("g", [below(0.0), -1, above(100.0), 101, 1e20, math.inf, -math.inf, math.nan, True, False,
                               "7.5", None])
def test_guidance_outside_or_not_a_number_is_refused(tiny_info, g):
    refused(tiny_info, "guidance_scale", GUIDANCE_RULE, guidance_scale=g)


def test_guidance_just_above_one_is_guided_and_one_is_not(tiny_info):
    assert not build(tiny_info, guidance_scale=1.0).guided
    assert build(tiny_info, guidance_scale=above(1.0)).guided


@pytest.mark.parametrize("seed", [0, 1, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1, np.uint64(2**64 - 1), np.int8(0)])
def test_seeds_from_zero_to_two_to_the_sixty_four_minus_one_are_accepted(tiny_info, seed):
    assert build(tiny_info, seed=seed).seed == int(seed)


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**64, 2**65, 0.0, 1.5, "1", True, False, None])
def test_seeds_outside_or_not_integers_are_refused(tiny_info, seed):
    refused(tiny_info, "seed", "must be an integer from 0 to 2**64-1", seed=seed)


@pytest.mark.parametrize("arg", ["height", "width"])
@pytest.mark.parametrize("v", [64, 72, 512, 2040, 2048, np.int32(64)])
def test_sides_from_64_to_2048_in_multiples_of_8_are_accepted(tiny_info, arg, v):
    assert getattr(build(tiny_info, **{arg: v}), arg) == v


@pytest.mark.parametrize("arg", ["height", "width"])
@pytest.mark.parametrize("v", [63, 56, 8, 0, -64, 2049, 2056, 4096])
def test_sides_outside_64_to_2048_are_refused(tiny_info, arg, v):
    refused(tiny_info, arg, f"must be between 64 and 2048 pixels but is {v}", **{arg: v})


@pytest.mark.parametrize("arg", ["height", "width"])
@pytest.mark.parametrize("v,fix", [(65, "use 64 or 72"), (71, "use 64 or 72"), (68, "use 64 or 72"),
                                   (2041, "use 2040 or 2048"), (2047, "use 2040 or 2048")])
def test_sides_between_multiples_are_refused_with_the_two_nearest(tiny_info, arg, v, fix):
    refused(tiny_info, arg, f"must be a multiple of 8 (the VAE scale factor) but is {v}; {fix}", **{arg: v})


@pytest.mark.parametrize("arg", ["height", "width"])
@pytest.mark.parametrize("v", [64.0, "64", True])
def test_sides_that_are_not_integers_are_refused(tiny_info, arg, v):
    refused(tiny_info, arg, "must be an integer number of pixels", **{arg: v})


@pytest.mark.parametrize("n", [1, 2, 63, 64])
def test_one_to_64_images_per_prompt_are_accepted(tiny_info, n):
    req = build(tiny_info, num_images_per_prompt=n)
    assert req.batch == n and req.num_images_per_prompt == n


@pytest.mark.parametrize("n", [0, -1, 65, 1000, 2.0, True, None])
def test_images_per_prompt_outside_one_to_64_are_refused(tiny_info, n):
    refused(tiny_info, "num_images_per_prompt", "must be an integer from 1 to 64", num_images_per_prompt=n)


@pytest.fixture(scope="module")
def init():
    return Image.new("RGB", (64, 64), (200, 30, 30))


@pytest.mark.parametrize("steps,strength", [(2, 1.0), (2, 1), (2, 0.5), (10, 0.1), (1000, 0.001), (1, 1.0),
                                            (3, below(1.0))])
def test_strength_in_zero_one_that_runs_a_step_is_accepted(tiny_info, init, steps, strength):
    req = build(tiny_info, image=init, steps=steps, strength=strength)
    assert req.strength == strength and req.steps - req.start_step == int(steps * strength) >= 1


@pytest.mark.parametrize("strength", [0, 0.0, -0.0, below(0.0), -1, above(1.0), 1.5, math.nan, math.inf, True,
                                      "0.8"])
def test_strength_outside_zero_one_is_refused(tiny_info, init, strength):
    refused(tiny_info, "strength", "must be in (0, 1]", image=init, strength=strength)


@pytest.mark.parametrize("strength", [0, 7, math.nan, "0.8"])
def test_strength_outside_zero_one_is_refused_without_an_init_image_too(tiny_info, strength):
    """A wrong value is refused by name even where text to image does not use it (not a TypeError)."""
    refused(tiny_info, "strength", "must be in (0, 1]", strength=strength)


def test_strength_none_is_the_default_of_img2img(tiny_info, init):
    """None asks for the default: 0.8 for img2img (with a mask 1: tests/test_inpaint.py)."""
    assert build(tiny_info, image=init, strength=None, steps=4).strength == 0.8


@pytest.mark.parametrize("strength", [np.float32(0.5), np.float64(1.0), 1])
def test_numpy_and_integer_strengths_are_numbers(tiny_info, init, strength):
    assert build(tiny_info, image=init, strength=strength, steps=4).strength == float(strength)


@pytest.mark.parametrize("steps,strength", [(10, 0.09), (10, below(0.1)), (1000, 0.0009), (1, below(1.0)),
                                            (2, 0.49), (2, 5e-324)])
def test_strength_that_runs_no_step_is_refused_with_the_fix(tiny_info, init, steps, strength):
    refused(tiny_info, "strength", "steps × strength must be at least 1 step", image=init, steps=steps,
            strength=strength)


@pytest.mark.parametrize("f", [0, 0.0, 5e-324, 0.5, below(1.0), 1, 1.0])
def test_guidance_until_in_zero_one_is_accepted(tiny_info, f):
    assert build(tiny_info, guidance_until=f).guidance_until == float(f)


@pytest.mark.parametrize("f", [below(0.0), -1, above(1.0), 2, math.nan, math.inf, True, False, "0.5"])
def test_guidance_until_outside_zero_one_is_refused(tiny_info, f):
    refused(tiny_info, "guidance_until", "must be a fraction of the steps in [0, 1]", guidance_until=f)


@pytest.mark.parametrize("n", [1, 2, 5, 50, 10**6])
def test_cache_interval_from_one_up_is_accepted(tiny_info, n):
    assert build(tiny_info, cache_interval=n).cache_interval == n


@pytest.mark.parametrize("n", [0, -1, 2.0, "2", True])
def test_cache_interval_below_one_or_not_an_integer_is_refused(tiny_info, n):
    refused(tiny_info, "cache_interval", "must be an integer >= 1", cache_interval=n)


def test_cache_interval_and_guidance_until_default_off(tiny_info):
    req = build(tiny_info, guidance_until=None, cache_interval=None)
    assert req.cache_interval is None and req.guidance_until is None and req.approximations() == []


@pytest.mark.parametrize("name", ["lms", "euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "lcm", "tcd"])
def test_each_scheduler_name_is_accepted(tiny_info, name):
    assert build(tiny_info, scheduler=name).scheduler == name


@pytest.mark.parametrize("name", ["Euler", "EULER", "euler ", " euler", "euler-a", "eulera", "dpmpp", "", 1])
def test_near_miss_scheduler_names_are_refused(tiny_info, name):
    refused(tiny_info, "scheduler", f"unknown {name!r}; choose one of lms, euler", scheduler=name)


@pytest.mark.parametrize("mode", ["chunk", "truncate"])
def test_long_prompt_modes_are_accepted(tiny_info, mode):
    assert build(tiny_info, long_prompt=mode).long_prompt == mode


@pytest.mark.parametrize("mode", ["Chunk", "chunks", "truncated", "", None])
def test_near_miss_long_prompt_modes_are_refused(tiny_info, mode):
    refused(tiny_info, "long_prompt", "choose one of chunk, truncate", long_prompt=mode)


@pytest.mark.parametrize("kw", [dict(crops_coords_top_left=(0, 0)), dict(crops_coords_top_left=[0, 0]),
                                dict(negative_crops_coords_top_left=[0, 0]), dict(original_size=None)])
def test_sdxl_arguments_at_their_defaults_pass_on_sd(tiny_info, kw):
    build(tiny_info, **kw)


@pytest.mark.parametrize("kw,arg", [(dict(crops_coords_top_left=(0, 1)), "crops_coords_top_left"),
                                    (dict(crops_coords_top_left=[1, 0]), "crops_coords_top_left"),
                                    (dict(original_size=(64, 64)), "original_size"),
                                    (dict(target_size=[64, 64]), "target_size"),
                                    (dict(prompt_2=""), "prompt_2")])
def test_sdxl_arguments_off_their_defaults_are_refused_on_sd(tiny_info, kw, arg):
    refused(tiny_info, arg, "only SDXL models take it", **kw)


def test_negative_prompts_must_match_the_prompts_one_for_one(tiny_info):
    assert build(tiny_info, prompt=["a", "b"], negative_prompt=["x", "y"]).negative_prompts == ["x", "y"]
    for negatives in (["x"], ["x", "y", "z"], []):
        refused(tiny_info, "negative_prompt", f"has {len(negatives)} for 2 prompts", prompt=["a", "b"],
                negative_prompt=negatives)


def test_a_list_of_one_prompt_is_accepted_and_an_empty_list_is_not(tiny_info):
    assert build(tiny_info, prompt=[""]).prompts == [""]
    refused(tiny_info, "prompt", "the list is empty", prompt=[])


# -- the rules themselves -----------------------------------------------------------------------

@pytest.mark.parametrize("v,ok", [(4, False), (5, True), (9, True), (10, False)])
def test_check_int_is_inclusive_at_both_ends(v, ok):
    if ok:
        assert rules.check_int("n", v, 5, 9) == v
    else:
        with pytest.raises(InvalidArgument, match=r"^n: must be an integer from 5 to 9 but is"):
            rules.check_int("n", v, 5, 9)


def test_check_int_without_an_upper_bound_names_only_the_lower():
    assert rules.check_int("n", 10**30, 3) == 10**30
    with pytest.raises(InvalidArgument, match=r"^n: must be an integer >= 3 but is 2; try more$"):
        rules.check_int("n", 2, 3, hint="try more")


@pytest.mark.parametrize("v,ok", [(64, True), (48, False), (80, True), (72, False), (2048, True), (2064, False)])
def test_check_side_follows_the_multiple_it_is_given(v, ok):
    if ok:
        assert rules.check_side("height", v, 16, "test") == v
    else:
        with pytest.raises(InvalidArgument, match=r"^height: must be (between|a multiple of 16)"):
            rules.check_side("height", v, 16, "test")


def test_check_steps_is_one_to_the_schedule_length():
    assert rules.check_steps(1, 20) == 1 and rules.check_steps(20, 20) == 20
    for v in (0, 21):
        with pytest.raises(InvalidArgument, match=r"^steps: must be an integer from 1 to 20 "):
            rules.check_steps(v, 20)


@pytest.mark.parametrize("v,ok", [(np.int64(3), True), (np.uint8(3), True), (3, True), (True, False),
                                  (np.bool_(True), False), (3.0, False), (np.float32(3), False), ("3", False)])
def test_is_int_takes_integers_of_any_kind_but_not_bools(v, ok):
    assert rules.is_int(v) is ok


# -- the command line -------------------------------------------------------------------------

@pytest.fixture
def cli(tiny_info, tmp_path, monkeypatch, capsys):
    """Run ``sdfast generate`` with flags: ``ok`` (every check passed: it went on to load the
    weights, which raises a marker here) or the one error line it printed."""

    class Reached(Exception):
        pass

    def load(*a, **k):
        raise Reached

    monkeypatch.setattr(sdfast.runtime, "load", load)
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64)).save(init)

    def run(*flags: str) -> str:
        argv = ["generate", "a cat", "--model", str(tiny_info.path), "--out", str(tmp_path / "o.png"), "--quiet",
                *[str(init) if f == "INIT" else f for f in flags]]
        capsys.readouterr()
        try:
            code = main(argv)
        except Reached:
            return "ok"
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err, err
        assert not (tmp_path / "o.png").exists()
        return err.removeprefix("sdfast generate: error: ")

    return run


CLI_CASES = [
    (["--steps", "1"], None), (["--steps", "1000"], None),
    (["--steps", "0"], "steps:"), (["--steps", "1001"], "steps:"),
    (["--guidance-scale", "0"], None), (["--guidance-scale", "100"], None),
    (["--guidance-scale=-1e-9"], "guidance_scale:"), (["--guidance-scale", "100.00001"], "guidance_scale:"),
    (["--guidance-scale", "nan"], "guidance_scale:"),
    (["--seed", "0"], None), (["--seed", str(2**64 - 1)], None),
    (["--seed", "-1"], "seed:"), (["--seed", str(2**64)], "seed:"),
    (["--height", "64"], None), (["--width", "2048"], None),
    (["--height", "63"], "height: must be between 64 and 2048"), (["--width", "2049"], "width: must be between"),
    (["--height", "72"], None), (["--height", "68"], "height: must be a multiple of 8"),
    (["--num-images", "1"], None), (["--num-images", "64"], None),
    (["--num-images", "0"], "num_images_per_prompt:"), (["--num-images", "65"], "num_images_per_prompt:"),
    (["--init-image", "INIT", "--strength", "1"], None), (["--init-image", "INIT", "--strength", "1.0000001"], "strength:"),
    (["--init-image", "INIT", "--strength", "0"], "strength: must be in (0, 1]"),
    (["--init-image", "INIT", "--steps", "10", "--strength", "0.1"], None),
    (["--init-image", "INIT", "--steps", "10", "--strength", "0.09"], "strength: steps × strength"),
    (["--guidance-until", "0"], None), (["--guidance-until", "1"], None),
    (["--guidance-until", "-0.001"], "guidance_until:"), (["--guidance-until", "1.001"], "guidance_until:"),
    (["--cache-interval", "1"], None), (["--cache-interval", "0"], "cache_interval:"),
]


@pytest.mark.parametrize("flags,error", CLI_CASES, ids=[" ".join(f) for f, _ in CLI_CASES])
def test_generate_flags_at_their_bounds(cli, flags, error):
    got = cli(*flags)
    if error is None:
        assert got == "ok", got
    else:
        assert got.startswith(error), got


@pytest.mark.parametrize("flags", [["--steps", "1.5"], ["--seed", "1e3"], ["--num-images", "two"],
                                   ["--cache-interval", "2.0"]])
def test_generate_flags_that_are_not_numbers_are_argparse_errors(cli, flags, capsys):
    with pytest.raises(SystemExit) as e:
        cli(*flags)
    assert e.value.code == 2 and "invalid int value" in capsys.readouterr().err
