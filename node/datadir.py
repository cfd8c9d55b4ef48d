"""The data_dir at start: usable by a node that writes, or already used for the commands that read.

Also the node's private folder for data sets being received (`private_incoming`).

`serve` and `anonymize` create the data_dir if needed and must be able to write
there; every other command reads (or adds an audit record to) an existing store
and never creates a data_dir, a database or a key: on a wrong config they say
that no node has used that data_dir. Every problem is one `DataDirError` whose
message names the folder and says what to do (the CLI prints it as one line).
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

from node import net


class DataDirError(Exception):
    """The data_dir cannot be used; the message names it and what to do."""


def prepare(data_dir: Path) -> None:
    """Create data_dir (0700) if missing and check that this process can write files in it."""
    if data_dir.exists() and not data_dir.is_dir():
        raise DataDirError(f"data_dir {data_dir} is not a folder: point node.data_dir at a folder")
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _probe(data_dir)
    except OSError as exc:
        raise DataDirError(f"data_dir {data_dir} is not usable: {_why(exc)}") from None


def _probe(data_dir: Path) -> None:
    """Write and remove a file: catches a read-only mount and ownership, which access() can miss."""
    probe = data_dir / f".probe-{secrets.token_hex(4)}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    probe.unlink()


def _why(exc: OSError) -> str:
    reason = exc.strerror or type(exc).__name__
    if exc.errno == errno.EROFS:
        return f"{reason}: mount it read-write, or choose another node.data_dir"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (f"{reason}: give the node's user write access to it "
                f"(e.g. chown that user and chmod 700), or choose another node.data_dir")
    if exc.errno == errno.ENOTDIR:
        return f"{reason}: a part of the path is a file, not a folder"
    return f"{reason}: check node.data_dir"


def require_used(data_dir: Path, database: Path, config: Path) -> None:
    """For the commands that read: the node's database must exist already (never created here)."""
    if not database.is_file():
        where = "does not exist" if not data_dir.exists() else f"holds no {database.name}"
        raise DataDirError(f"no node has used data_dir {data_dir} yet (it {where}): check node.data_dir "
                           f"in {config}, or start the node once with `telenode serve`")


def private_incoming(folder: Path) -> None:
    """Received data sets land in data_dir/incoming (0700), not /tmp: originals stay with the node's
    data, on the file system whose free space the node watches, and out of other users' reach. A killed
    node's half-received data sets (never acknowledged, PHI) are removed."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    for leftover in folder.glob("*.dcm"):
        leftover.unlink(missing_ok=True)
    net.use_incoming_dir(folder)
