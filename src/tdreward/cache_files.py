"""Temporary entries, locks and JSON indexes that survive concurrent processes and crashes.

Every temporary file or folder tdreward writes beside a cache entry or an output names its
owner: `.<base>.pid<PID>-<HOST>.<random><suffix>` (`temp_prefix`; `-pid<PID>-<HOST>.` after
another prefix works too). Two processes therefore never share a temporary name, and a process
killed mid-write leaves something the next run can recognise as abandoned: `sweep_stale`
removes the entries whose owner no longer runs. Entries without an owner in their name (older
tdreward versions, other writers) or owned by another machine are removed only once they are
older than a generous age.

Work that only one process should do at a time (dequantising a model, assembling a GGUF
file, updating a shared index) runs under `file_lock`: an OS-level lock (flock), released by
the kernel when its holder dies, so a crash never leaves a lock held.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger("tdreward")

# Long enough that no live writer (a dequantisation, a LoRA run writing its trainer folder)
# is mistaken for an abandoned one; used only when a name carries no owner we can ask.
STALE_AGE_S = 24 * 3600

_OWNER = re.compile(r"[.-]pid(\d+)-([0-9a-f]{8})\.")
# `<sha>.tmp<PID>` model folders written by tdreward 0.1 (no host in the name).
_LEGACY_PID = re.compile(r"\.tmp(\d+)$")


def host_id() -> str:
    """8 hex digits naming this machine: a pid is only meaningful on the host that owns it
    (caches on a shared home directory are seen by several machines)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def owner_tag() -> str:
    return f"pid{os.getpid()}-{host_id()}"


def temp_prefix(base: str) -> str:
    """Prefix for a temporary entry standing in for `base`: `.<base>.pid<PID>-<HOST>.`"""
    return f".{base}.{owner_tag()}."


def temp_pattern(base: str, suffix: str = ".tmp") -> str:
    """Glob matching the temporary entries of `base` (ours, and atomic_path's older ones)."""
    return f".{glob.escape(base)}.*{suffix}"


def make_temp_dir(parent: str | os.PathLike, base: str, suffix: str = ".tmp") -> Path:
    """A new, empty, uniquely named folder in `parent` (made if needed) owned by this process."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(base), suffix=suffix, dir=parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; what is renamed into place is an ordinary folder
    return tmp


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (signal 0 only checks)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _abandoned(name: str, mtime: float, max_age_s: float) -> bool:
    m = _OWNER.search(name)
    if m and m.group(2) == host_id():
        return not pid_alive(int(m.group(1)))
    if not m and (legacy := _LEGACY_PID.search(name)):
        return not pid_alive(int(legacy.group(1)))
    # Another machine's process, or no owner at all: only the age can tell.
    return time.time() - mtime > max_age_s


def sweep_stale(directory: str | os.PathLike, patterns: Iterable[str],
                max_age_s: float = STALE_AGE_S) -> list[Path]:
    """Remove the entries of `directory` that match one of the glob `patterns` and were left
    by a process that is no longer running (or, without an owner in the name, are older than
    `max_age_s`). Returns what was removed; a missing directory is nothing to sweep."""
    directory = Path(directory)
    patterns = list(patterns)
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for entry in entries:
        if not any(fnmatch.fnmatchcase(entry.name, p) for p in patterns):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # another process swept it first
            continue
        if not _abandoned(entry.name, st.st_mtime, max_age_s):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            # Two sweepers may delete the same folder at once: each ignores what the other
            # already removed; a sweep cut short leaves a name the next sweep matches again.
            shutil.rmtree(path, ignore_errors=True)
        else:
            # Gone already (another sweeper), or not ours to delete (a read-only cache): a
            # sweep only tidies up and never stops the run.
            with contextlib.suppress(OSError):
                path.unlink()
        if not os.path.lexists(path):
            removed.append(path)
    if removed:
        log.info("removed %d abandoned temporary file(s) in %s: %s", len(removed), directory,
                 ", ".join(p.name for p in removed))
    return removed


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, waiting_for: str = "") -> Iterator[None]:
    """Hold an exclusive inter-process lock on `path` (created if needed). Says once, at INFO,
    when it has to wait for another process."""
    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another tdreward process%s (lock %s)",
                 f" {waiting_for}" if waiting_for else "", path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def read_json_dict(path: str | os.PathLike) -> dict:
    """A JSON object from `path`; {} when the file is missing, unreadable or not an object
    (an index is only a shortcut: a damaged one is rebuilt, never a reason to fail)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_json_dict(path: str | os.PathLike, entries: dict) -> None:
    """Add `entries` to the JSON object in `path`: read, merge and replace under a lock, so
    concurrent writers neither drop each other's entries nor leave a half-written file."""
    path = Path(path)
    with file_lock(path.with_name(f".{path.name}.lock")):
        data = read_json_dict(path) | entries
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(path.parent, [temp_pattern(path.name)])
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


__all__ = ["STALE_AGE_S", "file_lock", "host_id", "make_temp_dir", "owner_tag", "pid_alive",
           "read_json_dict", "sweep_stale", "temp_pattern", "temp_prefix", "update_json_dict"]
