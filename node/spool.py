"""Durable files: anonymized instances waiting to be forwarded.

A file is written beside its final name (a hidden `.tmp` name in the same
folder, created 0600), flushed and fsynced, renamed into place, and its folder
fsynced — one folder, so one folder fsync covers both entries: after `write` returns, the file
survives a crash or a power cut, and no reader ever sees half a file. Files
fan out over 256 folders by pseudonymous SOP Instance UID so no folder grows
huge. The spool holds only de-identified data; it is still private to the
node's user (0700).

The quarantine holds what the node would not forward: the *original*
instance (it never leaves the hospital) with a JSON reason beside it that
carries no PHI; files 0600 in a 0700 folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

Writer = Callable[[BinaryIO], object]  # what it returns is ignored
FAN_OUT = 256


def fsync_dir(path: Path) -> None:
    """Make the entries of folder `path` (a rename, a new name) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(target: Path, write: Writer, tmp_dir: Path | None = None) -> int:
    """Write `target` all-or-nothing and durably; return its size. The partial file is removed on error."""
    target = Path(target)
    tmp_dir = tmp_dir or target.parent
    tmp = tmp_dir / f".{target.name}.{secrets.token_hex(4)}.tmp"
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
            size = handle.tell()
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return size


def copier(source: str | os.PathLike[str]) -> Writer:
    """A writer that copies `source` in 1 MiB chunks (never the whole file in memory)."""

    def copy(handle: BinaryIO) -> None:
        with open(source, "rb") as original:
            shutil.copyfileobj(original, handle, 1 << 20)

    return copy


class Spool:
    """Anonymized instances on disk under one root folder."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        for fan in range(FAN_OUT):  # once here, not a mkdir per instance
            (self.root / f"{fan:02x}").mkdir(exist_ok=True, mode=0o700)

    def path_for(self, sop_instance_uid: str) -> Path:
        """Where the instance with this (pseudonymous) UID lives."""
        fan = hashlib.sha1(sop_instance_uid.encode("ascii")).hexdigest()[:2]  # FAN_OUT folders
        return self.root / fan / f"{sop_instance_uid}.dcm"

    def write(self, target: Path, write: Writer) -> int:
        """Durably write one instance file; returns its size in bytes."""
        return atomic_write(target, write)

    def remove(self, path: str | os.PathLike[str]) -> None:
        """Delete a forwarded instance (already gone is fine)."""
        Path(path).unlink(missing_ok=True)

    def cleanup_tmp(self) -> int:
        """Remove partial files a crash left behind; returns how many."""
        removed = 0
        for leftover in [*self.root.glob("*/.*.tmp"), *self.root.glob(".tmp/*.tmp")]:  # .tmp/: before 0.2
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed


@dataclass(frozen=True)
class QuarantineEntry:
    """One held instance's reason record (`<id>.json`): why it was held, no PHI. The UIDs are pseudonyms
    (a failed send's or the leak guard's); the held file itself (`<id>.dcm`) may be an original and is
    never read here. `record` is the whole JSON record as written (kinds add their own detail)."""

    id: str
    time: str = ""
    kind: str = ""
    reason: str = ""
    calling_aet: str = ""
    destination: str = ""
    sop_instance_uid: str = ""
    record: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> QuarantineEntry:
        return cls(id=record["id"], time=record.get("time", ""), kind=record.get("kind", ""),
                   reason=record.get("reason", ""), calling_aet=record.get("calling_aet", ""),
                   destination=record.get("destination", ""), sop_instance_uid=record.get("sop_instance_uid", ""),
                   record=dict(record))

    def as_dict(self) -> dict[str, Any]:
        """The record as written (`quarantine list --json`, `quarantine show`, a retried send's queue row)."""
        return dict(self.record)


class Quarantine:
    """Originals held back: `<id>.dcm` (the instance as received) and `<id>.json` (why, no PHI)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)

    def put(self, source: str | os.PathLike[str], reason: dict) -> str:
        """Durably keep a copy of `source` with its reason; returns the quarantine ID."""
        qid = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)
        atomic_write(self.root / f"{qid}.dcm", copier(source))
        record = {"id": qid, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **reason}
        atomic_write(self.root / f"{qid}.json", lambda h: h.write(json.dumps(record, sort_keys=True).encode()))
        return qid

    def entries(self) -> list[QuarantineEntry]:
        """Every quarantined instance's reason record, oldest first."""
        return [QuarantineEntry.from_record(json.loads(p.read_text())) for p in sorted(self.root.glob("*.json"))]

    def count(self) -> int:
        return sum(1 for _ in self.root.glob("*.json"))

    def get(self, qid: str) -> QuarantineEntry | None:
        """One entry's reason record, or None (IDs are file names: nothing outside the folder is read)."""
        if not qid or "/" in qid or qid.startswith("."):
            return None
        path = self.root / f"{qid}.json"
        return QuarantineEntry.from_record(json.loads(path.read_text())) if path.is_file() else None

    def file(self, qid: str) -> Path:
        return self.root / f"{qid}.dcm"

    def remove(self, qid: str) -> None:
        """Forget an entry once it was released (the instance went on its way)."""
        self.file(qid).unlink(missing_ok=True)
        (self.root / f"{qid}.json").unlink(missing_ok=True)
