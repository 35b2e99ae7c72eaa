"""The eager PyTorch backend: the reference every other backend is held to.

It runs the same fixed-I/O wrappers that export traces (``models.component_modules``), so an
exported graph and the eager engine compute the same function by construction.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgument
from ..model.components import ComponentSpec, Precision
from ..model.info import COMPONENT_MODULE, ModelInfo, component_modules, load_torch_modules
from .base import engine_inputs


class TorchEngine:
    """Calls a module with the spec's inputs; float inputs are cast to the engine's precision
    and float outputs come back as float32, so the loop's math is precision-independent.

    Every call returns fresh tensors; inside a CUDA-graph capture those come from the graph's
    pool and serve as its static outputs (graphs.py), so the engine is graph safe as it is."""

    graph_safe = True
    profile = None  # any shape
    size_multiple = None

    def __init__(self, spec: ComponentSpec, module: torch.nn.Module, device: torch.device, precision: Precision):
        self.spec = spec
        self.module = module
        self.device = device
        self.precision = precision
        self.dtype = precision.torch_dtype

    @torch.inference_mode()
    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.module(*engine_inputs(self.spec, inputs, self.device, self.dtype))
        outs = out if isinstance(out, tuple) else (out,)
        return {t.name: o.float() for t, o in zip(self.spec.outputs, outs, strict=True)}


def check_dtype_supported(device: torch.device, precision: Precision) -> None:
    if device.type == "cpu" and precision is Precision.FP16:
        return  # slow but correct; useful for checking fp16 numerics without a GPU
    if device.type == "cuda" and precision is Precision.BF16 and not torch.cuda.is_bf16_supported():
        raise InvalidArgument("dtype: this GPU has no bf16 support; use dtype='fp16'")


#: attention= choices: PyTorch SDPA (flash / memory-efficient kernels on CUDA), xformers'
#: memory-efficient attention, or the classic matmul-softmax-matmul (a validation reference).
ATTENTION = ("sdpa", "xformers", "math")


def set_attention(mods: dict[str, torch.nn.Module], attention: str) -> None:
    """Select the attention implementation of the U-Net and the VAE (CLIP keeps its own)."""
    if attention not in ATTENTION:
        raise InvalidArgument(f"attention: {attention!r} is not an attention implementation; "
                              f"use one of {', '.join(ATTENTION)}")
    if attention == "sdpa" and all(getattr(mods.get(n), "lite", False) for n in ("unet", "vae") if n in mods):
        return  # sdfast's own modules (sdfast/model/lite.py) run SDPA already; importing diffusers costs seconds
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    for name in ("unet", "vae"):
        module = mods.get(name)
        if module is None:
            continue
        if attention == "xformers":
            try:
                import xformers  # noqa: F401
            except ModuleNotFoundError:
                raise InvalidArgument("attention: 'xformers' needs the xformers package, which is not "
                                      "installed; pip install xformers, or use attention='sdpa'") from None
            module.enable_xformers_memory_efficient_attention()
        else:
            module.set_attn_processor(AttnProcessor2_0() if attention == "sdpa" else AttnProcessor())


def load(info: ModelInfo, device: torch.device, precision: Precision, engines: str | None = None,
         modules: dict[str, torch.nn.Module] | None = None, attention: str = "sdpa") -> dict[str, TorchEngine]:
    if engines is not None:
        raise InvalidArgument("engines: the torch backend runs the model folder directly; drop --engines")
    check_dtype_supported(device, precision)
    mods = modules or load_torch_modules(info, dtype=precision.torch_dtype, device=device)
    if modules is None and precision is Precision.FP16 and info.vae_force_upcast:
        mods["vae"] = mods["vae"].float()  # the VAE config says it overflows fp16 (SDXL's): diffusers upcasts too
    set_attention(mods, attention)
    vae_precision = Precision.FP32 if mods["vae"].dtype == torch.float32 else precision
    return {
        name: TorchEngine(info.specs[name], module, device, vae_precision if info.specs[name].is_vae else precision)
        for name, module in component_modules(mods, info.family).items()
    }


def load_component(info: ModelInfo, name: str, device: torch.device, precision: Precision) -> TorchEngine:
    """One eager engine, loading only the module it needs (the fp32 VAE fallback of fp16 runs)."""
    mods = load_torch_modules(info, dtype=precision.torch_dtype, device=device, parts=(COMPONENT_MODULE[name],))
    return TorchEngine(info.specs[name], component_modules(mods, info.family)[name], device, precision)
