"""OpenVINO engines over an ``sdfast export --format openvino`` folder (CPU).

Tensors stay torch tensors: inputs are wrapped as OpenVINO tensors over the torch buffers (no
copy; bf16 as its raw 16-bit words typed ``bf16``), and every call hands the request a freshly
allocated torch output to write into, so a returned tensor never aliases a later call's.
Loading verifies the manifest (model fingerprint, file hashes), then each IR's real I/O
(names, element types, static dims and intervals) against the spec and profile, before any
model is compiled. Importing this module never imports diffusers.

CPU settings (``compile_config``), chosen by measurement (bench/studies/openvino_unet.py, numbers in
bench/README.md): the LATENCY hint with one stream (the loop makes one call at a time, so a
second stream only splits the cores), ``INFERENCE_NUM_THREADS`` = torch's thread count (the
two never run at once and share one budget), and the inference precision from the manifest
(never the plugin's default, which is bf16 on AMX CPUs even for an fp32 export). CPU pinning
follows ``SDFAST_OV_PINNING`` (default off: see ``PINNING_DEFAULT``).

Cold start (bench/studies/cold_start.py, numbers in bench/README.md): load compiles the tuned shape of
the components every text-to-image request runs; a component whose rows are init images (the
VAE encoder: img2img and inpainting only) is read and checked on load but compiled on its first
call. Each compiled model is kept in a cache (``CompileCache``: ``$SDFAST_OV_CACHE``, default
``$SDFAST_CACHE/openvino``, else ``$XDG_CACHE_HOME/sdfast/openvino`` or ``~/.cache/sdfast/openvino``;
``SDFAST_OV_CACHE=off`` switches it off) written by sdfast itself through ``export_model`` and
read back with ``import_model`` over a memory map, keyed by the component's sha256s in the
verified manifest, the openvino build, the CPU and the compile config and shapes, so a stale
entry is never used. Not OpenVINO's own ``CACHE_DIR``: for an ``ov.Model`` (sdfast reshapes the
IR to each static shape, so it never compiles from a path) that hashes every weight on each
load and reads the blob into memory (+3.3 GB RSS on the SD 1.5 U-Net), and on the CPU measured
its warm load was no faster than compiling; ``compile_model(path)`` skips the hash but keys on
the path and mtime and serves only the IR's interval shapes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch

from ..artifacts import Manifest, atomic_path, check_precision, rebuild_hint
from ..errors import ArtifactMismatch, InvalidArgument
from ..model.components import ComponentSpec, Precision, ShapeProfile, output_shapes, size_multiple
from ..model.info import ModelInfo
from .base import ExportedEngine, check_engine_io, engine_inputs, open_export, read_artifact

log = logging.getLogger(__name__)

FORMAT = "openvino"
#: OpenVINO element type names → the names ``artifacts.check_io`` compares.
ELEMENT_TYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "i64": "int64"}
#: the inference precision hint of each precision an export builds.
OV_HINT = {Precision.FP32: "f32", Precision.BF16: "bf16"}
#: input shapes each engine compiles statically before falling back to its interval model: the
#: guided and unguided U-Net batch plus one (see OpenVinoEngine).
STATIC_SHAPES = 3
#: Pinning threads to cores did not pay on the shared 2-core machine measured (see the module
#: doc); a dedicated machine may set SDFAST_OV_PINNING=1.
PINNING_DEFAULT = False
#: the compiled-model cache folder, or one of CACHE_OFF to run without one (see CompileCache).
CACHE_ENV = "SDFAST_OV_CACHE"
CACHE_OFF = ("", "0", "off", "false", "no", "none")
#: bumped when what a cache entry holds or how it is keyed changes (older entries then never match).
CACHE_FORMAT = 1
#: the cache folder's size limit in GB ($SDFAST_OV_CACHE_MAX_GB): past it, writing an entry removes
#: the least recently used ones of other exports (an SD 1.5 set is 4.1 GB, fp32 weights inside).
CACHE_MAX_ENV, CACHE_MAX_GB = "SDFAST_OV_CACHE_MAX_GB", 20.0


def cache_root() -> Path | None:
    """Where compiled models are cached: $SDFAST_OV_CACHE (None when it says off), else
    $SDFAST_CACHE/openvino, else $XDG_CACHE_HOME/sdfast/openvino, else ~/.cache/sdfast/openvino."""
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return None if env.strip().lower() in CACHE_OFF else Path(env).expanduser()
    if os.environ.get("SDFAST_CACHE"):
        return Path(os.environ["SDFAST_CACHE"]).expanduser() / "openvino"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sdfast" / "openvino"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class CompileCache:
    """Compiled models of one export on disk, one file per component and input shapes.

    An entry is ``COMPONENT-FOLDER-BUILD-KEY.blob``: FOLDER a digest of the export's path, BUILD
    of the component's file sha256s (from the manifest load verified), the openvino build and
    the CPU (name, ISA), KEY of all that plus the compile config and input shapes. Writing a
    BUILD removes the same folder and component's entries of other BUILDs (a re-export or an
    openvino upgrade), so one export keeps one set; past $SDFAST_OV_CACHE_MAX_GB (CACHE_MAX_GB) the
    least recently used entries of other exports go (temp exports leave theirs behind). Entries are written atomically (temp file,
    rename) and read through a memory map the compiled model keeps; a folder that cannot be
    made or written, an entry that does not import, or one in a folder others may write (or
    another user's) costs a log warning and a compile, never the load."""

    def __init__(self, root: Path | None, export: Path, core):
        self.root = root
        self.writable = root is not None
        self.folder = _digest(str(Path(export).resolve()))[:16]
        if root is not None:
            import openvino as ov

            self.device = {"openvino": ov.get_version(), "cpu": core.get_property("CPU", "FULL_DEVICE_NAME"),
                           "isa": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))}

    def path(self, m: Manifest, name: str, config: dict[str, Any], shapes) -> Path | None:
        if self.root is None:
            return None
        rec = m.components[name]
        files = {rec[k]: m.files[rec[k]]["sha256"] for k in ("file", "weights") if rec.get(k) in m.files}
        build = _digest([CACHE_FORMAT, name, files, rec.get("precision"), self.device])
        key = _digest([build, config, shapes])
        return self.root / f"{name}-{self.folder}-{build[:16]}-{key}.blob"

    def load(self, path: Path | None, core, config: dict[str, Any]):
        """(compiled model, its memory map) from ``path``, or None (absent, unreadable, broken)."""
        if path is None or not path.is_file():
            return None
        if not (_private(path.parent) and _private(path)):
            log.warning("openvino cache: %s is another user's or writable by anyone, so anyone could have put "
                        "that entry there; compiling instead (point %s at a folder of your own)", path, CACHE_ENV)
            return None
        import numpy as np
        import openvino as ov

        try:
            blob = np.memmap(path, dtype=np.uint8, mode="c")  # private pages: the file is never written
            compiled = core.import_model(ov.Tensor(blob, shared_memory=True), "CPU", config)
            with contextlib.suppress(OSError):
                os.utime(path)  # recently used: the size limit removes others first
            return compiled, blob
        except Exception as e:  # noqa: BLE001 -- openvino raises RuntimeError subclasses of many kinds
            log.warning("openvino cache: %s does not import (%s); compiling instead", path, _first_line(e))
            return None

    def store(self, path: Path | None, compiled) -> None:
        if path is None or not self.writable:
            return
        try:
            data = compiled.export_model()
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                fh.write(data.getbuffer())
            stem = path.name.rsplit("-", 2)[0] + "-"  # COMPONENT-FOLDER-: this export's component
            build = path.name.rsplit("-", 2)[1]
            for old in path.parent.glob(f"{stem}*.blob"):
                if old.name.rsplit("-", 2)[1] != build:
                    old.unlink(missing_ok=True)
            _trim(path.parent, f"-{self.folder}-")
        except Exception as e:  # noqa: BLE001 -- an unwritable folder, a full disk, an export failure
            self.writable = False
            log.warning("openvino cache: cannot write %s (%s); running without a cache (set %s to a writable "
                        "folder, or %s=off)", path.parent, _first_line(e), CACHE_ENV, CACHE_ENV)


