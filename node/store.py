"""The mapping store: originals ↔ pseudonyms, the forwarding queue and the audit trail, in SQLite.

One database file (WAL, synchronous=FULL, so a commit is on disk when it
returns) written through sqlite-utils. One connection is shared by the SCP's
threads and the forwarders under a lock; every method is one short
transaction. The schema is versioned with `PRAGMA user_version` and migrated
forward on open.

Original values (PHI) live only in the patients/studies/series/instances/uids
tables; the queue and the audit trail hold pseudonyms only.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import sqlite_utils

from node.deid.record import DeidRecord

SCHEMA_VERSION = 2

PENDING, INFLIGHT, SENT, FAILED = "pending", "inflight", "sent", "failed"
REQUEUED = "requeued"  # a failed row released from the quarantine: replaced by a new pending row


def _now() -> float:
    return time.time()


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class Store:
    """SQLite-backed mappings, queue and audit for one node."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        if fresh:
            os.chmod(self.path, 0o600)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.RLock()
        self._migrate()

    # -- schema ---------------------------------------------------------------------------------

    def _migrate(self) -> None:
        with self._lock, self._tx():
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"database schema {version} is newer than this telenode ({SCHEMA_VERSION})")
            if version < 1:
                self._schema_1()
            if version < 2:
                self._schema_2()
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _schema_1(self) -> None:
        db = self.db
        db["patients"].create({
            "pseudo_patient_id": str, "patient_id": str, "issuer_of_patient_id": str, "patient_name": str,
            "pseudo_patient_name": str, "patient_birth_date": str, "first_seen": str, "last_seen": str,
        }, pk="pseudo_patient_id", if_not_exists=True)
        db["studies"].create({
            "pseudo_study_instance_uid": str, "study_instance_uid": str, "accession_number": str,
            "pseudo_accession_number": str, "study_date": str, "pseudo_patient_id": str,
            "calling_aet": str, "received": str, "priority": int,
        }, pk="pseudo_study_instance_uid", if_not_exists=True)
        db["series"].create({
            "pseudo_series_instance_uid": str, "series_instance_uid": str, "modality": str,
            "pseudo_study_instance_uid": str,
        }, pk="pseudo_series_instance_uid", if_not_exists=True)
        db["instances"].create({
            "pseudo_sop_instance_uid": str, "sop_instance_uid": str, "sop_class_uid": str,
            "pseudo_series_instance_uid": str, "calling_aet": str, "received": str, "source": str,
        }, pk="pseudo_sop_instance_uid", if_not_exists=True)
        db["uids"].create({"pseudo_uid": str, "original_uid": str}, pk="pseudo_uid", if_not_exists=True)
        db["queue"].create({
            "id": int, "destination": str, "pseudo_sop_instance_uid": str, "sop_class_uid": str,
            "transfer_syntax": str, "path": str, "size": int, "priority": int, "status": str,
            "attempts": int, "failures": int, "due": float, "created": float, "updated": float, "last_error": str,
        }, pk="id", if_not_exists=True)
        db["audit"].create({"id": int, "time": str, "event": str, "detail": str}, pk="id", if_not_exists=True)
        db["studies"].create_index(["pseudo_accession_number"], if_not_exists=True)
        db["queue"].create_index(["destination", "status", "priority", "id"], if_not_exists=True)
        db["queue"].create_index(["pseudo_sop_instance_uid", "status"], if_not_exists=True)

    def _schema_2(self) -> None:
        """Per-destination state: paused by an operator, the last destination-wide error."""
        self.db["destinations"].create({
            "name": str, "paused": int, "last_error": str, "error_time": float, "updated": float,
        }, pk="name", if_not_exists=True)

    def _tx(self) -> Any:
        return _Transaction(self.db.conn)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """One transaction (one commit, one fsync) around several calls: group commit."""
        with self._lock, self._tx():
            yield

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()

    # -- mappings -------------------------------------------------------------------------------

    def record_mapping(self, record: DeidRecord, *, source: str, calling_aet: str = "", priority: int = 0) -> None:
        """Record the original ↔ pseudonym pairs of one instance and its audit line (one commit)."""
        with self._lock, self._tx():
            self._mapping(record, source=source, calling_aet=calling_aet, priority=priority)

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
        now = _now()
        with self._lock, self._tx():
            self._mapping(record, source="scp", calling_aet=calling_aet, priority=priority)
            for destination in destinations:
                pending = self.db.execute(
                    "SELECT id FROM queue WHERE destination = ? AND pseudo_sop_instance_uid = ? AND status = ?",
                    [destination, record.pseudo_sop_instance_uid, PENDING],
                ).fetchone()
                if pending:  # a resend while still queued: one send (of the file as now spooled) is enough
                    self.db.execute(
                        "UPDATE queue SET priority = MAX(priority, ?), size = ?, transfer_syntax = ?, path = ?, "
                        "sop_class_uid = ?, updated = ? WHERE id = ?",
                        [priority, size, transfer_syntax, path, record.sop_class_uid, now, pending[0]])
                    continue
                self.db["queue"].insert({
                    "destination": destination, "pseudo_sop_instance_uid": record.pseudo_sop_instance_uid,
                    "sop_class_uid": record.sop_class_uid, "transfer_syntax": transfer_syntax, "path": path,
                    "size": size, "priority": priority, "status": PENDING, "attempts": 0, "failures": 0,
                    "due": now, "created": now, "updated": now, "last_error": None,
                })

    def _mapping(self, record: DeidRecord, *, source: str, calling_aet: str, priority: int) -> None:
        now = _iso(_now())
        db = self.db
        db.execute(
            "INSERT INTO patients VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(pseudo_patient_id) DO UPDATE SET "
            "last_seen = excluded.last_seen, patient_name = COALESCE(NULLIF(excluded.patient_name, ''), patient_name), "
            "patient_birth_date = COALESCE(NULLIF(excluded.patient_birth_date, ''), patient_birth_date)",
            [record.pseudo_patient_id, record.patient_id, record.issuer_of_patient_id, record.patient_name,
             record.pseudo_patient_name, record.patient_birth_date, now, now],
        )
        db.execute(
            "INSERT INTO studies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(pseudo_study_instance_uid) DO UPDATE SET "
            "priority = MAX(priority, excluded.priority), accession_number = COALESCE(NULLIF(excluded.accession_number, ''), "
            "accession_number), pseudo_accession_number = COALESCE(NULLIF(excluded.pseudo_accession_number, ''), "
            "pseudo_accession_number)",
            [record.pseudo_study_instance_uid, record.study_instance_uid, record.accession_number,
             record.pseudo_accession_number, record.study_date, record.pseudo_patient_id, calling_aet, now, priority],
        )
        db.execute(
            "INSERT OR IGNORE INTO series VALUES (?, ?, ?, ?)",
            [record.pseudo_series_instance_uid, record.series_instance_uid, record.modality,
             record.pseudo_study_instance_uid],
        )
        db.execute(
            "INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?)",
            [record.pseudo_sop_instance_uid, record.sop_instance_uid, record.sop_class_uid,
             record.pseudo_series_instance_uid, calling_aet, now, source],
        )
        db.conn.executemany("INSERT OR IGNORE INTO uids VALUES (?, ?)",
                            [(new, old) for old, new in record.uid_map.items()])
        self._audit("deidentified", {
            "source": source, "calling_aet": calling_aet, "patient_id": record.pseudo_patient_id,
            "study_instance_uid": record.pseudo_study_instance_uid,
            "sop_instance_uid": record.pseudo_sop_instance_uid, "method_codes": list(record.method_codes),
            "overrides": list(record.overrides),
        })

    def lookup(self, pseudonym: str) -> dict[str, Any] | None:
        """The originals behind a pseudonymous PatientID, AccessionNumber or UID; None if unknown."""
        value = pseudonym.strip()
        with self._lock:
            for query in (_INSTANCE, _SERIES, _STUDY, _ACCESSION, _PATIENT, _UID):
                cursor = self.db.execute(query, [value])
                row = cursor.fetchone()
                if row is not None:
                    return dict(zip([d[0] for d in cursor.description], row))
        return None

    # -- audit ----------------------------------------------------------------------------------

    def audit(self, event: str, **detail: Any) -> None:
        """Append one audit record (pseudonyms and operator facts only, never originals)."""
        with self._lock, self._tx():
            self._audit(event, detail)

    def _audit(self, event: str, detail: dict[str, Any]) -> None:
        self.db.execute("INSERT INTO audit (time, event, detail) VALUES (?, ?, ?)",
                        [_iso(_now()), event, json.dumps(detail, sort_keys=True)])

    def audit_records(self, event: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.db.execute(
                "SELECT id, time, event, detail FROM audit WHERE ? IS NULL OR event = ? ORDER BY id", [event, event]
            ).fetchall()
        return [{"id": r[0], "time": r[1], "event": r[2], **json.loads(r[3])} for r in rows]

    # -- queue ----------------------------------------------------------------------------------

    def claim_batch(self, destination: str, limit: int) -> list[dict[str, Any]]:
        """Take due pending rows of one destination (highest priority first, then oldest) and mark them
        in flight, so that parallel workers never send the same row twice."""
        with self._lock, self._tx():
            cursor = self.db.execute(
                "SELECT id, pseudo_sop_instance_uid, sop_class_uid, transfer_syntax, path, size, priority, attempts, "
                "failures FROM queue WHERE destination = ? AND status = ? AND due <= ? "
                "ORDER BY priority DESC, id ASC LIMIT ?",
                [destination, PENDING, _now(), limit],
            )
            names = [d[0] for d in cursor.description]
            rows = [dict(zip(names, row)) for row in cursor.fetchall()]
            if rows:
                marks = ",".join("?" * len(rows))
                self.db.execute(f"UPDATE queue SET status = ?, updated = ? WHERE id IN ({marks})",
                                [INFLIGHT, _now(), *[r["id"] for r in rows]])
        return rows

    def release(self, ids: Iterable[int], delay: float = 0.0) -> None:
        """Put in-flight rows back in the queue, due after `delay` (a transient problem, not counted)."""
        ids = list(ids)
        if ids:
            marks = ",".join("?" * len(ids))
            with self._lock, self._tx():
                self.db.execute(f"UPDATE queue SET status = ?, due = ?, updated = ? WHERE id IN ({marks}) "
                                f"AND status = ?", [PENDING, _now() + delay, _now(), *ids, INFLIGHT])

    def recover(self) -> int:
        """At start: rows a killed node left in flight go back to pending (sent at least once, never lost)."""
        with self._lock, self._tx():
            return self.db.execute("UPDATE queue SET status = ? WHERE status = ?", [PENDING, INFLIGHT]).rowcount

    def next_due(self, destination: str) -> float | None:
        """When the earliest pending row of a destination becomes due (epoch seconds)."""
        with self._lock:
            row = self.db.execute("SELECT MIN(due) FROM queue WHERE destination = ? AND status = ?",
                                  [destination, PENDING]).fetchone()
        return row[0] if row else None

    def higher_priority_waiting(self, destination: str, priority: int) -> bool:
        """Whether a due row of higher priority than `priority` waits for this destination (STAT)."""
        with self._lock:
            row = self.db.execute("SELECT 1 FROM queue WHERE destination = ? AND status = ? AND priority > ? "
                                  "AND due <= ? LIMIT 1", [destination, PENDING, priority, _now()]).fetchone()
        return row is not None

    def mark_sent(self, ids: Iterable[int]) -> list[str]:
        """Mark rows sent; return the spool paths no destination still needs (safe to delete)."""
        ids = list(ids)
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        with self._lock, self._tx():
            self.db.execute(f"UPDATE queue SET status = ?, updated = ?, last_error = NULL WHERE id IN ({marks})",
                            [SENT, _now(), *ids])
            self.db.execute(f"UPDATE destinations SET last_error = NULL WHERE name IN "
                            f"(SELECT destination FROM queue WHERE id IN ({marks}))", ids)
            return self._unneeded(ids)

    def _unneeded(self, ids: list[int]) -> list[str]:
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(
            f"SELECT DISTINCT q.path FROM queue q WHERE q.id IN ({marks}) AND NOT EXISTS (SELECT 1 FROM queue p "
            f"WHERE p.path = q.path AND p.status IN (?, ?))", [*ids, PENDING, INFLIGHT]).fetchall()
        return [r[0] for r in rows]

    def mark_retry(self, row_id: int, error: str, delay: float, *, failure: bool) -> None:
        """Try again after `delay` seconds; `failure` counts a refusal of this instance by the remote."""
        with self._lock, self._tx():
            self.db.execute(
                "UPDATE queue SET status = ?, attempts = attempts + 1, failures = failures + ?, due = ?, "
                "updated = ?, last_error = ? WHERE id = ?",
                [PENDING, 1 if failure else 0, _now() + delay, _now(), error, row_id])

    def mark_failed(self, row_id: int, error: str) -> list[str]:
        """Give up on one row: the remote refused it permanently. Returns spool paths no longer needed."""
        with self._lock, self._tx():
            self.db.execute(
                "UPDATE queue SET status = ?, attempts = attempts + 1, failures = failures + 1, updated = ?, "
                "last_error = ? WHERE id = ?", [FAILED, _now(), error, row_id])
            return self._unneeded([row_id])

    def failed_row(self, row_id: int) -> dict[str, Any] | None:
        with self._lock:
            cursor = self.db.execute("SELECT * FROM queue WHERE id = ?", [row_id])
            row = cursor.fetchone()
            return dict(zip([d[0] for d in cursor.description], row)) if row else None

    def requeue(self, destination: str, record: dict[str, Any]) -> None:
        """Queue a file again for one destination (quarantine retry), as a new pending row; the failed
        row it replaces (record["queue_id"]) becomes 'requeued', so status no longer counts it failed."""
        now = _now()
        with self._lock, self._tx():
            if record.get("queue_id"):
                self.db.execute("UPDATE queue SET status = ?, updated = ? WHERE id = ? AND status = ?",
                                [REQUEUED, now, record["queue_id"], FAILED])
            self.db["queue"].insert({
                "destination": destination, "pseudo_sop_instance_uid": record["pseudo_sop_instance_uid"],
                "sop_class_uid": record["sop_class_uid"], "transfer_syntax": record["transfer_syntax"],
                "path": record["path"], "size": record["size"], "priority": record.get("priority", 0),
                "status": PENDING, "attempts": 0, "failures": 0, "due": now, "created": now, "updated": now,
                "last_error": None,
            })

    def note_error(self, destination: str, error: str) -> None:
        """Remember a destination-wide problem (remote down, refusing associations), for `status`."""
        with self._lock, self._tx():
            self._destination(destination)
            self.db.execute("UPDATE destinations SET last_error = ?, error_time = ?, updated = ? WHERE name = ?",
                            [error, _now(), _now(), destination])

    def _destination(self, name: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO destinations (name, paused, updated) VALUES (?, 0, ?)", [name, _now()])

    def set_paused(self, destination: str, paused: bool) -> None:
        """Pause or resume one destination's queue (instances keep being accepted and queued)."""
        with self._lock, self._tx():
            self._destination(destination)
            self.db.execute("UPDATE destinations SET paused = ?, updated = ? WHERE name = ?",
                            [1 if paused else 0, _now(), destination])

    def is_paused(self, destination: str) -> bool:
        with self._lock:
            row = self.db.execute("SELECT paused FROM destinations WHERE name = ?", [destination]).fetchone()
        return bool(row and row[0])

    def status(self) -> dict[str, dict[str, Any]]:
        """Per destination: pending, in-flight, sent and failed counts, oldest waiting age, last error, paused."""
        now = _now()
        result: dict[str, dict[str, Any]] = {}

        def entry(name: str) -> dict[str, Any]:
            return result.setdefault(name, empty_status())

        with self._lock:
            for destination, state, count, oldest in self.db.execute(
                "SELECT destination, status, COUNT(*), MIN(created) FROM queue WHERE status != ? "
                "GROUP BY destination, status", [REQUEUED]
            ).fetchall():
                row = entry(destination)
                row[state] = count
                if state in (PENDING, INFLIGHT):
                    age = round(now - oldest, 1)
                    row["oldest_pending_age_s"] = max(row["oldest_pending_age_s"] or 0, age)
            for destination, error in self.db.execute(
                "SELECT destination, last_error FROM queue WHERE id IN (SELECT MAX(id) FROM queue "
                "WHERE last_error IS NOT NULL AND status NOT IN (?, ?) GROUP BY destination)", [SENT, REQUEUED]
            ).fetchall():
                entry(destination)["last_error"] = error
            for name, paused, error in self.db.execute("SELECT name, paused, last_error FROM destinations").fetchall():
                row = entry(name)
                row["paused"] = bool(paused)
                if error:  # a destination-wide problem is the news: it explains every waiting row
                    row["last_error"] = error
        return result


def empty_status() -> dict[str, Any]:
    """One destination's status with nothing queued."""
    return {PENDING: 0, INFLIGHT: 0, SENT: 0, FAILED: 0, "oldest_pending_age_s": None, "last_error": None,
            "paused": False}


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT (ROLLBACK on error) on an autocommit connection; re-entrant."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.outer = False

    def __enter__(self) -> None:
        self.outer = not self.conn.in_transaction
        if self.outer:
            self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: Any, *_: Any) -> None:
        if not self.outer:
            return
        self.conn.execute("ROLLBACK" if kind else "COMMIT")


_PATIENT_COLUMNS = ("p.patient_id, p.issuer_of_patient_id, p.patient_name, p.patient_birth_date, "
                    "p.pseudo_patient_id")
_STUDY_COLUMNS = ("s.study_instance_uid, s.accession_number, s.study_date, s.pseudo_study_instance_uid, "
                  "s.pseudo_accession_number")
_PATIENT = f"SELECT 'patient' AS level, {_PATIENT_COLUMNS} FROM patients p WHERE p.pseudo_patient_id = ?"
_STUDY = (f"SELECT 'study' AS level, {_PATIENT_COLUMNS}, {_STUDY_COLUMNS} FROM studies s "
          f"JOIN patients p USING (pseudo_patient_id) WHERE s.pseudo_study_instance_uid = ?")
_ACCESSION = (f"SELECT 'study' AS level, {_PATIENT_COLUMNS}, {_STUDY_COLUMNS} FROM studies s "
              f"JOIN patients p USING (pseudo_patient_id) WHERE s.pseudo_accession_number = ? "
              f"ORDER BY s.received DESC LIMIT 1")
_SERIES = (f"SELECT 'series' AS level, {_PATIENT_COLUMNS}, {_STUDY_COLUMNS}, e.series_instance_uid, e.modality, "
           f"e.pseudo_series_instance_uid FROM series e JOIN studies s USING (pseudo_study_instance_uid) "
           f"JOIN patients p USING (pseudo_patient_id) WHERE e.pseudo_series_instance_uid = ?")
_INSTANCE = (f"SELECT 'instance' AS level, {_PATIENT_COLUMNS}, {_STUDY_COLUMNS}, e.series_instance_uid, e.modality, "
             f"e.pseudo_series_instance_uid, i.sop_instance_uid, i.sop_class_uid, i.pseudo_sop_instance_uid "
             f"FROM instances i JOIN series e USING (pseudo_series_instance_uid) "
             f"JOIN studies s USING (pseudo_study_instance_uid) JOIN patients p USING (pseudo_patient_id) "
             f"WHERE i.pseudo_sop_instance_uid = ?")
_UID = "SELECT 'uid' AS level, original_uid, pseudo_uid FROM uids WHERE pseudo_uid = ?"
