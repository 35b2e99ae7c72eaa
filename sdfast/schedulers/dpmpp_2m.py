"""DPM-Solver++(2M): the second-order multistep solver of Lu et al. 2022, "DPM-Solver++: Fast
Solver for Guided Sampling of Diffusion Probabilistic Models", Algorithm 2; equal to diffusers'
``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)`` with its defaults
(midpoint solver, ``lower_order_final``, ``final_sigmas_type="zero"``, no Euler at the end),
optionally on the Karras et al. 2022 sigma schedule (``dpmpp_2m_karras``).

Which steps are first order is a table, not a branch: a first-order step is a second-order one
whose correction coefficient is 0. That holds for the last step (``lower_order_final``: it
lands on sigma = 0) and for step 0. A run that starts later (img2img) has no previous data
prediction either; ``_has_prev`` (0 until the first step of the run, then 1) zeroes the
correction there, exactly as diffusers' ``lower_order_nums`` counter does.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InvalidArgument
from .base import Scheduler, StepIndex, at

KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5: the value the paper uses


def karras_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """(n,) float64 descending sigmas evenly spaced in sigma^(1/rho) (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
    return (hi + ramp * (lo - hi)) ** KARRAS_RHO


def sigmas_to_timesteps(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps whose sigma is ``sigmas``, linear in log sigma between steps."""
    log_train = np.log(train_sigmas)  # (T,) ascending in t
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(np.searchsorted(log_train, log_sigma, side="right") - 1, 0, len(log_train) - 2)
    w = np.clip((log_train[low] - log_sigma) / (log_train[low] - log_train[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


class DPMPP2MScheduler(Scheduler):
    name = "dpmpp_2m"
    default_spacing = "linspace"
    #: Karras sigmas instead of the training sigmas at evenly spaced timesteps. The name picks
    #: the algorithm, so the config's algorithm_type, solver_order and use_karras_sigmas are not read.
    karras = False
    tables = ("timesteps", "_alpha", "_sigma", "_ratio", "_phi", "_corr")
    state = ("_prev", "_has_prev")
    fixed_options = {
        **Scheduler.fixed_options,
        "thresholding": False,
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "use_lu_lambdas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
    }

    def __init__(self, config: dict):
        super().__init__(config)
        self._prev: torch.Tensor | None = None

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        """(n,) int64 descending timesteps: n + 1 points over the schedule, dropping t = 0."""
        t_max, spacing = self.schedule.num_train_timesteps, self.spacing
        if spacing == "linspace":
            return np.linspace(0, t_max - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        if spacing == "leading":
            ramp = (np.arange(n + 1) * (t_max // (n + 1))).round()[::-1][:-1]
            return ramp.astype(np.int64) + self.schedule.steps_offset
        return np.arange(t_max, 0, -t_max / n).round().astype(np.int64) - 1  # trailing

    def _timesteps_and_sigmas(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(n,) timesteps (rounded like diffusers) and their (n,) sigmas."""
        train = self.schedule.train_sigmas()  # (T,) float32
        timesteps = self._spaced_timesteps(n)
        if self.karras:
            # The Karras ramp spans the whole training range, whatever the spacing.
            sigmas = karras_sigmas(train[0].item(), train[-1].item(), n)
            timesteps = sigmas_to_timesteps(sigmas, train)
            if self.schedule.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(len(train)), train)
        return timesteps, sigmas

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str = "cpu") -> None:
        self.check_steps(num_inference_steps)
        timesteps, sigmas = self._timesteps_and_sigmas(num_inference_steps)
        repeats = len(sigmas) - len(np.unique(sigmas))
        if repeats:
            # Rounding puts two steps on one training timestep and sigma: a step of size h = 0,
            # whose second-order term divides by it (diffusers goes NaN at 1000 "linspace" steps).
            # Karras sigmas never repeat; their rounded timesteps do at the low-noise end (at 50
            # steps already, in diffusers too), but each step still moves to a smaller sigma.
            fewer = next(k for k in range(num_inference_steps - 1, 0, -1)
                         if len(np.unique(self._timesteps_and_sigmas(k)[1])) == k)
            raise InvalidArgument(
                f"steps: {self.name} at {num_inference_steps} steps repeats {repeats} of its timesteps (the "
                f"{self.schedule.num_train_timesteps} training steps cannot be divided that finely); use fewer "
                f"steps ({fewer} is the most below {num_inference_steps} that repeats none)")
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)  # final_sigmas_type "zero"
        n = len(timesteps)
        self.num_inference_steps = n
        self.timesteps = torch.from_numpy(timesteps.astype(np.int64).astype(np.float32)).to(device)

        # Per-step tables in float64 from the float32 sigmas (Lu et al. 2022, notation of sec. 3):
        # alpha_t = 1/sqrt(sigma^2+1), sigma_t = sigma*alpha_t, lambda_t = log(alpha_t/sigma_t).
        sigma = torch.from_numpy(sigmas).double()  # (N + 1,)
        alpha_t = 1 / (sigma**2 + 1) ** 0.5
        sigma_t = sigma * alpha_t
        lam = torch.log(alpha_t) - torch.log(sigma_t)  # +inf at sigma = 0
        h = lam[1:] - lam[:-1]  # (N,) h_i = lambda_{i+1} - lambda_i
        phi = alpha_t[1:] * torch.expm1(-h)  # alpha_{i+1} (e^{-h} - 1); -1 on the step to sigma 0
        r = torch.ones_like(h)
        r[1:] = (lam[1:-1] - lam[:-2]) / h[1:]  # r_i = h_{i-1} / h_i
        second_order = torch.zeros(n, dtype=torch.bool)
        second_order[1 : n - 1] = True  # step 0: no history; last step: lower_order_final
        corr = torch.where(second_order, 0.5 * phi / r, torch.zeros_like(phi))

        self._alpha = alpha_t[:-1].float().to(device)  # (N,) at the step's own sigma
        self._sigma = sigma_t[:-1].float().to(device)
        self._ratio = (sigma_t[1:] / sigma_t[:-1]).float().to(device)  # sigma_{i+1} / sigma_i (VP sigmas)
        self._phi = phi.float().to(device)
        self._corr = corr.float().to(device)

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def begin(self, sample: torch.Tensor) -> None:
        self._prev = torch.zeros_like(sample)  # previous data prediction x0_{i-1}
        self._has_prev = torch.zeros((), dtype=torch.float32, device=sample.device)

    def step(
        self, model_output: torch.Tensor, i: StepIndex, sample: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        prev = self._prev
        if prev is None:
            raise RuntimeError("scheduler: call begin(latents) before the first step to allocate the DPM-Solver state")
        # Lu et al. 2022, DPM-Solver++(2M), Algorithm 2:
        x0 = self._data_prediction(model_output, sample, i)  # 1. data prediction x_theta
        corr = at(self._corr, i) * self._has_prev  # 2. 0 on first-order steps
        x = sample.float()
        # 3. x_{i+1} = (s_{i+1}/s_i) x - a_{i+1}(e^{-h}-1) [(1 + 1/2r) x0_i - (1/2r) x0_{i-1}]
        x_next = at(self._ratio, i) * x - at(self._phi, i) * x0 - corr * (x0 - prev)
        prev.copy_(x0)  # 4. keep x0_i for the next step
        self._has_prev.fill_(1.0)
        return x_next.to(model_output.dtype)

    def _data_prediction(self, model_output: torch.Tensor, sample: torch.Tensor, i: StepIndex) -> torch.Tensor:
        """x0 from the model output (diffusers' convert_model_output for dpmsolver++)."""
        return self.predicted_x0(model_output, i, sample)

    def _vp(self, i: StepIndex) -> tuple[torch.Tensor, torch.Tensor]:
        return at(self._alpha, i), at(self._sigma, i)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, i: StepIndex) -> torch.Tensor:
        # q(x_t | x_0) in VP form: alpha_t x_0 + sigma_t eps
        return at(self._alpha, i) * original + at(self._sigma, i) * noise


class DPMPP2MKarrasScheduler(DPMPP2MScheduler):
    name = "dpmpp_2m_karras"
    karras = True
