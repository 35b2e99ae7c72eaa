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
- ``--refit``: the text encoder and U-Net plans are built with ``BuilderFlag.REFIT`` (the VAE,
  which no LoRA changes, is not), each with its base weights and refit table beside it, so
  ``set_loras`` swaps LoRAs by refitting (sdfast/lora_refit.py). A refittable plan may run slower
  than a frozen one (the builder cannot fold weights into other constants); not measured.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..artifacts import Manifest, atomic_write, gpu_record, load_manifest
from ..errors import ArtifactMismatch, InvalidArgument
from ..lora import GROUPS
from ..lora_refit import RefitLayer, RefitTable, refit_file
from ..model.components import COMPONENT_MODULE, Precision, ShapeProfile
from ..model.info import ModelInfo, cache_dir, load_torch_modules
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
    #: build the LoRA components (text encoders, U-Net) refittable, with their base weights
    refit: bool = False


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
               timing_cache: Path, refit: bool = False) -> bytes:
    """Parse ``onnx_path`` into a strongly typed network and build a serialized plan (refittable
    with ``refit``: the ONNX parser names its weights by their initializers)."""
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
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
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
    extra += ["--refit"] if options.refit else []
    with tempfile.TemporaryDirectory(prefix="sdfast-onnx-") as scratch:
        onnx_dir = _onnx_source(info, profile, options, Path(scratch) / "onnx")
        onnx_manifest = load_manifest(onnx_dir, info, "onnx")

        def build(name: str, tmp: Path) -> dict:
            refit = options.refit and COMPONENT_MODULE[name] in GROUPS
            onnx_path = onnx_manifest.file(onnx_dir, name)
            plan = build_plan(onnx_path, profile_triples(info, profile, name), options, timing_cache, refit)
            (tmp / f"{name}.plan").write_bytes(plan)
            record = {"file": f"{name}.plan", "precision": onnx_manifest.components[name]["precision"]}
            if refit:
                record.update(write_refit_base(info, name, onnx_path, Precision(record["precision"]), tmp))
            return record

        return export_components(info, out, profile, "tensorrt", options.precision, build, extra_flags=extra,
                                 model_arg=model_arg, verb="built", manifest={"device": device})


def write_refit_base(info: ModelInfo, name: str, onnx_path: Path, precision: Precision, tmp: Path) -> dict:
    """Write ``<name>.refit.safetensors`` (the graph's float initializers as they are) into ``tmp``
    and return the component's manifest fields: ``weights`` (that file) and ``refit`` (the table)."""
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import save_file

    model = onnx.load(str(onnx_path))  # external data is read from beside the graph
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    del model
    floats = {n: np.ascontiguousarray(a) for n, a in inits.items() if a.dtype.kind == "f" and a.size}
    part = COMPONENT_MODULE[name]
    module = load_torch_modules(info, dtype=precision.torch_dtype, device="cpu", parts=(part,))[part]
    table = refit_table(part, module, floats)
    if not table.layers:
        raise RuntimeError(f"refit: no Linear or Conv2d weight of the {part} is an initializer of {onnx_path.name}; "
                           "the ONNX graph folded them all: export without --refit")
    save_file(floats, str(tmp / refit_file(name)))
    log.info("%s: %d refittable layers", name, len(table.layers))
    return {"weights": refit_file(name), "refit": table.record()}


def refit_table(group: str, module, initializers: dict[str, np.ndarray]) -> RefitTable:
    """The layers of ``module`` (every Linear and Conv2d) whose weight is one initializer of the
    graph, found by value (the exporter renames a MatMul's transposed weight): the initializer
    equal to ``W``, or to ``W.T`` for a 2-D weight. A weight found in no initializer or in several,
    or an initializer two layers share, gives no row: a LoRA there is refused at run time."""
    import torch

    def key(a: np.ndarray) -> tuple:
        return a.shape, a.dtype.str, hashlib.sha256(a.tobytes()).hexdigest()

    by_value: dict[tuple, list[str]] = {}
    for n, a in initializers.items():
        by_value.setdefault(key(a), []).append(n)
    rows, claims = [], {}
    for n, m in module.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        w = m.weight.detach().cpu().numpy()
        hits = [(x, False) for x in by_value.get(key(w), [])]
        if w.ndim == 2:
            hits += [(x, True) for x in by_value.get(key(np.ascontiguousarray(w.T)), [])]
        if len(hits) == 1:
            rows.append(RefitLayer(n, hits[0][0], hits[0][1], tuple(w.shape)))
            claims[hits[0][0]] = claims.get(hits[0][0], 0) + 1
    return RefitTable(group, tuple(r for r in rows if claims[r.weight] == 1))


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
                                   timing_cache=job.flags.get("timing_cache"), onnx_dir=job.flags.get("onnx_dir"),
                                   refit=bool(job.flags.get("refit")))
    return export_tensorrt(job.info, job.out, job.profile, options, model_arg=job.model_arg)
