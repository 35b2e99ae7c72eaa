"""One record per backend: the single place that knows what a backend is.

A backend has one name, used everywhere (``--backend``, ``sdfast export --format``, the
manifest's ``format`` field, ``sdfast info``, bench rows): ``onnxruntime`` runs ``onnx``
artifacts, every other backend's artifact format has the backend's own name. A record says
which engine module loads it, which exporter builds its artifacts, the export flags of its
own, the Python packages it needs (and the extra that installs them), and whether it is
available here. The CLI, bench, the manifest and ``sdfast info`` read these records; adding a
backend is one engines module, one exporter module and one record below.

Nothing here imports torch, an engine or an exporter at import time, so reading the table is
free (``sdfast info`` and argparse do it before anything heavy loads).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidArgument

if TYPE_CHECKING:
    from .model.components import Precision, ShapeProfile
    from .model.info import ModelInfo


@dataclass(frozen=True)
class Flag:
    """An ``sdfast export`` flag that only one backend's exporter reads."""

    flag: str  # "--opset"
    dest: str  # the exporter keyword it fills
    help: str
    type: Callable[[str], Any] | None = None
    default: Any = None
    choices: tuple[Any, ...] | None = None
    action: str | None = None
    metavar: str | None = None

    def add_to(self, parser) -> None:
        kw: dict[str, Any] = {"dest": self.dest, "help": self.help, "default": self.default}
        if self.action:
            kw["action"] = self.action
        else:
            kw.update(type=self.type, choices=self.choices, metavar=self.metavar)
        parser.add_argument(self.flag, **{k: v for k, v in kw.items() if v is not None or k == "default"})


#: the formats whose exporters build LoRA slots (``sdfast export --lora-rank``; sdfast/lora_slots.py)
LORA_SLOT_FORMATS = ("onnx", "openvino")


@dataclass(frozen=True)
class ExportJob:
    """What every exporter gets: the model, the folder, the profile, the precisions and the
    values of its own flags (``Backend.flags``) by ``dest``."""

    info: ModelInfo
    out: Path
    profile: ShapeProfile
    precision: Precision
    vae_precision: Precision | None
    model_arg: str
    flags: dict[str, Any] = field(default_factory=dict)
    #: LoRA slots of this rank (``--lora-rank``; 0: none), for the formats in LORA_SLOT_FORMATS
    lora_rank: int = 0


@dataclass(frozen=True)
class Backend:
    name: str
    summary: str
    #: module under ``sdfast.engines`` with ``load(info, device, precision, engines, **options)``.
    engines: str
    #: the artifact format (manifest ``format``, ``sdfast export --format``); None: runs the folder.
    format: str | None = None
    #: module under ``sdfast.export`` whose ``export_job(job: ExportJob) -> Path`` builds the
    #: artifact folder; None for the torch backend. Named, not imported: reading this table
    #: loads no exporter, and exporters may import this module.
    exporter: str | None = None
    flags: tuple[Flag, ...] = ()
    #: import names the backend needs beyond sdfast's own dependencies.
    requires: tuple[str, ...] = ()
    extra: str | None = None  # pip install 'sdfast[EXTRA]'
    #: precisions ``sdfast export`` builds for it.
    precisions: tuple[str, ...] = ("fp32", "fp16")
    #: devices it runs on.
    devices: tuple[str, ...] = ("cpu", "cuda")
    #: loaders take ``options`` of these names (e.g. attention); others are not passed.
    options: tuple[str, ...] = ()
    #: a NaN/inf decode of a reduced-precision VAE is redone by an eager fp32 VAE (needs
    #: diffusers); exported backends instead keep their VAE in fp32 unless told otherwise.
    eager_vae_fallback: bool = False
    #: (import name, display name) of the packages whose exact version its artifacts need: they
    #: load only on the version that built them (checked by ``artifacts.verify``).
    pinned: tuple[tuple[str, str], ...] = ()

    def missing(self) -> str | None:
        """None when the backend can run here, else why not (one line with the fix)."""
        absent = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if absent:
            how = f"pip install 'sdfast[{self.extra}]'" if self.extra else f"pip install {' '.join(absent)}"
            return f"needs the Python package(s) {', '.join(absent)}, not installed; {how}"
        return None

    def require(self) -> None:
        reason = self.missing()
        if reason:
            raise InvalidArgument(f"backend: {self.name!r} {reason}, or use backend='torch'")

    def load_module(self):
        self.require()
        return importlib.import_module(f"sdfast.engines.{self.engines}")

    def export(self, job: ExportJob) -> Path:
        """Build the artifact folder ``job.out`` (the exporter checks and writes it atomically)."""
        if self.exporter is None:
            raise InvalidArgument(f"format: the {self.name} backend runs the model folder itself; nothing to export")
        self.require()
        return importlib.import_module(f"sdfast.export.{self.exporter}").export_job(job)


