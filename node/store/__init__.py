"""The mapping store: originals ↔ pseudonyms, the forwarding queue and the audit trail, in SQLite.

`Store` is the one object the rest of telenode uses; it wires the parts, each
in its own module, around one database core:

    db.py            the connection, its lock, transactions (group commit), commit hooks
    schema.py        the migrations, an ordered list run forward on open (PRAGMA user_version)
    mappings.py      originals ↔ pseudonyms, sealed by the mapping keyring (format: node/keys.py)
    queue.py         the forwarding queue (pseudonyms only)
    destinations.py  per-destination state: paused, last destination-wide error
    trail.py         the hash-chained audit trail (node/audit.py) and its external copies
    rotation.py      mapping key rotation

A copy of the database file alone reveals no identity: originals are stored
only encrypted, under a key kept in another file. The queue and the audit trail
hold pseudonyms only. A method that spans parts (recording an instance and
queueing it, marking rows sent) runs them in one transaction here.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from node import audit as chain
from node import log
from node.deid.record import DeidRecord
from node.keys import Keyring
from node.store.db import Database, iso, now
from node.store.destinations import Destinations
from node.store.mappings import ENCRYPTED, Mappings
from node.store.queue import FAILED, INFLIGHT, PENDING, REQUEUED, SENT, Queue, QueueRow
from node.store.rotation import Rotation
from node.store.schema import SCHEMA_VERSION, migrate
from node.store.trail import Trail, sinks

__all__ = ["ENCRYPTED", "FAILED", "INFLIGHT", "PENDING", "REQUEUED", "SCHEMA_VERSION", "SENT", "QueueRow", "Store",
           "empty_status"]


class Store:
    """SQLite-backed mappings, queue and audit for one node."""

    def __init__(self, path: str | os.PathLike[str], mapping_key: str | os.PathLike[str] | None = None, *,
                 audit_file: str | os.PathLike[str] | None = None, audit_syslog: str = "") -> None:
        """Open (create, migrate) the database at `path`; originals are sealed with the keyring file
        `mapping_key` (default: mapping.key beside the database, created 0600). Raises KeyFileError
        if the keyring is group/world accessible or malformed."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.ring = Keyring(Path(mapping_key) if mapping_key else self.path.parent / "mapping.key")
        copies = sinks(audit_file, audit_syslog)
        self.core = Database(self.path)
        self.db = self.core.db  # sqlite_utils.Database, for tests and tools that read tables directly
        self._lock = self.core.lock
        self.trail = Trail(self.core, copies)
        self.mappings = Mappings(self.core, self.ring, self.trail)
        self.queue = Queue(self.core)
        self.destinations = Destinations(self.core)
        self.rotation = Rotation(self.core, self.ring)
        migrate(self.core, self.ring)
        self._warn_new_key()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    def _warn_new_key(self) -> None:
        """A keyring just created for a store that has mappings: wrong mapping_key_file, or a lost key."""
        if self.ring.created and self.db.execute("SELECT 1 FROM patients LIMIT 1").fetchone():
            log.get("store").warning("mapping_key_created_for_existing_store", keyring=str(self.ring.path),
                                     consequence="originals recorded before cannot be re-identified with it")

    def _seal(self, table: str, column: str, key: str, value: str | None) -> bytes | None:
        """An original as stored (node/keys.py owns the format); kept for tools and tests."""
        return self.ring.seal(table, column, key, value)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """One transaction (one commit, one fsync) around several calls: group commit."""
        with self.core.write():
            yield

    def close(self) -> None:
        self.core.close()
        self.trail.close()

    # -- mappings -------------------------------------------------------------------------------

    def record_mapping(self, record: DeidRecord, *, source: str, calling_aet: str = "", priority: int = 0) -> None:
        """Record the original ↔ pseudonym pairs of one instance and its audit line (one commit)."""
        with self.core.write():
            self.mappings.record(record, source=source, calling_aet=calling_aet, priority=priority)

    def record_instance(
        self,
        record: DeidRecord,
        *,
        calling_aet: str,
        path: str,
        size: int,
        transfer_syntax: str,
        destinations: Sequence[str],
        priority: int = 0,
    ) -> None:
        """Record mappings and queue the spooled file for every destination, in one durable commit."""
        with self.core.write():
            self.mappings.record(record, source="scp", calling_aet=calling_aet, priority=priority)
            self.queue.enqueue(destinations, pseudo_sop_instance_uid=record.pseudo_sop_instance_uid,
                               sop_class_uid=record.sop_class_uid, path=path, size=size,
                               transfer_syntax=transfer_syntax, priority=priority)

    def lookup(self, pseudonym: str) -> dict[str, Any] | None:
        """The originals behind a pseudonymous PatientID, AccessionNumber or UID; None if unknown."""
        return self.mappings.lookup(pseudonym)

    # -- mapping keys ---------------------------------------------------------------------------

    def key_usage(self) -> dict[str, int]:
        """How many stored originals each mapping key id (hex) encrypts."""
        return self.rotation.usage()

    def rotate_mapping_key(self, batch: int = 500) -> dict[str, Any]:
        """Put a new mapping key first in the ring, re-encrypt every original under it in short
        transactions (the node keeps writing in between), then drop the keys no row uses any more."""
        return self.rotation.rotate(batch)

    # -- audit ----------------------------------------------------------------------------------

    def audit(self, event: str, **detail: Any) -> None:
        """Append one audit record (pseudonyms and operator facts only, never originals)."""
        self.trail.record(event, detail)

    def audit_log(self, event: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """The last `limit` records (all by default), oldest first, as {id, time, event, detail, hash}."""
        return self.trail.log(event, limit)

    def verify_audit(self) -> chain.Verdict:
        """Walk the hash chain from the first record; the first broken link or edited record, if any."""
        return self.trail.verify()

    def audit_records(self, event: str | None = None) -> list[dict[str, Any]]:
        return self.trail.records(event)

    # -- queue ----------------------------------------------------------------------------------

    def claim_batch(self, destination: str, limit: int) -> list[QueueRow]:
        """Take due pending rows of one destination (highest priority first, then oldest) and mark them
        in flight, so that parallel workers never send the same row twice."""
        return self.queue.claim(destination, limit)

    def release(self, ids: Iterable[int], delay: float = 0.0) -> None:
        """Put in-flight rows back in the queue, due after `delay` (a transient problem, not counted)."""
        self.queue.release(ids, delay)

    def recover(self) -> int:
        """At start: rows a killed node left in flight go back to pending (sent at least once, never lost)."""
        return self.queue.recover()

    def next_due(self, destination: str) -> float | None:
        """When the earliest pending row of a destination becomes due (epoch seconds)."""
        return self.queue.next_due(destination)

    def higher_priority_waiting(self, destination: str, priority: int) -> bool:
        """Whether a due row of higher priority than `priority` waits for this destination (STAT)."""
        return self.queue.higher_priority_waiting(destination, priority)

    def mark_sent(self, ids: Iterable[int]) -> list[str]:
        """Mark rows sent; return the spool paths no destination still needs (safe to delete)."""
        ids = list(ids)
        if not ids:
            return []
        with self.core.write():
            unneeded = self.queue.mark_sent(ids)
            self.destinations.clear_errors_of_rows(ids)
            return unneeded

    def mark_retry(self, row_id: int, error: str, delay: float, *, failure: bool) -> None:
        """Try again after `delay` seconds; `failure` counts a refusal of this instance by the remote."""
        self.queue.mark_retry(row_id, error, delay, failure=failure)

    def mark_failed(self, row_id: int, error: str) -> list[str]:
        """Give up on one row: the remote refused it permanently. Returns spool paths no longer needed."""
        return self.queue.mark_failed(row_id, error)

    def failed_row(self, row_id: int) -> QueueRow | None:
        """One queue row by id (None if there is none)."""
        return self.queue.row(row_id)

    def requeue(self, destination: str, record: Mapping[str, Any] | QueueRow) -> None:
        """Queue a file again for one destination (quarantine retry), as a new pending row; the failed
        row it replaces (record["queue_id"]) becomes 'requeued', so status no longer counts it failed."""
        self.queue.requeue(destination, record)

    def enqueue(self, destinations: Sequence[str], *, key: str, sop_class_uid: str, transfer_syntax: str,
                path: str, size: int, priority: int = 0) -> None:
        """Queue one spooled file that is not an outbound de-identified instance (the return path's
        re-identified results and HL7 reports) under `key` (a pseudonym or reader-minted UID, never an
        original). A row still pending for the same destination and key is updated: one send."""
        self.queue.enqueue_file(destinations, key=key, sop_class_uid=sop_class_uid, transfer_syntax=transfer_syntax,
                           path=path, size=size, priority=priority)

    def prune_sent(self, before: float, batch: int = 5000) -> int:
        """Delete the queue rows of instances delivered before `before` (epoch seconds), `batch` rows
        per transaction (the workers' commits wait for none longer than that); audited with the count.
        Mappings and the audit trail are never pruned."""
        count = self.queue.prune_sent(before, batch)
        if count:
            self.audit("queue_pruned", rows=count, sent_before=iso(before))
        return count

    # -- destinations ---------------------------------------------------------------------------

    def note_error(self, destination: str, error: str) -> None:
        """Remember a destination-wide problem (remote down, refusing associations), for `status`."""
        self.destinations.note_error(destination, error)

    def set_paused(self, destination: str, paused: bool) -> None:
        """Pause or resume one destination's queue (instances keep being accepted and queued)."""
        self.destinations.set_paused(destination, paused)

    def is_paused(self, destination: str) -> bool:
        return self.destinations.is_paused(destination)

    def status(self) -> dict[str, dict[str, Any]]:
        """Per destination: pending, in-flight, sent and failed counts, oldest waiting age, last error, paused."""
        current = now()
        result: dict[str, dict[str, Any]] = {}

        def entry(name: str) -> dict[str, Any]:
            return result.setdefault(name, empty_status())

        with self.core.read():
            for destination, state, count, oldest in self.queue.counts():
                row = entry(destination)
                row[state] = count
                if state in (PENDING, INFLIGHT):
                    age = round(current - oldest, 1)
                    row["oldest_pending_age_s"] = max(row["oldest_pending_age_s"] or 0, age)
            for destination, error in self.queue.last_errors():
                entry(destination)["last_error"] = error
            for name, paused, problem in self.destinations.states():
                row = entry(name)
                row["paused"] = bool(paused)
                if problem:  # a destination-wide problem is the news: it explains every waiting row
                    row["last_error"] = problem
        return result


def empty_status() -> dict[str, Any]:
    """One destination's status with nothing queued."""
    return {PENDING: 0, INFLIGHT: 0, SENT: 0, FAILED: 0, "oldest_pending_age_s": None, "last_error": None,
            "paused": False}
