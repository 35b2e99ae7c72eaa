"""``sdfast info``: versions, devices, CPU precision support and built-in models."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show versions, devices and built-in models")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(handler=run)


def collect() -> dict:
    import importlib.metadata as md
    import platform

    import torch

    from . import __version__
    from .engines import BACKENDS
    from .hardware import cpu_bf16_supported
    from .models import builtin_models

    versions = {"sdfast": __version__, "python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {
        "versions": versions,
        "cpu": {"machine": platform.machine(), "processor": platform.processor(),
                "threads": torch.get_num_threads(), "capability": torch.backends.cpu.get_cpu_capability(),
                "bf16": cpu_bf16_supported()},
        "cuda_devices": cuda,
        "backends": list(BACKENDS),
        "builtin_models": builtin_models(),
    }


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for section, value in info.items():
        print(f"{section}:")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in items:
            print(f"  {k}: {v}")
    return 0
