"""The guided denoising step, written once.

``guided_step`` is the whole classifier-free-guided step — batch the latents for the
[uncond, cond] halves, scale the U-Net input, call the U-Net, combine ``u + g·(t − u)``, take the
scheduler step, flag non-finite latents — over one explicit ``LoopState``. The plain loop
(``denoise``) calls it with a Python step index; the graph runner (graphs.py) captures the same
function once per shape with the step index, guidance and noise in device tensors and replays
it. Every per-step or per-request value is a tensor in the state, so nothing is read from the
host inside the step: no ``.item()``, no sync.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .inpaint import Blend
from .schedulers.base import Scheduler, StepIndex, at

#: callback(step_index, timestep, latents) after every step; latents are (B, C, h, w) float32.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
#: a stage timer: ``with timer("unet"): ...`` (runtime.StageTimer); None times nothing.
Timer = Callable[[str], contextlib.AbstractContextManager]


def _no_timer(stage: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def guide(eps: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """(2B, C, h, w) noise predictions as [uncond..., cond...] → (B, C, h, w) guided ones;
    ``guidance`` is (B, 1, 1, 1): every row keeps its own scale."""
    uncond, cond = eps.chunk(2)
    return uncond + guidance * (cond - uncond)  # u + g·(t − u)


def guidance_embedding(guidance: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) guidance scales g → (B, dim) float32 embedding of w = g − 1, the ``timestep_cond`` an
    LCM-distilled U-Net (``time_cond_proj_dim``) takes instead of an uncond batch.

    w is embedded like a timestep (VDM's sinusoidal embedding of 1000·w): ``dim // 2`` sines then
    as many cosines of 1000·w·10000^(−k/(dim/2 − 1)), k = 0 .. dim/2 − 1, and a zero column when
    ``dim`` is odd. The −1: the U-Net learned LCM's cond + w·(cond − uncond) guidance, and g is
    the cond-relative scale of u + g·(t − u) (diffusers' LatentConsistencyModelPipeline subtracts
    1 the same way)."""
    w = (guidance.to(torch.float32).reshape(-1) - 1.0) * 1000.0  # (B,)
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=w.device)
    freqs = torch.exp(k * (-math.log(10000.0) / (half - 1)))  # (half,)
    angles = w[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (B, 2·half)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


@dataclass
class LoopState:
    """Everything one denoising loop reads besides the engines and the scheduler."""

    latents: torch.Tensor  # (B, C, h, w) float32
    #: the U-Net's conditioning inputs, rows [uncond..., cond...] when guided: encoder_hidden_states
    #: (2B|B, K·S, D), and for SDXL text_embeds (2B|B, P) and time_ids (2B|B, 6) (text.py)
    cond: dict[str, torch.Tensor]
    guidance: torch.Tensor  # (B, 1, 1, 1) float32 per-row guidance scale (read only when guided)
    guided: bool
    noise: torch.Tensor | None  # (N, B, C, h, w) ancestral noise by absolute step index, or None
    finite: torch.Tensor  # (N,) bool; finite[i] is False when the latents after step i are not
    #: guidance_until: from this step index on, the conditional rows only (one U-Net row per
    #: image); None: every step as ``guided`` says
    cut: int | None = None
    #: inpainting (sdfast/inpaint.py): a 9-channel U-Net's extra input channels (2B|B, 1 + C, h, w),
    #: rows as the U-Net's; an ordinary U-Net's latent blending after each step
    unet_extra: torch.Tensor | None = None
    blend: Blend | None = None
    #: keep the clean-sample estimate of each step in ``x0`` (streamed partial images); off, the
    #: loop computes nothing extra
    estimate: bool = False
    x0: torch.Tensor | None = None

    @classmethod
    def create(cls, latents: torch.Tensor, cond: dict[str, torch.Tensor], guidance: list[float] | torch.Tensor,
               guided: bool, noise: torch.Tensor | None, steps: int, cut: int | None = None,
               unet_extra: torch.Tensor | None = None, blend: Blend | None = None) -> LoopState:
        g = torch.as_tensor(guidance, dtype=torch.float32).reshape(-1, 1, 1, 1).to(latents.device)  # (B, 1, 1, 1)
        finite = torch.ones(steps, dtype=torch.bool, device=latents.device)
        return cls(latents, cond, g, guided, noise, finite, cut, unet_extra, blend)

    def drop_guidance(self) -> None:
        """From now on run the conditional rows only: the [uncond..., cond...] inputs keep their
        cond half (B rows), and the step takes the conditional prediction as it is."""
        b = self.latents.shape[0]
        self.cond = {k: v[b:] if v.shape[0] == 2 * b else v for k, v in self.cond.items()}
        if self.unet_extra is not None and self.unet_extra.shape[0] == 2 * b:
            self.unet_extra = self.unet_extra[b:]
        self.guided = False


def guided_step(unet, sched: Scheduler, s: LoopState, i: StepIndex, timer: Timer | None = None) -> torch.Tensor:
    """One guided step at step index ``i`` (an int, or a 0-d long device tensor); returns the
    new latents and records whether they are finite in ``s.finite[i]``."""
    timer = timer or _no_timer
    with timer("scheduler"):
        x = torch.cat([s.latents, s.latents]) if s.guided else s.latents  # (2B|B, C, h, w)
        x = sched.scale_model_input(x, i)
        if s.unet_extra is not None:  # an inpainting U-Net: + mask and masked-image latents
            x = torch.cat([x, s.unet_extra], dim=1)  # (2B|B, 2C + 1, h, w)
        t = at(sched.timesteps, i).reshape(1)  # (1,)
    with timer("unet"):
        eps = unet(sample=x, timestep=t, **s.cond)["noise_pred"]  # (2B|B, C, h, w)
    with timer("scheduler"):
        if s.guided:
            eps = guide(eps, s.guidance)  # (B, C, h, w)
        if s.estimate:  # before the step: the estimate is from the sample the step starts at
            s.x0 = sched.predicted_x0(eps, i, s.latents)
            if s.blend is not None:  # the kept region is the init image's
                s.x0 = (1 - s.blend.mask) * s.blend.image_latents + s.blend.mask * s.x0
        new = sched.step(eps, i, s.latents, None if s.noise is None else at(s.noise, i))
        if s.blend is not None:  # inpainting with an ordinary U-Net: the kept region from the init image
            new = s.blend.apply(new, sched, i)
        ok = torch.isfinite(new).all()
        if isinstance(i, torch.Tensor):  # finite[i] = ... would call i.item(): a host sync
            s.finite.index_copy_(0, i.reshape(1), ok.reshape(1))
        else:
            s.finite[i] = ok  # a device write, checked once after the loop
    return new


def denoise(unet, sched: Scheduler, s: LoopState, first: int, timer: Timer | None = None,
            callback: StepCallback | None = None, progress: bool = False) -> torch.Tensor:
    """The plain loop: ``guided_step`` for steps ``first .. N-1`` (conditional-only from
    ``s.cut`` on); returns the final latents."""
    from tqdm.auto import tqdm

    for i in tqdm(range(first, len(sched.timesteps)), disable=not progress, unit="step"):
        if s.guided and s.cut is not None and i >= s.cut:
            s.drop_guidance()
        s.latents = guided_step(unet, sched, s, i, timer)
        if callback is not None:
            callback(i, sched.timesteps[i : i + 1], s.latents)
    return s.latents
