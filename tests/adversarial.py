"""Helpers of the adversarial tests: run the CLI in-process and prove it refused in
one line, and snapshot folders to prove an attempt left every file as it was."""

from __future__ import annotations

import hashlib
from pathlib import Path

from sdfast.cli import main


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (hidden ones too) with a hash of its bytes, or 'dir' / 'link'."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = f"link:{p.readlink()}"
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(capsys, argv: list[str], needle: str) -> str:
    """Run ``sdfast ARGV``: exit 2, exactly one line on stderr containing ``needle``, no traceback."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    return lines[0]