def _trim(folder: Path, keep: str) -> None:
    """Remove the least recently used entries past the size limit, never one whose name holds
    ``keep`` (the export being loaded)."""
    limit = float(os.environ.get(CACHE_MAX_ENV) or CACHE_MAX_GB) * 1e9
    entries = []
    for p in folder.glob("*.blob"):
        with contextlib.suppress(OSError):  # another process may remove one meanwhile
            st = p.stat()
            entries.append((st.st_mtime, st.st_size, p))
    entries.sort(key=lambda e: e[0])
    total = sum(size for _, size, _ in entries)
    for _, size, p in entries:
        if total <= limit:
            break
        if keep not in p.name:
            p.unlink(missing_ok=True)
            total -= size


def _private(p: Path) -> bool:
    """Owned by this user and not writable by others (a shared folder would serve anyone's blob)."""
    st = p.stat()
    return (not hasattr(os, "getuid") or st.st_uid == os.getuid()) and not st.st_mode & 0o002


def _first_line(e: Exception) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:200]


def compile_config(inference_precision: str, threads: int | None = None,
                   pinning: bool | None = None) -> dict[str, Any]:
    """The CPU plugin settings every engine compiles with (see the module doc)."""
    if pinning is None:
        env = os.environ.get("SDFAST_OV_PINNING")
        pinning = PINNING_DEFAULT if env is None else env.strip().lower() in ("1", "true", "yes", "on")
    return {
        "INFERENCE_PRECISION_HINT": inference_precision,
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": "1",
        "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
        "ENABLE_CPU_PINNING": bool(pinning),
    }


