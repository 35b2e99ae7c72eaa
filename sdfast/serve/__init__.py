"""``sdfast serve``: an OpenAI-compatible image server with request batching (extra ``sdfast[serve]``),
and the same app as a Ray Serve deployment (extra ``sdfast[ray]``, see ray.py).

    from sdfast.serve import ServeConfig, ImageService, create_app

The names load lazily: Ray's HTTP proxies import sdfast.serve.ray_proxy, and must not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .service import ImageService, ServeConfig

__all__ = ["ImageService", "ServeConfig", "create_app"]


def __getattr__(name: str) -> Any:
    if name in ("ImageService", "ServeConfig"):
        from . import service

        return getattr(service, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def create_app(service: ImageService, drain_timeout_s: float | None = None):
    """The FastAPI app (imported lazily: fastapi is only in the serve extra)."""
    from .app import create_app as _create_app

    return _create_app(service, drain_timeout_s)
