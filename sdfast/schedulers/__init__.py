"""Samplers by name: ``make_scheduler("euler", scheduler_config)``.

Timestep spacing is a config option, not a name: every scheduler reads ``timestep_spacing``
(``"linspace"``, ``"leading"``, ``"trailing"``) from the folder's ``scheduler_config.json``, so an
SD-Turbo folder (``EulerDiscreteScheduler``, ``"trailing"``) runs ``euler`` on the trailing
timesteps 999, 749, 499, 249 at 4 steps exactly as diffusers does, with no ``*_trailing`` names.
``scheduler_for_config`` picks the name a folder's config asks for when the user names none.
"""

from __future__ import annotations

from typing import Any

from ..rules import check_choice
from .base import Scheduler
from .ddim import DDIMScheduler
from .dpmpp_2m import DPMPP2MKarrasScheduler, DPMPP2MScheduler
from .euler import EulerScheduler
from .euler_ancestral import EulerAncestralScheduler
from .lcm import LCMScheduler
from .lms import LMSScheduler
from .tcd import TCDScheduler

SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.name: cls
    for cls in (
        LMSScheduler,
        EulerScheduler,
        EulerAncestralScheduler,
        DDIMScheduler,
        DPMPP2MScheduler,
        DPMPP2MKarrasScheduler,
        LCMScheduler,
        TCDScheduler,
    )
}

#: the scheduler a folder gets when its config names a class sdfast has no equal of (PNDM, the
#: class SD 1.5 ships, UniPC, Heun, DPM2 ...) or names none: LMS, sdfast's long-standing default.
DEFAULT_SCHEDULER = "lms"
#: diffusers class name -> sdfast name (the config's options are then read by that scheduler).
CONFIG_CLASSES = {
    "LMSDiscreteScheduler": "lms",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "DDIMScheduler": "ddim",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "LCMScheduler": "lcm",
    "TCDScheduler": "tcd",
}


def scheduler_for_config(config: dict[str, Any]) -> str:
    """The sdfast scheduler name for a folder's ``scheduler_config.json`` (a dict); never raises.

    ``_class_name`` picks the algorithm (``CONFIG_CLASSES``); ``timestep_spacing`` needs no
    name of its own, since the chosen scheduler reads it from the same config. With
    ``use_karras_sigmas: true`` the answer is ``dpmpp_2m_karras``, the one scheduler here that
    runs Karras sigmas (a Karras Euler / LMS config would be refused by euler / lms, which
    implement the training sigmas only). Any other class, a missing or non-string
    ``_class_name``, or a config that is not a dict gives ``DEFAULT_SCHEDULER`` ("lms").
    """
    if not isinstance(config, dict):
        return DEFAULT_SCHEDULER
    cls = config.get("_class_name")
    name = CONFIG_CLASSES.get(cls, DEFAULT_SCHEDULER) if isinstance(cls, str) else DEFAULT_SCHEDULER
    if config.get("use_karras_sigmas") is True and name not in ("lcm", "tcd", "ddim"):
        return "dpmpp_2m_karras"
    return name


def make_scheduler(name: str, config: dict[str, Any]) -> Scheduler:
    """Build scheduler ``name`` from a model folder's ``scheduler_config.json`` (a dict)."""
    return SCHEDULERS[check_choice("scheduler", name, SCHEDULERS)](config)


__all__ = [
    "CONFIG_CLASSES",
    "DEFAULT_SCHEDULER",
    "SCHEDULERS",
    "Scheduler",
    "make_scheduler",
    "scheduler_for_config",
]
