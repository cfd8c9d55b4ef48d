"""Study batches: which queued instances travel together, when a batch is complete, its manifest.

A batch is one study's instances that arrived before the study went quiet for
`[studies] stable_seconds`; instances of the same study that arrive later form a
new batch with its own id and manifest. Only the queue rows of destinations of
other kinds (dicomweb, s3, azure) are batched: their objects are laid out by
batch, and their per-destination state is what `telenode studies` shows.

Per (batch, destination) the state runs: open (instances may still join) →
sending (complete, instances still queued) → done (every instance settled; for
object stores, the manifest written last). The manifest's content is fixed the
first time it is built and kept here, so a manifest written again after a kill
is the same object.

These tables live in the store's database file but belong to this module: it
opens its own connection (WAL lets it sit beside the store's) and creates them
if missing, so the store's schema version is not involved. Pseudonyms only.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from node.store.queue import QueueRow

SCHEMA = """
CREATE TABLE IF NOT EXISTS study_batches (
    batch_id TEXT PRIMARY KEY,
    pseudo_study_instance_uid TEXT NOT NULL,
    first_arrival REAL NOT NULL,
    last_arrival REAL NOT NULL,
    complete REAL
);
CREATE INDEX IF NOT EXISTS study_batches_open ON study_batches (complete, pseudo_study_instance_uid);
CREATE TABLE IF NOT EXISTS batch_rows (
    queue_id INTEGER PRIMARY KEY,
    batch_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    started INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS batch_rows_batch ON batch_rows (batch_id, destination);
CREATE TABLE IF NOT EXISTS batch_states (
    batch_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    manifest TEXT,
    manifest_started INTEGER NOT NULL DEFAULT 0,
    done REAL,
    PRIMARY KEY (batch_id, destination)
);
CREATE INDEX IF NOT EXISTS batch_states_open ON batch_states (destination, done);
"""

WAITING = ("pending", "inflight")  # queue states of an instance not yet settled


def priority_name(priority: int) -> str:
    """The manifest's and the objects' Priority: STAT for high-priority instances, else ROUTINE."""
    return "STAT" if priority >= 1 else "ROUTINE"


def iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def study_token(pseudo_study_uid: str) -> str:
    """CloudStudyId for a study without an AccessionNumber: a 16-character token of the pseudonymous
    accession's form, derived from the pseudonymous Study Instance UID (no key needed: it is public)."""
    return base64.b32encode(hashlib.sha256(pseudo_study_uid.encode("ascii")).digest()).decode("ascii")[:16]


@dataclass(frozen=True)
class Item:
    """One claimed queue row of a destination of another kind, with the batch and UIDs it belongs to."""

    queue_id: int
    path: Path
    size: int
    sop_class_uid: str
    transfer_syntax: str
    priority: int
    attempts: int
    failures: int
    sop_instance_uid: str  # all pseudonymous
    series_instance_uid: str
    study_instance_uid: str
    batch_id: str
    started: bool  # an upload of it began before (a kill, a lost answer): look before writing again

    @property
    def object_name(self) -> str:
        """Its name inside the batch folder: {series uid}/{sop uid}.dcm."""
        return f"{self.series_instance_uid}/{self.sop_instance_uid}.dcm"

    @property
    def priority_name(self) -> str:
        return priority_name(self.priority)


@dataclass(frozen=True)
class Manifest:
    """A batch's manifest.json for one destination, as it is (and stays) written."""

    batch_id: str
    priority: str
    body: bytes
    started: bool  # a write began before: look before writing again


@dataclass(frozen=True)
class Settled:
    """A complete batch whose every instance for a destination is sent or failed."""

    batch_id: str
    sent: int
    failed: int


class Batches:
    """Batch membership and per-destination batch state, in the store's database file."""

    def __init__(self, database: str | Path, stable_seconds: float = 30.0) -> None:
        self.stable_seconds = stable_seconds
        self.conn = sqlite3.connect(database, check_same_thread=False, timeout=30, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self._lock = threading.RLock()
        with self._tx():
            for statement in filter(str.strip, SCHEMA.split(";")):
                self.conn.execute(statement)

    def __repr__(self) -> str:
        return f"Batches(stable_seconds={self.stable_seconds})"

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            cursor = self.conn.execute(sql, list(args))
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    # -- membership -----------------------------------------------------------------------------

    def assign(self, destinations: Sequence[str], now: float | None = None) -> int:
        """Put every waiting queue row of these destinations that has no batch into its study's open
        batch (or a new one after a quiet gap of stable_seconds), and close the batches whose study has
        been quiet that long. One transaction; returns how many rows joined a batch."""
        if not destinations:
            return 0
        now = time.time() if now is None else now
        marks = ",".join("?" * len(destinations))
        if not self._work(destinations, now):  # the common case: no write transaction at all
            return 0
        with self._tx():
            rows = self.conn.execute(
                f"SELECT q.id, q.destination, q.created, s.pseudo_study_instance_uid FROM queue q "
                f"LEFT JOIN batch_rows b ON b.queue_id = q.id "
                f"LEFT JOIN instances i ON i.pseudo_sop_instance_uid = q.pseudo_sop_instance_uid "
                f"LEFT JOIN series s ON s.pseudo_series_instance_uid = i.pseudo_series_instance_uid "
                f"WHERE b.queue_id IS NULL AND q.destination IN ({marks}) AND q.status IN (?, ?) "
                f"ORDER BY q.created, q.id", [*destinations, *WAITING]).fetchall()
            joined: set[tuple[str, str]] = set()
            for queue_id, destination, created, study in rows:
                batch = self._batch_for(study or "", created, destination, joined)
                joined.add((batch, destination))
                self.conn.execute("INSERT INTO batch_rows (queue_id, batch_id, destination) VALUES (?, ?, ?)",
                                  [queue_id, batch, destination])
                self.conn.execute("INSERT OR IGNORE INTO batch_states (batch_id, destination) VALUES (?, ?)",
                                  [batch, destination])
            self.conn.execute("UPDATE study_batches SET complete = last_arrival + ? WHERE complete IS NULL "
                              "AND last_arrival + ? <= ?", [self.stable_seconds, self.stable_seconds, now])
        return len(rows)

    def _work(self, destinations: Sequence[str], now: float) -> bool:
        """Whether a row waits for a batch or an open batch is due to complete (read-only)."""
        marks = ",".join("?" * len(destinations))
        with self._lock:
            unassigned = self.conn.execute(
                f"SELECT 1 FROM queue q LEFT JOIN batch_rows b ON b.queue_id = q.id WHERE b.queue_id IS NULL "
                f"AND q.destination IN ({marks}) AND q.status IN (?, ?) LIMIT 1", [*destinations, *WAITING]).fetchone()
            due = self.conn.execute("SELECT 1 FROM study_batches WHERE complete IS NULL AND last_arrival + ? <= ? "
                                    "LIMIT 1", [self.stable_seconds, now]).fetchone()
        return bool(unassigned or due)

    def _batch_for(self, study: str, arrived: float, destination: str, joined: set[tuple[str, str]]) -> str:
        """The study's batch this arrival belongs to: its latest one if the arrival came within
        stable_seconds of that batch's last, else a new batch.

        A batch that is already complete takes the row only for a destination that has none of its
        rows yet (one paused or added meanwhile), or only rows this same assignment added (`joined`):
        the instances keep their BatchId everywhere, and no destination sees an instance join a batch
        it may be finishing."""
        row = self.conn.execute(
            "SELECT batch_id, last_arrival, complete, EXISTS (SELECT 1 FROM batch_states st WHERE "
            "st.batch_id = sb.batch_id AND st.destination = ?) FROM study_batches sb "
            "WHERE pseudo_study_instance_uid = ? ORDER BY last_arrival DESC LIMIT 1", [destination, study]).fetchone()
        joinable = row is not None and (row[2] is None or not row[3] or (row[0], destination) in joined)
        if row is not None and joinable and arrived - row[1] < self.stable_seconds:
            if row[2] is None:
                self.conn.execute("UPDATE study_batches SET last_arrival = MAX(last_arrival, ?) WHERE batch_id = ?",
                                  [arrived, row[0]])
            return row[0]
        if row is not None and row[2] is None:  # the study went quiet before this one arrived: complete
            self.conn.execute("UPDATE study_batches SET complete = last_arrival + ? WHERE batch_id = ?",
                              [self.stable_seconds, row[0]])
        batch = new_batch_id(arrived)
        self.conn.execute("INSERT INTO study_batches VALUES (?, ?, ?, ?, NULL)", [batch, study, arrived, arrived])
        return batch

    def next_completion(self) -> float | None:
        """When the next open batch becomes complete (epoch seconds), if any is open."""
        with self._lock:
            row = self.conn.execute("SELECT MIN(last_arrival) FROM study_batches WHERE complete IS NULL").fetchone()
        return None if row[0] is None else row[0] + self.stable_seconds

    def items(self, rows: Sequence[QueueRow]) -> list[Item]:
        """The claimed queue rows (store.claim_batch) as items with their batch; rows without one are left out."""
        if not rows:
            return []
        marks = ",".join("?" * len(rows))
        found = {r["queue_id"]: r for r in self._rows(
            f"SELECT b.queue_id, b.batch_id, b.started, i.pseudo_series_instance_uid AS series, "
            f"s.pseudo_study_instance_uid AS study FROM batch_rows b JOIN queue q ON q.id = b.queue_id "
            f"JOIN instances i ON i.pseudo_sop_instance_uid = q.pseudo_sop_instance_uid "
            f"JOIN series s ON s.pseudo_series_instance_uid = i.pseudo_series_instance_uid "
            f"WHERE b.queue_id IN ({marks})", [r.id for r in rows])}
        return [Item(queue_id=r.id, path=Path(r.path), size=r.size, sop_class_uid=r.sop_class_uid,
                     transfer_syntax=r.transfer_syntax, priority=r.priority, attempts=r.attempts,
                     failures=r.failures, sop_instance_uid=r.pseudo_sop_instance_uid,
                     series_instance_uid=found[r.id]["series"], study_instance_uid=found[r.id]["study"],
                     batch_id=found[r.id]["batch_id"], started=bool(found[r.id]["started"]))
                for r in rows if r.id in found]

    def mark_started(self, items: Sequence[Item]) -> None:
        """Uploads of these items begin: after a kill they are looked for before being written again."""
        fresh = [item.queue_id for item in items if not item.started]
        if fresh:
            with self._tx():
                self.conn.execute(f"UPDATE batch_rows SET started = 1 WHERE queue_id IN ({','.join('?' * len(fresh))})",
                                  fresh)

    # -- completion and manifest ----------------------------------------------------------------

    def settled(self, destination: str) -> list[Settled]:
        """Complete batches not yet done for this destination whose every instance is sent or failed."""
        return [Settled(r["batch_id"], r["sent"], r["failed"]) for r in self._rows(
            "SELECT st.batch_id, SUM(q.status = 'sent') AS sent, SUM(q.status = 'failed') AS failed "
            "FROM batch_states st JOIN study_batches sb USING (batch_id) "
            "JOIN batch_rows b ON b.batch_id = st.batch_id AND b.destination = st.destination "
            "JOIN queue q ON q.id = b.queue_id "
            "WHERE st.destination = ? AND st.done IS NULL AND sb.complete IS NOT NULL "
            "GROUP BY st.batch_id HAVING SUM(q.status IN (?, ?)) = 0 ORDER BY MIN(sb.first_arrival)",
            [destination, *WAITING])]

    def manifest(self, batch_id: str, destination: str) -> Manifest:
        """The batch's manifest for this destination: built once from what was sent there, then kept."""
        with self._tx():
            stored = self.conn.execute("SELECT manifest, manifest_started FROM batch_states WHERE batch_id = ? "
                                       "AND destination = ?", [batch_id, destination]).fetchone()
            if stored is not None and stored[0]:
                body = stored[0]
            else:
                body = json.dumps(self._content(batch_id, destination), indent=2)
                self.conn.execute("UPDATE batch_states SET manifest = ? WHERE batch_id = ? AND destination = ?",
                                  [body, batch_id, destination])
        return Manifest(batch_id, json.loads(body)["Priority"], body.encode("utf-8"),
                        bool(stored and stored[1]))

    def _content(self, batch_id: str, destination: str) -> dict[str, Any]:
        """manifest.json as ../shared/design.md fixes it: one study per batch, files relative to the batch."""
        rows = self.conn.execute(
            "SELECT s.pseudo_study_instance_uid, st.pseudo_accession_number, i.pseudo_series_instance_uid, "
            "q.pseudo_sop_instance_uid, q.priority FROM batch_rows b JOIN queue q ON q.id = b.queue_id "
            "JOIN instances i ON i.pseudo_sop_instance_uid = q.pseudo_sop_instance_uid "
            "JOIN series s ON s.pseudo_series_instance_uid = i.pseudo_series_instance_uid "
            "LEFT JOIN studies st ON st.pseudo_study_instance_uid = s.pseudo_study_instance_uid "
            "WHERE b.batch_id = ? AND b.destination = ? AND q.status = 'sent' ORDER BY q.id",
            [batch_id, destination]).fetchall()
        studies: dict[str, dict[str, Any]] = {}
        for study, accession, series, sop, _ in rows:
            entry = studies.setdefault(study, {"CloudStudyId": accession or study_token(study),
                                               "StudyInstanceUID": study, "ImageCount": 0, "Files": []})
            name = f"{series}/{sop}.dcm"
            if name not in entry["Files"]:  # an instance sent twice in one batch is one object
                entry["Files"].append(name)
                entry["ImageCount"] += 1
        priority = max((row[4] for row in rows), default=0)
        return {"Version": "1.0", "BatchId": batch_id, "Priority": priority_name(priority),
                "SubmittedAt": iso_now(), "TotalStudies": len(studies),
                "TotalImages": sum(s["ImageCount"] for s in studies.values()), "Studies": list(studies.values())}

    def manifest_started(self, batch_id: str, destination: str) -> None:
        with self._tx():
            self.conn.execute("UPDATE batch_states SET manifest_started = 1 WHERE batch_id = ? AND destination = ?",
                              [batch_id, destination])

    def finish(self, batch_id: str, destination: str) -> None:
        """Every instance settled there (and the manifest written, for object stores)."""
        with self._tx():
            self.conn.execute("UPDATE batch_states SET done = ? WHERE batch_id = ? AND destination = ?",
                              [time.time(), batch_id, destination])

    # -- views ----------------------------------------------------------------------------------

    def states(self, batch_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Per (batch, destination): study, instances by queue state, manifest written, and its state name."""
        where, args = "", []
        if batch_ids is not None:
            if not batch_ids:
                return []
            where, args = f"WHERE st.batch_id IN ({','.join('?' * len(batch_ids))})", list(batch_ids)
        rows = self._rows(
            "SELECT st.batch_id, st.destination, sb.pseudo_study_instance_uid AS study, sb.complete, st.done, "
            "st.manifest IS NOT NULL AND st.done IS NOT NULL AS manifest, sb.first_arrival, "
            "COUNT(DISTINCT q.pseudo_sop_instance_uid) AS instances, MAX(q.priority) AS priority, "
            "SUM(q.status IN ('pending', 'inflight')) AS waiting, SUM(q.status = 'sent') AS sent, "
            "SUM(q.status = 'failed') AS failed FROM batch_states st JOIN study_batches sb USING (batch_id) "
            "JOIN batch_rows b ON b.batch_id = st.batch_id AND b.destination = st.destination "
            f"JOIN queue q ON q.id = b.queue_id {where} GROUP BY st.batch_id, st.destination "
            "ORDER BY sb.first_arrival, st.destination", args)
        for row in rows:
            row["state"] = _state(row)
            row["priority"] = priority_name(row["priority"] or 0)
        return rows

    def summary(self) -> dict[str, dict[str, int]]:
        """Per destination: how many batches are open, sending, done and failed (for `status`)."""
        result: dict[str, dict[str, int]] = {}
        for row in self.states():
            counts = result.setdefault(row["destination"], {"open": 0, "sending": 0, "done": 0, "failed": 0})
            counts[row["state"] if row["state"] in counts else "done"] += 1
        return result


def _state(row: dict[str, Any]) -> str:
    if row["complete"] is None:
        return "open"
    if row["done"] is None:
        return "sending"
    return "failed" if not row["sent"] else "partial" if row["failed"] else "done"


def new_batch_id(arrived: float) -> str:
    """Sortable and unique: the UTC time the batch's first instance arrived, and 32 random bits."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(arrived)) + "-" + secrets.token_hex(4)


def recent_studies(batches: Batches, limit: int = 50) -> list[dict[str, Any]]:
    """The most recently received studies by pseudonym: instances, priority, queue state per
    destination and their batches (for `telenode studies`)."""
    studies = batches._rows(
        "SELECT st.pseudo_study_instance_uid AS study, st.pseudo_accession_number AS accession, "
        "st.pseudo_patient_id AS patient, st.priority, COUNT(i.pseudo_sop_instance_uid) AS instances, "
        "MAX(i.received) AS last_received FROM studies st "
        "JOIN series s ON s.pseudo_study_instance_uid = st.pseudo_study_instance_uid "
        "JOIN instances i ON i.pseudo_series_instance_uid = s.pseudo_series_instance_uid "
        "GROUP BY st.pseudo_study_instance_uid ORDER BY last_received DESC LIMIT ?", [limit])
    result = []
    for study in studies:
        queues: dict[str, dict[str, int]] = {}
        for row in batches._rows(
                "SELECT q.destination, q.status, COUNT(DISTINCT q.pseudo_sop_instance_uid) AS n FROM queue q "
                "JOIN instances i ON i.pseudo_sop_instance_uid = q.pseudo_sop_instance_uid "
                "JOIN series s ON s.pseudo_series_instance_uid = i.pseudo_series_instance_uid "
                "WHERE s.pseudo_study_instance_uid = ? AND q.status != 'requeued' GROUP BY q.destination, q.status",
                [study["study"]]):
            queues.setdefault(row["destination"], {"pending": 0, "inflight": 0, "sent": 0, "failed": 0})[
                row["status"]] = row["n"]
        ids = [r["batch_id"] for r in batches._rows(
            "SELECT batch_id FROM study_batches WHERE pseudo_study_instance_uid = ? ORDER BY first_arrival",
            [study["study"]])]
        result.append({
            "study_instance_uid": study["study"], "cloud_study_id": study["accession"] or study_token(study["study"]),
            "patient_id": study["patient"], "priority": priority_name(study["priority"] or 0),
            "instances": study["instances"], "last_received": study["last_received"],
            "destinations": {name: {**counts, "state": _queue_state(counts)} for name, counts in sorted(queues.items())},
            "batches": _batch_views(batches.states(ids)),
        })
    return result


def _queue_state(counts: dict[str, int]) -> str:
    if counts["pending"] or counts["inflight"]:
        return "sending"
    return "failed" if counts["failed"] and not counts["sent"] else "partial" if counts["failed"] else "sent"


def _batch_views(states: list[dict[str, Any]]) -> list[dict[str, Any]]:
    views: dict[str, dict[str, Any]] = {}
    for row in states:
        view = views.setdefault(row["batch_id"], {"batch_id": row["batch_id"], "instances": 0,
                                                  "priority": row["priority"], "complete": row["complete"] is not None,
                                                  "destinations": {}})
        view["instances"] = max(view["instances"], row["instances"])
        view["destinations"][row["destination"]] = {"state": row["state"], "sent": row["sent"],
                                                    "failed": row["failed"], "waiting": row["waiting"],
                                                    "manifest": bool(row["manifest"])}
    return list(views.values())
