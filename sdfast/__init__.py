"""sdfast: fast Stable Diffusion inference with the eager PyTorch path as its measured reference.

    import sdfast
    pipe = sdfast.load("tiny")                # or a diffusers folder / hub id
    out = pipe.generate("a red circle on a blue background", steps=20, seed=0)
    out.images[0].save("out.png")
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(model="tiny", backend="torch", device="cpu", dtype="fp32", engines=None, **options):
    """Load a pipeline; see :func:`sdfast.runtime.load` (options: ``attention``, ``cuda_graphs``).
    Imported lazily to keep ``import sdfast`` light."""
    from .runtime import load as _load

    return _load(model, backend=backend, device=device, dtype=dtype, engines=engines, **options)
