"""The scheduler contract shared by every algorithm in this package.

A scheduler is built from a model folder's ``scheduler/scheduler_config.json`` (a plain dict),
``set_timesteps`` precomputes every per-step table on the target device, and ``step`` is pure
tensor math on that device: no ``.item()``, no host-side branching on tensor values, no scipy.
That is what lets a CUDA graph capture a whole guided step and replay it for every step: the
step index may be a Python ``int`` *or* a 0-d ``torch.long`` tensor living on the device.

Per-run state (the LMS derivative history, DPM-Solver's previous output) lives in tensors
created by ``begin`` and updated in place by ``step``, so the same buffers are reused by every
replay. One scheduler object serves one generation at a time; the pipeline builds a fresh one
per call (cheap: a few small tables), which keeps concurrent ``generate`` calls independent.

The buffer contract is explicit, not guessed: every scheduler names its per-step ``tables``
(tensors built by ``set_timesteps``, first dim = step or step + 1) and its per-run ``state``
(tensors built by ``begin``); ``buffers()`` returns exactly those, and ``host_values`` names the
Python values that change with the step count but are read outside ``step`` only. A CUDA graph
copies ``buffers()`` of a fresh scheduler into its static one (graphs.py); a test checks that
every registered scheduler declares every tensor it holds and nothing that ``step`` reads
lives in an undeclared Python number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InvalidArgument
from ..rules import check_steps, is_int, is_number

StepIndex = int | torch.Tensor
#: what the U-Net predicts: the noise (SD 1.x, 2.x base), the velocity v = alpha·eps − sigma·x0
#: (Salimans & Ho 2022; SD 2.x 768 px), or the clean sample.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("linspace", "leading", "trailing")
#: Every released SD model trains on 1000 steps; far more only allocates tables nobody can use
#: (10**12 asked for 4 TB), so a config beyond this is refused as broken.
MAX_TRAIN_TIMESTEPS = 10_000
_FIX = "fix scheduler_config.json or restore it from the model release"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def at(table: torch.Tensor, i: StepIndex) -> torch.Tensor:
    """``table[i]`` without a host sync: a 0-d tensor index goes through ``index_select``.

    Plain ``table[i]`` with a 0-d integer tensor converts it with ``.item()``, which waits for
    the device and cannot be captured in a CUDA graph.
    """
    if isinstance(i, torch.Tensor):
        return table.index_select(0, i.reshape(1)).squeeze(0)
    return table[i]


@dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule read from ``scheduler_config.json``."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None  # None: the algorithm's diffusers default
    steps_offset: int = 0
    trained_betas: tuple[float, ...] | None = None  # overrides beta_start/beta_end/beta_schedule

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NoiseSchedule:
        """The schedule a config states; InvalidArgument naming the key for one no run can use."""
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in config.items() if k in known and v is not None}
        if "trained_betas" in values:
            betas = values["trained_betas"]
            if not isinstance(betas, list | tuple) or not betas or not all(map(is_number, betas)):
                raise InvalidArgument(f"scheduler config: trained_betas must be a non-empty list of numbers but is "
                                      f"{_short(betas)}; {_FIX}")
            values["trained_betas"] = tuple(float(b) for b in betas)
        schedule = cls(**values)
        schedule.check()
        return schedule

    def check(self) -> None:
        def bad(key: str, rule: str) -> InvalidArgument:
            return InvalidArgument(f"scheduler config: {key} must be {rule} but is {_short(getattr(self, key))}; {_FIX}")

        n = self.num_train_timesteps
        if not is_int(n) or not 1 <= n <= MAX_TRAIN_TIMESTEPS:
            raise bad("num_train_timesteps", f"an integer from 1 to {MAX_TRAIN_TIMESTEPS} (SD models use 1000)")
        if self.trained_betas is not None:
            if len(self.trained_betas) != n:
                raise InvalidArgument(f"scheduler config: trained_betas has {len(self.trained_betas)} values but "
                                      f"num_train_timesteps is {n}; they must agree; {_FIX}")
            if not all(0 < b < 1 for b in self.trained_betas):  # NaN fails too
                raise bad("trained_betas", "values in (0, 1)")
        else:
            if self.beta_schedule not in BETA_SCHEDULES:
                raise bad("beta_schedule", f"one of {', '.join(map(repr, BETA_SCHEDULES))}")
            if self.beta_schedule != "squaredcos_cap_v2":  # the cosine schedule reads neither
                for key in ("beta_start", "beta_end"):
                    v = getattr(self, key)
                    if not is_number(v) or not 0 < v < 1:
                        raise bad(key, "a number in (0, 1) (SD: 0.00085 and 0.012)")
                if self.beta_start > self.beta_end:
                    raise InvalidArgument(f"scheduler config: beta_start ({self.beta_start!r}) must not exceed "
                                          f"beta_end ({self.beta_end!r}); noise only grows along the schedule; {_FIX}")
        if self.timestep_spacing is not None and self.timestep_spacing not in SPACINGS:
            raise bad("timestep_spacing", f"one of {', '.join(map(repr, SPACINGS))} (or absent: the scheduler's default)")
        if not is_int(self.steps_offset) or not 0 <= self.steps_offset < n:
            raise bad("steps_offset", f"an integer from 0 to {n - 1} (SD 1.x: 1)")
        if not isinstance(self.prediction_type, str):
            raise bad("prediction_type", f"one of {', '.join(map(repr, PREDICTION_TYPES))}")

    def betas(self) -> torch.Tensor:
        """float32 betas, computed exactly like diffusers (float32 linspace, squared in float32).

        diffusers builds the whole schedule in float32; a float64 schedule drifts ~1e-6 from it
        after the cumulative product, enough to move a Karras timestep across a rounding edge.
        """
        n = self.num_train_timesteps
        if self.trained_betas is not None:
            return torch.tensor(self.trained_betas, dtype=torch.float32)
        if self.beta_schedule == "linear":
            return torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float32)
        if self.beta_schedule == "scaled_linear":
            return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=torch.float32) ** 2
        if self.beta_schedule == "squaredcos_cap_v2":
            def alpha_bar(t: float) -> float:
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

            return torch.tensor(
                [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                dtype=torch.float32,
            )
        raise AssertionError(self.beta_schedule)  # refused by check()

    def alphas_cumprod(self) -> torch.Tensor:
        """(T,) float32 ``alpha_bar_t``, the cumulative product diffusers computes in float32."""
        return torch.cumprod(1.0 - self.betas(), dim=0)

    def train_sigmas(self) -> np.ndarray:
        """(T,) float32 ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` (Karras et al. 2022, VP -> VE)."""
        ac = self.alphas_cumprod()
        return (((1 - ac) / ac) ** 0.5).numpy()


def spaced_timesteps(spacing: str, num_train_timesteps: int, n: int, steps_offset: int) -> np.ndarray:
    """(n,) float32 descending timesteps for the sigma-space samplers (LMS, Euler, Euler a).

    The three spacings of Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", Table 2; "linspace" may land between training steps (e.g. 832.5).
    """
    t_max = num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, t_max - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        stride = t_max // n
        return (np.arange(n) * stride).round()[::-1].astype(np.float32) + steps_offset
    if spacing == "trailing":
        return np.arange(t_max, 0, -t_max / n).round().astype(np.float32) - 1
    raise AssertionError(spacing)  # refused by NoiseSchedule.check()


def interpolated_sigmas(schedule: NoiseSchedule, timesteps: np.ndarray) -> np.ndarray:
    """(N + 1,) float32 sigmas at (possibly fractional) ``timesteps``, with a final 0 appended."""
    train = schedule.train_sigmas()
    sigmas = np.interp(timesteps, np.arange(len(train)), train)  # float64, linear in t
    return np.concatenate([sigmas, [0.0]]).astype(np.float32)


class Scheduler:
    """Base class. Subclasses set ``name`` and implement the four methods below."""

    name: str = ""
    #: True when ``step`` needs fresh Gaussian noise (ancestral samplers).
    needs_noise: bool = False
    #: model outputs this sampler turns into a step (those its diffusers counterpart supports).
    prediction_types: tuple[str, ...] = PREDICTION_TYPES
    #: ``timestep_spacing`` when the config has none: the matching diffusers class's default.
    default_spacing: str = "linspace"
    #: Config options implemented only at this value (the diffusers default); another value in
    #: scheduler_config.json is refused rather than silently ignored.
    fixed_options: dict[str, Any] = {"rescale_betas_zero_snr": False}
    #: per-step tensors made by ``set_timesteps`` (first dim: step, or step + 1).
    tables: tuple[str, ...] = ("timesteps",)
    #: per-run tensors made by ``begin`` and updated in place by ``step``.
    state: tuple[str, ...] = ()
    #: Python values that depend on the step count but are read outside ``step`` only.
    host_values: tuple[str, ...] = ("num_inference_steps",)

    def __init__(self, config: dict[str, Any]):
        self.config = dict(config)
        self.schedule = NoiseSchedule.from_config(config)
        if self.schedule.prediction_type not in self.prediction_types:
            raise InvalidArgument(
                f"scheduler config: prediction_type {self.schedule.prediction_type!r} is not supported by "
                f"{self.name!r}, which runs {', '.join(map(repr, self.prediction_types))} models (SD 1.x: "
                "epsilon, SD 2.x 768: v_prediction); fix scheduler_config.json or pick another scheduler"
            )
        for key, supported in self.fixed_options.items():
            if config.get(key, supported) != supported:
                raise InvalidArgument(
                    f"scheduler config: {key}={config[key]!r} is not supported by {self.name!r}; "
                    f"set it to {supported!r} or remove it from scheduler_config.json"
                )
        self.timesteps: torch.Tensor = torch.empty(0)  # (N,) float32, what the U-Net receives
        self.num_inference_steps = 0

    @property
    def spacing(self) -> str:
        return self.schedule.timestep_spacing or self.default_spacing  # a known one: NoiseSchedule.check()

    def check_steps(self, num_inference_steps: int) -> None:
        """Reject a step count the training schedule cannot be divided into (``rules.check_steps``)."""
        check_steps(num_inference_steps, self.schedule.num_train_timesteps)

    def buffers(self) -> dict[str, torch.Tensor]:
        """The declared tables and state (after ``set_timesteps`` and ``begin``), by name."""
        out = {}
        for name in self.tables + self.state:
            value = getattr(self, name, None)
            if not isinstance(value, torch.Tensor):
                raise RuntimeError(f"scheduler {self.name!r}: declared buffer {name!r} is {type(value).__name__}, "
                                   "not a tensor; call set_timesteps and begin first")
            out[name] = value
        return out

    # -- tables -----------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, device: torch.device | str = "cpu") -> None:
        raise NotImplementedError

    @property
    def init_noise_sigma(self) -> float:
        """Factor applied to the unit-Gaussian initial latents (a host float, known after set_timesteps)."""
        raise NotImplementedError

    # -- per run ----------------------------------------------------------------------------
    def begin(self, sample: torch.Tensor) -> None:
        """Allocate/zero the per-run state buffers for latents shaped like ``sample``."""

    def scale_model_input(self, sample: torch.Tensor, i: StepIndex) -> torch.Tensor:
        return sample

    def step(
        self, model_output: torch.Tensor, i: StepIndex, sample: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the sample after step ``i`` (0-based position in ``timesteps``)."""
        raise NotImplementedError

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, i: StepIndex) -> torch.Tensor:
        """Noise clean latents to the level of step ``i`` (img2img start)."""
        raise NotImplementedError

    def predicted_x0(self, model_output: torch.Tensor, i: StepIndex, sample: torch.Tensor) -> torch.Tensor:
        """The clean-sample estimate at step ``i`` from the (guided) model output and the sample
        the step starts from: what streamed partial images show (diffusers'
        ``pred_original_sample``, unclipped). It reads the tables only; no state changes."""
        a, b = self._vp(i)
        return vp_x0(self.schedule.prediction_type, model_output, sample, a, b)

    def _vp(self, i: StepIndex) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(alpha_bar), sqrt(1 - alpha_bar)) at step ``i``: the VP form x = a·x0 + b·eps."""
        raise NotImplementedError


def vp_x0(kind: str, model_output: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x0 from a model output in the VP form x = a·x0 + b·eps (``kind``: the prediction type)."""
    if kind == "epsilon":
        return (x - b * model_output) / a
    if kind == "v_prediction":  # v = a·eps − b·x0 (Salimans & Ho 2022)
        return a * x - b * model_output
    return model_output  # "sample"


class SigmaScheduler(Scheduler):
    """Shared tables of the samplers that work in sigma space (LMS, Euler, Euler ancestral).

    They follow Karras et al. 2022 ("Elucidating the Design Space", EDM): the latent is
    ``x = x0 + sigma * eps``, the U-Net sees ``x / sqrt(sigma^2 + 1)`` (the VP-scaled input it
    was trained on) and the sampler integrates ``dx/dsigma = (x - x0) / sigma``.
    """

    fixed_options = {
        **Scheduler.fixed_options,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
    }
    tables = ("timesteps", "sigmas", "_in_denom")
    host_values = ("num_inference_steps", "_init_noise_sigma")

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str = "cpu") -> None:
        self.check_steps(num_inference_steps)
        s = self.schedule
        timesteps = spaced_timesteps(self.spacing, s.num_train_timesteps, num_inference_steps, s.steps_offset)
        sigmas = torch.from_numpy(interpolated_sigmas(s, timesteps))  # (N + 1,) float32, last = 0
        self.num_inference_steps = len(timesteps)
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self.sigmas = sigmas.to(device)
        # U-Net input scale denominator sqrt(sigma^2 + 1), in float32 like diffusers divides by it.
        self._in_denom = ((sigmas**2 + 1) ** 0.5).to(device)
        sigma_max = sigmas.max()
        # diffusers starts "leading" runs from unit-variance-scaled noise, the others from sigma_max.
        start = sigma_max if self.spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5
        self._init_noise_sigma = float(start)
        self._build_step_tables(sigmas.double(), device)

    def _build_step_tables(self, sigmas: torch.Tensor, device: torch.device | str) -> None:
        """Precompute the algorithm's per-step tables from the (N + 1,) sigmas (float64)."""

    @property
    def init_noise_sigma(self) -> float:
        return self._init_noise_sigma

    def scale_model_input(self, sample: torch.Tensor, i: StepIndex) -> torch.Tensor:
        return sample / at(self._in_denom, i)

    def denoised(self, model_output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The clean-sample estimate x0 = D(x; sigma) from the model output (k-diffusion's
        VP → VE parameterization; ``prediction_type`` is a config constant, not a tensor value)."""
        kind = self.schedule.prediction_type
        if kind == "epsilon":
            return x - sigma * model_output  # x = x0 + sigma * eps
        if kind == "v_prediction":  # the VP latent is x / sqrt(sigma^2 + 1)
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        return model_output  # "sample"

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, i: StepIndex) -> torch.Tensor:
        return original + noise * at(self.sigmas, i)  # x = x0 + sigma * eps

    def predicted_x0(self, model_output: torch.Tensor, i: StepIndex, sample: torch.Tensor) -> torch.Tensor:
        return self.denoised(model_output, sample, at(self.sigmas, i))
