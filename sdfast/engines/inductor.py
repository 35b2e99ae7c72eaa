"""The AOTInductor backend: compiled ``.pt2`` packages from ``sdfast export --format inductor``.

Loading needs torch only — no diffusers, no model code. Packages are tied to the torch
version that compiled them and, on CUDA, to the GPU architecture: both are checked against the
manifest before anything is loaded, with the command that rebuilds.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from pathlib import Path

import torch
import torch._inductor

from ..artifacts import Manifest, check_precision, rebuild_hint
from ..errors import ArtifactMismatch
from ..model.components import ComponentSpec, Precision, ShapeProfile, size_multiple
from ..model.info import ModelInfo
from .base import ExportedEngine, engine_inputs, open_export, read_artifact

FORMAT = "inductor"


class InductorEngine(ExportedEngine):
    """One compiled component. Float inputs go in at the package's precision, float outputs
    come back float32; every call returns fresh tensors (from the graph pool inside a capture)."""

    graph_safe = True

    def __init__(self, spec: ComponentSpec, runner, device: torch.device, precision: Precision,
                 profile: ShapeProfile, multiple: int):
        super().__init__(spec, device, precision, profile, multiple)
        self.runner = runner
        # Packages load with run_single_threaded on CUDA (capturable); we serialize calls instead.
        self._lock = threading.Lock()

    @torch.no_grad()
    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        args = engine_inputs(self.spec, inputs, self.device, self.dtype)
        with self._lock:
            out = self.runner(*args)
        outs = out if isinstance(out, (list, tuple)) else (out,)
        return {t.name: o.float() for t, o in zip(self.spec.outputs, outs, strict=True)}

    def weight_names(self) -> dict[str, str]:
        """The torch module's parameter name -> the package constant holding it (the package names
        them after the fixed-I/O wrapper: ``unet.conv_in.weight`` for ``conv_in.weight``)."""
        return {fqn.split(".", 1)[1]: fqn for fqn in self.runner.get_constant_fqns() if "." in fqn}

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Replace weights in the loaded package (AOTInductor's load_constants copies them in): a
        LoRA swap without re-export. Names are the torch module's (``weight_names``)."""
        names = self.weight_names()
        consts = {names[n]: w.to(self.device, self.dtype).contiguous() for n, w in weights.items()}
        with self._lock:
            self.runner.load_constants(consts, check_full_update=False)


def _check_runtime(m: Manifest, root: Path, info: ModelInfo, device: torch.device, precision: Precision) -> None:
    hint = rebuild_hint(m, root, info, "inductor")
    where = {m.components[c].get("device", "cpu") for c in info.specs}
    if where != {device.type}:
        raise ArtifactMismatch(f"engines: {root} was compiled for {', '.join(sorted(where))} but device "
                               f"{device.type!r} was asked for; pass --device {where.pop()} or {hint}")
    if device.type == "cuda" and m.device is not None:
        major, minor = torch.cuda.get_device_capability(device)
        if m.device.get("compute_capability") != f"{major}.{minor}":
            raise ArtifactMismatch(
                f"engines: {root} was compiled for compute capability {m.device.get('compute_capability')} "
                f"({m.device.get('gpu')}) but this GPU has {major}.{minor}; {hint}"
            )
    check_precision(m, root, precision, "packages")


def check_package(runner, m: Manifest, root: Path, info: ModelInfo, name: str) -> None:
    """Refuse a package that is not the component the manifest says it is (a swapped or foreign
    file under a recomputed hash): sdfast's exporter stores the component and its I/O names in
    the package metadata; packages without them are held to the input and output counts."""
    hint = rebuild_hint(m, root, info, FORMAT)
    path = m.file(root, name)
    spec = info.specs[name]
    meta = dict(runner.get_metadata()) if hasattr(runner, "get_metadata") else {}
    if "sdfast_component" in meta:
        have = (meta["sdfast_component"], meta.get("sdfast_inputs", ""), meta.get("sdfast_outputs", ""))
        want = (name, ",".join(spec.input_names), ",".join(spec.output_names))
        if have != want:
            raise ArtifactMismatch(f"engines: {path} is the package of {have[0]} ({have[1]} -> {have[2]}), not "
                                   f"{name} ({want[1]} -> {want[2]}) (a swapped or foreign file); {hint}")
        return
    try:
        from torch.utils import _pytree as pytree

        in_spec, out_spec = (pytree.treespec_loads(s) for s in runner.loader.get_call_spec())
        n_in, n_out = in_spec.num_leaves, out_spec.num_leaves
    except (AttributeError, ValueError, TypeError):
        return  # no call spec to read: the hash and the first call are all the checks there are
    if (n_in, n_out) != (len(spec.inputs), len(spec.outputs)):
        raise ArtifactMismatch(f"engines: {path} takes {n_in} input(s) and returns {n_out}, but {name} takes "
                               f"{len(spec.inputs)} and returns {len(spec.outputs)} (a swapped or foreign file); {hint}")


def load(info: ModelInfo, device: torch.device, precision: Precision, engines: str | None = None
         ) -> dict[str, InductorEngine]:
    root, m, hint = open_export(info, engines, "inductor", FORMAT, "compiled packages")
    _check_runtime(m, root, info, device, precision)
    multiple = size_multiple(info)
    out = {}
    for name in info.specs:
        path = m.file(root, name)
        runner = read_artifact(lambda path=path: _quietly(lambda: torch._inductor.aoti_load_package(
            str(path), run_single_threaded=device.type == "cuda",
            device_index=device.index if device.index is not None else -1)), "torch", path, hint)
        check_package(runner, m, root, info, name)
        out[name] = InductorEngine(info.specs[name], runner, device, m.precision(name), m.profile, multiple)
    return out


class _Held(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _quietly(load):
    """``load()`` with torch's log lines and warnings held back: a package another torch built
    fails to load after torch logs "Loading outdated pt2 file" (its first loader failed, its legacy
    one then fails too), and sdfast's one-line refusal must be all the user sees. What was held is
    dropped when the load fails, and shown as it would have been when it succeeds."""
    logger = logging.getLogger("torch._inductor.package.package")
    held, propagate = _Held(), logger.propagate
    logger.addHandler(held)
    logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runner = load()
    finally:
        logger.removeHandler(held)
        logger.propagate = propagate
    for record in held.records:
        logger.handle(record)
    for w in caught:
        with contextlib.suppress(Exception):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return runner
