"""One writer per output dir: an OS file lock beside the dir (``.NAME.lock``, via filelock).

A command takes the lock before it changes anything in its output dir and keeps it until its output
is complete; a second process that wants the same dir meanwhile gets a one-line error naming the
holder's pid. The lock is the operating system's (flock), so one left by a killed process is free
again at once: there is no stale lock to clean up. Taking a lock the process already holds is a
no-op, so `lowrank run` and the stages it calls in-process can each take theirs.
"""

from __future__ import annotations

import os
from pathlib import Path

from lowrank.errors import UserError

_held: dict[Path, object] = {}


def lock_path(out_dir) -> Path:
    """The lock file of ``out_dir``: a hidden sibling, since the dir itself may be replaced (--overwrite)."""
    out = Path(out_dir).expanduser().absolute()
    return out.parent / f".{out.name}.lock"


def _pid_file(lock: Path) -> Path:
    # The holder's pid lives in a file of its own: opening the lock file truncates it, also for a
    # process whose attempt then fails.
    return lock.with_name(lock.name + ".pid")


def hold(out_dir) -> None:
    """Take the lock of ``out_dir`` for this process (until :func:`release`), or raise UserError."""
    import filelock

    path = lock_path(out_dir)
    if path in _held:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(path), timeout=0)
        lock.acquire()
    except filelock.Timeout:
        holder = "unknown pid"
        try:
            holder = f"pid {int(_pid_file(path).read_text().strip())}"
        except (OSError, ValueError):
            pass
        raise UserError(f"{Path(out_dir).expanduser()} is in use by another lowrank process ({holder}); wait for it "
                        "to finish or choose another output dir") from None
    except OSError as e:
        raise UserError(f"{path.parent}: cannot create the lock of the output dir ({e.strerror})") from None
    _held[path] = lock
    try:
        _pid_file(path).write_text(f"{os.getpid()}\n")
    except OSError:
        pass  # the pid only improves the message another process prints


def _drop(path: Path) -> None:
    lock = _held.pop(path, None)
    if lock is not None:
        _pid_file(path).unlink(missing_ok=True)
        lock.release()


def release(out_dir) -> None:
    """Give up the lock of ``out_dir`` if this process holds it."""
    _drop(lock_path(out_dir))


def release_all() -> None:
    for path in list(_held):
        _drop(path)
