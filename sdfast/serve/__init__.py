"""``sdfast serve``: an OpenAI-compatible image server with request batching (extra ``sdfast[serve]``),
and the same app as a Ray Serve deployment (extra ``sdfast[ray]``, see ray.py).

    from sdfast.serve import ServeConfig, ImageService, create_app
"""

from __future__ import annotations

from .service import ImageService, ServeConfig

__all__ = ["ImageService", "ServeConfig", "create_app"]


def create_app(service: ImageService, drain_timeout_s: float | None = None):
    """The FastAPI app (imported lazily: fastapi is only in the serve extra)."""
    from .app import create_app as _create_app

    return _create_app(service, drain_timeout_s)
