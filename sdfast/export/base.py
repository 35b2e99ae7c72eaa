"""The one skeleton every exporter runs: check the profile and the output folder before any work,
build each component into a staging folder beside ``out``, seal it with a manifest written last,
and rename it into place (``artifacts.staging_dir``). An exporter supplies only what differs: how
one component is built and what its manifest record holds."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..artifacts import (
    MANIFEST,
    Manifest,
    check_names,
    check_output_path,
    export_command,
    model_record,
    schema_errors,
    staging_dir,
    tensor_records,
)
from ..errors import InvalidArgument
from ..model.components import CACHE_FORMATS, Precision, ShapeProfile
from ..model.info import ModelInfo

log = logging.getLogger(__name__)

#: build(name, staging folder) -> the component's manifest record (its files, precision, ...);
#: the skeleton adds the tensor records of the profile.
Build = Callable[[str, Path], dict[str, Any]]


def export_components(info: ModelInfo, out: Path | str, profile: ShapeProfile, fmt: str, precision: Precision,
                      build: Build, *, components: tuple[str, ...] | None = None, extra_flags: list[str] = (),
                      model_arg: str | None = None, manifest: dict[str, Any] | None = None,
                      verb: str = "exported", lora_rank: int = 0) -> Path:
    """Export ``components`` (default: every component of the family) into ``out``, replaced
    atomically and sealed. ``extra_flags``: the CLI flags beyond the profile that rebuild it (kept
    in the manifest's export command); ``manifest``: further Manifest fields (versions, device);
    ``lora_rank``: the LoRA slots ``build`` gave the components (sdfast/lora_slots.py), for the
    export command."""
    components = components or tuple(info.specs)
    cached = [c for c in components if info.specs[c].cache_branch is not None]  # DeepCache's graphs
    if cached and fmt not in CACHE_FORMATS:
        raise InvalidArgument(f"cache-branch: DeepCache's graphs are exported for --format {' or '.join(CACHE_FORMATS)}, "
                              f"not {fmt}; drop --cache-branch, or change --format")
    if cached and lora_rank:
        raise InvalidArgument("lora-rank: DeepCache's graphs (--cache-branch) are not built with LoRA slots; drop "
                              "--lora-rank (fuse a set with --lora), or drop --cache-branch")
    if cached:
        extra_flags = [*extra_flags, "--cache-branch", str(info.cache_branch)]
    profile.validate(info)
    out = check_export_out(out, protect=info.path)  # before any work: never replace what we did not write
    lora_flags = [arg for lo in info.loras for arg in ("--lora", f"{lo.file.path}:{lo.scale:g}")]
    if lora_rank:
        lora_flags += ["--lora-rank", str(lora_rank)]
    cmd = export_command(model_arg or str(info.path), out, fmt, precision.value, profile,
                         list(extra_flags) + lora_flags)
    with staging_dir(out) as tmp:
        comps = {}
        bar = tqdm(components, desc=f"export {fmt}", unit="component", disable=None)
        for name in bar:
            bar.set_postfix_str(name)
            t0 = time.perf_counter()
            record = build(name, tmp)
            log.info("%s %s in %.1f s", verb, name, time.perf_counter() - t0)
            branch = info.specs[name].cache_branch
            comps[name] = {**record, **tensor_records(name, profile, info),
                           **({"cache_branch": branch} if branch is not None else {})}
        Manifest(format=fmt, model=model_record(info), profile=profile, components=comps, export_command=cmd,
                 **(manifest or {})).seal(tmp)
    log.info("wrote %s (%s)", out, profile.describe())
    return out


def is_export_folder(path: Path) -> bool:
    """True when ``path`` holds an sdfast export and nothing else: a valid manifest plus only
    the files it lists. Export replaces such a folder; anything more is someone else's data."""
    path = Path(path)
    try:
        d = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if schema_errors(d) is not None:
        return False
    listed = set(d["files"]) | {MANIFEST}
    for p in path.rglob("*"):
        rel = p.relative_to(path).as_posix()
        if p.is_symlink() or (p.is_file() and rel not in listed):
            return False
        if p.is_dir() and not any(f.startswith(rel + "/") for f in listed):
            return False
    return True


def check_export_out(out: Path | str, protect: Path | None = None) -> Path:
    """Refuse an export target whose replacement would destroy what export did not write.

    Returns the resolved folder. Allowed: a missing path, an empty folder, or an earlier sdfast
    export (``is_export_folder``). Refused: a file, a folder with other content, ``protect``
    (the model folder) or any folder containing it, and the current folder or any above it.
    """
    raw = str(out)
    check_names(out, "out")
    path = Path(out).expanduser().resolve()
    fix = "pass a new or empty folder, or an earlier sdfast export folder"
    if protect is not None:
        model = Path(protect).resolve()
        if model == path or model.is_relative_to(path):
            raise InvalidArgument(f"out: {raw!r} is the model folder or contains it, and export replaces --out "
                                  f"as a whole; {fix}")
    if Path.cwd().resolve().is_relative_to(path):
        raise InvalidArgument(f"out: {raw!r} is the current folder or contains it, and export replaces --out "
                              f"as a whole; {fix}, e.g. --out engines")
    if path.exists() and not path.is_dir():
        raise InvalidArgument(f"out: {raw!r} is a file, and export writes a folder there; {fix}")
    if path.is_dir() and any(path.iterdir()) and not is_export_folder(path):
        raise InvalidArgument(f"out: {raw!r} holds files that sdfast export did not write (no manifest listing "
                              f"them), and export replaces --out as a whole; {fix}")
    check_output_path(path, "out", directory=True)
    return path
