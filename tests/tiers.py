"""Tier 1 of docs/architecture.md's parity tiers, as the engine tests assert it: an engine's run
against the eager (or torch DeepCache) run of the same request."""

from __future__ import annotations

import numpy as np

LATENT_RTOL = 1e-4  # max |ours - ref| relative to max |ref|: tier 1
IMAGE_ATOL = 2  # max, on 0..255


def assert_tier1(out, ref) -> None:
    """``out`` and ``ref`` (GenerationOutputs): same latent shape, latents within LATENT_RTOL of
    max |ref|, every pixel within IMAGE_ATOL."""
    assert out.latents.shape == ref.latents.shape
    err = (out.latents - ref.latents).abs().max().item()
    scale = ref.latents.abs().max().item()
    print(f"latents max abs diff {err:.3g} (relative {err / scale:.2g})")
    assert err <= LATENT_RTOL * scale
    a = np.stack([np.asarray(i) for i in out.images]).astype(int)
    b = np.stack([np.asarray(i) for i in ref.images]).astype(int)
    assert np.abs(a - b).max() <= IMAGE_ATOL
