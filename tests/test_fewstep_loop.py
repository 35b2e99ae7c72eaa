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