def to_ov(x: torch.Tensor):
    """An ``ov.Tensor`` sharing ``x``'s memory (``x`` contiguous on the CPU)."""
    import openvino as ov

    if x.dtype == torch.bfloat16:
        return ov.Tensor(x.view(torch.int16).numpy(), ov.Shape(list(x.shape)), ov.Type.bf16)
    return ov.Tensor(x.numpy(), shared_memory=True)


class OpenVinoEngine(ExportedEngine):
    """One component on OpenVINO; float outputs come back float32.

    Each input shape seen is compiled with every dim static (``model.reshape`` of the IR's
    intervals to that shape), up to ``static_shapes`` shapes, then the interval model serves
    the rest: the CPU plugin plans memory and picks kernels once per static shape, which is its
    fast case, while a static-side profile meets only a few shapes (the guided and unguided
    U-Net batch). ``load`` compiles the profile's tuned shape of the components a text-to-image
    request runs, so a broken IR fails there; each compile goes through ``cache`` (None: none)."""

    def __init__(self, spec: ComponentSpec, model, core, config: dict[str, Any], info: ModelInfo,
                 device: torch.device, precision: Precision, profile: ShapeProfile, static_shapes: int,
                 cache: CompileCache | None = None, manifest: Manifest | None = None, hint: str = "",
                 file: Path | None = None):
        super().__init__(spec, device, precision, profile, size_multiple(info))
        self.model = model
        self.core = core
        self.config = config
        self.info = info
        self.static_shapes = static_shapes
        self.cache, self.manifest, self.hint, self.file = cache, manifest, hint, file
        self._requests: dict[tuple[tuple[int, ...], ...], Any] = {}
        self._dynamic = None
        #: per compiled shape (None: the interval model), whether it came from the cache
        self.from_cache: dict[tuple[tuple[int, ...], ...] | None, bool] = {}
        self._blobs: list = []  # the cache entries' memory maps, which the imported models use
        self._slot_ov: list = []  # the LoRA slots' factors as ov.Tensors (init_slots / set_lora_slots)
        self._lock = threading.Lock()  # one request per shape: calls from several threads take turns

    def init_slots(self, table, dtype: torch.dtype) -> None:
        super().init_slots(table, dtype)
        self._slot_ov = [to_ov(x) for x in self.slot_inputs]  # wrapped once per set, not per call

    def set_lora_slots(self, tensors: list[torch.Tensor]) -> None:
        super().set_lora_slots(tensors)
        self._slot_ov = [to_ov(x) for x in self.slot_inputs]

    def request_for(self, shapes: tuple[tuple[int, ...], ...]):
        """The infer request serving input ``shapes`` (compiled on first need; caller holds the lock)."""
        req = self._requests.get(shapes)
        if req is not None:
            return req
        import openvino as ov

        if self.model.is_dynamic() and len(self._requests) < self.static_shapes:
            req = self._requests[shapes] = self._compile(
                lambda: self._reshaped({i: ov.PartialShape(list(s)) for i, s in enumerate(shapes)}), shapes)
            log.info("%s: compiled for %s", self.spec.name, shapes)
            return req
        if not self.model.is_dynamic():
            req = self._requests[shapes] = self._compile(lambda: self.model, shapes)
            return req
        if self._dynamic is None:
            self._dynamic = self._compile(lambda: self.model, None)
        return self._dynamic

    def _reshaped(self, shapes):
        m = self.model.clone()
        m.reshape(shapes)
        return m

    def _compile(self, model, shapes):
        """An infer request of ``model()`` compiled for ``shapes`` (None: its intervals), from the
        cache when it holds one; a compile that fails is one ArtifactMismatch line."""
        cache = self.cache if self.manifest is not None else None
        path = cache.path(self.manifest, self.spec.name, self.config, shapes) if cache else None
        hit = cache.load(path, self.core, self.config) if cache else None
        if hit is not None:
            compiled, blob = hit
            self._blobs.append(blob)
        else:
            compiled = read_artifact(lambda: self.core.compile_model(model(), "CPU", self.config),
                                     "OpenVINO's CPU plugin", self.file or Path(self.spec.name), self.hint)
            if cache:
                cache.store(path, compiled)
        self.from_cache[shapes] = hit is not None
        return compiled.create_infer_request()

    def tuned_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The input shapes of the profile's tuned (opt) shape."""
        return tuple(s[1] for s in self.profile.shapes(self.spec, self.info, "inputs").values())

    @property
    def compiled(self):
        """The compiled model of the first shape served, the tuned one compiled now if none was
        (for inspecting its properties)."""
        with self._lock:
            req = next(iter(self._requests.values()), None) or self._dynamic or self.request_for(self.tuned_shapes())
        return req.get_compiled_model()

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        keep = engine_inputs(self.spec, inputs, self.device, self.dtype)  # must outlive the run
        in_shapes = tuple(tuple(x.shape) for x in keep)
        shapes = output_shapes(self.spec, self.info, dict(zip(self.spec.input_names, in_shapes, strict=True)))
        outs = {t.name: torch.empty(shapes[t.name], dtype=self.dtype) for t in self.spec.outputs}
        with self._lock:
            request = self.request_for(in_shapes)
            for i, x in enumerate(keep):
                request.set_input_tensor(i, to_ov(x))
            for i, t in enumerate(self._slot_ov, len(keep)):  # then the LoRA slots' factors, if any
                request.set_input_tensor(i, t)
            for i, t in enumerate(self.spec.outputs):
                request.set_output_tensor(i, to_ov(outs[t.name]))
            request.infer()
        return {k: v.float() for k, v in outs.items()}


