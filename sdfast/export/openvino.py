"""torch modules → OpenVINO IR (``NAME.xml`` + ``NAME.bin``), one model per component.

Choices, and why (numbers in bench/README.md, "OpenVINO"):

- **Source: the torch modules, through ``ov.convert_model``** (OpenVINO's PyTorch frontend
  traces the fixed-I/O wrapper), not our ONNX graphs. On the tiny model both are exact to
  ~1e-6; from torch it is one step instead of two (no ONNX trace, no onnxscript folding),
  several times faster to build, and PyTorch's ``scaled_dot_product_attention`` arrives as
  OpenVINO's own SDPA op, which the CPU plugin runs as one fused attention kernel; the ONNX
  graph's MatMul → Softmax → MatMul (chosen for TensorRT, see export/onnx.py) has to be
  pattern-matched back into it.
- **Shapes from the profile:** every dim the profile fixes is static in the IR and every dim
  it lets vary is an interval ``[min, max]`` (``ov.Dimension(lo, hi)``), so the CPU plugin
  plans memory for the bound and a request outside it fails in the engine's profile check
  first. Static profiles are the fast case (the CPU plugin compiles one shape once). Tracing
  freezes diffusers' shape-dependent Python branches exactly as the ONNX exporter's does,
  hence the same side multiple.
- **Precision is an inference hint, weights stay fp32 in the IR.** OpenVINO's CPU plugin runs
  bf16 by itself when told ``INFERENCE_PRECISION_HINT=bf16`` (on AMX / AVX512-BF16 it is the
  plugin's *default*, so fp32 engines must ask for f32 explicitly); it keeps the ops that need
  fp32 (softmax, normalization statistics) in fp32. A bf16 export therefore writes fp32
  weights plus bf16 inputs and outputs (a pre/post-processing step in the IR), so its real I/O
  says bf16 like every other backend's bf16 engine, and the manifest records the hint the
  engine compiles with. The VAE follows ``precision`` for bf16 (bf16 has fp32's exponent
  range, so the fp16 overflow that keeps other backends' VAE in fp32 does not arise) unless
  ``vae_precision`` says otherwise.
"""

from __future__ import annotations

import gc
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..artifacts import (
    package_version,
    versions,
)
from ..components import VAE_COMPONENTS, Precision, ShapeProfile, sample_inputs
from ..errors import InvalidArgument
from ..lora_slots import SlotTable, check_rank, slotted_component
from ..models import COMPONENT_MODULE, ModelInfo, load_torch_modules
from .base import export_components

if TYPE_CHECKING:
    from ..backends import ExportJob

log = logging.getLogger(__name__)

FORMAT = "openvino"
#: precisions the CPU plugin runs these graphs in (fp16 on CPU needs AVX512-FP16 / AMX-FP16:
#: not measured here, so not offered).
PRECISIONS = (Precision.FP32, Precision.BF16)
#: OpenVINO's names for the inference precision hint.
OV_HINT = {Precision.FP32: "f32", Precision.BF16: "bf16"}


@dataclass(frozen=True)
class OpenVinoExportOptions:
    precision: Precision = Precision.FP32
    #: None: the VAE follows ``precision`` (see the module doc).
    vae_precision: Precision | None = None
    #: LoRA slots of this rank in the U-Net and text encoders (0: none; sdfast/lora_slots.py)
    lora_rank: int = 0

    def component_precision(self, name: str) -> Precision:
        if name in VAE_COMPONENTS and self.vae_precision is not None:
            return self.vae_precision
        return self.precision

    def validate(self) -> None:
        check_rank(self.lora_rank)
        for arg, p in (("precision", self.precision), ("vae_precision", self.vae_precision)):
            if p is not None and p not in PRECISIONS:
                raise InvalidArgument(f"{arg}: the OpenVINO export builds fp32 or bf16 models, not {p.value}; "
                                      f"use --{arg.replace('_', '-')} fp32 or bf16")


def partial_shape(dims: list[tuple[int, int]]):
    """One ``ov.PartialShape`` from per-axis (min, max): static where they agree, an interval otherwise."""
    import openvino as ov

    return ov.PartialShape([ov.Dimension(lo) if lo == hi else ov.Dimension(lo, hi) for lo, hi in dims])


