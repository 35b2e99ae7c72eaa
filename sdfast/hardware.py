"""What the machine can do, detected rather than assumed."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .errors import InvalidArgument


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16_supported() -> bool:
    """bf16 matrix units (AMX-BF16) or AVX512-BF16: where bf16 is faster than fp32 on the CPU."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def resolve_device(device: str | torch.device) -> torch.device:
    """A user's device string → a torch device that exists here, or InvalidArgument."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise InvalidArgument(f"device: {device!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("device: 'cuda' was asked for but no CUDA device is available; use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidArgument(f"device: {dev.type!r} is not supported; use 'cpu' or 'cuda'")
    return dev