#: ONNX opsets the exporter accepts: 17 is the first with LayerNormalization; the TorchScript
#: exporter (export/onnx.py) stops at 20.
OPSETS = tuple(range(17, 21))

BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("torch", "eager PyTorch, runs the model folder directly (the parity reference)", engines="torch",
            precisions=("fp32", "fp16", "bf16"), options=("attention", "modules"), eager_vae_fallback=True),
    Backend("onnxruntime", "ONNX graphs on ONNX Runtime (CPU; CUDA with onnxruntime-gpu)", engines="onnxruntime",
            format="onnx", exporter="onnx", requires=("onnx", "onnxruntime", "onnxscript"), extra="onnx",
            flags=(
                Flag("--external-data", "external_data", action="store_true", default=False,
                     help="onnx: keep weights in NAME.onnx.data however small (models over 256 MB always do)"),
                Flag("--opset", "opset", type=int, default=17, choices=OPSETS,
                     metavar="N",
                     help="onnx: ONNX opset, 17-20 (default 17, the first with LayerNormalization)"),
            )),
    Backend("tensorrt", "TensorRT plans built from the ONNX graphs (NVIDIA GPUs; unverified)", engines="tensorrt",
            format="tensorrt", exporter="tensorrt", requires=("tensorrt", "onnx", "onnxruntime", "onnxscript"),
            extra="gpu", devices=("cuda",), pinned=(("tensorrt", "TensorRT"),),
            flags=(
                Flag("--onnx", "onnx_dir", metavar="DIR",
                     help="tensorrt: build from this ONNX export instead of exporting one"),
                Flag("--builder-optimization-level", "builder_optimization_level", type=int, default=3,
                     choices=tuple(range(6)), help="tensorrt: builder optimization level 0-5 (default 3)"),
                Flag("--timing-cache", "timing_cache", metavar="FILE",
                     help="tensorrt: timing cache, read and updated (default: in the sdfast cache)"),
                Flag("--refit", "refit", action="store_true", default=False,
                     help="tensorrt: build the text encoder and U-Net plans refittable, so generate --lora / "
                          "set_loras swap LoRAs by refitting their weights (unverified on a GPU)"),
            )),
    Backend("inductor", "AOTInductor packages compiled by torch.export (CPU and CUDA)", engines="inductor",
            format="inductor", exporter="inductor", pinned=(("torch", "torch"),),
            flags=(
                Flag("--device", "device", choices=("cpu", "cuda"),
                     help="inductor: compile for cpu or cuda (default: cuda when available)"),
                Flag("--autotune", "autotune", choices=("none", "default", "max"),
                     help="inductor: kernel autotuning effort on CUDA (default 'default')"),
            )),
    Backend("openvino", "OpenVINO IR on the OpenVINO CPU plugin (bf16 on AMX / AVX512-BF16 CPUs)",
            engines="openvino", format="openvino", exporter="openvino", requires=("openvino",), extra="openvino",
            precisions=("fp32", "bf16"), devices=("cpu",)),
)}

#: artifact formats, in the order `sdfast export --format` lists them.
FORMATS: tuple[str, ...] = tuple(b.format for b in BACKENDS.values() if b.format)


def get(name: str, arg: str = "backend") -> Backend:
    """The record of backend ``name``; InvalidArgument naming ``arg`` if there is none."""
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        raise InvalidArgument(f"{arg}: unknown {name!r}; choose one of {', '.join(BACKENDS)}") from None


def for_format(fmt: str) -> Backend:
    """The backend that runs artifacts of format ``fmt``."""
    for b in BACKENDS.values():
        if b.format == fmt:
            return b
    raise InvalidArgument(f"format: unknown artifact format {fmt!r}; the formats are {', '.join(FORMATS)}")
