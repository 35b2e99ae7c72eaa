"""The LCM loop: a U-Net that takes ``timestep_cond`` (time_cond_proj_dim) gets the guidance
scale as an embedding, in one U-Net batch per step (no uncond rows)."""

from __future__ import annotations

import pytest
import torch

from sdfast.loop import guidance_embedding


@pytest.mark.parametrize("dim", [256, 32, 7])
def test_guidance_embedding_equals_diffusers(dim):
    from diffusers import LatentConsistencyModelPipeline

    g = torch.tensor([8.5, 1.0, 3.0, 0.0, 15.25])
    ours = guidance_embedding(g, dim)
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, g - 1, embedding_dim=dim)
    assert ours.shape == (5, dim) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6)
    # each row is its own scale's embedding: a swapped scale gives another row
    assert not torch.allclose(ours[0], ours[2])
    torch.testing.assert_close(guidance_embedding(g[2:3], dim)[0], ours[2], rtol=0, atol=0)


class Recorder:
    """A U-Net engine that records what each call got, and forwards the SD inputs."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def __call__(self, **inputs):
        self.calls.append({k: v.clone() for k, v in inputs.items()})
        return self.engine(**{k: v for k, v in inputs.items() if k != "timestep_cond"})


def lcm_shaped(tiny_pipe, tiny_info, dim, cuda_graphs=False):
    """The tiny pipeline, told its U-Net is LCM-distilled (time_cond_proj_dim): the loop's side."""
    import dataclasses

    from sdfast.runtime import Pipeline

    info = dataclasses.replace(tiny_info, unet_config={**tiny_info.unet_config, "time_cond_proj_dim": dim})
    rec = Recorder(tiny_pipe.engines["unet"])
    pipe = Pipeline(info, {**tiny_pipe.engines, "unet": rec}, tiny_pipe.device, tiny_pipe.precision, "torch",
                    tokenizer=tiny_pipe.tokenizer, cuda_graphs=cuda_graphs)
    return pipe, rec, info


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_an_lcm_unet_runs_one_batch_per_step_with_each_rows_scale_embedded(tiny_pipe, tiny_info, cuda_graphs):
    from sdfast.request import Request

    pipe, rec, info = lcm_shaped(tiny_pipe, tiny_info, 16, cuda_graphs)
    reqs = [Request.build(info, prompt="a red circle on a blue background", steps=3, guidance_scale=g, seed=s,
                          scheduler="euler") for g, s in ((8.5, 1), (2.0, 2))]
    outs = pipe.run_batch(reqs)
    assert len(rec.calls) == 3
    want = guidance_embedding(torch.tensor([8.5, 2.0]), 16)
    for call in rec.calls:
        assert call["sample"].shape[0] == 2 and call["encoder_hidden_states"].shape[0] == 2  # no uncond rows
        torch.testing.assert_close(call["timestep_cond"], want, rtol=0, atol=0)
    assert any("LCM-distilled U-Net" in a for a in outs[0].approximations)
    # a row's embedding is its own scale's, whatever the batch-mate's
    rec.calls.clear()
    pipe.run(reqs[1])
    torch.testing.assert_close(rec.calls[0]["timestep_cond"], want[1:], rtol=0, atol=0)


def test_an_lcm_unet_takes_no_negative_prompt_and_no_guidance_cut(tiny_pipe, tiny_info):
    from sdfast.errors import InvalidArgument
    from sdfast.request import Request

    _, _, info = lcm_shaped(tiny_pipe, tiny_info, 16)
    with pytest.raises(InvalidArgument, match="negative_prompt: this model's U-Net is LCM-distilled"):
        Request.build(info, prompt="x", negative_prompt="blue")
    Request.build(info, prompt="x", negative_prompt="")  # empty is no negative prompt
    with pytest.raises(InvalidArgument, match="guidance_until: this model's U-Net is LCM-distilled"):
        Request.build(info, prompt="x", guidance_until=0.5)
    r = Request.build(info, prompt="x", guidance_scale=8.5)
    assert not r.guided and r.guidance_embedded  # one batch, the scale goes in the embedding


