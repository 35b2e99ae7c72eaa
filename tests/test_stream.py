"""Streamed partial images (sdfast/stream.py): the estimate they show, when they come, and that
streaming never changes the final image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_schedulers import SD15_CONFIG, fake_unet, reference, seeded

import sdfast
from sdfast.errors import InvalidArgument
from sdfast.output import GenerationOutput, PartialImage
from sdfast.request import Request
from sdfast.schedulers import make_scheduler
from sdfast.stream import Cancelled, check_partial_images, partial_steps, stream

SOURCE = "a red circle on a blue background"


@pytest.fixture(scope="module")
def toy_pipe():
    return sdfast.load("tiny")  # the trained toy model: partial images have a picture to converge to


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.float64)


# -- the estimate: diffusers' pred_original_sample ------------------------------------------------
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["lms", "euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras"])
def test_the_estimate_equals_diffusers_pred_original_sample(name, prediction):
    config = {**SD15_CONFIG, "prediction_type": prediction}
    ref = reference(name, config)
    ref.set_timesteps(7)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(0)
    ours = make_scheduler(name, config)
    ours.set_timesteps(7, "cpu")
    ours.begin(seeded(0))
    x = seeded(0) * ref.init_noise_sigma
    generator = torch.Generator().manual_seed(3)
    for i, t in enumerate(ref.timesteps):
        out = fake_unet(ref.scale_model_input(x, t), t)
        got = ours.predicted_x0(out, i, x)
        kwargs = {"generator": generator} if name == "euler_a" else {}
        step = ref.step(out, t, x, **kwargs)
        # DPM-Solver keeps its data prediction (x0) as the newest model output
        want = ref.model_outputs[-1] if name.startswith("dpmpp") else step.pred_original_sample
        err = (got - want).abs().max().item()
        assert err <= 1e-5 * max(1.0, want.abs().max().item()), f"{name} step {i}: {err:.3g}"
        x = step.prev_sample


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_consistency_samplers_estimate_x0_from_their_alphas(name):
    """diffusers' LCM / TCD steps return no x0; it is the VP-form estimate at the step's alpha_bar."""
    ours = make_scheduler(name, SD15_CONFIG)
    ours.set_timesteps(4, "cpu")
    alphas = reference(name, SD15_CONFIG).alphas_cumprod
    x = seeded(0)
    for i, t in enumerate(ours.timesteps):
        out = fake_unet(x, t)
        a = alphas[int(t)]
        want = (x - (1 - a).sqrt() * out) / a.sqrt()
        torch.testing.assert_close(ours.predicted_x0(out, i, x), want, rtol=1e-5, atol=1e-5)


# -- when partial images come ---------------------------------------------------------------------
def test_partial_steps_spread_over_the_run_and_never_at_its_end():
    assert partial_steps(0, 10, 3) == [1, 4, 6]
    assert partial_steps(0, 10, 1) == [4]
    assert partial_steps(0, 10, 0) == []
    assert partial_steps(6, 10, 3) == [6, 7, 8]  # img2img: only the steps that run
    assert partial_steps(0, 2, 3) == [0]  # two steps: one partial image, not three
    assert partial_steps(0, 1, 3) == []  # one step: the final image is all there is
    for first, steps, k in [(0, 50, 3), (3, 7, 2), (0, 4, 3), (10, 12, 1)]:
        at = partial_steps(first, steps, k)
        assert at == sorted(set(at)) and len(at) <= k
        assert all(first <= i < steps - 1 for i in at)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_partial_images_accepts_0_to_3(k):
    assert check_partial_images(k) == k


@pytest.mark.parametrize("k", [-1, 4, True, 1.0, "2", None])
def test_partial_images_refuses_the_rest_naming_it(k):
    with pytest.raises(InvalidArgument, match=r"^partial_images: must be an integer from 0 to 3"):
        check_partial_images(k)


def test_partial_images_without_a_receiver_is_refused(tiny_pipe):
    with pytest.raises(InvalidArgument, match="^on_partial:"):
        tiny_pipe.generate("x", steps=4, partial_images=2)


# -- streaming never changes the result -----------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["lms", "euler_a", "dpmpp_2m"])
def test_the_final_image_equals_the_unstreamed_run(tiny_pipe, scheduler):
    plain = tiny_pipe.generate("a cat", steps=8, seed=5, scheduler=scheduler, guidance_scale=6.0)
    got: list[PartialImage] = []
    out = tiny_pipe.generate("a cat", steps=8, seed=5, scheduler=scheduler, guidance_scale=6.0,
                             partial_images=3, on_partial=got.append)
    assert torch.equal(out.latents, plain.latents)
    assert np.array_equal(pixels(out.images[0]), pixels(plain.images[0]))
    assert [(p.index, p.step, p.steps) for p in got] == [(0, 2, 8), (1, 4, 8), (2, 6, 8)]
    assert "partial_images" in out.timings


def test_partial_images_converge_to_the_final_image(toy_pipe):
    """Each partial image is the decoded clean estimate, so it nears the final image step by step
    (the noisy latents decoded would not: they are far from any picture until the end)."""
    got: list[PartialImage] = []
    out = toy_pipe.generate(SOURCE, steps=20, seed=0, scheduler="euler", partial_images=3, on_partial=got.append)
    final = pixels(out.images[0])
    errors = [np.abs(pixels(p.images[0]) - final).mean() for p in got]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 8, errors  # within a few levels of the result two-thirds of the way in
    # the circle is already red in the first partial image (the estimate, not noise)
    first = pixels(got[0].images[0])
    centre = first[24:40, 24:40].mean(axis=(0, 1))
    assert centre[0] > centre[2] + 40, centre


def test_batched_requests_each_get_their_own_partial_rows(tiny_pipe):
    reqs = [Request.build(tiny_pipe.info, prompt=p, steps=6, seed=s, guidance_scale=g, num_images_per_prompt=n)
            for p, s, g, n in (("a cat", 1, 7.5, 2), ("a dog", 2, 5.0, 1))]
    got: list[PartialImage] = []
    tiny_pipe.run_batch(reqs, partial_images=2, on_partial=got.append)
    assert [(p.index, p.request is reqs[0] or p.request is reqs[1], len(p.images)) for p in got] == \
        [(0, True, 2), (0, True, 1), (1, True, 2), (1, True, 1)]
    assert got[0].request is reqs[0] and got[1].request is reqs[1]
    # each partial image is its own request's (as its lone run streams it), and the rows differ
    a, b = got[2].images
    assert not np.array_equal(pixels(a), pixels(b))
    for k, r in enumerate(reqs):
        alone: list[PartialImage] = []
        tiny_pipe.run(r, partial_images=2, on_partial=alone.append)
        for j in range(2):
            batched = got[2 * j + k]
            assert batched.request is r
            for x, y in zip(batched.images, alone[j].images, strict=True):
                assert np.abs(pixels(x) - pixels(y)).max() <= 2  # batch kernels round differently
            other = got[2 * j + 1 - k].images[0]
            assert np.abs(pixels(batched.images[0]) - pixels(other)).mean() > 2


def test_img2img_and_inpainting_stream_the_steps_they_run(toy_pipe):
    source = toy_pipe.generate(SOURCE, steps=10, seed=0, scheduler="euler").images[0]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    for extra in ({"strength": 0.5}, {"mask": mask}):
        kwargs = dict(steps=10, seed=1, scheduler="euler", image=source, **extra)
        plain = toy_pipe.generate("a yellow circle on a blue background", **kwargs)
        got: list[PartialImage] = []
        out = toy_pipe.generate("a yellow circle on a blue background", partial_images=2, on_partial=got.append,
                                **kwargs)
        assert torch.equal(out.latents, plain.latents)
        assert [p.steps for p in got] == [out.steps] * 2 and all(1 <= p.step < out.steps for p in got)


# -- the iterator --------------------------------------------------------------------------------
def test_stream_yields_the_partial_images_then_the_output(tiny_pipe):
    req = Request.build(tiny_pipe.info, prompt="a cat", steps=8, seed=3)
    items = list(stream(tiny_pipe, req, partial_images=2))
    assert [type(i) for i in items] == [PartialImage, PartialImage, GenerationOutput]
    assert torch.equal(items[-1].latents, tiny_pipe.run(req).latents)


class CountingUnet:
    def __init__(self, unet):
        self.unet, self.calls = unet, 0

    def __getattr__(self, name):
        return getattr(self.unet, name)

    def __call__(self, **kw):
        self.calls += 1
        return self.unet(**kw)


def test_leaving_the_stream_early_stops_the_run(tiny_pipe, monkeypatch):
    counter = CountingUnet(tiny_pipe.engines["unet"])
    monkeypatch.setitem(tiny_pipe.engines, "unet", counter)
    req = Request.build(tiny_pipe.info, prompt="a cat", steps=30, seed=3)
    for item in stream(tiny_pipe, req, partial_images=3):
        assert isinstance(item, PartialImage)
        break  # the first partial comes after step 7 of 30
    assert 7 <= counter.calls <= 8, counter.calls
    monkeypatch.undo()
    assert tiny_pipe.run(req).steps == 30  # the pipeline is left usable


def test_errors_of_the_run_reach_the_consumer(tiny_pipe, monkeypatch):
    class Broken(CountingUnet):
        def __call__(self, **kw):
            raise RuntimeError("engine fell over")

    monkeypatch.setitem(tiny_pipe.engines, "unet", Broken(tiny_pipe.engines["unet"]))
    req = Request.build(tiny_pipe.info, prompt="a cat", steps=4, seed=3)
    with pytest.raises(RuntimeError, match="engine fell over"):
        list(stream(tiny_pipe, req, partial_images=1))


def test_a_receiver_that_raises_stops_the_run(tiny_pipe):
    def refuse(p):
        raise Cancelled("client went away")

    with pytest.raises(Cancelled):
        tiny_pipe.generate("a cat", steps=6, partial_images=2, on_partial=refuse)
