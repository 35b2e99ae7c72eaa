"""TCD: the strategic stochastic sampler of Zheng et al. 2024, "Trajectory Consistency
Distillation" (sec. 4.3, eq. 16); equal to diffusers' ``TCDScheduler`` stepped with ``eta=gamma``.

What it approximates: the ODE trajectory of a *TCD- or LCM-distilled* model (TCD-LoRA, LCM-LoRA)
in 2-8 steps, with less blur than LCM at the higher step counts. From x_t the model's x0 and eps
estimates give the point on the trajectory at the intermediate timestep ``s = floor((1 - gamma)
t_next)`` (deterministic, DDIM-like); from there the sample is noised forward to ``t_next`` with
fresh noise. ``gamma`` sets the stochasticity: 0 is a deterministic DDIM-like jump to ``t_next``
(no noise drawn), 1 jumps to x0 and re-noises like LCM. Use it with distilled models only.

Options, read from ``scheduler_config.json`` with diffusers' defaults: ``gamma`` (default 0.3,
what diffusers' TCD pipeline passes as ``eta``; in 0..1), ``original_inference_steps`` (50: the
timesteps are LCM's, see lcm.py, so a run has at most that many steps). diffusers' TCD ignores
``clip_sample``, ``timestep_spacing`` and ``steps_offset``, and so does this one.

Note diffusers' generic ``StableDiffusionPipeline`` passes its own ``eta`` (default 0.0) to
TCD's step: to reproduce a diffusers run, call it with ``eta=gamma``. The noise is drawn by the
caller, one ``torch.randn`` per step in step order (only while ``gamma > 0``), as diffusers does.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InvalidArgument
from .base import StepIndex, at
from .lcm import ConsistencyScheduler

#: diffusers' TCDScheduler.step / StableDiffusionXL TCD pipeline default ``eta`` (the paper's gamma).
GAMMA = 0.3


def read_gamma(config: dict[str, Any]) -> float:
    value = config.get("gamma")
    value = GAMMA if value is None else value
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise InvalidArgument(
            f"scheduler config: gamma must be a number from 0 to 1 but is {value!r}; 0 is deterministic, "
            f"1 re-noises fully like LCM, {GAMMA} is diffusers' default; fix scheduler_config.json or remove the key"
        )
    return float(value)


class TCDScheduler(ConsistencyScheduler):
    name = "tcd"
    tables = ("timesteps", "_sqrt_alpha", "_sqrt_beta", "_sqrt_alpha_s", "_sqrt_beta_s", "_keep", "_renoise")
    host_values = ("num_inference_steps",)

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        self.gamma = read_gamma(config)
        # gamma = 0 never re-noises: no noise to draw (diffusers draws none either).
        self.needs_noise = self.gamma > 0

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str = "cpu") -> None:
        t, ac = self._timesteps(num_inference_steps)
        tt = torch.from_numpy(t)
        t_next = torch.cat([tt[1:], torch.zeros(1, dtype=torch.long)])  # after the last step: t = 0
        # s = floor((1 - gamma) t_next), in float32 like diffusers (0.7 * t can sit on an integer).
        s = torch.floor((1 - self.gamma) * t_next).to(torch.long)
        alpha, alpha_next, alpha_s = ac[tt], ac[t_next], ac[s]
        ratio = alpha_next / alpha_s  # <= 1: t_next >= s
        keep, renoise = ratio.sqrt(), (1 - ratio).sqrt()
        if self.gamma > 0:  # the last step returns the trajectory point at s unchanged
            keep[-1], renoise[-1] = 1.0, 0.0
        else:
            keep, renoise = torch.ones_like(keep), torch.zeros_like(renoise)
        self.num_inference_steps = len(t)
        self.timesteps = tt.float().to(device)
        self._sqrt_alpha = alpha.sqrt().to(device)  # (N,)
        self._sqrt_beta = (1 - alpha).sqrt().to(device)
        self._sqrt_alpha_s = alpha_s.sqrt().to(device)
        self._sqrt_beta_s = (1 - alpha_s).sqrt().to(device)
        self._keep = keep.to(device)
        self._renoise = renoise.to(device)

    def step(
        self,
        model_output: torch.Tensor,
        i: StepIndex,
        sample: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = sample.float()
        x0, eps = self._x0_eps(model_output.float(), x, at(self._sqrt_alpha, i), at(self._sqrt_beta, i))  # 1.
        # 2. the trajectory point at s (Zheng et al. 2024, eq. 16, deterministic part)
        x_s = at(self._sqrt_alpha_s, i) * x0 + at(self._sqrt_beta_s, i) * eps
        if not self.needs_noise:  # gamma = 0, a config constant
            return x_s.to(model_output.dtype)
        # 3. forward-noise s -> t_next: q(x_next | x_s) with alpha_bar_next / alpha_bar_s (last step: none)
        x_next = at(self._keep, i) * x_s + at(self._renoise, i) * self._require_noise(noise)
        return x_next.to(model_output.dtype)
