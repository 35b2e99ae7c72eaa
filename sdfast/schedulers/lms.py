"""LMS: the linear multistep sampler of Katherine Crowson's k-diffusion (``sample_lms``),
an Adams-Bashforth method in sigma space; equal to diffusers' ``LMSDiscreteScheduler`` (order 4).

The step integrates the Lagrange polynomial through the last few ODE slopes over
``[sigma_i, sigma_{i+1}]``. diffusers integrates it numerically (scipy ``quad``) on every
step; the integrand is a polynomial, so we integrate it exactly, once per step, in
``set_timesteps``.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.polynomial import polynomial as poly

from .base import SigmaScheduler, StepIndex, at

ORDER = 4


def lms_coefficients(sigmas: np.ndarray, order: int = ORDER) -> np.ndarray:
    """(N, order) float64 table; row i holds the weights of slopes d_i, d_{i-1}, ... at step i.

    Weight k is the integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial that
    is 1 at sigma_{i-k} and 0 at the other nodes sigma_i, ..., sigma_{i-o+1}. Like diffusers,
    step i uses o = min(i + 1, order) nodes counted from the *absolute* step index, even when
    a run (img2img) starts later with fewer slopes in its history; the missing slopes are zero.
    """
    n = len(sigmas) - 1
    table = np.zeros((n, order), dtype=np.float64)
    for i in range(n):
        o = min(i + 1, order)
        # Shift the variable to u = tau - sigma_i so the antiderivative stays well conditioned.
        nodes = sigmas[i - np.arange(o)] - sigmas[i]
        width = sigmas[i + 1] - sigmas[i]
        for k in range(o):
            others = np.delete(nodes, k)
            basis = poly.polyfromroots(others) / np.prod(nodes[k] - others)
            table[i, k] = poly.polyval(width, poly.polyint(basis))  # antiderivative is 0 at u = 0
    return table


class LMSScheduler(SigmaScheduler):
    name = "lms"
    default_spacing = "linspace"
    tables = (*SigmaScheduler.tables, "_coeffs")
    state = ("_slopes",)

    def _build_step_tables(self, sigmas: torch.Tensor, device: torch.device | str) -> None:
        self._coeffs = torch.from_numpy(lms_coefficients(sigmas.numpy())).float().to(device)  # (N, 4)
        self._slopes: torch.Tensor | None = None

    def begin(self, sample: torch.Tensor) -> None:
        # Slope history, newest first: slopes[k] = d_{i-k}. Zeros stand for "not seen yet".
        self._slopes = torch.zeros((ORDER, *sample.shape), dtype=sample.dtype, device=sample.device)

    def step(
        self, model_output: torch.Tensor, i: StepIndex, sample: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        slopes = self._slopes
        if slopes is None:
            raise RuntimeError("scheduler: call begin(latents) before the first step to allocate the LMS history")
        sigma = at(self.sigmas, i)
        coeffs = at(self._coeffs, i)  # (4,)
        # k-diffusion sample_lms:
        x0 = self.denoised(model_output, sample, sigma)  # 1. denoised estimate
        d = (sample - x0) / sigma  # 2. ODE slope dx/dsigma (Karras et al. 2022, eq. 3)
        for k in range(ORDER - 1, 0, -1):  # 3. push d_i onto the history, dropping d_{i-4}
            slopes[k].copy_(slopes[k - 1])
        slopes[0].copy_(d)
        update = coeffs[0] * slopes[0]  # 4. x_{i+1} = x_i + sum_k c_{i,k} d_{i-k}
        for k in range(1, ORDER):
            update = update + coeffs[k] * slopes[k]
        return sample + update