# -- tier 2 against diffusers' LatentConsistencyModelPipeline on tiny-random-lcm ------------------

LATENT_RTOL = 1e-4  # test_pipeline_parity's bounds: latents relative to max |ref|, pixels on 0..255
IMAGE_ATOL, IMAGE_MEAN_ATOL = 2, 1.0


@pytest.fixture(scope="module")
def lcm_info(_private_cache):
    from sdfast.model.info import resolve_model

    return resolve_model("tiny-random-lcm")


@pytest.fixture(scope="module")
def lcm_pipes(lcm_info):
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    import sdfast

    ref = LatentConsistencyModelPipeline.from_pretrained(lcm_info.path, torch_dtype=torch.float32,
                                                         safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)

    ref.scheduler = LCMScheduler.from_config(lcm_info.scheduler_config)  # the folder's own config
    return sdfast.load(lcm_info.path), ref


def run_reference(ref, prompts, steps, guidance, seed):
    gen = torch.Generator("cpu").manual_seed(seed)
    lat = ref(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gen, height=64, width=64,
              output_type="latent").images
    gen = torch.Generator("cpu").manual_seed(seed)
    img = ref(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gen, height=64, width=64,
              output_type="np").images
    return lat, (img * 255).round().astype("uint8")


def assert_tier2(out, lat, img):
    import numpy as np

    assert out.latents.shape == lat.shape
    err, scale = (out.latents - lat).abs().max().item(), lat.abs().max().item()
    assert err <= LATENT_RTOL * scale, (err, scale)
    pix = np.abs(np.stack([np.asarray(im) for im in out.images]).astype(int) - img.astype(int))
    assert pix.max() <= IMAGE_ATOL and pix.mean() <= IMAGE_MEAN_ATOL


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lcm_equals_diffusers_lcm_pipeline(lcm_pipes, lcm_info, steps):
    pipe, ref = lcm_pipes
    assert lcm_info.timestep_cond_dim and pipe.generate("x", steps=1).request.scheduler == "lcm"  # folder default
    lat, img = run_reference(ref, ["a red circle on a blue background"], steps, 8.5, 5)
    out = pipe.generate("a red circle on a blue background", steps=steps, guidance_scale=8.5, seed=5)
    assert out.request.scheduler == "lcm" and not out.request.guided
    assert [a.split(":")[0] for a in out.approximations] == ["LCM-distilled U-Net", "scheduler lcm"]
    assert_tier2(out, lat, img)


def test_lcm_rows_of_a_batch_keep_their_own_guidance(lcm_pipes, lcm_info):
    from sdfast.request import Request

    pipe, ref = lcm_pipes
    prompt = "a green square on a white background"
    reqs = [Request.build(lcm_info, prompt=prompt, steps=4, guidance_scale=g, seed=7) for g in (8.5, 2.0)]
    batched = pipe.run_batch(reqs)
    for g, out in zip((8.5, 2.0), batched, strict=True):
        lat, img = run_reference(ref, [prompt], 4, g, 7)  # each row is diffusers' run at its own scale
        assert_tier2(out, lat, img)
    assert (batched[0].latents - batched[1].latents).abs().max() > 1e-3  # the scale really reached the U-Net


def test_lcm_graphed_step_equals_the_plain_loop(lcm_pipes, lcm_info):
    from sdfast.runtime import Pipeline

    pipe, _ = lcm_pipes
    graphed = Pipeline(lcm_info, pipe.engines, pipe.device, pipe.precision, "torch", tokenizer=pipe.tokenizer,
                       cuda_graphs=True)
    for g in (8.5, 3.0):  # the second run reuses the static buffers with another scale
        a = graphed.generate(["a red circle", "a white triangle"], steps=4, guidance_scale=g, seed=9)
        b = pipe.generate(["a red circle", "a white triangle"], steps=4, guidance_scale=g, seed=9)
        torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=1e-5)
