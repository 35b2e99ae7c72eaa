"""Exact batching on this machine: kernels whose rows do not depend on the batch, and the
warm-up probe that checks a batched image equals the same image alone (see ImageService)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..request import Request

if TYPE_CHECKING:
    from ..runtime import Pipeline

log = logging.getLogger(__name__)


def use_batch_invariant_kernels() -> None:
    """Switch this process to CPU kernels whose result for a row does not depend on how many rows
    share the call, measured on a Xeon with AVX-512/AMX (torch 2.13, MKL 2024.2, oneDNN 3.12):

    - oneDNN (``torch.backends.mkldnn``) convolutions and matmuls pick blockings by the batch
      size; off, convolutions run as im2col + MKL GEMM per image, and bf16 GEMMs get slow;
    - NNPACK takes over convolutions from batch 16 up with other arithmetic; off;
    - MKL's SGEMM picks kernels by the row count; ``MKL_CBWR=AUTO,STRICT`` (Conditional
      Numerical Reproducibility, strict mode) fixes one order. MKL reads it at its first call,
      so this has to run before the first matrix product in the process.

    Two effects remain that no kernel switch removes, both outside the U-Net loop on our models:
    diffusers' attention returns a channels-last view, and a residual add of it keeps that layout
    for N > 1 rows but not for N = 1 (size-1 dims do not count in the stride order), so a 1-row
    VAE decode runs the NCHW conv/GroupNorm kernels and a batched one the NHWC ones (measured:
    making their inputs contiguous makes the decode batch-invariant); and an elementwise
    transcendental (QuickGELU) computes the tail of a tensor whose row size is not a multiple of
    the SIMD width with scalar code, so tiny-random's CLIP (width 37) is not batch-invariant.
    Text encoding and decoding each request on its own, as its lone run does, avoids both.

    fp32 loses ~25-45 % of its speed on the tiny model, bf16 ~4-10x (no oneDNN): the price of
    exact batching on a CPU. CUDA kernels are not covered (unverified: the probe decides there).
    """
    import os

    import torch

    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    torch.backends.mkldnn.enabled = False
    torch.backends.nnpack.set_flags(False)


@dataclass
class ProbeResult:
    latents: bool  # every batched latent equals its lone run's
    images: bool  # every image from run_batch equals its lone run's
    own_decode: bool  # every image equals when each request's latents are decoded on their own


def probe_batch_invariance(pipe: Pipeline, size: tuple[int, int], k: int) -> ProbeResult:
    """Run k short requests (distinct seeds and guidance scales) alone, then the first 2, 3, ...
    k of them as one batch each, and compare bit for bit with the lone runs. That depends on the
    kernels (a CPU GEMM may pick another blocking for another row count), so it is measured on
    the engines actually served, not assumed. Every batch size is tried because kernels switch
    at sizes of their own (bf16 oneDNN on this project's CPU: 2 requests differ, 4 and 8 agree).
    It is evidence, not proof: a kernel whose rounding differs only for some values can pass."""
    import numpy as np
    import torch

    def same(a, b) -> bool:
        return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))

    h, w = size
    result = ProbeResult(True, True, True)
    t0 = time.perf_counter()
    # Guided (per-row scales) and unguided: an unguided lone run is a 1-row U-Net call, where
    # layout choices differ (see use_batch_invariant_kernels). 6 steps of the default scheduler
    # (LMS's multistep history is in play from the second step): rounding-boundary differences
    # are rare events, so a longer run has more chances to show one.
    for guided in (True, False):
        reqs = [Request.build(pipe.info, prompt=f"probe {i}", height=h, width=w, steps=6,
                              guidance_scale=7.5 + i % 4 if guided else 1.0, seed=1000 + i) for i in range(k)]
        alone = [pipe.run(r) for r in reqs]
        for n in range(2, k + 1):
            for a, b in zip(alone, pipe.run_batch(reqs[:n]), strict=False):
                result.latents &= torch.equal(a.latents, b.latents)
                result.images &= same(a.images, b.images)
                result.own_decode &= same(a.images, pipe.to_pil(pipe.decode(b.latents)))
    log.info("batch-invariance probe (batches of 2..%d) took %.2f s: %s", k, time.perf_counter() - t0, result)
    return result
