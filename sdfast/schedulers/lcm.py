"""LCM: multistep consistency sampling of Luo et al. 2023, "Latent Consistency Models"
(Algorithm 1, after Song et al. 2023, "Consistency Models"); equal to diffusers' ``LCMScheduler``.

What it approximates: the probability-flow ODE's end point x0, predicted in one U-Net call by a
model *distilled* for it (an LCM U-Net or an LCM-LoRA). Each step maps x_t to a clean estimate
through the consistency boundary condition ``f(x, t) = c_skip(t) x + c_out(t) x0(x, t)`` and,
except on the last step, noises that estimate back to the next (lower) timestep with *fresh*
Gaussian noise. Use it with LCM-distilled models at 1-8 steps; on an ordinary model it gives
blurry images (the U-Net was never trained to predict x0 from so far away in one call).

Timesteps: the distillation schedule is ``original_inference_steps`` (default 50, the
``scheduler_config.json`` key of that name, as diffusers) evenly spaced training steps
``k - 1, 2k - 1, ..., T - 1`` with ``k = T // original_inference_steps``; ``n`` steps take every
``len / n``-th of them from the top, so ``n`` cannot exceed ``original_inference_steps``.
``timestep_scaling`` (default 10) and ``clip_sample`` (default False) are read from the config too;
``timestep_spacing`` and ``steps_offset`` do not apply (diffusers ignores them for LCM as well).

The re-noising noise is drawn by the caller, one ``torch.randn(shape, generator=g)`` per step in
step order (the runtime's ``noise[i]`` by absolute step index), which is diffusers' order: it
draws once per step but the last, and a draw after the last one changes nothing. Img2img starts
at step ``t_start`` of the ``n``-step schedule (diffusers' Img2Img pipeline with this scheduler
does the same; its LCM-specific img2img pipeline instead shrinks the distillation schedule by the
strength, which sdfast does not do).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import InvalidArgument
from ..rules import check_int
from .base import Scheduler, StepIndex, at

#: diffusers' LCMScheduler / TCDScheduler defaults.
ORIGINAL_INFERENCE_STEPS = 50
TIMESTEP_SCALING = 10.0
SIGMA_DATA = 0.5  # Song et al. 2023, sec. 3: c_skip / c_out are built around sigma_data = 0.5


def origin_steps(config: dict[str, Any], num_train_timesteps: int) -> int:
    """``original_inference_steps`` from the config (diffusers' default 50), checked."""
    value = config.get("original_inference_steps")
    value = ORIGINAL_INFERENCE_STEPS if value is None else value
    return check_int(
        "scheduler config: original_inference_steps",
        value,
        1,
        num_train_timesteps,
        "it is the step count the model was distilled with (50 for the published LCM / TCD models); "
        "fix scheduler_config.json or remove the key",
    )


def consistency_timesteps(n: int, original_steps: int, num_train_timesteps: int) -> np.ndarray:
    """(n,) int64 descending timesteps: n evenly indexed picks from the distillation schedule."""
    k = num_train_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]  # T-1 (or below) ... k-1
    picks = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
    return origin[picks].astype(np.int64)


