"""Backup of the mapping store while the node runs: SQLite's online backup API into a new file.

The copy is one consistent snapshot (a read transaction over the whole database,
WAL included; writers go on meanwhile), written beside the target under a
temporary name, checked, synced and renamed, so a crash never leaves a half
backup under the target's name. It is created 0600 and never overwrites a file.
The copy holds the originals encrypted only: it is useless without the mapping
keyring, and the pseudonyms of new instances need the pseudonym key; both key
files are backed up separately (README: Backup and restore).
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path


class BackupError(Exception):
    """The backup could not be made; the message names the file."""


@dataclass(frozen=True)
class Backup:
    """What was written."""

    path: Path
    bytes: int
    schema: int
    audit_records: int


def backup(database: Path, output: Path) -> Backup:
    """Copy `database` to `output` (a new file) consistently while other processes write it."""
    if output.exists():
        raise BackupError(f"{output} exists; not overwritten")
    tmp = output.with_name(f".{output.name}.{secrets.token_hex(4)}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # 0600 before any byte
        _copy(database, tmp)
        result = _check(tmp)
        _sync(tmp)
        os.link(tmp, output)  # fails rather than replace a file made meanwhile
        _sync(output.parent)
    except OSError as exc:
        raise BackupError(f"cannot write {output}: {exc.strerror or exc}") from None
    except sqlite3.Error as exc:
        raise BackupError(f"cannot back up {database}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return Backup(output, output.stat().st_size, *result)


def _copy(database: Path, target: Path) -> None:
    source = sqlite3.connect(f"file:{database}?mode=rw", uri=True, timeout=30)  # never creates it
    try:
        copy = sqlite3.connect(target)
        try:
            source.backup(copy)  # all pages in one step: one read transaction, one snapshot
        finally:
            copy.close()
    finally:
        source.close()


def _check(path: Path) -> tuple[int, int]:
    """The copy opens and passes SQLite's quick check; its schema version and audit record count."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
        if verdict != "ok":
            raise sqlite3.DatabaseError(f"the copy fails SQLite's quick check ({verdict})")
        schema = conn.execute("PRAGMA user_version").fetchone()[0]
        audit = conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
        return schema, audit
    finally:
        conn.close()


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
