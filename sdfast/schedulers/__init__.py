"""Samplers by name: ``make_scheduler("euler", scheduler_config)``."""

from __future__ import annotations

from typing import Any

from ..rules import check_choice
from .base import Scheduler
from .ddim import DDIMScheduler
from .dpmpp_2m import DPMPP2MKarrasScheduler, DPMPP2MScheduler
from .euler import EulerScheduler
from .euler_ancestral import EulerAncestralScheduler
from .lms import LMSScheduler

SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.name: cls
    for cls in (
        LMSScheduler,
        EulerScheduler,
        EulerAncestralScheduler,
        DDIMScheduler,
        DPMPP2MScheduler,
        DPMPP2MKarrasScheduler,
    )
}


def make_scheduler(name: str, config: dict[str, Any]) -> Scheduler:
    """Build scheduler ``name`` from a model folder's ``scheduler_config.json`` (a dict)."""
    return SCHEDULERS[check_choice("scheduler", name, SCHEDULERS)](config)


__all__ = ["SCHEDULERS", "Scheduler", "make_scheduler"]
