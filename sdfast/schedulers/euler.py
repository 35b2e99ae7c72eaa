"""Euler: the first-order ODE sampler of Karras et al. 2022 (EDM), Algorithm 2 without the
Heun correction and without churn; equal to diffusers' ``EulerDiscreteScheduler`` defaults."""

from __future__ import annotations

import torch

from .base import SigmaScheduler, StepIndex, at


class EulerScheduler(SigmaScheduler):
    name = "euler"
    default_spacing = "linspace"
    tables = (*SigmaScheduler.tables, "_dt")
    fixed_options = {
        **SigmaScheduler.fixed_options,
        "interpolation_type": "linear",
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
    }

    def _build_step_tables(self, sigmas: torch.Tensor, device: torch.device | str) -> None:
        # dt_i = sigma_{i+1} - sigma_i; taken from the float32 sigmas so it equals diffusers' dt.
        sigmas32 = sigmas.float()
        self._dt = (sigmas32[1:] - sigmas32[:-1]).to(device)  # (N,)

    def step(
        self, model_output: torch.Tensor, i: StepIndex, sample: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        sigma = at(self.sigmas, i)
        x = sample.float()
        # Karras et al. 2022, Algorithm 2 (s_churn = 0, so sigma_hat = sigma):
        x0 = self.denoised(model_output, x, sigma)  # 1. denoised estimate D(x; sigma)
        d = (x - x0) / sigma  # 2. ODE slope dx/dsigma = (x - D(x; sigma)) / sigma   (eq. 3)
        x_next = x + d * at(self._dt, i)  # 3. Euler step to sigma_{i+1}
        return x_next.to(model_output.dtype)
