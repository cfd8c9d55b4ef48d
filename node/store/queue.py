"""The forwarding queue: one row per spooled instance and destination, pseudonyms only.

A row is pending (waiting, due at `due`), inflight (claimed by a sender), sent,
failed (refused for good; its file went to the quarantine) or requeued (a failed
row released from the quarantine and replaced by a new pending row). Claiming
marks rows in flight in the same transaction, so parallel senders never send one
row twice; a killed node's in-flight rows go back to pending at start.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from node.store.db import Database, now

PENDING, INFLIGHT, SENT, FAILED = "pending", "inflight", "sent", "failed"
REQUEUED = "requeued"  # a failed row released from the quarantine: replaced by a new pending row


@dataclass(frozen=True)
class QueueRow:
    """One queue row as the senders see it. Pseudonyms only (the pseudonymous SOP Instance UID, or a
    reader-minted key on the return path; a spool path named after it): no original, so repr shows all."""

    id: int
    destination: str
    pseudo_sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: str
    size: int
    priority: int = 0
    attempts: int = 0
    failures: int = 0
    status: str = PENDING
    due: float = 0.0
    created: float = 0.0
    updated: float = 0.0
    last_error: str | None = None

    @classmethod
    def from_columns(cls, names: Sequence[str], values: Sequence[Any]) -> QueueRow:
        """A row from a `SELECT *` result (columns this record does not know are left out)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{n: v for n, v in zip(names, values, strict=True) if n in known})


def _marks(ids: Sequence[Any]) -> str:
    return ",".join("?" * len(ids))


