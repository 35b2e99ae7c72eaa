"""torch modules → AOTInductor packages (``.pt2``), one per component, for CPU or CUDA.

``torch.export`` captures each fixed-I/O wrapper (``models.component_modules``) with the
profile's dynamic dims as ``torch.export.Dim``; ``torch._inductor.aoti_compile_and_package``
compiles it to a self-contained package that ``engines/inductor.py`` loads with
``aoti_load_package`` — no diffusers, no model code at run time.

Choices, and why:

- **Sides as multiples.** Diffusers' U-Net pads latent grids that are not multiples of its
  total downsampling through a shape-dependent branch; declaring ``h = m·k`` (a derived Dim)
  lets export prove that branch is never taken, so the graph serves every side on the grid of
  ``components.size_multiple`` inside the profile.
- **CUDA compile options for U-Net speed** go through the ``inductor_configs`` argument of
  ``aoti_compile_and_package`` — never ``torch._inductor.config`` (global state, changed by
  importing us otherwise): coordinate-descent tuning, 1×1 convolutions as matmuls, and with
  ``autotune="max"`` max-autotune over ATen and Triton GEMMs. Channels-last weights and
  diffusers' fused QKV projections are module transforms done before export, CUDA only.
  Inductor's own CUDA graphs stay off: the runtime captures the whole step itself (graphs.py).
- **Precision** follows the ONNX exporter: text encoder and U-Net in ``precision``, the VAE in
  fp32 unless ``vae_precision`` says otherwise (the SD VAE can overflow fp16; the runtime's
  fp32 decode fallback covers an fp16 VAE that does).
- **Manifest:** the shared ``sdfast/artifacts.py`` with ``format="inductor"``; packages are tied to
  the torch version (ABI) and, on CUDA, to the GPU architecture, which the loader checks.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch._inductor

from ..artifacts import (
    gpu_record,
)
from ..errors import InvalidArgument
from ..hardware import resolve_device
from ..model.components import (
    VAE_COMPONENTS,
    ComponentSpec,
    Precision,
    ShapeProfile,
    sample_inputs,
    size_multiple,
)
from ..model.info import COMPONENT_MODULE, ModelInfo, component_modules, load_torch_modules
from .base import export_components

if TYPE_CHECKING:
    from ..backends import ExportJob

log = logging.getLogger(__name__)

FORMAT = "inductor"
#: autotune levels: how much compile time buys kernel speed on CUDA (ignored on the CPU).
AUTOTUNE = ("none", "default", "max")


@dataclass(frozen=True)
class InductorExportOptions:
    precision: Precision = Precision.FP32
    vae_precision: Precision | None = None  # None: fp32 (see module doc)
    device: str = "cpu"
    autotune: str = "default"
    channels_last: bool = True  # CUDA only
    fuse_qkv: bool = True  # CUDA only

    def component_precision(self, name: str) -> Precision:
        if name in VAE_COMPONENTS:
            return self.vae_precision or Precision.FP32
        return self.precision


def inductor_configs(device: torch.device, autotune: str) -> dict[str, Any]:
    """Per-compile Inductor options (passed to aoti_compile_and_package, never set globally)."""
    if autotune not in AUTOTUNE:
        raise InvalidArgument(f"autotune: {autotune!r} is not a level; use one of {', '.join(AUTOTUNE)}")
    cfg: dict[str, Any] = {"triton.cudagraphs": False}
    if device.type != "cuda":
        return cfg
    cfg.update({
        "conv_1x1_as_mm": True,  # SD's 1×1 convs (proj_in/out, shortcuts) as GEMMs
        "coordinate_descent_tuning": autotune != "none",
        "coordinate_descent_check_all_directions": autotune == "max",
        "max_autotune": autotune == "max",
        "max_autotune_gemm_backends": "ATEN,TRITON",
        "epilogue_fusion": False,  # diffusers' torch.compile guide: faster for the SD U-Net
    })
    return cfg


def dynamic_shapes(spec: ComponentSpec, info: ModelInfo, profile: ShapeProfile) -> dict[str, dict[int, Any]]:
    """``torch.export`` dynamic_shapes for ``spec``: one Dim per dynamic dim name, shared
    between the tensors that carry it; image/latent sides as multiples of the U-Net grid."""
    from torch.export import Dim

    dims = profile.component_dims(spec, info)
    side = {"H": size_multiple(info), "W": size_multiple(info)}
    side["h"] = side["w"] = size_multiple(info) // info.vae_scale_factor
    made: dict[str, Any] = {}
    for name, (lo, _, hi) in dims.items():
        if lo == hi:
            continue
        if name in side:
            m = side[name]
            made[name] = m * Dim(f"{name}_over_{m}", min=max(1, lo // m), max=hi // m)
        else:
            made[name] = Dim(name, min=lo, max=hi)
    return {t.name: {i: made[d] for i, d in enumerate(t.dims) if d in made} for t in spec.inputs}


def prepare_module(info: ModelInfo, name: str, dtype: torch.dtype, device: torch.device,
                   options: InductorExportOptions) -> torch.nn.Module:
    """One component wrapper in ``dtype`` on ``device``, with the CUDA speed transforms; only
    its own torch module is loaded, so peak memory stays near one module."""
    part = COMPONENT_MODULE[name]
    module = load_torch_modules(info, dtype=dtype, device=device, parts=(part,))[part]
    if device.type == "cuda" and part in ("unet", "vae"):
        if options.fuse_qkv and part == "unet":
            module.fuse_qkv_projections()
        if options.channels_last:
            module.to(memory_format=torch.channels_last)
    return component_modules({part: module}, info.family)[name]


def export_component(module: torch.nn.Module, name: str, info: ModelInfo, profile: ShapeProfile,
                     dtype: torch.dtype, device: torch.device, dest: Path, configs: dict[str, Any]) -> Path:
    """torch.export one component and compile it into the package ``dest``."""
    spec = info.specs[name]
    # Export specializes a dim whose sample value is 1; trace at the max shape when a dynamic
    # dim's opt is 1 (an unguided batch of one image, say).
    dims = profile.component_dims(spec, info)
    which = 2 if any(lo != hi and opt == 1 for lo, opt, hi in dims.values()) else 1
    inputs = sample_inputs(spec, info, profile, which=which, dtype=dtype)
    args = tuple(inputs[n].to(device) for n in spec.input_names)
    # The package carries its component's I/O, so the loader can refuse a swapped or foreign file.
    configs = {**configs, "aot_inductor.metadata": package_metadata(spec)}
    with torch.no_grad():
        ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes(spec, info, profile), strict=False)
        with open(dest, "wb") as raw:
            sink = _LatchingWriter(raw)
            try:
                torch._inductor.aoti_compile_and_package(ep, package_path=sink, inductor_configs=configs)
            except Exception as e:
                if sink.error is not None:  # torch's writer fails on after a failed write: the write is the cause
                    raise sink.error from e
                raise
            if sink.error is not None:
                raise sink.error
    return dest


class _LatchingWriter(io.RawIOBase):
    """The package file as torch's zip writer sees it: the first failed write (a full disk) is kept
    and every later write is dropped.

    Handed a path, torch's ``PyTorchFileWriter`` that hits ENOSPC raises, is kept alive by the
    traceback, and its destructor then throws again at interpreter exit — ``std::terminate``, a core
    dump after sdfast's own message. Writing through this object, torch never sees an error; the
    exporter raises the kept one after the package call, and the staging folder is discarded.
    """

    def __init__(self, raw: io.BufferedWriter) -> None:
        super().__init__()
        self._raw = raw
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if self.error is None:
            try:
                self._raw.write(data)
            except OSError as e:
                self.error = e
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def flush(self) -> None:
        if self.error is None:
            try:
                self._raw.flush()
            except OSError as e:
                self.error = e


def package_metadata(spec: ComponentSpec) -> dict[str, str]:
    """What ``engines/inductor.py`` checks against the component spec on load."""
    return {"sdfast_component": spec.name, "sdfast_inputs": ",".join(spec.input_names),
            "sdfast_outputs": ",".join(spec.output_names)}


def export_inductor(info: ModelInfo, out: Path | str, profile: ShapeProfile,
                    options: InductorExportOptions = InductorExportOptions(), model_arg: str | None = None,
                    components: tuple[str, ...] | None = None) -> Path:
    """Compile every component into ``out`` (replaced atomically), sealed with a manifest."""
    device = resolve_device(options.device)
    configs = inductor_configs(device, options.autotune)
    extra = ["--device", device.type]
    if options.vae_precision:
        extra += ["--vae-precision", options.vae_precision.value]
    if device.type == "cuda":
        extra += ["--autotune", options.autotune]

    def build(name: str, tmp: Path) -> dict:
        dtype = options.component_precision(name).torch_dtype
        module = prepare_module(info, name, dtype, device, options)
        t0 = time.perf_counter()
        export_component(module, name, info, profile, dtype, device, tmp / f"{name}.pt2", configs)
        del module  # one module resident at a time
        return {"file": f"{name}.pt2", "precision": options.component_precision(name).value, "device": device.type,
                "inductor_configs": configs, "compile_s": round(time.perf_counter() - t0, 1)}

    return export_components(info, out, profile, FORMAT, options.precision, build, components=components,
                             extra_flags=extra, model_arg=model_arg, verb="compiled",
                             manifest={"device": gpu_record(device.index or 0) if device.type == "cuda" else None})


def export_job(job: ExportJob) -> Path:
    """``sdfast export --format inductor`` (the backend record's entry point): --device defaults
    to cuda when available, --autotune to 'default'."""
    device = job.flags.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    options = InductorExportOptions(precision=job.precision, vae_precision=job.vae_precision, device=device,
                                    autotune=job.flags.get("autotune") or "default")
    return export_inductor(job.info, job.out, job.profile, options, model_arg=job.model_arg)
