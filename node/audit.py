"""The audit trail's hash chain, its verification, and its copies outside the database (file, syslog).

Each audit record stores `hash` = SHA-256(prev + "\\n" + canonical content),
where `prev` is the hash of the record before it (64 zeros for the first) and
the canonical content is the compact JSON array [id, time, event, detail] with
detail exactly as stored (JSON, sorted keys). Editing, deleting, inserting or
reordering a record breaks the chain from that record on; `verify` names the
first bad record. Whoever can write the database could recompute the whole
chain after the record they change: the copies sent to a JSON-lines file and
to syslog as each record is committed are the outside anchor (compare their
last hash with `telenode audit verify`'s head).

Records hold pseudonyms and operator facts only, never original values.
IHE ATNA / RFC 3881 DICOM audit messages (PS3.15 A.5) are not produced yet.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from node import log

GENESIS = "0" * 64

#: RFC 5424 PRI for facility authpriv (10), severity notice (5).
SYSLOG_PRI = 10 * 8 + 5


def canonical(record_id: int, when: str, event: str, detail: str) -> bytes:
    """The bytes a record's hash covers besides the previous hash."""
    return json.dumps([record_id, when, event, detail], separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def chain_hash(prev: str, record_id: int, when: str, event: str, detail: str) -> str:
    return hashlib.sha256(prev.encode("ascii") + b"\n" + canonical(record_id, when, event, detail)).hexdigest()


@dataclass
class Verdict:
    """The result of checking a chain: how many records, the head hash, and the first problem."""

    count: int
    head: str
    bad_id: int | None = None
    problem: str = ""

    @property
    def intact(self) -> bool:
        return self.bad_id is None


def verify(rows: Iterable[tuple[int, str, str, str, str | None, str | None]],
           find: Callable[[str], int | None]) -> Verdict:
    """Check (id, time, event, detail, prev, hash) rows in id order (streamed); stop at the first bad
    record. `find(hash)` names the record holding a hash, to tell a reordering from a deletion."""
    expected_prev, last_id, count = GENESIS, 0, 0
    for record_id, when, event, detail, prev, digest in rows:
        if record_id != last_id + 1:
            missing = f"record {last_id + 1}" if record_id == last_id + 2 else f"records {last_id + 1}-{record_id - 1}"
            return Verdict(count, expected_prev, record_id, f"{missing} missing before it (deleted)")
        if prev != expected_prev:
            after = find(prev) if prev else None
            if after is not None:
                return Verdict(count, expected_prev, record_id,
                               f"out of order: it was written after record {after} (reordered)")
            return Verdict(count, expected_prev, record_id,
                           f"does not follow record {last_id} (a record before it was deleted or inserted)")
        if digest != chain_hash(prev, record_id, when, event, detail):
            return Verdict(count, expected_prev, record_id, "content does not match its hash (edited)")
        expected_prev, last_id, count = digest, record_id, count + 1
    return Verdict(count, expected_prev)


class Sink(Protocol):
    def emit(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonLinesFile:
    """Appends each committed record as one JSON line to a file created 0600 (for a SIEM)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with contextlib.suppress(OSError):  # an existing file keeps its owner; make it private too
            os.fchmod(self._fd, 0o600)

    def emit(self, record: dict[str, Any]) -> None:
        os.write(self._fd, (json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))

    def close(self) -> None:
        os.close(self._fd)


class Syslog:
    """Sends each committed record to syslog: RFC 5424 header, the record as JSON for the message.

    `address`: a local socket path ("/dev/log") or "host:port" (UDP, RFC 5426). The name is resolved
    once, here, and the socket never blocks: records are copied on the C-STORE path, and a hung
    syslog daemon (full queue) or a slow DNS must not stall receiving — a record that cannot be
    sent at once is dropped and logged (the database is the record).
    """

    def __init__(self, address: str) -> None:
        if address.startswith("/"):
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._target: Any = address
        else:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"audit_syslog must be a socket path or host:port, not {address!r}")
            try:
                family, kind, proto, _, target = socket.getaddrinfo(host.strip("[]"), int(port),
                                                                    type=socket.SOCK_DGRAM)[0]
            except OSError as exc:
                raise ValueError(f"cannot resolve {host!r} ({exc.strerror or exc})") from None
            self._sock = socket.socket(family, kind, proto)
            self._target = target
        self._sock.setblocking(False)
        self._host = socket.gethostname() or "-"

    def emit(self, record: dict[str, Any]) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        message = (f"<{SYSLOG_PRI}>1 {stamp} {self._host} telenode {os.getpid()} {record['event'][:32]} - "
                   f"{json.dumps(record, sort_keys=True)}")
        self._sock.sendto(message.encode("utf-8"), self._target)

    def close(self) -> None:
        self._sock.close()


def sinks(audit_file: Path | None, audit_syslog: str) -> list[Sink]:
    """The configured outside copies of the audit trail (none by default)."""
    found: list[Sink] = []
    if audit_file is not None:
        found.append(JsonLinesFile(audit_file))
    if audit_syslog:
        found.append(Syslog(audit_syslog))
    return found


def emit(targets: Iterable[Sink], records: Iterable[dict[str, Any]]) -> None:
    """Copy committed records to every sink; a failing sink is logged, never fatal (the database is the record)."""
    for record in records:
        for target in targets:
            try:
                target.emit(record)
            except OSError as exc:
                log.get("audit").warning("audit_copy_failed", sink=type(target).__name__,
                                         reason=exc.strerror or type(exc).__name__, audit_id=record.get("id"))
