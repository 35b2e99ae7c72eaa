"""ONNX → TensorRT plans (TensorRT 10 and 11 Python API), one plan per component.

UNVERIFIED: written against NVIDIA's documented Python API; no machine this was developed on
has TensorRT or a GPU. The GPU-free parts (profile triples, manifest, reuse rules) are tested.

- The network is created **strongly typed** (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``):
  the ONNX graph's own types decide every layer's precision, so an fp16 export builds as fp16
  and its fp32 VAE as fp32, with no FP16 builder flag (deprecated for weakly typed networks in
  TensorRT 10 and gone in 11).
- One optimization profile per component, from ``ShapeProfile.shapes`` (the same triples that
  made the ONNX dynamic axes); nothing here restates a shape.
- A timing cache persisted across builds (``--timing-cache``, default in the sdfast cache), so
  rebuilding for another profile re-times only what changed.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..artifacts import Manifest, atomic_write, gpu_record, load_manifest
from ..components import Precision, ShapeProfile
from ..errors import ArtifactMismatch, InvalidArgument
from ..models import ModelInfo, cache_dir
from .base import check_export_out, export_components

if TYPE_CHECKING:
    from ..backends import ExportJob

log = logging.getLogger(__name__)

#: default scratch memory for tactics; the builder may use less.
WORKSPACE_BYTES = 8 << 30


@dataclass(frozen=True)
class TensorRTBuildOptions:
    precision: Precision = Precision.FP16
    vae_precision: Precision | None = None
    #: 0 (fast build) .. 5 (widest tactic search); TensorRT's default is 3.
    builder_optimization_level: int = 3
    timing_cache: str | None = None
    #: an existing ONNX export to build from; None exports one into a temp folder first.
    onnx_dir: str | None = None
    workspace_bytes: int = WORKSPACE_BYTES


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise InvalidArgument(
            "format: 'tensorrt' needs the tensorrt Python package and a CUDA GPU, which this machine lacks; "
            "pip install 'sdfast[gpu]' on a GPU machine, or export --format onnx"
        ) from e
    return trt


def profile_triples(info: ModelInfo, profile: ShapeProfile, component: str) -> dict[str, tuple[tuple[int, ...], ...]]:
    """input name -> (min, opt, max) shapes: the arguments of ``IOptimizationProfile.set_shape``."""
    return profile.shapes(info.specs[component], info, "inputs")


def onnx_covers(onnx_profile: ShapeProfile, profile: ShapeProfile) -> list[str]:
    """Why an ONNX export cannot serve a TensorRT profile: a range it lacks or a dim it froze."""
    reasons = []
    for dim in ("batch", "height", "width"):
        (olo, _, ohi), (lo, _, hi) = getattr(onnx_profile, dim), getattr(profile, dim)
        if lo < olo or hi > ohi:
            reasons.append(f"{dim} {lo}..{hi} is outside the ONNX export's {olo}..{ohi}")
        elif lo != hi and olo == ohi:
            reasons.append(f"{dim} is static in the ONNX export")
    # The text encoder and U-Net batch is always dynamic (B..2B); see ShapeProfile.component_dims.
    return reasons


def load_timing_cache(config, path: Path):
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, False)  # False: refuse a cache from another device/version
    return cache


def save_timing_cache(config, path: Path) -> None:
    cache = config.get_timing_cache()
    if cache is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, bytes(memoryview(cache.serialize())))


def build_plan(onnx_path: Path, triples: dict[str, tuple[tuple[int, ...], ...]], options: TensorRTBuildOptions,
               timing_cache: Path) -> bytes:
    """Parse ``onnx_path`` into a strongly typed network and build a serialized plan."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Required for strong typing on 10.x; accepted and ignored on 11.x, where it is always on.
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    # From the file, not bytes: the parser then finds external weight files next to it.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    config.builder_optimization_level = options.builder_optimization_level
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        lo, opt, hi = triples[name]
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    load_timing_cache(config, timing_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build {onnx_path.name}; rerun with -v for the builder log")
    save_timing_cache(config, timing_cache)
    return bytes(memoryview(plan))


def export_tensorrt(info: ModelInfo, out: Path | str, profile: ShapeProfile,
                    options: TensorRTBuildOptions = TensorRTBuildOptions(), model_arg: str | None = None) -> Path:
    """ONNX (given or exported now) → one plan per component in ``out``, sealed by a manifest."""
    profile.validate(info)
    check_export_out(out, protect=info.path)  # before TensorRT and the ONNX export: never replace what we did not write
    trt = import_tensorrt()
    device = gpu_record()
    timing_cache = Path(options.timing_cache) if options.timing_cache else \
        cache_dir() / "tensorrt" / f"timing-{trt.__version__}-{device['compute_capability']}.cache"
    extra = ["--vae-precision", options.vae_precision.value] if options.vae_precision else []
    extra += ["--builder-optimization-level", str(options.builder_optimization_level)]
    with tempfile.TemporaryDirectory(prefix="sdfast-onnx-") as scratch:
        onnx_dir = _onnx_source(info, profile, options, Path(scratch) / "onnx")
        onnx_manifest = load_manifest(onnx_dir, info, "onnx")

        def build(name: str, tmp: Path) -> dict:
            plan = build_plan(onnx_manifest.file(onnx_dir, name), profile_triples(info, profile, name),
                              options, timing_cache)
            (tmp / f"{name}.plan").write_bytes(plan)
            return {"file": f"{name}.plan", "precision": onnx_manifest.components[name]["precision"]}

        return export_components(info, out, profile, "tensorrt", options.precision, build, extra_flags=extra,
                                 model_arg=model_arg, verb="built", manifest={"device": device})


def _onnx_source(info: ModelInfo, profile: ShapeProfile, options: TensorRTBuildOptions, scratch: Path) -> Path:
    if options.onnx_dir is not None:
        src = Path(options.onnx_dir)
        m: Manifest = load_manifest(src, info, "onnx")
        reasons = onnx_covers(m.profile, profile)
        if reasons:
            raise ArtifactMismatch(f"onnx: {src} cannot serve this profile ({'; '.join(reasons)}); "
                                   f"export ONNX with the same range flags or drop --onnx")
        return src
    from .onnx import OnnxExportOptions, export_onnx

    export_onnx(info, scratch, profile, OnnxExportOptions(precision=options.precision,
                                                          vae_precision=options.vae_precision))
    return scratch


def export_job(job: ExportJob) -> Path:
    """``sdfast export --format tensorrt`` (the backend record's entry point)."""
    options = TensorRTBuildOptions(precision=job.precision, vae_precision=job.vae_precision,
                                   builder_optimization_level=job.flags.get("builder_optimization_level", 3),
                                   timing_cache=job.flags.get("timing_cache"), onnx_dir=job.flags.get("onnx_dir"))
    return export_tensorrt(job.info, job.out, job.profile, options, model_arg=job.model_arg)
