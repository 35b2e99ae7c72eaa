"""DDIM: the deterministic (eta = 0) sampler of Song et al. 2021, "Denoising Diffusion
Implicit Models", eq. 12; equal to diffusers' ``DDIMScheduler`` with ``eta=0``."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InvalidArgument
from .base import Scheduler, StepIndex, at


class DDIMScheduler(Scheduler):
    name = "ddim"
    default_spacing = "leading"
    fixed_options = {**Scheduler.fixed_options, "thresholding": False}
    tables = ("timesteps", "_sqrt_alpha", "_sqrt_one_minus_alpha", "_sqrt_alpha_prev", "_sqrt_one_minus_alpha_prev")

    def __init__(self, config: dict):
        super().__init__(config)
        self.clip_sample = bool(config.get("clip_sample", True))
        self.clip_sample_range = float(config.get("clip_sample_range", 1.0))
        self.set_alpha_to_one = bool(config.get("set_alpha_to_one", True))

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        """(n,) int64 descending training timesteps; DDIM rounds "linspace" to whole steps."""
        t_max, spacing = self.schedule.num_train_timesteps, self.spacing
        if spacing == "linspace":
            return np.linspace(0, t_max - 1, n).round()[::-1].astype(np.int64)
        if spacing == "leading":
            return (np.arange(n) * (t_max // n)).round()[::-1].astype(np.int64) + self.schedule.steps_offset
        return np.round(np.arange(t_max, 0, -t_max / n)).astype(np.int64) - 1  # trailing

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str = "cpu") -> None:
        self.check_steps(num_inference_steps)
        t_max = self.schedule.num_train_timesteps
        timesteps = self._spaced_timesteps(num_inference_steps)
        if timesteps.max() >= t_max:
            fewer = next(k for k in range(num_inference_steps - 1, 0, -1) if self._spaced_timesteps(k).max() < t_max)
            raise InvalidArgument(
                f"steps: {num_inference_steps} steps with timestep_spacing {self.spacing!r} and steps_offset "
                f"{self.schedule.steps_offset} would start at timestep {timesteps.max()}, past the last training "
                f"step {t_max - 1}; use fewer steps ({fewer} is the most below {num_inference_steps} that fits)"
            )
        alphas_cumprod = self.schedule.alphas_cumprod().double()  # float32 values, as diffusers
        final = 1.0 if self.set_alpha_to_one else alphas_cumprod[0]
        # diffusers steps back by T // n whatever the spacing, so with "linspace" or "trailing"
        # the "previous" alpha is not always the next timestep's; we keep that for parity.
        prev = timesteps - t_max // num_inference_steps
        alpha = alphas_cumprod[torch.from_numpy(timesteps)]
        alpha_prev = torch.where(
            torch.from_numpy(prev >= 0), alphas_cumprod[torch.from_numpy(prev.clip(min=0))], final
        )
        self.num_inference_steps = len(timesteps)
        self.timesteps = torch.from_numpy(timesteps.astype(np.float32)).to(device)
        self._sqrt_alpha = (alpha**0.5).float().to(device)  # (N,)
        self._sqrt_one_minus_alpha = ((1 - alpha) ** 0.5).float().to(device)
        self._sqrt_alpha_prev = (alpha_prev**0.5).float().to(device)
        self._sqrt_one_minus_alpha_prev = ((1 - alpha_prev) ** 0.5).float().to(device)

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def step(
        self, model_output: torch.Tensor, i: StepIndex, sample: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        # Song et al. 2021, eq. 12 with sigma_t = 0 (eta = 0):
        a, b = at(self._sqrt_alpha, i), at(self._sqrt_one_minus_alpha, i)
        kind = self.schedule.prediction_type  # a config constant, not a tensor value
        if kind == "epsilon":
            eps = model_output
            x0 = (sample - b * eps) / a  # 1. "predicted x0"
        elif kind == "v_prediction":  # v = a·eps − b·x0 (Salimans & Ho 2022)
            x0 = a * sample - b * model_output
            eps = a * model_output + b * sample
        else:  # "sample"
            x0 = model_output
            eps = (sample - a * x0) / b
        if self.clip_sample:  # config switch, not a tensor value
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        direction = at(self._sqrt_one_minus_alpha_prev, i) * eps  # 2. "direction pointing to x_t"
        return at(self._sqrt_alpha_prev, i) * x0 + direction  # 3. x_{t-1}

    def _vp(self, i: StepIndex) -> tuple[torch.Tensor, torch.Tensor]:
        return at(self._sqrt_alpha, i), at(self._sqrt_one_minus_alpha, i)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, i: StepIndex) -> torch.Tensor:
        # q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)   (Ho et al. 2020, eq. 4)
        return at(self._sqrt_alpha, i) * original + at(self._sqrt_one_minus_alpha, i) * noise
