"""Every input rule, stated once; ``Request``, ``ShapeProfile``, the schedulers, the engines'
profile check and the CLIs call these instead of restating a limit.

Each rule raises ``InvalidArgument`` naming the argument, the rule and the fix.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable
from typing import Any

from .errors import InvalidArgument

#: image sides any request or export profile may have, in pixels.
MIN_SIDE, MAX_SIDE = 64, 2048
MAX_SEED = 2**64 - 1
#: images per request: every one is a row of each U-Net call, so memory grows with it.
MAX_IMAGES = 64
#: Classifier-free guidance beyond ~20 oversaturates every SD model; 100 is far past any useful
#: value and keeps g·(cond − uncond) (|cond − uncond| is O(1) for SD's ε-prediction) inside the
#: range where fp16 engines cannot overflow, so a typo like 1e20 is refused up front instead of
#: turning every latent into NaN after the first step.
MAX_GUIDANCE = 100.0


def scalar(value: Any) -> Any:
    """A 0-d numpy array or torch tensor as the Python number it holds (``.item()``); anything
    else as it is. A caller computing a value with numpy or torch passes one of these naturally."""
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        return value.item()
    return value


def is_int(value: Any) -> bool:
    """An integer (Python, numpy, or a 0-d integer array / tensor), not a bool."""
    value = scalar(value)
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def is_number(value: Any) -> bool:
    """A real number (Python, numpy: ``numpy.float32(7.5)`` is one, or a 0-d array / tensor), not a bool."""
    value = scalar(value)
    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy.bool_ is not Real


def check_int(arg: str, value: Any, lo: int, hi: int | None = None, hint: str = "", hi_text: str = "") -> int:
    """An integer in lo..hi (hi None: no upper bound), returned as a Python int; ``hi_text`` spells
    hi (e.g. "2**64-1")."""
    value = scalar(value)
    if not is_int(value) or value < lo or (hi is not None and value > hi):
        rule = f"an integer from {lo} to {hi_text or hi}" if hi is not None else f"an integer >= {lo}"
        raise InvalidArgument(f"{arg}: must be {rule} but is {value!r}{'; ' + hint if hint else ''}")
    return int(value)


def check_choice(arg: str, value: Any, choices: Iterable[str]) -> str:
    choices = list(choices)
    if value not in choices:
        raise InvalidArgument(f"{arg}: unknown {value!r}; choose one of {', '.join(choices)}")
    return value


def check_steps(steps: Any, num_train_timesteps: int = 1000) -> int:
    """Denoising steps: 1 .. the training schedule's length (it cannot be divided further)."""
    return check_int("steps", steps, 1, num_train_timesteps,
                     "pass an integer number of denoising steps in that range (e.g. 25 or 50)")


def check_guidance(value: Any) -> float:
    value = scalar(value)
    if not is_number(value) or not math.isfinite(value) or not 0 <= value <= MAX_GUIDANCE:
        raise InvalidArgument(
            f"guidance_scale: must be a finite number >= 0 and <= {MAX_GUIDANCE:g} but is {value!r}; "
            "7.5 is the usual value, <= 1 disables classifier-free guidance, > 20 oversaturates"
        )
    return float(value)


def check_strength(value: Any) -> float:
    """img2img strength: the fraction of the schedule re-run from the noised init image."""
    value = scalar(value)
    if not is_number(value) or not 0 < value <= 1:
        raise InvalidArgument(f"strength: must be in (0, 1] but is {value!r}; 0.8 is the usual value, "
                              "1 all but ignores the init image")
    return float(value)


def check_side(arg: str, value: Any, multiple: int, why: str) -> int:
    """An image side in pixels: MIN_SIDE..MAX_SIDE and a multiple of ``multiple`` (``why`` says whose)."""
    if not is_int(value):
        raise InvalidArgument(f"{arg}: must be an integer number of pixels, not {value!r}")
    if not MIN_SIDE <= value <= MAX_SIDE:
        raise InvalidArgument(f"{arg}: must be between {MIN_SIDE} and {MAX_SIDE} pixels but is {value}")
    if value % multiple:
        lo = value - value % multiple
        raise InvalidArgument(f"{arg}: must be a multiple of {multiple} ({why}) but is {value}; "
                              f"use {lo or multiple} or {lo + multiple}")
    return int(value)
