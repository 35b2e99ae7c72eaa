"""torch modules → ONNX, one graph per component, read back and checked from its path.

Choices, and why:

- **Exporter: the legacy TorchScript tracer (``dynamo=False``).** Diffusers' U-Net has
  shape-dependent Python branches (upsample padding, ``shape[0] >= 64`` contiguity) that
  ``torch.export`` turns into guards and symbolic-shape constraint errors; tracing freezes them
  at the traced shape, which is exactly what an engine profile means. Its output is plain
  standard ops that both ORT and TensorRT's parser take. The frozen padding branch is why
  profiles keep sides on ``components.size_multiple``.
- **Attention: diffusers' ``AttnProcessor`` (and CLIP's "eager" attention),** i.e. plain
  MatMul → Softmax → MatMul. TensorRT's Myelin pattern-matches that into its fused MHA kernels
  and ORT's transformer optimizer into its attention kernels; the SDPA symbolic's separate
  scaling of q and k and its explicit masks defeat both matchers.
- **Opset 17:** the first with LayerNormalization (CLIP, transformer blocks). GroupNorm is
  exported as Reshape → InstanceNormalization → Reshape → Mul/Add, which is exact
  (per-group statistics, per-channel affine) and what TensorRT fuses; opset 18's
  GroupNormalization had per-group scale/bias (fixed only in opset 21), so we stay below it.
- **Optimizer: onnxscript's constant folder plus onnx_ir's common passes** (fold with shape
  inference, common-subexpression elimination, identity removal, dead-node removal, constants
  lifted and deduplicated as initializers): the graph stays standard ONNX, portable to TensorRT
  and ORT alike and valid for ``onnx.checker``, and onnx_ir streams >2 GB models through lazy
  external data. We skip onnxscript's pattern rewriter (``optimizer.optimize``): it removed
  ~5% more nodes on the U-Net but took 10-50× longer. ORT's offline optimization was the
  other candidate; its EXTENDED level writes ORT-only fused ops that TensorRT cannot read, and
  ORT re-applies those at session load anyway.
- **Precision:** fp16 graphs are traced from fp16 modules (so TensorRT builds them strongly
  typed as they are); the VAE stays fp32 unless ``vae_precision`` says otherwise, because SD's
  VAE decoder overflows fp16 on real images.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import InvalidArgument
from ..lora_slots import SlotTable, check_rank
from ..model.components import VAE_COMPONENTS, Precision, ShapeProfile, sample_inputs
from ..model.info import ModelInfo, load_torch_modules
from .base import export_components

if TYPE_CHECKING:
    from ..backends import ExportJob

log = logging.getLogger(__name__)

OPSET = 17
#: opsets this exporter writes: 17 is the first with LayerNormalization (CLIP); the TorchScript
#: exporter stops at torch's ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET (20 in torch 2.x).
MIN_OPSET = 17
#: protobuf's hard limit for one serialized message; larger models must keep weights outside.
PROTOBUF_LIMIT = 2**31
#: Weights above this go to external data. Not only past protobuf's limit: writing weights
#: inline serializes a second in-memory copy of them (the SD 1.5 fp16 U-Net, 1.6 GB, peaked at
#: 8.8 GB RSS inline), while external data streams them to disk.
EXTERNAL_DATA_THRESHOLD = 256 << 20
#: tensors smaller than this stay inside the .onnx when weights go to external data.
EXTERNAL_MIN_BYTES = 1024


@dataclass(frozen=True)
class OnnxExportOptions:
    precision: Precision = Precision.FP32
    #: precision of the two VAE graphs; None means fp32 (see module doc).
    vae_precision: Precision | None = None
    #: True forces weights into ``NAME.onnx.data``; None decides by size (> EXTERNAL_DATA_THRESHOLD).
    external_data: bool | None = None
    optimize: bool = True
    opset: int = OPSET
    #: LoRA slots of this rank in the U-Net and text encoders (0: none; sdfast/lora_slots.py)
    lora_rank: int = 0

    def component_precision(self, name: str) -> Precision:
        if name in VAE_COMPONENTS:
            return self.vae_precision or Precision.FP32
        return self.precision

    def validate(self) -> None:
        check_rank(self.lora_rank)
        top = max_opset()
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or not MIN_OPSET <= self.opset <= top:
            raise InvalidArgument(f"opset: {self.opset!r} is not an opset this exporter writes; use {MIN_OPSET}..{top} "
                                  f"(default {OPSET})")
        for arg, p in (("precision", self.precision), ("vae_precision", self.vae_precision)):
            if p is not None and p not in (Precision.FP32, Precision.FP16):
                raise InvalidArgument(f"{arg}: ONNX export builds fp32 or fp16 graphs, not {p}; "
                                      f"use --{arg.replace('_', '-')} fp32 or fp16")


def max_opset() -> int:
    from torch.onnx import _constants

    return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))


def prepare_module(info: ModelInfo, name: str, dtype: torch.dtype,
                   lora_rank: int = 0) -> tuple[torch.nn.Module, SlotTable | None]:
    """One component wrapper with export-friendly attention (see the module doc), in ``dtype``,
    with LoRA slots of ``lora_rank`` where it runs a LoRA group; (wrapper, slot table or None).

    Only the torch module that component needs is loaded, so exporting the SD 1.5 U-Net never
    holds the text encoder or the VAE (or a second precision's copy) beside it."""
    from diffusers.models.attention_processor import AttnProcessor

    from ..deepcache import component_module

    part = info.specs[name].module
    mod = load_torch_modules(info, dtype=dtype, device="cpu", parts=(part,))[part]
    if info.specs[name].is_text:
        mod.set_attn_implementation("eager")
    else:
        mod.set_attn_processor(AttnProcessor())
    return component_module({part: mod}, name, info, lora_rank)  # DeepCache's graphs: the cut's halves


def trace_component(module: torch.nn.Module, name: str, info: ModelInfo, profile: ShapeProfile,
                    dtype: torch.dtype, raw: Path, options: OnnxExportOptions, slots: SlotTable | None = None) -> None:
    """Trace one component with the legacy exporter into ``raw`` (unoptimized); ``slots``: its
    LoRA slots' factors follow the component's inputs (static shapes)."""
    spec = info.specs[name]
    inputs = sample_inputs(spec, info, profile, which=1, dtype=dtype)
    slot_names = slots.input_names() if slots else []
    inputs.update(zip(slot_names, slots.zeros(dtype) if slots else [], strict=True))
    raw.parent.mkdir()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # TracerWarnings name the Python branches that tracing freezes; see the module doc.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # The tracer's own folding skips Slice ops with steps != 1 and says so per op; our
        # optimizer folds what it left (see the module doc), so the warning is noise here.
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        torch.onnx.export(
            module, tuple(inputs[n] for n in [*spec.input_names, *slot_names]), str(raw), dynamo=False,
            opset_version=options.opset, input_names=[*spec.input_names, *slot_names], output_names=spec.output_names,
            dynamic_axes=profile.dynamic_axes(spec, info), do_constant_folding=True,
        )


def export_component(info: ModelInfo, name: str, profile: ShapeProfile, dtype: torch.dtype, dest: Path,
                     options: OnnxExportOptions) -> SlotTable | None:
    """Load, trace, optimize and check one component at ``dest``; returns its LoRA slots, if any.

    The torch module is dropped as soon as the trace is on disk, so optimizing and saving the
    graph never holds a second copy of the weights beside it."""
    import onnx

    raw = dest.parent / f"{dest.stem}.raw" / dest.name
    module, slots = prepare_module(info, name, dtype, options.lora_rank)
    trace_component(module, name, info, profile, dtype, raw, options, slots)
    del module
    _finish(raw, dest, options)
    shutil.rmtree(raw.parent)
    onnx.checker.check_model(str(dest))  # from the path: works for external data and > 2 GB
    return slots


def optimize(model, rounds: int = 2) -> None:
    """Constant folding and dead-code elimination in place (see the module doc for the choice)."""
    import onnx_ir.passes.common as passes
    import onnxscript.optimizer

    for _ in range(rounds):  # folding exposes dead nodes, whose removal exposes more folding
        onnxscript.optimizer.fold_constants_ir(model, onnx_shape_inference=True)
        passes.CommonSubexpressionEliminationPass()(model)
        passes.IdentityEliminationPass()(model)
        onnxscript.optimizer.remove_unused_nodes(model)
    passes.LiftConstantsToInitializersPass()(model)
    passes.DeduplicateInitializersPass()(model)
    passes.RemoveUnusedNodesPass()(model)


def _finish(raw: Path, dest: Path, options: OnnxExportOptions) -> list[Path]:
    """Optimize ``raw`` and write it to ``dest``, weights inline or in ``dest.name + '.data'``."""
    import onnx_ir as ir

    model = ir.load(raw)
    if options.optimize:
        n0 = sum(1 for _ in model.graph.all_nodes())
        optimize(model)
        log.info("%s: optimized %d -> %d nodes", dest.name, n0, sum(1 for _ in model.graph.all_nodes()))
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    external = options.external_data if options.external_data is not None else weight_bytes > EXTERNAL_DATA_THRESHOLD
    if external:
        data = f"{dest.name}.data"
        # Every weight moves out; tiny tensors stay inline, because ORT cannot read the tensor
        # attributes (ConstantOfShape's value) from external data.
        ir.save(model, dest, external_data=data, size_threshold_bytes=EXTERNAL_MIN_BYTES)
        return [dest, dest.parent / data]
    ir.save(model, dest)
    return [dest]


def export_onnx(info: ModelInfo, out: Path | str, profile: ShapeProfile,
                options: OnnxExportOptions = OnnxExportOptions(), model_arg: str | None = None,
                components: tuple[str, ...] | None = None) -> Path:
    """Export every component of the model family into ``out`` (replaced atomically) and seal it with a manifest."""
    components = components or tuple(info.specs)
    options.validate()
    extra = ["--vae-precision", options.vae_precision.value] if options.vae_precision else []
    if options.external_data:
        extra.append("--external-data")
    dtypes = {name: options.component_precision(name).torch_dtype for name in components}
    if options.precision is not Precision.FP32:
        vae = options.vae_precision or Precision.FP32
        log.warning("export: text_encoder and unet in %s, VAE in %s%s", options.precision.value, vae.value,
                    "" if options.vae_precision else " (the SD VAE overflows fp16; --vae-precision fp16 to change)")

    def build(name: str, tmp: Path) -> dict:
        slots = export_component(info, name, profile, dtypes[name], tmp / f"{name}.onnx", options)
        return {"file": f"{name}.onnx", "precision": options.component_precision(name).value,
                **({"lora_slots": slots.record()} if slots else {})}

    return export_components(info, out, profile, "onnx", options.precision, build, components=components,
                             extra_flags=extra, model_arg=model_arg, lora_rank=options.lora_rank)


def export_job(job: ExportJob) -> Path:
    """``sdfast export --format onnx`` (the backend record's entry point)."""
    options = OnnxExportOptions(precision=job.precision, vae_precision=job.vae_precision,
                                external_data=True if job.flags.get("external_data") else None,
                                opset=job.flags.get("opset", OPSET), lora_rank=job.lora_rank)
    return export_onnx(job.info, job.out, job.profile, options, model_arg=job.model_arg)
