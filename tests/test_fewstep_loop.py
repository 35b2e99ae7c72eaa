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
