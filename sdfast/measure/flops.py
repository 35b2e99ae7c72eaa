"""FLOPs of each stage and the device's peak, for TFLOP/s and share-of-peak in benchmarks.

FLOPs are counted, not estimated: the eager diffusers/transformers modules are built from the
model folder's configs on the ``meta`` device (no memory, no arithmetic) and run once per shape
under ``torch.utils.flop_counter.FlopCounterMode``. That counter counts matmul, conv and
attention ops (1 multiply-add = 2 FLOP) and nothing elementwise. Attention is forced onto the
classic processors (diffusers' ``AttnProcessor``, transformers' "eager") so the QKᵀ and AV
matmuls are counted as plain (b)mm ops; through SDPA on CPU they would be missed.

Each component is called through its fixed-I/O wrapper (``sdfast.model.wrappers``, what export traces
and the eager engine runs) on zeros shaped from the family's spec (``info.specs``), so SDXL's
second text encoder and its U-Net's ``text_embeds``/``time_ids`` are counted like the rest.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..model.components import FAMILY_SPECS
from ..model.info import ModelInfo


@dataclass(frozen=True)
class StageFlops:
    """FLOPs of one generation at one shape; ``unet_step`` is per denoising step (guided batch)."""

    text_encoder: float
    unet_step: float
    vae_decode: float

    def total(self, steps: int) -> float:
        return self.text_encoder + steps * self.unet_step + self.vae_decode

    def as_gflop(self, steps: int) -> dict[str, float]:
        d = {k: v / 1e9 for k, v in asdict(self).items()}
        d["total"] = self.total(steps) / 1e9
        return d


def _clean(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


_META: dict[str, dict[str, torch.nn.Module]] = {}
_FLOPS: dict[tuple, StageFlops] = {}


def _meta_modules(info: ModelInfo) -> dict[str, torch.nn.Module]:
    key = str(info.path)
    if key not in _META:
        _META[key] = _build_meta_modules(info)
    return _META[key]


def _build_meta_modules(info: ModelInfo) -> dict[str, torch.nn.Module]:
    """The family's torch modules (``models.MODULE_CLASSES``: SDXL adds text_encoder_2) on meta."""
    import importlib

    from diffusers.models.attention_processor import AttnProcessor
    from transformers import CLIPTextConfig

    from ..model.info import MODULE_CLASSES
    from ..model.wrappers import family_modules

    mods: dict[str, torch.nn.Module] = {}
    with torch.device("meta"):
        for part in family_modules(info.family):
            lib, name = MODULE_CLASSES[part]
            cls = getattr(importlib.import_module(lib), name)
            cfg = _clean(getattr(info, f"{part}_config"))
            if lib == "transformers":
                text_cfg = CLIPTextConfig(**cfg)
                text_cfg._attn_implementation = "eager"  # explicit matmuls, so attention is counted
                mods[part] = cls(text_cfg)
            else:
                mods[part] = cls.from_config(cfg)
    for part in ("unet", "vae"):
        mods[part].set_attn_processor(AttnProcessor())
    return {k: m.eval() for k, m in mods.items()}


