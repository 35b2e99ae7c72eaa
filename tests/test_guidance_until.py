"""--guidance-until F: classifier-free guidance for the first fraction F of the steps, then one
U-Net row per image. Off by default; F=1 is the exact guided run, F=0 the conditional-only run;
in between the steps after the cut run B rows, not 2B; recorded as an approximation."""

from __future__ import annotations

import pytest
import torch

from sdfast.cli import main
from sdfast.errors import InvalidArgument
from sdfast.media import read_png_metadata
from sdfast.request import Request
from sdfast.runtime import Pipeline

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


class RowCounter:
    """A U-Net engine that records the batch of every call and forwards it."""

    def __init__(self, engine):
        self.engine, self.rows = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def __call__(self, **inputs):
        self.rows.append(inputs["sample"].shape[0])
        return self.engine(**inputs)


@pytest.fixture()
def counted(tiny_pipe, tiny_info):
    counter = RowCounter(tiny_pipe.engines["unet"])
    pipe = Pipeline(tiny_info, {**tiny_pipe.engines, "unet": counter}, tiny_pipe.device, tiny_pipe.precision,
                    "torch", tokenizer=tiny_pipe.tokenizer)
    return pipe, counter


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_off_by_default_and_one_is_the_exact_run(counted, tiny_info):
    pipe, counter = counted
    exact = pipe.generate(PROMPTS, steps=6, scheduler="euler", seed=1)
    assert counter.rows == [4] * 6 and exact.approximations == []
    counter.rows.clear()
    full = pipe.generate(PROMPTS, steps=6, scheduler="euler", seed=1, guidance_until=1.0)
    assert counter.rows == [4] * 6 and full.approximations == []
    assert torch.equal(full.latents, exact.latents)


def test_zero_is_the_conditional_only_run(counted):
    pipe, counter = counted
    cond_only = pipe.generate(PROMPTS, steps=5, scheduler="euler", seed=1, guidance_scale=1.0)
    counter.rows.clear()
    zero = pipe.generate(PROMPTS, steps=5, scheduler="euler", seed=1, guidance_until=0.0)
    assert counter.rows == [2] * 5
    # the text encoder saw 4 rows instead of 2: equal up to float order
    assert rel_err(zero.latents, cond_only.latents) <= 3e-4
    assert any("guidance_until 0" in a for a in zero.approximations)


def test_steps_after_the_cut_run_one_row_per_image(counted):
    pipe, counter = counted
    exact = pipe.generate(PROMPTS, steps=10, scheduler="euler", seed=1)
    counter.rows.clear()
    half = pipe.generate(PROMPTS, steps=10, scheduler="euler", seed=1, guidance_until=0.3)
    assert counter.rows == [4] * 3 + [2] * 7  # ceil(0.3 × 10) guided steps
    assert rel_err(half.latents, exact.latents) > 1e-3  # the cut really changed the result
    assert half.approximations == ["guidance_until 0.3: classifier-free guidance for steps 0..2 only, "
                                   "conditional-only steps after"]
    counter.rows.clear()
    pipe.generate(PROMPTS, steps=10, scheduler="euler", seed=1, guidance_until=0.31)
    assert counter.rows == [4] * 4 + [2] * 6  # just past 0.3: one more guided step


def test_the_graphed_loop_runs_the_cut_the_same(tiny_pipe, tiny_info):
    graphed = Pipeline(tiny_info, tiny_pipe.engines, tiny_pipe.device, tiny_pipe.precision, "torch",
                       tokenizer=tiny_pipe.tokenizer, cuda_graphs=True)
    a = graphed.generate(PROMPTS, steps=6, scheduler="dpmpp_2m", seed=4, guidance_until=0.5)
    b = tiny_pipe.generate(PROMPTS, steps=6, scheduler="dpmpp_2m", seed=4, guidance_until=0.5)
    assert rel_err(a.latents, b.latents) <= 3e-4


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan"), True, "half"])
def test_outside_zero_one_is_refused_naming_it(tiny_info, bad):
    with pytest.raises(InvalidArgument, match="guidance_until: must be a fraction of the steps in \\[0, 1\\]"):
        Request.build(tiny_info, prompt="x", guidance_until=bad)


def test_unguided_requests_record_no_cut(tiny_info):
    r = Request.build(tiny_info, prompt="x", steps=10, guidance_scale=1.0, guidance_until=0.5)
    assert r.guidance_cut is None and r.approximations() == []


def test_cli_records_it_in_the_png(tiny_info, tmp_path, capsys):
    out = tmp_path / "o.png"
    assert main(["generate", "a red circle on a blue background", "--model", str(tiny_info.path), "--steps", "4",
                 "--scheduler", "euler", "--guidance-until", "0.5", "--out", str(out), "--quiet"]) == 0
    meta = read_png_metadata(out)
    assert meta["guidance_until"] == 0.5
    assert meta["approximations"] == ["guidance_until 0.5: classifier-free guidance for steps 0..1 only, "
                                      "conditional-only steps after"]
    assert main(["generate", "x", "--model", str(tiny_info.path), "--guidance-until", "1.5",
                 "--out", str(tmp_path / "p.png"), "--quiet"]) == 2
    assert "guidance_until" in capsys.readouterr().err and not (tmp_path / "p.png").exists()