def _ov_io(ports) -> list[tuple[str, str | None, list[int | None]]]:
    """OpenVINO ports as (name, element type, dims with None for a dynamic dim) for ``check_io``."""
    out = []
    for p in ports:
        names = sorted(p.get_names())
        kind = p.get_element_type().get_type_name()
        out.append((names[0] if names else "", ELEMENT_TYPES.get(kind, kind),
                    [d.get_length() if d.is_static else None for d in p.get_partial_shape()]))
    return out


def check_bounds(model, m: Manifest, root: Path, info: ModelInfo, name: str) -> None:
    """Refuse an IR whose dynamic dims are not bounded by the manifest's profile (check_io has
    made sure they are dynamic; an unbounded or differently bounded one is not this export)."""
    shapes = m.profile.shapes(info.specs[name], info, "inputs")
    for port in model.inputs[:len(info.specs[name].inputs)]:  # LoRA slots (after them) are static
        tname = sorted(port.get_names())[0]
        lo, _, hi = shapes[tname]
        for axis, (d, a, b) in enumerate(zip(port.get_partial_shape(), lo, hi, strict=True)):
            if d.is_static:
                continue
            if (d.get_min_length(), d.get_max_length()) != (a, b):
                raise ArtifactMismatch(
                    f"engines: {m.file(root, name)} input {tname} spans {d.get_min_length()}..{d.get_max_length()} "
                    f"on axis {axis} but the manifest's profile spans {a}..{b} (a foreign or edited file); "
                    f"{rebuild_hint(m, root, info, FORMAT)}")


