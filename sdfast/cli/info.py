"""`sdfast info`: versions, devices, CPU precision support, backends (available or why not) and
built-in models."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show versions, devices, backends and built-in models",
                       description="Show versions, devices, CPU precision support, which backends can run "
                                   "here (and what to install for the others) and the built-in models.")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(handler=run)


def collect() -> dict:
    import platform

    import torch

    from ..artifacts import versions as artifact_versions
    from ..backends import BACKENDS
    from ..hardware import cpu_bf16_supported, cpu_name, default_threads
    from ..model.info import builtin_models

    versions: dict[str, str | None] = {"python": platform.python_version(), **artifact_versions()}
    cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    backends = {}
    for b in BACKENDS.values():
        reason = b.missing()
        backends[b.name] = {"available": reason is None, "format": b.format, "reason": reason}
    return {
        "versions": versions,
        "cpu": {"model": cpu_name() or "unknown", "machine": platform.machine(),
                "threads": torch.get_num_threads(), "default_threads": "{} ({})".format(*default_threads()),
                "capability": torch.backends.cpu.get_cpu_capability(),
                "bf16": cpu_bf16_supported()},
        "cuda_devices": cuda,
        "backends": backends,
        "builtin_models": builtin_models(),
    }


def format_text(info: dict) -> str:
    lines = ["versions:"]
    lines += [f"  {k}: {'not installed' if v is None else v}" for k, v in info["versions"].items()]
    lines.append("cpu:")
    lines += [f"  {k}: {v}" for k, v in info["cpu"].items()]
    devices = info["cuda_devices"]
    lines.append("cuda_devices: " + ("none" if not devices else ""))
    lines += [f"  {i}: {name}" for i, name in enumerate(devices)]
    lines.append("backends:")
    for name, b in info["backends"].items():
        runs = f"runs --format {b['format']} exports" if b["format"] else "runs the model folder"
        state = "available" if b["available"] else f"NOT available: {b['reason']}"
        lines.append(f"  {name} ({runs}): {state}")
    lines.append("builtin_models:")
    lines += [f"  {k}: {v}" for k, v in info["builtin_models"].items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0
