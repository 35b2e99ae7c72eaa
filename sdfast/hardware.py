"""What the machine can do, detected rather than assumed.

Nothing here imports torch at import time: the CLI reads the thread default before anything
heavy loads."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InvalidArgument

if TYPE_CHECKING:
    import torch

CPUINFO = Path("/proc/cpuinfo")
LOADAVG = Path("/proc/loadavg")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform.processor()`` says."""
    import platform

    try:
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cpu_bf16_supported() -> bool:
    """bf16 matrix units (AMX-BF16) or AVX512-BF16: where bf16 is faster than fp32 on the CPU."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def usable_cores() -> int:
    """Physical cores among the CPUs this process may run on, capped by a cgroup CPU quota.
    Hyper-threads of one core count once: two threads on one core's siblings only contend."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    try:
        cpu = phys = None
        for line in CPUINFO.read_text().splitlines() + [""]:
            key, _, value = (x.strip() for x in line.partition(":"))
            if key == "processor":
                cpu = int(value)
            elif key == "physical id":
                phys = value
            elif key == "core id" and cpu in allowed:
                cores.add((phys or "0", value))
    except (OSError, ValueError):
        cores = set()
    n = len(cores) or len(allowed) or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return n


def busy_cpus(samples: int = 3, interval_s: float = 0.01) -> float:
    """CPUs other processes are running on right now: the kernel's count of runnable tasks
    (/proc/loadavg's 4th field, less this process), the median of a few samples. Instantaneous,
    unlike the load averages, so a command run right after another of ours does not count it."""
    counts = []
    for k in range(samples):
        try:
            running = int(LOADAVG.read_text().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0.0
        counts.append(max(0, running - 1))
        if k + 1 < samples:
            time.sleep(interval_s)
    return float(sorted(counts)[len(counts) // 2])


def default_threads() -> tuple[int, str]:
    """(threads, why) for CPU work: $OMP_NUM_THREADS when set, else the usable cores less the CPUs
    other processes keep busy, at least 1. On a shared CPU more threads than free cores is the
    slow case: each parallel region waits for its slowest thread, and a thread that lost its core
    to another process holds up all the others (measured on 2 cores at load 7-9: the quick start
    took 7 s on 2 threads, 0.7 s on 1)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env), "OMP_NUM_THREADS"
    cores = usable_cores()
    busy = busy_cpus()
    machine = os.cpu_count() or cores
    free = max(0, round(machine - busy))
    n = max(1, min(cores, free))
    return n, f"{cores} usable core(s), {busy:g} CPU(s) busy with other processes"


def resolve_device(device: str | torch.device) -> torch.device:
    """A user's device string → a torch device that exists here, or InvalidArgument."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise InvalidArgument(f"device: {device!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("device: 'cuda' was asked for but no CUDA device is available; use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidArgument(f"device: {dev.type!r} is not supported; use 'cpu' or 'cuda'")
    return dev
