"""Every README command runs as written, in order, in a scratch folder, and writes the
files it names. Slow (it exports the toy model and runs parity: ~2 min on 2 cores), so CI runs it
with -m slow. The commands it does not run are pinned in tests/test_readme.py."""

from __future__ import annotations

import pytest
from test_readme import README, ROOT, walk

pytestmark = pytest.mark.slow


def test_every_readme_command_runs(tmp_path):
    steps = walk.walk(ROOT / "README.md", tmp_path)
    print(walk.report(steps))
    assert steps and walk.plan(README) and len(steps) == len(walk.plan(README))
    failed = [f"{s.text.splitlines()[0]}: {s.detail}" for s in steps if s.status == "failed"]
    assert not failed, "\n".join(failed)
    assert all(s.status in ("ok", "checked", "skipped") for s in steps)
    assert sum(s.status == "ok" for s in steps) >= 5
