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
- **int8** (``precision`` int8, export/int8.py): the components ``Int8Options.components`` names
  (the U-Net by default) are quantized by NNCF, calibrated on the eager loop's real inputs; every
  component keeps a float ``precision`` (``--int8-base``, fp32 by default) for its I/O and the
  math int8 leaves in float, and the quantized ones carry a ``quantization`` record (mode,
  settings, calibration, nncf version). The OpenVINO engine loads them as it loads any export.
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
from ..errors import InvalidArgument
from ..lora_slots import SlotTable, check_rank
from ..model.components import VAE_COMPONENTS, Precision, ShapeProfile, sample_inputs
from ..model.info import ModelInfo, load_torch_modules
from .base import export_components
from .int8 import Int8Options

if TYPE_CHECKING:
    from ..backends import ExportJob

log = logging.getLogger(__name__)

FORMAT = "openvino"
#: precisions the CPU plugin runs these graphs in (fp16 on CPU needs AVX512-FP16 / AMX-FP16:
#: not measured here, so not offered).
PRECISIONS = (Precision.FP32, Precision.BF16)
#: ``precision`` may also be int8 (export/int8.py): the quantized components over a float base.
EXPORT_PRECISIONS = (*PRECISIONS, Precision.INT8)
#: OpenVINO's names for the inference precision hint.
OV_HINT = {Precision.FP32: "f32", Precision.BF16: "bf16"}


@dataclass(frozen=True)
class OpenVinoExportOptions:
    precision: Precision = Precision.FP32
    #: None: the VAE follows ``precision`` (see the module doc).
    vae_precision: Precision | None = None
    #: LoRA slots of this rank in the U-Net and text encoders (0: none; sdfast/lora_slots.py)
    lora_rank: int = 0
    #: precision int8: the mode, base and calibration (export/int8.py); None: Int8Options()
    int8: Int8Options | None = None

    @property
    def int8_options(self) -> Int8Options | None:
        if self.precision is not Precision.INT8:
            return None
        return self.int8 or Int8Options()

    def component_precision(self, name: str) -> Precision:
        """The float precision a component's I/O and unquantized math run in."""
        if name in VAE_COMPONENTS and self.vae_precision is not None:
            return self.vae_precision
        if self.precision is Precision.INT8:
            return Precision(self.int8_options.base)
        return self.precision

    def quantized(self, name: str) -> bool:
        return self.int8_options is not None and name in self.int8_options.components

    def validate(self) -> None:
        check_rank(self.lora_rank)
        for arg, p, allowed in (("precision", self.precision, EXPORT_PRECISIONS),
                                ("vae_precision", self.vae_precision, PRECISIONS)):
            if p is not None and p not in allowed:
                raise InvalidArgument(f"{arg}: the OpenVINO export builds {' or '.join(a.value for a in allowed)} "
                                      f"models, not {p.value}; use --{arg.replace('_', '-')} fp32 or bf16")
        if self.int8 is not None and self.precision is not Precision.INT8:
            raise InvalidArgument(f"int8-mode: int8 options were given with --precision {self.precision.value}; "
                                  "pass --precision int8, or drop the --int8-* flags")
        if self.int8_options is not None:
            self.int8_options.validate()
            if self.lora_rank:
                raise InvalidArgument("lora-rank: LoRA slots are not built into int8 exports (their factors would "
                                      "need calibrating too); drop --lora-rank, or fuse the LoRA with --lora")


def partial_shape(dims: list[tuple[int, int]]):
    """One ``ov.PartialShape`` from per-axis (min, max): static where they agree, an interval otherwise."""
    import openvino as ov

    return ov.PartialShape([ov.Dimension(lo) if lo == hi else ov.Dimension(lo, hi) for lo, hi in dims])


