"""The one skeleton every exporter runs: check the profile and the output folder before any work,
build each component into a staging folder beside ``out``, seal it with a manifest written last,
and rename it into place (``artifacts.staging_dir``). An exporter supplies only what differs: how
one component is built and what its manifest record holds."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..artifacts import Manifest, check_export_out, export_command, model_record, staging_dir, tensor_records
from ..components import Precision, ShapeProfile
from ..models import ModelInfo

log = logging.getLogger(__name__)

#: build(name, staging folder) -> the component's manifest record (its files, precision, ...);
#: the skeleton adds the tensor records of the profile.
Build = Callable[[str, Path], dict[str, Any]]


def export_components(info: ModelInfo, out: Path | str, profile: ShapeProfile, fmt: str, precision: Precision,
                      build: Build, *, components: tuple[str, ...] | None = None, extra_flags: list[str] = (),
                      model_arg: str | None = None, manifest: dict[str, Any] | None = None,
                      verb: str = "exported") -> Path:
    """Export ``components`` (default: every component of the family) into ``out``, replaced
    atomically and sealed. ``extra_flags``: the CLI flags beyond the profile that rebuild it (kept
    in the manifest's export command); ``manifest``: further Manifest fields (versions, device)."""
    components = components or tuple(info.specs)
    profile.validate(info)
    out = check_export_out(out, protect=info.path)  # before any work: never replace what we did not write
    cmd = export_command(model_arg or str(info.path), out, fmt, precision.value, profile, list(extra_flags))
    with staging_dir(out) as tmp:
        comps = {}
        bar = tqdm(components, desc=f"export {fmt}", unit="component", disable=None)
        for name in bar:
            bar.set_postfix_str(name)
            t0 = time.perf_counter()
            record = build(name, tmp)
            log.info("%s %s in %.1f s", verb, name, time.perf_counter() - t0)
            comps[name] = {**record, **tensor_records(name, profile, info)}
        Manifest(format=fmt, model=model_record(info), profile=profile, components=comps, export_command=cmd,
                 **(manifest or {})).seal(tmp)
    log.info("wrote %s (%s)", out, profile.describe())
    return out
