"""``manifest.json``: what an artifact dir holds, what it was built from, and the check on load.

Layout (format version 1)::

    {"format_version": 1, "format": "onnx" | "tensorrt",
     "model": {"name", "source", "fingerprint", "configs": {text_encoder, unet, vae, scheduler, tokenizer}},
     "profile": {min_batch, opt_batch, max_batch, min_height, ...},   # components.ShapeProfile
     "components": {name: {"file", "precision", "inputs": {tensor: {"dims", "min", "opt", "max"}},
                           "outputs": {...}}},
     "files": {relative path: {"sha256", "size"}},
     "versions": {"sdfast", "torch", "onnx", "onnxruntime", "onnxscript", "tensorrt"},
     "device": {"gpu", "compute_capability"} | null,    # TensorRT plans only
     "export_command": "sdfast export ..."}

``load_manifest`` refuses anything that does not match (file bytes, model, TensorRT version,
GPU) with ``ArtifactMismatch`` naming the difference and the command that rebuilds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..components import SPECS, Precision, ShapeProfile
from ..errors import ArtifactMismatch, MissingFile
from ..media import ordinary_mode
from ..models import ModelInfo

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: distributions whose versions every manifest records (one list, read here only).
VERSIONED_PACKAGES = {"sdfast": "sdfast", "torch": "torch", "onnx": "onnx", "onnxruntime": "onnxruntime",
                      "onnxscript": "onnxscript", "tensorrt": "tensorrt"}
#: artifact format -> the --backend that runs it and the `sdfast export --format` that builds it.
FORMAT_BACKEND = {"onnx": "onnxruntime", "tensorrt": "tensorrt", "aoti": "inductor"}
FORMAT_FLAG = {"onnx": "onnx", "tensorrt": "tensorrt", "aoti": "inductor"}
#: ORT distributions: any of them provides the ``onnxruntime`` module.
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml")


def package_version(module: str) -> str | None:
    """Installed version of a package by its import name, without importing it."""
    if module == "sdfast":
        from .. import __version__

        return __version__
    names = ORT_DISTRIBUTIONS if module == "onnxruntime" else (module, f"{module}-cu12", f"{module}-cu13")
    for dist in names:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict[str, str | None]:
    return {key: package_version(mod) for key, mod in VERSIONED_PACKAGES.items()}


def file_record(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return {"sha256": h.hexdigest(), "size": path.stat().st_size}


def model_record(info: ModelInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "source": str(info.path),
        "fingerprint": info.fingerprint,
        # The configs the runtime reads, so a mismatch can name the field that differs.
        "configs": {"text_encoder": info.text_encoder_config, "unet": info.unet_config,
                    "vae": info.vae_config, "scheduler": info.scheduler_config,
                    "tokenizer": info.tokenizer_config},
    }


def tensor_records(name: str, profile: ShapeProfile, info: ModelInfo) -> dict[str, Any]:
    spec = SPECS[name]
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
        return root / self.components[component]["file"]

    def to_json(self) -> str:
        d = {"format_version": self.format_version, "format": self.format, "model": self.model,
             "profile": self.profile.to_dict(), "components": self.components, "files": self.files,
             "versions": self.versions, "device": self.device, "export_command": self.export_command}
        return json.dumps(d, indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        return cls(format=d["format"], model=d["model"], profile=ShapeProfile.from_dict(d["profile"]),
                   components=d["components"], files=d["files"], versions=d["versions"],
                   device=d.get("device"), export_command=d.get("export_command", ""),
                   format_version=int(d["format_version"]))

    def seal(self, root: Path) -> None:
        """Hash every file under ``root`` (except the manifest) and write the manifest last."""
        self.files = {p.relative_to(root).as_posix(): file_record(p)
                      for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}
        (root / MANIFEST).write_text(self.to_json(), encoding="utf-8")


def export_command(model: str, out: Path | str, fmt: str, precision: str, profile: ShapeProfile,
                   extra: list[str] | None = None) -> str:
    """The `sdfast export` line that rebuilds an artifact with this profile."""
    args = ["sdfast", "export", "--model", model, "--out", str(out), "--format", fmt, "--precision", precision,
            "--batch", str(profile.opt_batch), "--height", str(profile.opt_height), "--width", str(profile.opt_width)]
    for flag, (lo, _, hi) in (("batch", profile.batch), ("height", profile.height), ("width", profile.width)):
        if lo != hi:
            args += [f"--min-{flag}", str(lo), f"--max-{flag}", str(hi)]
    return shlex.join(args + list(extra or []))


def rebuild_hint(m: Manifest | None, root: Path, info: ModelInfo | None = None, fmt: str = "onnx") -> str:
    if m is not None and m.export_command:
        cmd = m.export_command
        if info is not None:  # rebuild from the model at hand, into the same folder
            parts = shlex.split(cmd)
            parts[parts.index("--model") + 1] = str(info.path)
            parts[parts.index("--out") + 1] = str(root)
            cmd = shlex.join(parts)
        return f"rebuild with: {cmd}"
    model = str(info.path) if info is not None else "MODEL"
    return (f"rebuild with: sdfast export --model {shlex.quote(model)} --out {shlex.quote(str(root))} "
            f"--format {FORMAT_FLAG.get(fmt, fmt)}")


def read_manifest(root: Path | str, info: ModelInfo | None = None) -> Manifest:
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise MissingFile(f"engines: no folder at {str(root)!r}; pass the --out folder of `sdfast export`")
    if not path.is_file():
        raise MissingFile(
            f"engines: {root} has no {MANIFEST}, so it is not a complete export (an interrupted export "
            f"leaves none); {rebuild_hint(None, root, info)}"
        )
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        if int(d.get("format_version", -1)) != FORMAT_VERSION:
            raise ArtifactMismatch(
                f"engines: {path} has format version {d.get('format_version')!r} but this sdfast reads "
                f"{FORMAT_VERSION}; {rebuild_hint(None, root, info)}"
            )
        return Manifest.from_dict(d)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, ArtifactMismatch):
            raise
        raise ArtifactMismatch(f"engines: {path} is not a valid manifest ({e}); {rebuild_hint(None, root, info)}") from e


def _config_diff(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    for section in ("unet", "vae", "text_encoder", "scheduler", "tokenizer"):
        a, b = ours.get(section, {}), theirs.get(section, {})
        for k in sorted(set(a) | set(b)):
            if json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True):
                return f" ({section} config {k}: export has {a.get(k)!r}, model has {b.get(k)!r})"
    return " (same configs, different weights)"


def verify(m: Manifest, root: Path, info: ModelInfo, fmt: str, check_hashes: bool = True,
           device: dict[str, Any] | None = None) -> None:
    """Raise ArtifactMismatch naming the first difference between the artifact and what is at hand."""
    hint = rebuild_hint(m, root, info, fmt)
    if m.format != fmt:
        raise ArtifactMismatch(f"engines: {root} holds {m.format} artifacts, not {fmt}; "
                               f"use --backend {FORMAT_BACKEND.get(m.format, m.format)} or {hint}")
    missing = [c for c in SPECS if c not in m.components]
    if missing:
        raise ArtifactMismatch(f"engines: {root} lacks component(s) {', '.join(missing)}; {hint}")
    if m.model.get("fingerprint") != info.fingerprint:
        diff = _config_diff(m.model.get("configs", {}), model_record(info)["configs"])
        raise ArtifactMismatch(
            f"engines: {root} was exported from a different model ({m.model.get('name')!r} at "
            f"{m.model.get('source')!r}) than {info.name!r} at {str(info.path)!r}{diff}; {hint}"
        )
    if fmt == "tensorrt":
        have = package_version("tensorrt")
        if m.versions.get("tensorrt") != have:
            raise ArtifactMismatch(
                f"engines: {root} was built with TensorRT {m.versions.get('tensorrt')} but TensorRT {have} is "
                f"installed; plans only load on the version that built them; {hint}"
            )
        if device is not None and m.device is not None:
            for key in ("gpu", "compute_capability"):
                if m.device.get(key) != device.get(key):
                    raise ArtifactMismatch(
                        f"engines: {root} was built for GPU {m.device.get('gpu')!r} (compute capability "
                        f"{m.device.get('compute_capability')}) but this is {device.get('gpu')!r} (compute "
                        f"capability {device.get('compute_capability')}); {hint}"
                    )
    for rel, rec in m.files.items():
        p = root / rel
        if not p.is_file():
            raise ArtifactMismatch(f"engines: {p} is listed in the manifest but missing; {hint}")
        size = p.stat().st_size
        if size != rec["size"]:
            raise ArtifactMismatch(
                f"engines: {p} has {size} bytes but the manifest says {rec['size']} (truncated or replaced); {hint}"
            )
        if check_hashes and file_record(p)["sha256"] != rec["sha256"]:
            raise ArtifactMismatch(f"engines: {p} does not match its sha256 in the manifest (modified); {hint}")
    for c in SPECS:
        if m.components[c]["file"] not in m.files:
            raise ArtifactMismatch(f"engines: the manifest lists no hash for {m.components[c]['file']}; {hint}")


def load_manifest(root: Path | str, info: ModelInfo, fmt: str, device: dict[str, Any] | None = None) -> Manifest:
    root = Path(root)
    m = read_manifest(root, info)
    verify(m, root, info, fmt, device=device)
    return m


@contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A temp folder beside ``out``; renamed onto ``out`` only when the block finishes.

    A crash or kill inside the block leaves ``out`` as it was (or absent) and at worst a hidden
    ``.NAME.tmp-*`` folder without a manifest.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, ordinary_mode(0o777))  # mkdtemp makes it private; the export is an ordinary folder
    try:
        yield tmp
        if not (tmp / MANIFEST).is_file():
            raise RuntimeError(f"export into {tmp} finished without writing {MANIFEST}")
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
