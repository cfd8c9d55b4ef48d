"""One node per data_dir: the serve process holds an exclusive lock on data_dir/telenode.lock.

Two nodes on one data_dir would share one queue and one spool: both send every
instance, and each deletes spool files the other still needs. `telenode serve`
therefore takes an exclusive `flock` on a lock file in the data_dir for its whole
life and writes its PID there; a second `serve` fails at once naming that PID. The
kernel drops the lock when the process ends however it ends (SIGKILL, power cut
included), so a stale file never blocks a restart. Read commands (status,
reidentify, backup, ...) never take it: they share the store through SQLite.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

LOCK_NAME = "telenode.lock"


class DataDirInUse(Exception):
    """Another process holds the data_dir's lock; the message names the data_dir and its PID."""


class DataDirLock:
    """The held lock; `release()` (or process exit) gives it up."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LOCK_NAME
        self._fd: int | None = None

    def __repr__(self) -> str:
        return f"DataDirLock({str(self.path)!r}, held={self._fd is not None})"

    def acquire(self) -> "DataDirLock":
        """Take the lock or raise DataDirInUse; OSError if the lock file cannot be made (unusable data_dir)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by workers (PEP 446)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise DataDirInUse(f"data_dir {self.path.parent} is in use by another telenode serve "
                               f"(PID {holder}): stop it first, or give this node its own data_dir") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the PID stays in the file; only the flock says whether it is held
            self._fd = None


def _holder(fd: int) -> str:
    """The PID the holder wrote (right after locking, so it may be a moment late: wait up to 1 s)."""
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return text
        time.sleep(0.05)
    return "unknown"