def _count(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def text_rows(info: ModelInfo, batch: int, guided: bool) -> int:
    """Rows each text encoder runs for ``batch`` prompts without a negative prompt (bench's
    call, both sides): 2 × batch under guidance (the empty negative is encoded), except where
    the model zeroes an absent negative instead (SDXL's ``force_zeros_for_empty_prompt``)."""
    return 2 * batch if guided and not info.force_zeros_for_empty_prompt else batch


def count_stage_flops(info: ModelInfo, height: int, width: int, batch: int, guided: bool = True) -> StageFlops:
    """FLOPs per stage for ``batch`` images of height × width; under guidance the U-Net sees
    2 × batch rows (uncond + cond), the text encoders ``text_rows`` and the VAE decodes
    ``batch`` latents. ``text_encoder`` is the sum over the family's text encoders (SDXL: both
    CLIPs). Counted once per model and shape."""
    key = (str(info.path), height, width, batch, guided)
    if key not in _FLOPS:
        _FLOPS[key] = _count_stage_flops(info, height, width, batch, guided)
    return _FLOPS[key]


#: component (``info.specs``) -> the StageFlops field its FLOPs add to; vae_encoder is img2img only.
STAGE_OF = {n: spec.stage for specs in FAMILY_SPECS.values() for n, spec in specs.items() if spec.stage != "vae_encode"}


def _count_stage_flops(info: ModelInfo, height: int, width: int, batch: int, guided: bool) -> StageFlops:
    from ..model.components import ShapeProfile
    from ..model.wrappers import component_modules

    wrappers = component_modules(_meta_modules(info), info.family)
    dims_of = ShapeProfile.static(batch, height, width)
    rows = {"unet": 2 * batch if guided else batch, "vae_decoder": batch}
    totals = dict.fromkeys(STAGE_OF.values(), 0.0)
    for name, stage in STAGE_OF.items():
        spec = info.specs.get(name)
        if spec is None:
            continue
        # Every input shaped from the component's spec (SDXL's U-Net: text_embeds, time_ids too),
        # one prompt chunk, with the stage's row count as B.
        dims = dims_of.component_dims(spec, info)
        b = rows.get(name, text_rows(info, batch, guided))
        inputs = [torch.zeros(tuple(b if d == "B" else dims[d][1] for d in t.dims),
                              dtype=torch.long if t.kind == "int64" else torch.float32, device="meta")
                  for t in spec.inputs]
        totals[stage] += _count(lambda w=wrappers[name], x=inputs: w(*x))
    return StageFlops(**totals)


# -- device peak -----------------------------------------------------------------------------

#: Dense fp16/bf16 tensor-core peak in TFLOP/s (no sparsity), from NVIDIA's product datasheets
#: (H100/H200: "H100 Tensor Core GPU" and "H200" datasheets; A100: "A100 Tensor Core GPU"
#: datasheet; L4: "L4 Tensor Core GPU" datasheet; RTX 4090: "Ada Lovelace architecture"
#: whitepaper, fp16 with fp32 accumulate). Matched against torch.cuda.get_device_name in order.
GPU_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"H200", 989.0),
    (r"H100.*PCIe", 756.0),
    (r"H100", 989.0),  # SXM
    (r"A100|A800", 312.0),
    (r"\bL4\b", 121.0),
    (r"RTX 4090", 165.0),
)
GPU_PEAK_SOURCE = "NVIDIA datasheet, dense fp16/bf16 tensor-core peak"


@dataclass(frozen=True)
class DevicePeak:
    tflops: float | None
    source: str


def gpu_peak(name: str) -> DevicePeak:
    for pattern, tflops in GPU_PEAK_TFLOPS:
        if re.search(pattern, name):
            return DevicePeak(tflops, f"{GPU_PEAK_SOURCE} ({name})")
    return DevicePeak(None, f"{name} is not in sdfast.measure.flops.GPU_PEAK_TFLOPS; share of peak not reported")


@functools.cache
def measured_cpu_peak(dtype: torch.dtype, threads: int, n: int = 2048, tries: int = 5) -> DevicePeak:
    """Best of ``tries`` n×n×n matmuls in ``dtype`` on the current torch threads: an achievable
    peak, not a datasheet one (it is what oneDNN/MKL reach on this CPU and thread count)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # first call pays packing/JIT
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    tflops = 2 * n**3 / best / 1e12
    return DevicePeak(tflops, f"measured: best of {tries} {n}x{n} {str(dtype).removeprefix('torch.')} "
                              f"matmuls on {threads} thread(s)")


def device_peak(device: torch.device, dtype: torch.dtype) -> DevicePeak:
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device))
    return measured_cpu_peak(dtype, torch.get_num_threads())
