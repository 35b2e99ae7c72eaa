"""Artifact folders and safe writes: shared by ``sdfast.export`` and ``sdfast.engines``.

Engines read what export writes through this module only, so run time never imports build
time. It holds the manifest (schema, read, write, verify), file hashes, the one atomic-write
helper every writer uses, the GPU record and the list of versions a manifest records.

Manifest layout (format version 1)::

    {"format_version": 1, "format": "onnx" | "tensorrt" | "inductor",
     "model": {"name", "source", "fingerprint", "configs": {text_encoder, unet, vae, scheduler, tokenizer}},
     "profile": {min_batch, opt_batch, max_batch, min_height, ...},   # components.ShapeProfile
     "components": {name: {"file", "precision", "inputs": {tensor: {"dims", "min", "opt", "max"}},
                           "outputs": {...}}},
     "files": {relative path: {"sha256", "size"}},
     "versions": {"sdfast", "torch", "onnx", "onnxruntime", "onnxscript", "tensorrt"},
     "device": {"gpu", "compute_capability"} | null,    # GPU artifacts only
     "export_command": "sdfast export ..."}

``load_manifest`` validates the schema before reading anything, keeps every path inside the
folder (after symlinks), and refuses anything that does not match (file bytes, model, TensorRT
version, GPU) with ``ArtifactMismatch`` naming the difference and the command that rebuilds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import hash_memo
from .errors import ArtifactMismatch, InvalidArgument, MissingFile
from .fsio import (
    atomic_path,
    atomic_write,
    check_names,
    check_output_dir,
    check_output_path,
    ordinary_mode,
    output_group,
    staging_dir,
)
from .model.components import Precision, ShapeProfile

if TYPE_CHECKING:
    from .model.info import ModelInfo

__all__ = ["atomic_path", "atomic_write", "check_names", "check_output_dir", "check_output_path", "ordinary_mode",
           "output_group", "staging_dir"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: distributions whose versions every manifest records (one list, read here only).
#: diffusers and transformers too: exports trace their modules. `sdfast info` and bench show the same.
VERSIONED_PACKAGES = {"sdfast": "sdfast", "torch": "torch", "diffusers": "diffusers", "transformers": "transformers",
                      "onnx": "onnx", "onnxruntime": "onnxruntime", "onnxscript": "onnxscript",
                      "openvino": "openvino", "tensorrt": "tensorrt"}
#: ORT distributions: any of them provides the ``onnxruntime`` module.
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml")
#: manifests written before the inductor format had one name.
LEGACY_FORMATS = {"aoti": "inductor"}


def _backend_for(fmt: str) -> str:
    """The --backend that runs artifact format ``fmt`` (also the `sdfast export --format` name)."""
    from . import backends

    try:
        return backends.for_format(fmt).name
    except InvalidArgument:  # a format this sdfast does not know: name it as it is
        return fmt


def _pinned(fmt: str) -> tuple[tuple[str, str], ...]:
    """The packages whose exact version artifacts of ``fmt`` need (their backend record's ``pinned``)."""
    from . import backends

    try:
        return backends.for_format(fmt).pinned
    except InvalidArgument:
        return ()


def package_version(module: str) -> str | None:
    """Installed version of a package by its import name, without importing it."""
    if module == "sdfast":
        from . import __version__

        return __version__
    names = ORT_DISTRIBUTIONS if module == "onnxruntime" else (module, f"{module}-cu12", f"{module}-cu13")
    for dist in names:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict[str, str | None]:
    """The versions an artifact is built with (the one list: manifests, `sdfast info`, bench)."""
    return {key: package_version(mod) for key, mod in VERSIONED_PACKAGES.items()}


def gpu_record(device_index: int = 0) -> dict[str, Any]:
    """Name and compute capability of the GPU an artifact is built for (GPU artifacts only run there)."""
    import torch

    if not torch.cuda.is_available():
        raise InvalidArgument("device: GPU artifacts are built on the GPU that runs them, but no CUDA GPU is visible")
    major, minor = torch.cuda.get_device_capability(device_index)
    return {"gpu": torch.cuda.get_device_name(device_index), "compute_capability": f"{major}.{minor}"}


def file_record(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return {"sha256": h.hexdigest(), "size": path.stat().st_size}


def model_record(info: ModelInfo) -> dict[str, Any]:
    record = {
        "name": info.name,
        "source": str(info.path),
        "fingerprint": info.fingerprint,
        # The configs the runtime reads, so a mismatch can name the field that differs.
        "configs": {"text_encoder": info.text_encoder_config, "unet": info.unet_config,
                    "vae": info.vae_config, "scheduler": info.scheduler_config,
                    "tokenizer": info.tokenizer_config},
    }
    if info.loras:  # fused into the exported weights (export --lora): name, sha256, scale, format
        record["loras"] = [lo.record() for lo in info.loras]
    return record


def _lora_set(records: Any) -> list[tuple[str, float]]:
    if not isinstance(records, list):
        return []
    return [(r.get("sha256"), r.get("scale")) for r in records if isinstance(r, dict)]


def _lora_names(records: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r.get('name')}:{r.get('scale')}" for r in records) or "none"


def tensor_records(name: str, profile: ShapeProfile, info: ModelInfo) -> dict[str, Any]:
    spec = info.specs[name]
    out = {}
    for which in ("inputs", "outputs"):
        shapes = profile.shapes(spec, info, which)
        out[which] = {t.name: {"dims": list(t.dims), "min": list(shapes[t.name][0]), "opt": list(shapes[t.name][1]),
                               "max": list(shapes[t.name][2])}
                      for t in (spec.inputs if which == "inputs" else spec.outputs)}
    return out


@dataclass
class Manifest:
    format: str
    model: dict[str, Any]
    profile: ShapeProfile
    components: dict[str, dict[str, Any]]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, str | None] = field(default_factory=versions)
    device: dict[str, Any] | None = None
    export_command: str = ""
    format_version: int = FORMAT_VERSION

    def precision(self, component: str) -> Precision:
        return Precision(self.components[component]["precision"])

    def file(self, root: Path, component: str) -> Path:
        return Path(root) / self.components[component]["file"]

    def to_json(self) -> str:
        d = {"format_version": self.format_version, "format": self.format, "model": self.model,
             "profile": self.profile.to_dict(), "components": self.components, "files": self.files,
             "versions": self.versions, "device": self.device, "export_command": self.export_command}
        return json.dumps(d, indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """From a dict that passed :func:`validate_schema`."""
        return cls(format=LEGACY_FORMATS.get(d["format"], d["format"]), model=d["model"],
                   profile=ShapeProfile.from_dict(d["profile"]), components=d["components"], files=d["files"],
                   versions=d["versions"], device=d.get("device"), export_command=d.get("export_command") or "",
                   format_version=d["format_version"])

    def seal(self, root: Path) -> None:
        """Hash every file under ``root`` (except the manifest) and write the manifest last."""
        root = Path(root)
        self.files = {p.relative_to(root).as_posix(): file_record(p)
                      for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}
        atomic_write(root / MANIFEST, self.to_json())


# -- schema -----------------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def schema_errors(d: Any) -> str | None:
    """The first way ``d`` breaks the manifest schema (types and required keys), or None."""
    if not isinstance(d, dict):
        return f"the top level is {type(d).__name__}, not an object"
    want = {"format_version": int, "format": str, "model": dict, "profile": dict, "components": dict,
            "files": dict, "versions": dict}
    for key, typ in want.items():
        if key not in d:
            return f"key {key!r} is missing"
        if not isinstance(d[key], typ) or (typ is int and not _is_int(d[key])):
            return f"{key!r} is {type(d[key]).__name__}, not {typ.__name__}"
    if d["format_version"] != FORMAT_VERSION:
        return None  # read_manifest names the version itself
    for key, typ in (("device", dict), ("export_command", str)):
        if d.get(key) is not None and not isinstance(d[key], typ):
            return f"{key!r} is {type(d[key]).__name__}, not {typ.__name__} or null"
    if not isinstance(d["model"].get("fingerprint"), str):
        return "model.fingerprint is missing or not a string"
    for k in ShapeProfile.__dataclass_fields__:
        v = d["profile"].get(k, 1 if "chunks" in k else None)  # exports before prompt chunks serve 1
        if not _is_int(v) or v < 1:
            return f"profile.{k} is {v!r}, not a positive integer"
    precisions = {p.value for p in Precision}
    for name, comp in d["components"].items():
        if not isinstance(comp, dict):
            return f"components.{name} is {type(comp).__name__}, not an object"
        if not isinstance(comp.get("file"), str):
            return f"components.{name}.file is missing or not a string"
        if comp.get("precision") not in precisions:
            return f"components.{name}.precision is {comp.get('precision')!r}, not one of {', '.join(sorted(precisions))}"
        for which in ("inputs", "outputs"):
            if not isinstance(comp.get(which), dict):
                return f"components.{name}.{which} is missing or not an object"
    for rel, rec in d["files"].items():
        if not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str) or not _is_int(rec.get("size")):
            return f"files[{rel!r}] is not an object with a string sha256 and an integer size"
    for k, v in d["versions"].items():
        if v is not None and not isinstance(v, str):
            return f"versions.{k} is {type(v).__name__}, not a string or null"
    return None


def inside(root: Path, rel: str) -> Path | None:
    """``root / rel`` when it stays inside ``root`` after resolving symlinks; None otherwise."""
    if not rel or os.path.isabs(rel) or "\\" in rel or ".." in Path(rel).parts:
        return None
    base = Path(root).resolve()
    p = (base / rel).resolve()
    return p if p != base and p.is_relative_to(base) else None


# -- reading and checking ---------------------------------------------------------------------

def export_command(model: str, out: Path | str, fmt: str, precision: str, profile: ShapeProfile,
                   extra: list[str] | None = None) -> str:
    """The `sdfast export` line that rebuilds an artifact with this profile."""
    args = ["sdfast", "export", "--model", model, "--out", str(out), "--format", fmt, "--precision", precision,
            "--batch", str(profile.opt_batch), "--height", str(profile.opt_height), "--width", str(profile.opt_width)]
    for flag, (lo, _, hi) in (("batch", profile.batch), ("height", profile.height), ("width", profile.width),
                              ("chunks", profile.chunks)):
        if lo != hi:
            args += [f"--min-{flag}", str(lo), f"--max-{flag}", str(hi)]
    return shlex.join(args + list(extra or []))


def rebuild_hint(m: Manifest | None, root: Path, info: ModelInfo | None = None, fmt: str = "onnx") -> str:
    """The command that rebuilds ``root`` in format ``fmt`` (the format the caller needs)."""
    from .model.info import model_arg  # here, not at the top: reading a manifest needs no torch

    if m is not None and m.export_command and m.format == fmt:
        parts = shlex.split(m.export_command)
        if info is not None:  # rebuild from the model at hand, into the same folder
            for flag, value in (("--model", model_arg(info)), ("--out", str(root))):
                if flag in parts:
                    parts[parts.index(flag) + 1] = value
        return f"rebuild with: {shlex.join(parts)}"
    model = model_arg(info) if info is not None else "MODEL"
    return (f"rebuild with: sdfast export --model {shlex.quote(model)} --out {shlex.quote(str(root))} "
            f"--format {fmt}")


def read_manifest(root: Path | str, info: ModelInfo | None = None, fmt: str = "onnx") -> Manifest:
    """The manifest of ``root``, schema-checked and with every listed path inside ``root``."""
    root = Path(root)
    path = root / MANIFEST
    hint = rebuild_hint(None, root, info, fmt)
    if not root.is_dir():
        raise MissingFile(f"engines: no folder at {str(root)!r}; pass the --out folder of `sdfast export`")
    if not path.is_file():
        raise MissingFile(f"engines: {root} has no {MANIFEST}, so it is not a complete export (an interrupted "
                          f"export leaves none); {hint}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, OSError) as e:
        raise ArtifactMismatch(f"engines: {path} is not valid JSON ({e}); {hint}") from None
    problem = schema_errors(d)
    if problem:
        raise ArtifactMismatch(f"engines: {path} is not an sdfast manifest: {problem}; {hint}")
    if d["format_version"] != FORMAT_VERSION:
        raise ArtifactMismatch(f"engines: {path} has format version {d['format_version']!r} but this sdfast "
                               f"reads {FORMAT_VERSION}; {hint}")
    m = Manifest.from_dict(d)
    for rel in [*m.files, *(c["file"] for c in m.components.values())]:
        if inside(root, rel) is None:
            raise ArtifactMismatch(f"engines: {path} lists {rel!r}, which is outside {root} (after symlinks); "
                                   f"an export only lists its own files; {hint}")
    return m


def _config_diff(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    for section in ("unet", "vae", "text_encoder", "scheduler", "tokenizer"):
        a, b = ours.get(section, {}), theirs.get(section, {})
        if not isinstance(a, dict) or not isinstance(b, dict):
            continue
        for k in sorted(set(a) | set(b)):
            if json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True):
                return f" ({section} config {k}: export has {a.get(k)!r}, model has {b.get(k)!r})"
    return " (same configs, different weights)"


def verify(m: Manifest, root: Path, info: ModelInfo, fmt: str, check_hashes: bool = True,
           device: dict[str, Any] | None = None) -> None:
    """Raise ArtifactMismatch naming the first difference between the artifact and what is at hand."""
    root = Path(root)
    if m.format != fmt:
        raise ArtifactMismatch(f"engines: {root} holds {m.format} artifacts, not {fmt}; use --backend "
                               f"{_backend_for(m.format)} or {rebuild_hint(None, root, info, fmt)}")
    hint = rebuild_hint(m, root, info, fmt)
    missing = [c for c in info.specs if c not in m.components]
    if missing:
        raise ArtifactMismatch(f"engines: {root} lacks component(s) {', '.join(missing)}; {hint}")
    if m.model.get("fingerprint") != info.fingerprint:
        configs = m.model.get("configs")
        diff = _config_diff(configs if isinstance(configs, dict) else {}, model_record(info)["configs"])
        raise ArtifactMismatch(
            f"engines: {root} was exported from a different model ({m.model.get('name')!r} at "
            f"{m.model.get('source')!r}) than {info.name!r} at {str(info.path)!r}{diff}; {hint}"
        )
    fused = m.model.get("loras") if isinstance(m.model.get("loras"), list) else []
    asked = [lo.record() for lo in info.loras]
    if _lora_set(fused) != _lora_set(asked):
        raise ArtifactMismatch(
            f"engines: {root} was exported with LoRAs {_lora_names(fused)} fused into its weights, and this run "
            f"asks for {_lora_names(asked)}; an exported engine's LoRAs are fixed at export: pass the same --lora "
            f"set, or export again with the set you want (sdfast export ... --lora FILE[:SCALE])")
    for module, label in _pinned(fmt):
        have = package_version(module)
        if m.versions.get(module) != have:
            raise ArtifactMismatch(
                f"engines: {root} was built with {label} {m.versions.get(module)} but {label} {have} is "
                f"installed; {fmt} artifacts only load on the {label} version that built them; {hint}"
            )
    if fmt == "tensorrt":
        if device is not None and m.device is not None:
            for key in ("gpu", "compute_capability"):
                if m.device.get(key) != device.get(key):
                    raise ArtifactMismatch(
                        f"engines: {root} was built for GPU {m.device.get('gpu')!r} (compute capability "
                        f"{m.device.get('compute_capability')}) but this is {device.get('gpu')!r} (compute "
                        f"capability {device.get('compute_capability')}); {hint}"
                    )
    for c in info.specs:
        for key in ("file", "weights"):
            rel = m.components[c].get(key)
            if rel is not None and rel not in m.files:
                raise ArtifactMismatch(f"engines: the manifest lists no hash for {rel}; {hint}")
    _refuse_unsealed_component_files(m, root, hint)
    for rel, rec in m.files.items():
        p = inside(root, rel)  # checked on read too; a symlink may have changed since
        if p is None:
            raise ArtifactMismatch(f"engines: {rel!r} resolves outside {root}; {hint}")
        if not p.is_file():
            raise ArtifactMismatch(f"engines: {root / rel} is listed in the manifest but missing; {hint}")
        size = p.stat().st_size
        if size != rec["size"]:
            raise ArtifactMismatch(f"engines: {root / rel} has {size} bytes but the manifest says {rec['size']} "
                                   f"(truncated or replaced); {hint}")
        if check_hashes and hash_memo.sha256_of(p, lambda q: file_record(q)["sha256"]) != rec["sha256"]:
            raise ArtifactMismatch(f"engines: {root / rel} does not match its sha256 in the manifest (modified); {hint}")


def _refuse_unsealed_component_files(m: Manifest, root: Path, hint: str) -> None:
    """A file beside a component's graph that shares its name (``unet.onnx.data``, ``unet.bin``)
    is one its runtime may load (ONNX external data is found by name from inside the graph): if
    the manifest does not hash it, changed weights would load unchecked."""
    prefixes = {}
    for rec in m.components.values():
        rel = rec.get("file")
        if isinstance(rel, str):
            parent, _, name = rel.rpartition("/")
            prefixes.setdefault(parent, set()).add(name.split(".", 1)[0] + ".")
    for parent, stems in prefixes.items():
        folder = root / parent if parent else root
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        for p in entries:
            rel = f"{parent}/{p.name}" if parent else p.name
            if rel not in m.files and rel != MANIFEST and p.name.startswith(tuple(stems)):
                raise ArtifactMismatch(f"engines: {root / rel} sits beside a component's graph but the manifest "
                                       f"lists no hash for it (its runtime may load it unchecked); {hint}")


def load_manifest(root: Path | str, info: ModelInfo, fmt: str, device: dict[str, Any] | None = None) -> Manifest:
    root = Path(root)
    m = read_manifest(root, info, fmt)
    verify(m, root, info, fmt, device=device)
    return m


# -- what engines check on load -----------------------------------------------------------------

#: the element type names engines report (ORT's "tensor(float16)" → "float16", torch dtypes' names).
FLOAT_TYPES = {Precision.FP32: "float32", Precision.FP16: "float16", Precision.BF16: "bfloat16"}


def check_io(m: Manifest, root: Path, info: ModelInfo, component: str,
             inputs: list[tuple[str, str | None, list[int | None]]],
             outputs: list[tuple[str, str | None, list[int | None]]]) -> None:
    """Refuse an engine file whose real I/O is not the component the manifest says it is.

    ``inputs``/``outputs``: (name, element type or None if unknown, dims with None for a
    symbolic dim), as the engine library reports them. Names, order, element types and rank
    must match the component spec; a dim the profile fixes must be that size or symbolic, and
    a dim the profile lets vary must be symbolic (else the manifest's profile was widened). A
    file swapped in under a recomputed hash is caught here, before the first call."""
    spec = info.specs[component]
    path = m.file(root, component)
    hint = rebuild_hint(m, root, info, m.format)
    for which, have, tensors in (("inputs", inputs, spec.inputs), ("outputs", outputs, spec.outputs)):
        names = [n for n, _, _ in have]
        if names != [t.name for t in tensors]:
            raise ArtifactMismatch(f"engines: {path} has {which} {names} but {component} has {[t.name for t in tensors]} "
                                   f"(a swapped or foreign file); {hint}")
        shapes = m.profile.shapes(spec, info, which)
        for (name, kind, dims), t in zip(have, tensors, strict=True):
            want = "int64" if t.kind == "int64" else FLOAT_TYPES[m.precision(component)]
            if kind is not None and kind != want:
                raise ArtifactMismatch(f"engines: {path} {which[:-1]} {name} is {kind} but the manifest says {want} "
                                       f"(a foreign file or an edited precision); {hint}")
            lo, _, hi = shapes[name]
            if len(dims) != len(lo):
                raise ArtifactMismatch(f"engines: {path} {which[:-1]} {name} has rank {len(dims)} but {component} "
                                       f"needs {len(lo)} ({', '.join(t.dims)}); {hint}")
            for axis, (d, a, b) in enumerate(zip(dims, lo, hi, strict=True)):
                if d is None:
                    continue
                if a == b and d != a:
                    raise ArtifactMismatch(f"engines: {path} {which[:-1]} {name} has size {d} on axis {axis} "
                                           f"({t.dims[axis]}) but the model and profile need {a}; {hint}")
                if a != b:
                    raise ArtifactMismatch(f"engines: {path} {which[:-1]} {name} is fixed at {d} on axis {axis} "
                                           f"({t.dims[axis]}) but the manifest's profile spans {a}..{b} (a "
                                           f"widened profile or a foreign file); {hint}")


def check_precision(m: Manifest, root: Path, asked: Precision, what: str = "graphs") -> None:
    """Refuse a --dtype other than the precision the artifacts were built in, with a fix that works."""
    core = m.precision("unet")
    if core is asked:
        return
    fix = f"pass --dtype {core.value} (or --dtype auto, which takes the export's precision)"
    try:
        from . import backends

        buildable = asked.value in backends.for_format(m.format).precisions
    except InvalidArgument:
        buildable = False
    if buildable:
        fix += f", or export again with --precision {asked.value}"
    raise InvalidArgument(f"dtype: {root} holds {core.value} {what} but --dtype {asked.value} was asked for; {fix}")
