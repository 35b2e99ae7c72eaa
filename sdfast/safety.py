"""Numerical safety nets of the loop, without host syncs inside it.

- ``check_finite``: the loop (plain or graphed) writes one device-side "latents are finite"
  flag per step (``LoopState.finite``); this reads them once after it, and a NaN/inf stops
  the run naming the first bad step.
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


def check_finite(finite: torch.Tensor, first: int, timesteps: torch.Tensor, hint: str) -> None:
    """``finite``: (N,) bool, False where the latents after step i were not finite. One host
    sync for the whole run; raise NumericalError naming the first bad step."""
    bad = (~finite[first:]).nonzero()
    if len(bad):
        i = first + int(bad[0, 0])
        raise NumericalError(
            f"latents became NaN or inf at step {i} of {len(finite)} (timestep {float(timesteps[i]):g}); {hint}"
        )


class DecodeFallback:
    """Checks a reduced-precision decode and redoes it with a lazily built fp32 decoder."""

    def __init__(self, load_fp32: Callable[[], Engine] | None, enabled: bool = True):
        self._load = load_fp32
        self._enabled = enabled
        self._engine: Engine | None = None
        self._warned = False
        self._lock = threading.Lock()

    def __call__(self, image: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """``image`` decoded from ``latent`` (already divided by the scaling factor)."""
        if bool(torch.isfinite(image).all()):  # a sync, but the image goes to the host next anyway
            return image
        if not self._enabled:
            raise NumericalError("vae_decoder: the fp32 decode produced NaN or inf; the latents are broken "
                                 "(check the engines with `sdfast parity`)")
        if self._load is None:
            raise NumericalError("vae_decoder: the reduced-precision decode produced NaN or inf and this backend "
                                 "has no eager fp32 decoder to redo it; export the VAE in fp32 (the default, "
                                 "without --vae-precision fp16) or load with dtype='fp32'")
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
