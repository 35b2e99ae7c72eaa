"""Euler ancestral: an Euler step down to ``sigma_down`` plus fresh noise of ``sigma_up``
(Katherine Crowson's k-diffusion ``sample_euler_ancestral``, the DDPM ancestral split of
Ho et al. 2020 written in sigma space); equal to diffusers' ``EulerAncestralDiscreteScheduler``.

The noise is drawn by the caller, one ``torch.randn(shape, generator=g)`` per step in order,
so the step stays pure tensor math and one seed gives the same image as diffusers.
"""

from __future__ import annotations

import torch

from .base import SigmaScheduler, StepIndex, at


class EulerAncestralScheduler(SigmaScheduler):
    name = "euler_a"
    needs_noise = True
    prediction_types = ("epsilon", "v_prediction")  # diffusers' EulerAncestral has no "sample"
    default_spacing = "linspace"
    tables = (*SigmaScheduler.tables, "_sigma_up", "_dt")

    def _build_step_tables(self, sigmas: torch.Tensor, device: torch.device | str) -> None:
        sigma_from, sigma_to = sigmas[:-1], sigmas[1:]
        # Split the move sigma_from -> sigma_to into a deterministic part down to sigma_down and
        # a stochastic part sigma_up with sigma_down^2 + sigma_up^2 = sigma_to^2.
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2).clamp(min=0) ** 0.5
        self._sigma_up = sigma_up.float().to(device)  # (N,)
        self._dt = (sigma_down - sigma_from).float().to(device)  # (N,)

    def step(
        self, model_output: torch.Tensor, i: StepIndex, sample: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        if noise is None:
            raise ValueError(
                "noise: euler_a needs fresh Gaussian noise at every step but got None; pass "
                "noise=torch.randn(sample.shape, generator=g) drawn in step order from the seed's generator"
            )
        sigma = at(self.sigmas, i)
        x = sample.float()
        # k-diffusion sample_euler_ancestral:
        x0 = self.denoised(model_output, x, sigma)  # 1. denoised estimate
        d = (x - x0) / sigma  # 2. ODE slope dx/dsigma (Karras et al. 2022, eq. 3)
        x_next = x + d * at(self._dt, i)  # 3. Euler step down to sigma_down
        x_next = x_next + noise * at(self._sigma_up, i)  # 4. add back noise up to sigma_{i+1}
        return x_next.to(model_output.dtype)
