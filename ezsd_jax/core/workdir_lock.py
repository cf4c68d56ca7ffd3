"""One run per workdir: an fcntl lock file that every entry point takes before any work.

`cli.prepare_workdir` calls `acquire`; a second run on the same workdir stops with one line,
"workdir DIR in use by PID N". The kernel releases the lock when its holder dies, so it is
never stale. Lock files and keys: docs/code-notes.md.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os

log = logging.getLogger(__name__)


class WorkdirInUse(RuntimeError):
    """Another live process holds the workdir's lock."""


_held: dict[str, int] = {}  # lock path -> open fd, for the life of this process


def lock_path(workdir: str, key: str = "") -> str:
    return os.path.join(os.path.abspath(workdir), f".lock.{key}" if key else ".lock")


def acquire(workdir: str, key: str = "") -> str:
    """Takes the workdir's lock for the rest of this process (idempotent); returns the
    lock file's path. Raises WorkdirInUse naming the holder's PID."""
    path = lock_path(workdir, key)
    if path in _held:
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            # a filesystem without flock (some FUSE mounts): run, but say it is unguarded
            os.close(fd)
            log.warning("workdir lock %s not supported here (%s): concurrent runs on "
                        "this workdir are not detected", path, e.strerror)
            return path
        holder = _read_pid(fd)
        os.close(fd)
        who = f"PID {holder}" if holder else "another process"
        raise WorkdirInUse(f"workdir {os.path.dirname(path)} in use by {who} (lock file "
                           f"{path}); wait for it to finish or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[path] = fd
    return path


def release(workdir: str, key: str = "") -> None:
    """Drops the lock early (normally it lasts until the process exits)."""
    fd = _held.pop(lock_path(workdir, key), None)
    if fd is not None:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