class ConsistencyScheduler(Scheduler):
    """What LCM and TCD share: the distillation timestep schedule, the VP x0 estimate, DDPM noising."""

    fixed_options = {**Scheduler.fixed_options, "thresholding": False}
    needs_noise = True
    host_values = ("num_inference_steps",)

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        self.original_inference_steps = origin_steps(config, self.schedule.num_train_timesteps)

    @property
    def init_noise_sigma(self) -> float:
        return 1.0  # VP latents: unit variance at the top timestep

    def check_steps(self, num_inference_steps: int) -> None:
        check_int(
            "steps",
            num_inference_steps,
            1,
            self.original_inference_steps,
            f"{self.name} picks its steps from the model's {self.original_inference_steps}-step distillation "
            "schedule (scheduler_config.json original_inference_steps); 1-8 is the usual range",
        )

    def _timesteps(self, num_inference_steps: int) -> tuple[np.ndarray, torch.Tensor]:
        """(n,) int64 timesteps and the float32 (T,) alpha_bar table, as diffusers holds it."""
        self.check_steps(num_inference_steps)
        t = consistency_timesteps(
            num_inference_steps, self.original_inference_steps, self.schedule.num_train_timesteps
        )
        return t, self.schedule.alphas_cumprod()

    def _x0_eps(self, model_output: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
        """(x0, eps) from the model output at sqrt(alpha_bar) = a, sqrt(1 - alpha_bar) = b."""
        kind = self.schedule.prediction_type  # a config constant, not a tensor value
        if kind == "epsilon":
            return (x - b * model_output) / a, model_output
        if kind == "v_prediction":  # v = a·eps − b·x0 (Salimans & Ho 2022)
            return a * x - b * model_output, a * model_output + b * x
        return model_output, (x - a * model_output) / b  # "sample"

    def _require_noise(self, noise: torch.Tensor | None) -> torch.Tensor:
        if noise is None:
            raise ValueError(
                f"noise: {self.name} re-noises between steps and needs fresh Gaussian noise at every step but got "
                "None; pass noise=torch.randn(sample.shape, generator=g) drawn in step order from the seed's generator"
            )
        return noise

    def _vp(self, i: StepIndex) -> tuple[torch.Tensor, torch.Tensor]:
        return at(self._sqrt_alpha, i), at(self._sqrt_beta, i)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, i: StepIndex) -> torch.Tensor:
        # q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)   (Ho et al. 2020, eq. 4)
        return at(self._sqrt_alpha, i) * original + at(self._sqrt_beta, i) * noise


class LCMScheduler(ConsistencyScheduler):
    name = "lcm"
    tables = (
        "timesteps",
        "_sqrt_alpha",
        "_sqrt_beta",
        "_c_skip",
        "_c_out",
        "_sqrt_alpha_next",
        "_sqrt_beta_next",
    )

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        self.timestep_scaling = float(config.get("timestep_scaling", TIMESTEP_SCALING))
        self.clip_sample = bool(config.get("clip_sample", False))  # diffusers' LCM default (DDIM's is True)
        self.clip_sample_range = float(config.get("clip_sample_range", 1.0))
        if not self.timestep_scaling > 0:
            raise InvalidArgument(
                f"scheduler config: timestep_scaling must be > 0 but is {self.timestep_scaling!r}; "
                "fix scheduler_config.json or remove the key (default 10)"
            )

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str = "cpu") -> None:
        t, ac = self._timesteps(num_inference_steps)
        tt = torch.from_numpy(t)
        alpha = ac[tt]  # float32, as diffusers indexes its float32 table
        # The next step's alpha; after the last step nothing is re-noised: keep 1 x denoised + 0 x noise.
        alpha_next = torch.cat([ac[tt[1:]], torch.ones(1)])
        # Boundary condition (Luo et al. 2023, eq. 5; Song et al. 2023, Appendix C) at the scaled
        # discrete timestep, in float32 like diffusers: c_skip -> 1 and c_out -> 0 as t -> 0.
        scaled = tt * self.timestep_scaling
        self._c_skip = (SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)).float().to(device)
        self._c_out = (scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5).float().to(device)
        self.num_inference_steps = len(t)
        self.timesteps = tt.float().to(device)
        self._sqrt_alpha = alpha.sqrt().to(device)  # (N,)
        self._sqrt_beta = (1 - alpha).sqrt().to(device)
        self._sqrt_alpha_next = alpha_next.sqrt().to(device)
        self._sqrt_beta_next = (1 - alpha_next).sqrt().to(device)

    def step(
        self,
        model_output: torch.Tensor,
        i: StepIndex,
        sample: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        noise = self._require_noise(noise)
        x = sample.float()
        x0, _ = self._x0_eps(model_output.float(), x, at(self._sqrt_alpha, i), at(self._sqrt_beta, i))  # 1.
        if self.clip_sample:  # config switch, not a tensor value
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        denoised = at(self._c_out, i) * x0 + at(self._c_skip, i) * x  # 2. consistency function f(x, t)
        # 3. re-noise to the next timestep (a no-op on the last step: 1 x denoised + 0 x noise)
        x_next = at(self._sqrt_alpha_next, i) * denoised + at(self._sqrt_beta_next, i) * noise
        return x_next.to(model_output.dtype)
