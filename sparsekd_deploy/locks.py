"""One run per output directory: ``with dir_lock(out): ...`` holds ``<out>.lock`` for the duration.

The lock file is created atomically (O_CREAT|O_EXCL) next to the directory — not inside it, because outputs are
assembled in ``<out>.partial`` and renamed over ``<out>``. It records the holder's pid, host and start time, so a
second run is told who holds it. A lock left by a run that died (its pid is gone on this host) is reported as
stale, never silently taken: the user removes it once sure no other run uses the directory.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import SparseKDError


class LockError(SparseKDError):
    """The output directory is locked by another run (live, stale or on another host)."""


def lock_path(path: str | Path) -> Path:
    """The lock file of an output directory: ``<dir>.lock`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (one of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_error(lock: Path, target: Path) -> LockError:
    try:
        holder = json.loads(lock.read_text())
        pid, host, since = int(holder["pid"]), str(holder["host"]), str(holder["started"])
    except (OSError, ValueError, KeyError, TypeError):
        return LockError(f"{target} is locked by {lock}, which does not say who holds it (a run starting right now, "
                         f"or one that crashed while creating it); remove {lock} if no other run uses {target}")
    if host != socket.gethostname():
        return LockError(f"{target} is in use by pid {pid} on host {host} since {since} (cannot check that host from "
                         f"here); remove {lock} if no other run uses it")
    if not pid_alive(pid):
        return LockError(f"{target}: stale lock from pid {pid} (dead) since {since}; remove {lock} if no other run "
                         "uses it")
    return LockError(f"{target} is in use by pid {pid} since {since} (lock {lock}); wait for that run to finish or "
                     "choose another output directory")


@contextmanager
def dir_lock(path: str | Path) -> Iterator[Path]:
    """Hold the lock of output directory ``path`` (its parent is created if needed); yields the lock file.

    Raises ``LockError`` naming the holder's pid and start time when another run holds it, or saying the lock is
    stale when that pid is dead on this host. The lock is removed on exit (also on an exception), and only if it is
    still this holder's.
    """
    target = Path(path)
    lock = lock_path(target)
    lock.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "token": token}
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise _holder_error(lock, target) from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record) + "\n")
    except BaseException:
        lock.unlink(missing_ok=True)  # a half-written lock would block the next run for nothing
        raise
    try:
        yield lock
    finally:
        try:
            mine = json.loads(lock.read_text()).get("token") == token
        except (OSError, ValueError, AttributeError):
            mine = False
        if mine:
            lock.unlink(missing_ok=True)