def convert_component(module: torch.nn.Module, name: str, info: ModelInfo, profile: ShapeProfile,
                      precision: Precision, slots: SlotTable | None = None):
    """``ov.convert_model`` of one wrapper, with the spec's tensor names and the profile's shapes;
    ``slots``: its LoRA slots' factors follow the component's inputs (static, fp32 like the weights)."""
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

    spec = info.specs[name]
    inputs = sample_inputs(spec, info, profile, which=1)
    slot_names = slots.input_names() if slots else []
    args = tuple(inputs[n] for n in spec.input_names) + tuple(slots.zeros(torch.float32) if slots else ())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # branches frozen at the traced shape
        model = ov.convert_model(module, example_input=args)
    for port, tname in zip(model.inputs, [*spec.input_names, *slot_names], strict=True):
        port.get_tensor().set_names({tname})
    for port, t in zip(model.outputs, spec.outputs, strict=True):
        port.get_tensor().set_names({t.name})
    shapes = {which: profile.shapes(spec, info, which) for which in ("inputs", "outputs")}
    model.reshape({**{t.name: partial_shape(list(zip(shapes["inputs"][t.name][0], shapes["inputs"][t.name][2],
                                                     strict=True)))
                      for t in spec.inputs},
                   **{n: ov.PartialShape(list(s)) for n, s in zip(slot_names, slots.input_shapes() if slots else [],
                                                                  strict=True)}})
    if precision is not Precision.FP32:
        # Real I/O in the engine's precision; weights stay fp32 (the hint decides the compute).
        ppp = PrePostProcessor(model)
        for t in spec.inputs:
            if t.kind == "float":
                ppp.input(t.name).tensor().set_element_type(ov.Type.bf16)
        for t in spec.outputs:
            ppp.output(t.name).tensor().set_element_type(ov.Type.bf16)
        model = ppp.build()
    model.set_rt_info(name, ["sdfast", "component"])
    model.set_rt_info(OV_HINT[precision], ["sdfast", "inference_precision"])
    return model


def export_component(info: ModelInfo, name: str, profile: ShapeProfile, precision: Precision, dest: Path,
                     lora_rank: int = 0) -> SlotTable | None:
    """Load one component's module (fp32: weights stay fp32), convert and save it at ``dest``;
    returns its LoRA slots, if any."""
    import openvino as ov

    part = COMPONENT_MODULE[name]
    mods = load_torch_modules(info, dtype=torch.float32, device="cpu", parts=(part,))
    module, slots = slotted_component(mods, name, info.family, lora_rank)
    # The IR shares the module's weight memory (convert_model's share_weights), so one copy of
    # the weights is resident and the module must outlive the save.
    model = convert_component(module, name, info, profile, precision, slots)
    ov.save_model(model, str(dest), compress_to_fp16=False)
    del model, module, mods
    gc.collect()
    return slots


def export_openvino(info: ModelInfo, out: Path | str, profile: ShapeProfile,
                    options: OpenVinoExportOptions = OpenVinoExportOptions(), model_arg: str | None = None,
                    components: tuple[str, ...] | None = None) -> Path:
    """Convert every component into ``out`` (replaced atomically) and seal it with a manifest."""
    options.validate()
    extra = ["--vae-precision", options.vae_precision.value] if options.vae_precision else []

    def build(name: str, tmp: Path) -> dict:
        precision = options.component_precision(name)
        slots = export_component(info, name, profile, precision, tmp / f"{name}.xml", options.lora_rank)
        return {"file": f"{name}.xml", "weights": f"{name}.bin", "precision": precision.value,
                "inference_precision": OV_HINT[precision], **({"lora_slots": slots.record()} if slots else {})}

    return export_components(info, out, profile, FORMAT, options.precision, build, components=components,
                             extra_flags=extra, model_arg=model_arg, verb="converted", lora_rank=options.lora_rank,
                             manifest={"versions": {**versions(), "openvino": package_version("openvino")}})


def export_job(job: ExportJob) -> Path:
    """``sdfast export --format openvino`` (the backend record's entry point)."""
    options = OpenVinoExportOptions(precision=job.precision, vae_precision=job.vae_precision,
                                    lora_rank=job.lora_rank)
    return export_openvino(job.info, job.out, job.profile, options, model_arg=job.model_arg)
