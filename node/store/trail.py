"""The audit trail in the store: hash-chained records (node/audit.py) and their external copies.

Records hold pseudonyms and operator facts only, never originals. A record is
appended inside the write transaction of the act it records, and the chain head
is read inside that transaction (several processes write one trail), never
cached. The configured copies (a JSON-lines file, syslog) get the records of a
transaction only after it committed; a rollback forgets them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from node import audit as chain
from node.store.db import Database, iso, now


class Trail:
    """Append, read and verify the `audit` table."""

    def __init__(self, core: Database, sinks: Sequence[chain.Sink]) -> None:
        self.core = core
        self.sinks = list(sinks)
        self._unsent: list[dict[str, Any]] = []  # records of the open transaction, for the sinks
        core.on_commit(self._committed)
        core.on_rollback(self._unsent.clear)

    def __repr__(self) -> str:
        return f"Trail({str(self.core.path)!r})"

    def _committed(self) -> None:
        records, self._unsent[:] = list(self._unsent), []
        if self.sinks and records:
            chain.emit(self.sinks, records)

    def append(self, event: str, detail: dict[str, Any]) -> None:
        """Append one chained record; must run inside a write transaction."""
        assert self.core.in_transaction, "audit records are chained inside a write transaction"
        head = self.core.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
        record_id, prev = (head[0] + 1, head[1] or chain.GENESIS) if head else (1, chain.GENESIS)
        when, text = iso(now()), json.dumps(detail, sort_keys=True)
        digest = chain.chain_hash(prev, record_id, when, event, text)
        self.core.execute("INSERT INTO audit (id, time, event, detail, prev, hash) VALUES (?, ?, ?, ?, ?, ?)",
                          [record_id, when, event, text, prev, digest])
        if self.sinks:
            self._unsent.append({"id": record_id, "time": when, "event": event, "detail": detail,
                                 "prev": prev, "hash": digest})

    def record(self, event: str, detail: dict[str, Any]) -> None:
        """Append one record in its own transaction (or the caller's)."""
        with self.core.write():
            self.append(event, detail)

    def log(self, event: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """The last `limit` records (all by default), oldest first, as {id, time, event, detail, hash}."""
        with self.core.read():
            rows = self.core.execute(
                "SELECT id, time, event, detail, hash FROM audit WHERE ? IS NULL OR event = ? ORDER BY id DESC "
                "LIMIT ?", [event, event, -1 if limit is None else limit]).fetchall()
        return [{"id": r[0], "time": r[1], "event": r[2], "detail": json.loads(r[3]), "hash": r[4]}
                for r in reversed(rows)]

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        """Every record (of one event), oldest first, with its detail merged in."""
        with self.core.read():
            rows = self.core.execute(
                "SELECT id, time, event, detail FROM audit WHERE ? IS NULL OR event = ? ORDER BY id", [event, event]
            ).fetchall()
        return [{"id": r[0], "time": r[1], "event": r[2], **json.loads(r[3])} for r in rows]

    def verify(self) -> chain.Verdict:
        """Walk the hash chain from the first record; the first broken link or edited record, if any."""
        with self.core.read():
            rows = self.core.execute("SELECT id, time, event, detail, prev, hash FROM audit ORDER BY id")
            return chain.verify(rows, self._id_of)

    def _id_of(self, digest: str) -> int | None:
        row = self.core.execute("SELECT id FROM audit WHERE hash = ? LIMIT 1", [digest]).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def sinks(audit_file: str | os.PathLike[str] | None, audit_syslog: str) -> list[chain.Sink]:
    """The external copies configured for the trail (ValueError for a bad syslog address)."""
    return chain.sinks(Path(audit_file) if audit_file else None, audit_syslog)
