"""Safe writes: every file and folder sdfast writes goes through here (re-exported by ``artifacts``).

- ``atomic_path`` / ``atomic_write``: bytes land in a temporary file beside the target and are
  renamed over it only when complete; a crash never leaves a half-written file.
- ``staging_dir``: the same for a folder (an export, a model folder); an earlier folder at the
  target is swapped out atomically where the OS can (``renameat2(RENAME_EXCHANGE)`` on Linux),
  so it survives any crash.
- ``output_group``: several outputs of one run (images, step frames, an animation) that appear
  together or not at all.
- ``check_output_path`` / ``check_output_dir``: the checks that run *before* any work.

A disk that fills mid-write (ENOSPC, EDQUOT, or a library's error quoting "No space left on
device") surfaces from all three writers as ``errors.NoSpace``, one line naming the target,
after the staged bytes are removed; the CLI prints it without a traceback.

Temporary names are ``.NAME.tmp-PID-XXXXXXXX`` (NAME shortened so the whole fits the file
system's name limit). The PID lets the next writer to the same target remove what a killed
process left, and only that: a live process's staging folder is never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import InvalidArgument, NoSpace

_STALE = re.compile(r"^\.(?P<stem>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[^.]+(\..*)?$")


def ordinary_mode(base: int = 0o666) -> int:
    """The permissions a plain ``open``/``mkdir`` would give under the current umask.

    ``tempfile`` makes private (0600/0700) files and folders; whatever we rename into place
    should look like any other file the user wrote."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _prefix(name: str, kind: str, folder: Path, suffix: str = "") -> str:
    """``.NAME.KIND-PID-`` with NAME cut so prefix + 8 random characters + suffix fit the limit."""
    tail = f".{kind}-{os.getpid()}-"
    room = _name_max(folder) - len(os.fsencode(f".{tail}{suffix}")) - 8
    stem = name
    while len(os.fsencode(stem)) > room:
        stem = stem[:-1]
    return f".{stem or '_'}{tail}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _stem_of(stem: str, name: str, leftover: str, folder: Path) -> bool:
    """Whether a leftover whose NAME part is ``stem`` was written for target ``name``: the same
    name, or its start where ``_prefix`` had to shorten it (the leftover's name then fills the
    limit, give or take a cut multi-byte character). Never another target whose name merely
    starts the same way (``eng`` vs ``engines``)."""
    if stem == name:
        return True
    return name.startswith(stem) and len(os.fsencode(leftover)) >= _name_max(folder) - 4


def clean_stale(target: Path, complete: str | None = None) -> None:
    """Remove the temporary files and folders that dead writers left beside ``target``.

    A ``.old-`` folder holds an earlier export that a crash caught between two renames (only
    where the OS cannot swap atomically): it is put back when ``target`` is missing."""
    target = Path(target)
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return
    for p in entries:
        m = _STALE.match(p.name)
        if not m or not _stem_of(m["stem"], target.name, p.name, target.parent) or _alive(int(m["pid"])):
            continue
        held = p / "x"
        if m["kind"] == "old" and not target.exists() and held.is_dir() and \
                (complete is None or (held / complete).is_file()):
            os.replace(held, target)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = os.strerror(errno.ENOSPC).lower()  # "no space left on device"


def _is_full(e: BaseException) -> bool:
    """True for the disk-full errors a writer may see: OSError's errno or a library's message."""
    for err in (e, e.__cause__, e.__context__):
        if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
            return True
        if isinstance(err, (OSError, RuntimeError)) and _FULL_TEXT in str(err).lower():
            return True
    return False


_NEARLY_FULL = 1 << 20  # bytes: below this, a failed write is taken to be the disk filling


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL
    except OSError:
        return False