def load(info: ModelInfo, device: torch.device, precision: Precision, engines: str | None = None,
         threads: int | None = None, static_shapes: int | None = None,
         components: tuple[str, ...] | None = None) -> dict[str, OpenVinoEngine]:
    """The engines of an export: every component of ``info.specs``, or ``components`` of them
    (DeepCache's two graphs load on first use, sdfast/deepcache.py); ``static_shapes`` per engine
    (default ``SDFAST_OV_STATIC_SHAPES`` or STATIC_SHAPES; 0 runs the IR's interval shapes as they are)."""
    if device.type != "cpu":
        raise InvalidArgument(f"device: the openvino backend runs on the CPU, not {device.type}; use --device cpu")
    import openvino as ov

    if static_shapes is None:
        static_shapes = int(os.environ.get("SDFAST_OV_STATIC_SHAPES", STATIC_SHAPES))
    root, m, hint = open_export(info, engines, "openvino", FORMAT, "an exported folder", " --precision bf16")
    check_precision(m, root, precision, "models")
    core = ov.Core()
    cache = CompileCache(cache_root(), root, core)
    out = {}
    for name in components or info.specs:
        path = m.file(root, name)
        if m.precision(name) not in OV_HINT:
            raise ArtifactMismatch(f"engines: {root} lists {name} in {m.precision(name).value}, which the openvino "
                                   f"export never builds (fp32 or bf16); {hint}")
        model = read_artifact(lambda path=path: core.read_model(str(path)), "OpenVINO", path, hint)
        slots = check_engine_io(m, root, info, name, _ov_io(model.inputs), _ov_io(model.outputs), "float32")
        check_bounds(model, m, root, info, name)
        # The hint follows the checked precision (the manifest's own hint field is informative).
        engine = OpenVinoEngine(info.specs[name], model, core, compile_config(OV_HINT[m.precision(name)], threads),
                                info, device, m.precision(name), m.profile, static_shapes, cache, m, hint, path)
        engine.init_slots(slots, torch.float32)  # weights stay fp32 in the IR (see export/openvino.py)
        record = m.components[name]
        note = (record.get("quantization") or {}).get("note") if isinstance(record, dict) else None
        if note:  # the export's int8 speed check found it slower than the float engine
            log.warning("%s: %s (from the export's int8 speed check)", name, note)
        if engine.spec.rows != "init":  # init-image rows: img2img / inpainting only, compiled on first call
            with engine._lock:  # the tuned shape now: a broken IR fails on load, not mid-generation
                engine.request_for(engine.tuned_shapes())
        out[name] = engine
    return out