class Queue:
    """The `queue` table."""

    def __init__(self, core: Database) -> None:
        self.core = core

    def __repr__(self) -> str:
        return f"Queue({str(self.core.path)!r})"

    def enqueue(self, destinations: Sequence[str], *, pseudo_sop_instance_uid: str, sop_class_uid: str,
                path: str, size: int, transfer_syntax: str, priority: int) -> None:
        """Queue one spooled file for each destination (caller's transaction); a resend while still
        queued updates the pending row: one send (of the file as now spooled) is enough."""
        when = now()
        for destination in destinations:
            pending = self.core.execute(
                "SELECT id FROM queue WHERE destination = ? AND pseudo_sop_instance_uid = ? AND status = ?",
                [destination, pseudo_sop_instance_uid, PENDING],
            ).fetchone()
            if pending:
                self.core.execute(
                    "UPDATE queue SET priority = MAX(priority, ?), size = ?, transfer_syntax = ?, path = ?, "
                    "sop_class_uid = ?, updated = ? WHERE id = ?",
                    [priority, size, transfer_syntax, path, sop_class_uid, when, pending[0]])
                continue
            self._insert(destination, pseudo_sop_instance_uid=pseudo_sop_instance_uid, sop_class_uid=sop_class_uid,
                         transfer_syntax=transfer_syntax, path=path, size=size, priority=priority)

    def _insert(self, destination: str, **row: Any) -> None:
        when = now()
        self.core.db.table("queue").insert({
            "destination": destination, **row, "status": PENDING, "attempts": 0, "failures": 0,
            "due": when, "created": when, "updated": when, "last_error": None,
        })

    def claim(self, destination: str, limit: int) -> list[QueueRow]:
        """Take due pending rows of one destination (highest priority first, then oldest), in flight."""
        with self.core.write():
            cursor = self.core.execute(
                "SELECT * FROM queue WHERE destination = ? AND status = ? AND due <= ? "
                "ORDER BY priority DESC, id ASC LIMIT ?",
                [destination, PENDING, now(), limit],
            )
            names = [d[0] for d in cursor.description]
            found = [QueueRow.from_columns(names, row) for row in cursor.fetchall()]
            if found:
                when = now()
                self.core.execute(f"UPDATE queue SET status = ?, updated = ? WHERE id IN ({_marks(found)})",
                                  [INFLIGHT, when, *[r.id for r in found]])
                found = [dataclasses.replace(r, status=INFLIGHT, updated=when) for r in found]
        return found

    def release(self, ids: Iterable[int], delay: float = 0.0) -> None:
        """Put in-flight rows back in the queue, due after `delay` (a transient problem, not counted)."""
        ids = list(ids)
        if ids:
            with self.core.write():
                self.core.execute(f"UPDATE queue SET status = ?, due = ?, updated = ? WHERE id IN ({_marks(ids)}) "
                                  f"AND status = ?", [PENDING, now() + delay, now(), *ids, INFLIGHT])

    def recover(self) -> int:
        """At start: rows a killed node left in flight go back to pending (sent at least once, never lost)."""
        with self.core.write():
            return self.core.execute("UPDATE queue SET status = ? WHERE status = ?", [PENDING, INFLIGHT]).rowcount

    def next_due(self, destination: str) -> float | None:
        """When the earliest pending row of a destination becomes due (epoch seconds)."""
        with self.core.read():
            row = self.core.execute("SELECT MIN(due) FROM queue WHERE destination = ? AND status = ?",
                                    [destination, PENDING]).fetchone()
        return row[0] if row else None

    def higher_priority_waiting(self, destination: str, priority: int) -> bool:
        """Whether a due row of higher priority than `priority` waits for this destination (STAT)."""
        with self.core.read():
            row = self.core.execute("SELECT 1 FROM queue WHERE destination = ? AND status = ? AND priority > ? "
                                    "AND due <= ? LIMIT 1", [destination, PENDING, priority, now()]).fetchone()
        return row is not None

    def mark_sent(self, ids: list[int]) -> list[str]:
        """Mark rows sent (caller's transaction); return the spool paths no destination still needs."""
        self.core.execute(f"UPDATE queue SET status = ?, updated = ?, last_error = NULL WHERE id IN ({_marks(ids)})",
                          [SENT, now(), *ids])
        return self.unneeded(ids)

    def unneeded(self, ids: list[int]) -> list[str]:
        """Spool paths of these rows that no pending or in-flight row still needs (safe to delete)."""
        rows = self.core.execute(
            f"SELECT DISTINCT q.path FROM queue q WHERE q.id IN ({_marks(ids)}) AND NOT EXISTS (SELECT 1 FROM queue p "
            f"WHERE p.path = q.path AND p.status IN (?, ?))", [*ids, PENDING, INFLIGHT]).fetchall()
        return [r[0] for r in rows]

    def mark_retry(self, row_id: int, error: str, delay: float, *, failure: bool) -> None:
        """Try again after `delay` seconds; `failure` counts a refusal of this instance by the remote."""
        with self.core.write():
            self.core.execute(
                "UPDATE queue SET status = ?, attempts = attempts + 1, failures = failures + ?, due = ?, "
                "updated = ?, last_error = ? WHERE id = ?",
                [PENDING, 1 if failure else 0, now() + delay, now(), error, row_id])

    def mark_failed(self, row_id: int, error: str) -> list[str]:
        """Give up on one row: the remote refused it permanently. Returns spool paths no longer needed."""
        with self.core.write():
            self.core.execute(
                "UPDATE queue SET status = ?, attempts = attempts + 1, failures = failures + 1, updated = ?, "
                "last_error = ? WHERE id = ?", [FAILED, now(), error, row_id])
            return self.unneeded([row_id])

    def row(self, row_id: int) -> QueueRow | None:
        """One row by id, whatever its state (None if there is none)."""
        with self.core.read():
            cursor = self.core.execute("SELECT * FROM queue WHERE id = ?", [row_id])
            row = cursor.fetchone()
            return QueueRow.from_columns([d[0] for d in cursor.description], row) if row else None

    def requeue(self, destination: str, record: Mapping[str, Any] | QueueRow) -> None:
        """Queue a file again for one destination (quarantine retry), as a new pending row; the failed
        row it replaces (record["queue_id"]) becomes 'requeued', so status no longer counts it failed.
        A QueueRow is taken as a plain record (it has no queue_id: no row is marked requeued)."""
        if isinstance(record, QueueRow):
            record = dataclasses.asdict(record)
        with self.core.write():
            if record.get("queue_id"):
                self.core.execute("UPDATE queue SET status = ?, updated = ? WHERE id = ? AND status = ?",
                                  [REQUEUED, now(), record["queue_id"], FAILED])
            self._insert(destination, pseudo_sop_instance_uid=record["pseudo_sop_instance_uid"],
                         sop_class_uid=record["sop_class_uid"], transfer_syntax=record["transfer_syntax"],
                         path=record["path"], size=record["size"], priority=record.get("priority", 0))

    def enqueue_file(self, destinations: Sequence[str], *, key: str, sop_class_uid: str, transfer_syntax: str,
                path: str, size: int, priority: int = 0) -> None:
        """Queue one spooled file under `key` for each destination; a row still pending for the same
        destination and key is updated instead, so it is sent once."""
        with self.core.write():
            for destination in destinations:
                updated = self.core.execute(
                    "UPDATE queue SET priority = MAX(priority, ?), size = ?, transfer_syntax = ?, path = ?, "
                    "sop_class_uid = ?, updated = ? WHERE destination = ? AND pseudo_sop_instance_uid = ? "
                    "AND status = ?", [priority, size, transfer_syntax, path, sop_class_uid, now(), destination,
                                       key, PENDING]).rowcount
                if not updated:
                    self._insert(destination, pseudo_sop_instance_uid=key, sop_class_uid=sop_class_uid,
                                 transfer_syntax=transfer_syntax, path=path, size=size, priority=priority)

    def prune_sent(self, before: float, batch: int) -> int:
        """Delete rows sent before `before`, `batch` per transaction; returns how many."""
        count = 0
        while True:
            with self.core.write():
                done = self.core.execute("DELETE FROM queue WHERE id IN (SELECT id FROM queue WHERE status = ? "
                                         "AND updated < ? LIMIT ?)", [SENT, before, batch]).rowcount
            count += done
            if done < batch:
                return count

    def counts(self) -> list[tuple[str, str, int, float]]:
        """(destination, status, rows, oldest created) for every status but requeued."""
        with self.core.read():
            return self.core.execute(
                "SELECT destination, status, COUNT(*), MIN(created) FROM queue WHERE status != ? "
                "GROUP BY destination, status", [REQUEUED]).fetchall()

    def last_errors(self) -> list[tuple[str, str]]:
        """(destination, last_error) of each destination's newest row that still has an error to show."""
        with self.core.read():
            return self.core.execute(
                "SELECT destination, last_error FROM queue WHERE id IN (SELECT MAX(id) FROM queue "
                "WHERE last_error IS NOT NULL AND status NOT IN (?, ?) GROUP BY destination)", [SENT, REQUEUED]
            ).fetchall()