@contextlib.contextmanager
def _note_full_disk(folder: Path) -> Iterator[None]:
    """Inside a writer, before its clean-up: a failure on a disk that is now (nearly) full is the
    disk filling, whatever the library said (OpenVINO's writer says "basic_ios::clear: iostream
    error"); re-raised as ENOSPC quoting the library's words."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if _is_full(e) or not _nearly_full(folder):
            raise
        raise OSError(errno.ENOSPC, f"{_FULL_TEXT} (the writer said: {e})") from e


def _free_mib(folder: Path) -> str:
    while not folder.exists() and folder != folder.parent:  # a folder the failed write made is gone
        folder = folder.parent
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free there now"
    except OSError:
        return "free space unknown"


@contextlib.contextmanager
def _full_disk_is(kind: str, target: Path) -> Iterator[None]:
    """Turn a disk-full error inside the block into one ``NoSpace`` line naming ``target``.

    Runs outside the writer's own clean-up, so the free space it reports is after the staged
    bytes went.
    """
    try:
        yield
    except (OSError, RuntimeError) as e:
        if isinstance(e, NoSpace) or not _is_full(e):
            raise
        raise NoSpace(errno.ENOSPC,
                      f"the disk filled while writing {kind} {target} ({_free_mib(target.parent)}); nothing "
                      f"was left half-written and an earlier {target.name}, if any, is unchanged: free space on that "
                      f"disk or write somewhere else", str(target)) from e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it to ``path`` on success."""
    path = Path(path)
    with _full_disk_is("the file", path.absolute()):
        with _atomic_path(path) as tmp:
            yield tmp


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path.name, "tmp", path.parent, path.suffix), suffix=path.suffix,
                               dir=path.parent)
    os.close(fd)
    try:
        with _note_full_disk(path.parent):
            yield Path(tmp)
        os.chmod(tmp, ordinary_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (str as UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def staging_dir(out: str | os.PathLike, complete: str | None = "manifest.json") -> Iterator[Path]:
    """A temp folder beside ``out``; it replaces ``out`` only when the block finishes.

    ``complete`` names the file the block must have written (the manifest, written last). A
    crash or kill inside the block leaves ``out`` as it was (or absent) and a hidden
    ``.NAME.tmp-PID-*`` folder that the next write to ``out`` removes. The caller decides
    whether ``out`` may be replaced (``export.base.check_export_out``).
    """
    out = Path(out).absolute()
    with _full_disk_is("the folder", out):
        with _staging_dir(out, complete) as tmp:
            yield tmp


@contextlib.contextmanager
def _staging_dir(out: Path, complete: str | None) -> Iterator[Path]:
    made = _make_parents(out)
    clean_stale(out, complete)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(out.name, "tmp", out.parent), dir=out.parent))
    os.chmod(tmp, ordinary_mode(0o777))  # mkdtemp makes it private; the result is an ordinary folder
    done = False
    try:
        with _note_full_disk(out.parent):
            yield tmp
        if complete is not None and not (tmp / complete).is_file():
            raise RuntimeError(f"writing {tmp} finished without {complete}")
        if not (out.exists() or out.is_symlink()):
            os.replace(tmp, out)
        elif not _exchange(tmp, out):
            old = Path(tempfile.mkdtemp(prefix=_prefix(out.name, "old", out.parent), dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        # after an exchange, tmp holds the earlier folder: removed below
        done = True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not done:  # a failed write leaves no folder it made
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    d.rmdir()


def _make_parents(target: Path) -> list[Path]:
    """Create the missing folders above ``target``; return them, outermost first."""
    missing = []
    p = target.parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    made = []
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        made.append(d)
    return made


# -- checks before any work -------------------------------------------------------------------

def _exists(p: Path) -> bool:
    try:
        return p.exists() or p.is_symlink()
    except OSError:  # ENAMETOOLONG, ELOOP, ...: nothing usable there
        return False


def _existing_ancestor(path: Path, arg: str) -> Path:
    """The nearest ancestor of ``path`` that exists; refuse one that is not a folder."""
    p = path.parent
    while not _exists(p):
        p = p.parent
    if not p.is_dir():
        raise InvalidArgument(f"{arg}: {str(path)!r} lies under {str(p)!r}, which is a file, not a folder; "
                              f"pick a path in a folder")
    return p


def check_names(path: str | os.PathLike, arg: str) -> None:
    """Refuse a path with a name longer than its file system allows (before anything stats it)."""
    p = Path(path).expanduser().absolute()
    anchor = p.parent
    while not _exists(anchor):
        anchor = anchor.parent
    limit = _name_max(anchor)
    for part in p.parts:
        if len(os.fsencode(part)) > limit:
            raise InvalidArgument(f"{arg}: the name {part[:40]!r}... is {len(os.fsencode(part))} bytes but this file "
                                  f"system allows {limit}; use a shorter name")


def check_output_path(path: str | os.PathLike, arg: str, directory: bool = False) -> Path:
    """Refuse, before any work, an output path that the write at the end would fail on.

    A file target may not be a folder; a folder target (``directory``) may not be a file. The
    nearest existing ancestor must be a writable folder and every new name must fit the file
    system's limit (temporary names are shortened to fit, so only the target's names count)."""
    check_names(path, arg)
    p = Path(path).expanduser().absolute()
    if p.exists():
        if not directory and p.is_dir():
            example = Path(path) / f"out{Path(path).suffix or '.png'}"
            raise InvalidArgument(f"{arg}: {str(path)!r} is a folder; pass a file path, e.g. {str(example)!r}")
        if directory and not p.is_dir():
            raise InvalidArgument(f"{arg}: {str(path)!r} is a file, not a folder; pass a folder")
    anchor = _existing_ancestor(p, arg)
    writable_dir = p if directory and p.is_dir() else anchor if not p.parent.exists() else p.parent
    if not os.access(writable_dir, os.W_OK | os.X_OK):
        raise InvalidArgument(f"{arg}: cannot write into {str(writable_dir)!r} (not writable); "
                              f"pick a folder you can write to")
    return p


def check_output_dir(path: str | os.PathLike, arg: str) -> Path:
    return check_output_path(path, arg, directory=True)


class OutputGroup:
    """Outputs staged under temporary names, renamed into place together at the end."""

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []
        self._made: list[Path] = []
        self.last: Path | None = None  # the latest target asked for, named if the disk fills

    def path(self, target: str | os.PathLike) -> Path:
        """A temporary path that becomes ``target`` when the group commits."""
        target = Path(target).absolute()
        self.last = target
        self._made += _make_parents(target)
        clean_stale(target)
        fd, tmp = tempfile.mkstemp(prefix=_prefix(target.name, "tmp", target.parent, target.suffix),
                                   suffix=target.suffix, dir=target.parent)
        os.close(fd)
        self._staged.append((Path(tmp), target))
        return Path(tmp)

    def commit(self) -> None:
        mode = ordinary_mode()
        for tmp, _ in self._staged:
            os.chmod(tmp, mode)
        for tmp, target in self._staged:
            os.replace(tmp, target)
        self._staged.clear()
        self._made.clear()

    def discard(self) -> None:
        for tmp, _ in self._staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        for d in reversed(self._made):
            with contextlib.suppress(OSError):
                d.rmdir()
        self._staged.clear()
        self._made.clear()


@contextlib.contextmanager
def output_group() -> Iterator[OutputGroup]:
    """``with output_group() as g: save(g.path(target))`` — all targets appear at the end, or none."""
    group = OutputGroup()
    try:
        yield group
        group.commit()
    except (OSError, RuntimeError) as e:
        if isinstance(e, NoSpace) or group.last is None:
            raise
        full = _is_full(e) or _nearly_full(group.last.parent)  # before discard frees the space
        group.discard()
        if not full:
            raise
        with _full_disk_is("the outputs of this run, such as", group.last):
            raise OSError(errno.ENOSPC, f"{_FULL_TEXT} (the writer said: {e})") from e
    finally:
        group.discard()