def convert_component(module: torch.nn.Module, name: str, info: ModelInfo, profile: ShapeProfile,
                      precision: Precision, slots: SlotTable | None = None):
    """``ov.convert_model`` of one wrapper, with the spec's tensor names and the profile's shapes;
    ``slots``: its LoRA slots' factors follow the component's inputs (static, fp32 like the weights)."""
    import openvino as ov

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
    return with_io_precision(model, spec, name, precision)


def with_io_precision(model, spec, name: str, precision: Precision):
    """``model`` with real I/O in ``precision`` (bf16: a pre/post-processing step; weights stay as
    they are and the hint decides the compute) and sdfast's rt_info."""
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

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
                     lora_rank: int = 0, quantize=None) -> SlotTable | None:
    """Load one component's module (fp32: weights stay fp32), convert and save it at ``dest``;
    returns its LoRA slots, if any."""
    import openvino as ov

    from ..deepcache import component_module

    part = info.specs[name].module
    mods = load_torch_modules(info, dtype=torch.float32, device="cpu", parts=(part,))
    module, slots = component_module(mods, name, info, lora_rank)  # DeepCache's graphs: the cut's halves
    # The IR shares the module's weight memory (convert_model's share_weights), so one copy of
    # the weights is resident and the module must outlive the save.
    if quantize is None:
        model = convert_component(module, name, info, profile, precision, slots)
    else:  # int8: quantized with fp32 I/O (the calibration samples' dtype), then the I/O precision
        model = quantize(convert_component(module, name, info, profile, Precision.FP32, slots))
        model = with_io_precision(model, info.specs[name], name, precision)
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
    q8 = options.int8_options
    cal = None
    if q8 is not None and info.cache_branch is not None:
        raise InvalidArgument("cache-branch: DeepCache's graphs are not built into int8 exports (they would need "
                              "calibrating too); drop --cache-branch, or export --precision fp32 or bf16")
    if q8 is not None:
        from . import int8

        int8.require_nncf()
        extra += q8.flags()
        note = int8.cpu_int8_note()
        if note:
            log.warning("int8: %s", note)
        if q8.mode != "weights":  # weights-only needs no data
            cal = int8.capture_calibration(info, profile, q8, tuple(c for c in q8.components if c in info.specs))

    def build(name: str, tmp: Path) -> dict:
        precision = options.component_precision(name)
        quant: dict = {}

        def quantize(model):
            from . import int8

            reference = model.clone() if q8.speed_check else None  # NNCF may rewrite its input in place
            out, settings = int8.quantize_model(model, cal.samples[name] if cal else [], q8)
            speed = int8.speed_check(out, reference, q8) if reference is not None else None
            del reference
            quant.update(int8.record(settings, q8, cal, speed))
            if quant.get("note"):
                log.warning("int8 %s: %s", name, quant["note"])
            return out

        slots = export_component(info, name, profile, precision, tmp / f"{name}.xml", options.lora_rank,
                                 quantize if options.quantized(name) else None)
        if quant:
            log.info("int8 %s: %s mode over %s (%s)", name, quant["mode"], quant["base"], quant["activations"])
        return {"file": f"{name}.xml", "weights": f"{name}.bin", "precision": precision.value,
                "inference_precision": OV_HINT[precision], **({"lora_slots": slots.record()} if slots else {}),
                **({"quantization": quant} if quant else {})}

    return export_components(info, out, profile, FORMAT, options.precision, build, components=components,
                             extra_flags=extra, model_arg=model_arg, verb="converted", lora_rank=options.lora_rank,
                             manifest={"versions": {**versions(), "openvino": package_version("openvino"),
                                                    **({"nncf": package_version("nncf")} if q8 else {})}})


def export_job(job: ExportJob) -> Path:
    """``sdfast export --format openvino`` (the backend record's entry point)."""
    options = OpenVinoExportOptions(precision=job.precision, vae_precision=job.vae_precision,
                                    lora_rank=job.lora_rank, int8=job.flags.get("int8"))
    return export_openvino(job.info, job.out, job.profile, options, model_arg=job.model_arg)
