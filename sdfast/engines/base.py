"""The Engine protocol and the backend registry."""

from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

import torch

from ..components import ComponentSpec, Precision
from ..errors import InvalidArgument
from ..models import ModelInfo

#: backend name -> module (under sdfast.engines) exposing ``load(info, device, precision, engines)``.
BACKENDS: dict[str, str] = {
    "torch": "torch",
    "onnxruntime": "onnxruntime",
    "tensorrt": "tensorrt",
    "inductor": "inductor",
}


@runtime_checkable
class Engine(Protocol):
    spec: ComponentSpec
    device: torch.device

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]: ...


def load_engines(info: ModelInfo, backend: str, device: torch.device, precision: Precision,
                 engines: str | None = None) -> dict[str, Engine]:
    """The engines of ``backend`` for every component, keyed by component name."""
    if backend not in BACKENDS:
        raise InvalidArgument(f"backend: unknown {backend!r}; choose one of {', '.join(BACKENDS)}")
    try:
        module = importlib.import_module(f".{BACKENDS[backend]}", __package__)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("sdfast"):
            raise InvalidArgument(f"backend: {backend!r} is not available in this build of sdfast") from e
        raise InvalidArgument(
            f"backend: {backend!r} needs the Python package {e.name!r}, which is not installed; "
            f"install it (pip install 'sdfast[onnx]' or 'sdfast[gpu]') or use backend='torch'"
        ) from e
    return module.load(info, device=device, precision=precision, engines=engines)
