"""Numerical safety nets of the loop, without host syncs inside it.

- ``StepFlags``: one device-side "latents are finite" flag per step, written by the loop (plain
  or graphed) and read once after it; a NaN/inf stops the run naming the first bad step.
- ``DecodeFallback``: a VAE decode that yields NaN/inf in reduced precision is redone in fp32
  (the known fp16 black-image failure), with one warning; the fp32 decoder is built lazily.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .errors import NumericalError

if TYPE_CHECKING:
    from .engines import Engine

log = logging.getLogger(__name__)


class StepFlags:
    """(N,) bool on the device; ``flags[i]`` is True while the latents after step i are finite."""

    def __init__(self, steps: int, device: torch.device):
        self.flags = torch.ones(steps, dtype=torch.bool, device=device)

    def record(self, i: int, latents: torch.Tensor) -> None:
        self.flags[i] = torch.isfinite(latents).all()  # a device write, no sync

    def check(self, first: int, timesteps: torch.Tensor, hint: str) -> None:
        """One host sync for the whole run; raise NumericalError naming the first bad step."""
        bad = (~self.flags[first:]).nonzero()
        if len(bad):
            i = first + int(bad[0, 0])
            n = len(self.flags)
            raise NumericalError(
                f"latents became NaN or inf at step {i} of {n} (timestep {float(timesteps[i]):g}); {hint}"
            )


class DecodeFallback:
    """Checks a reduced-precision decode and redoes it with a lazily built fp32 decoder."""

    def __init__(self, load_fp32: Callable[[], Engine] | None):
        self._load = load_fp32
        self._engine: Engine | None = None
        self._warned = False
        self._lock = threading.Lock()

    def __call__(self, image: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """``image`` decoded from ``latent`` (already divided by the scaling factor)."""
        if bool(torch.isfinite(image).all()):  # a sync, but the image goes to the host next anyway
            return image
        if self._load is None:
            raise NumericalError("vae_decoder: the decode produced NaN or inf and no fp32 decoder is "
                                 "available; load the pipeline with dtype='fp32'")
        with self._lock:
            if not self._warned:
                log.warning("VAE decode produced NaN/inf in reduced precision (the fp16 black-image "
                            "overflow); decoding again in fp32")
                self._warned = True
            if self._engine is None:
                self._engine = self._load()
        image = self._engine(latent=latent.float())["image"]
        if not bool(torch.isfinite(image).all()):
            raise NumericalError("vae_decoder: the fp32 decode produced NaN or inf too; the latents are broken")
        return image
