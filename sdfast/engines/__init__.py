"""Engines: one object per component, one interface for every backend.

``load_engines`` builds the four engines of a backend. The runtime never asks which backend it
has; it calls ``engine(**inputs)`` and gets a dict of torch tensors on the engine's device.
"""

from __future__ import annotations

from .base import Engine, check_request, load_engines

__all__ = ["Engine", "check_request", "load_engines"]
