"""Remembered sha256s of export files: a second load does not read gigabytes again to hash them.

Loading an export checks every file against the manifest's sha256 (artifacts.verify). That read
is most of a warm OpenVINO start (3.0 s of CPU for the 4.2 GB SD 1.5 export, bench/studies/cold_start.py).
As git's index does, a file's hash is remembered under what the file system says about it:
(real path, device, inode, size, mtime_ns, ctime_ns). Any write to the file changes its ctime,
which no user can set back, so a changed file never matches its old entry and is hashed again;
a file whose ctime is within ``RACY_S`` of the moment it was hashed is not remembered (a write
in the same clock tick could leave the ctime unchanged: git's "racy" case).

The entries live in ``<sdfast cache>/verified-hashes`` ($SDFAST_CACHE, default ~/.cache/sdfast);
``SDFAST_HASH_MEMO=off`` hashes every time. A folder another user owns or anyone may write is
never read (an entry there could vouch for a file it never saw). Entries are written
atomically; one that cannot be written or read is just a hash computed again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "SDFAST_HASH_MEMO"
#: a file changed less than this long before it was hashed is not remembered (seconds)
RACY_S = 2.0


def folder() -> Path | None:
    if os.environ.get(ENV, "").strip().lower() in ("off", "0", "no", "false"):
        return None
    from .model.folder import cache_dir

    return cache_dir() / "verified-hashes"


def _key(path: Path, st: os.stat_result) -> str:
    fields = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return hashlib.sha256(repr(fields).encode()).hexdigest()


def _private(p: Path) -> bool:
    st = p.stat()
    return (not hasattr(os, "getuid") or st.st_uid == os.getuid()) and not st.st_mode & 0o022


def sha256_of(path: Path, compute: Callable[[Path], str]) -> str:
    """``path``'s sha256: remembered when its file-system record is unchanged, else ``compute``d."""
    root = folder()
    st = path.stat()
    entry = None if root is None else root / _key(path, st)
    if entry is not None:
        try:
            if _private(root) and _private(entry):
                text = entry.read_text(encoding="ascii").strip()
                if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
                    return text
        except (OSError, UnicodeDecodeError):
            pass  # no entry (the usual case), or one we cannot use: hash
    digest = compute(path)
    if entry is not None and time.time() - st.st_ctime >= RACY_S and _key(path, path.stat()) == entry.name:
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
            if _private(root):
                tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w", encoding="ascii") as fh:
                    fh.write(digest)
                os.replace(tmp, entry)
        except OSError as e:
            log.debug("could not remember the sha256 of %s: %s", path, e)
    return digest
