"""What the machine can do, detected rather than assumed."""

from __future__ import annotations

import functools
from pathlib import Path


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
