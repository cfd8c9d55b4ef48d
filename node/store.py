"""The mapping store: originals ↔ pseudonyms, the forwarding queue and the audit trail, in SQLite.

One database file (WAL, synchronous=FULL, so a commit is on disk when it
returns) written through sqlite-utils. One connection is shared by the SCP's
threads and the forwarders under a lock; every method is one short
transaction. The schema is versioned with `PRAGMA user_version` and migrated
forward on open.

Original values (PHI) live only in the patients/studies/series/instances/uids
tables, and only encrypted: AES-256-GCM under the mapping keyring
(node/keys.py, a key separate from the pseudonym key), each value bound to its
table, column and row by the associated data. Rows are found by pseudonym,
which is itself a keyed HMAC of the original, so no lookup needs an original
in clear. A copy of the database file alone reveals no identity. The queue
and the audit trail hold pseudonyms only; the audit trail is hash-chained
(node/audit.py).
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

from node import audit as chain
from node import log
from node.deid.record import DeidRecord
from node.keys import Keyring, rotation_lock

SCHEMA_VERSION = 3

#: Per table: its primary key (a pseudonym) and the columns that hold originals, encrypted.
ENCRYPTED: dict[str, tuple[str, tuple[str, ...]]] = {
    "patients": ("pseudo_patient_id", ("patient_id", "issuer_of_patient_id", "patient_name", "patient_birth_date")),
    "studies": ("pseudo_study_instance_uid", ("study_instance_uid", "accession_number", "study_date")),
    "series": ("pseudo_series_instance_uid", ("series_instance_uid",)),
    "instances": ("pseudo_sop_instance_uid", ("sop_instance_uid",)),
    "uids": ("pseudo_uid", ("original_uid",)),
}
#: Output column of a lookup → (table, primary key column) that authenticates it.
_SEALED_BY = {column: (table, pk) for table, (pk, columns) in ENCRYPTED.items() for column in columns}

PENDING, INFLIGHT, SENT, FAILED = "pending", "inflight", "sent", "failed"
REQUEUED = "requeued"  # a failed row released from the quarantine: replaced by a new pending row


def _now() -> float:
    return time.time()


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


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
        self._sinks = chain.sinks(Path(audit_file) if audit_file else None, audit_syslog)
        self._unsent: list[dict[str, Any]] = []  # audit records of the open transaction, for the sinks
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
        self._warn_new_key()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    def _warn_new_key(self) -> None:
        """A keyring just created for a store that has mappings: wrong mapping_key_file, or a lost key."""
        if self.ring.created and self.db.execute("SELECT 1 FROM patients LIMIT 1").fetchone():
            log.get("store").warning("mapping_key_created_for_existing_store", keyring=str(self.ring.path),
                                     consequence="originals recorded before cannot be re-identified with it")

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
            if version < 3 and self._has_rows():
                self._scrub_marker.touch(mode=0o600)  # before sealing: a crash after the commit still scrubs
            if version < 3:
                self._schema_3()
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        if self._scrub_marker.exists():  # this open's migration, or one whose scrub could not finish
            self._scrub()

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

    def _schema_3(self) -> int:
        """Originals encrypted (plaintext rows of older databases sealed in place), audit hash chain.

        Idempotent: only TEXT values are sealed (ciphertexts are BLOBs), only unchained records chained.
        Returns how many plaintext values were sealed."""
        columns = set(self.db["audit"].columns_dict)
        for name in ("prev", "hash"):
            if name not in columns:
                self.db.execute(f"ALTER TABLE audit ADD COLUMN {name} TEXT")
        sealed = self._seal_plaintext()
        self._chain_unchained()
        return sealed

    def _seal_plaintext(self) -> int:
        self.db.execute("PRAGMA secure_delete=ON")  # freed plaintext cells are zeroed, not just unlinked
        sealed = 0
        for table, (pk, originals) in ENCRYPTED.items():
            for column in originals:
                rows = self.db.execute(f"SELECT {pk}, {column} FROM {table} WHERE typeof({column}) = 'text'").fetchall()
                for key, value in rows:
                    self.db.execute(f"UPDATE {table} SET {column} = ? WHERE {pk} = ?",
                                    [self._seal(table, column, key, value), key])
                sealed += len(rows)
        self.db.execute("PRAGMA secure_delete=OFF")
        return sealed

    def _chain_unchained(self) -> None:
        prev = chain.GENESIS
        for record_id, when, event, detail, digest in self.db.execute(
                "SELECT id, time, event, detail, hash FROM audit ORDER BY id").fetchall():
            if digest is None:
                digest = chain.chain_hash(prev, record_id, when, event, detail)
                self.db.execute("UPDATE audit SET prev = ?, hash = ? WHERE id = ?", [prev, digest, record_id])
            prev = digest

    @property
    def _scrub_marker(self) -> Path:
        return self.path.with_name(self.path.name + ".scrub-pending")

    def _has_rows(self) -> bool:
        return any(self.db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() for table in ENCRYPTED
                   if self.db[table].exists())

    def _scrub(self) -> None:
        """After sealing plaintext: rewrite the file and empty the WAL so no old page keeps an original.
        Until that has fully succeeded a marker file stays beside the database, and every open retries."""
        try:
            with self._lock:
                self.db.execute("PRAGMA busy_timeout=2000")  # at open: don't hold a start for 30 s
                try:
                    self.db.execute("VACUUM")
                    busy = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                finally:
                    self.db.execute("PRAGMA busy_timeout=30000")
        except sqlite3.OperationalError as exc:
            busy, reason = 1, str(exc)
        else:
            reason = "another connection is reading the write-ahead log"
        if busy:  # another process holds the database: retried at the next open
            log.get("store").warning("store_scrub_deferred", reason=reason)
            return
        self._scrub_marker.unlink(missing_ok=True)

    def _tx(self) -> Any:
        return _Transaction(self.db.conn, self._committed, self._unsent.clear)

    def _committed(self) -> None:
        records, self._unsent[:] = list(self._unsent), []
        if self._sinks and records:
            chain.emit(self._sinks, records)

    # -- sealing --------------------------------------------------------------------------------

    @staticmethod
    def _context(table: str, column: str, key: str) -> bytes:
        """AES-GCM associated data: the value belongs to this table, column and row, nowhere else."""
        return f"telenode-mapping\x00{table}\x00{column}\x00{key}".encode("utf-8")

    def _seal(self, table: str, column: str, key: str, value: str | None) -> bytes | None:
        """An original as stored: encrypted, or NULL when empty."""
        if value is None or value == "":
            return None
        return self.ring.encrypt(value, self._context(table, column, key))

    def _open(self, table: str, column: str, key: str, stored: Any) -> str:
        if stored is None:
            return ""
        if isinstance(stored, str):  # never written by this version; tolerated, not produced
            return stored
        return self.ring.decrypt(bytes(stored), self._context(table, column, key))

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """One transaction (one commit, one fsync) around several calls: group commit."""
        with self._lock, self._tx():
            yield

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()
            for sink in self._sinks:
                sink.close()

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
        self.ring.refresh(strict=True)  # inside the write transaction: a rotation that renamed the ring file is seen here
        patient, study = record.pseudo_patient_id, record.pseudo_study_instance_uid
        seal = self._seal
        db.execute(
            "INSERT INTO patients VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(pseudo_patient_id) DO UPDATE SET "
            "last_seen = excluded.last_seen, patient_name = COALESCE(excluded.patient_name, patient_name), "
            "patient_birth_date = COALESCE(excluded.patient_birth_date, patient_birth_date)",
            [patient, seal("patients", "patient_id", patient, record.patient_id),
             seal("patients", "issuer_of_patient_id", patient, record.issuer_of_patient_id),
             seal("patients", "patient_name", patient, record.patient_name), record.pseudo_patient_name,
             seal("patients", "patient_birth_date", patient, record.patient_birth_date), now, now],
        )
        db.execute(
            "INSERT INTO studies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(pseudo_study_instance_uid) DO UPDATE SET "
            "priority = MAX(priority, excluded.priority), accession_number = COALESCE(excluded.accession_number, "
            "accession_number), pseudo_accession_number = COALESCE(NULLIF(excluded.pseudo_accession_number, ''), "
            "pseudo_accession_number)",
            [study, seal("studies", "study_instance_uid", study, record.study_instance_uid),
             seal("studies", "accession_number", study, record.accession_number), record.pseudo_accession_number,
             seal("studies", "study_date", study, record.study_date), patient, calling_aet, now, priority],
        )
        series = record.pseudo_series_instance_uid
        db.execute(
            "INSERT OR IGNORE INTO series VALUES (?, ?, ?, ?)",
            [series, seal("series", "series_instance_uid", series, record.series_instance_uid), record.modality,
             study],
        )
        sop = record.pseudo_sop_instance_uid
        db.execute(
            "INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?)",
            [sop, seal("instances", "sop_instance_uid", sop, record.sop_instance_uid), record.sop_class_uid,
             series, calling_aet, now, source],
        )
        db.conn.executemany("INSERT OR IGNORE INTO uids VALUES (?, ?)",
                            [(new, seal("uids", "original_uid", new, old)) for old, new in record.uid_map.items()])
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
                    return self._opened(dict(zip([d[0] for d in cursor.description], row)))
        return None

    def _opened(self, row: dict[str, Any]) -> dict[str, Any]:
        """A lookup row with its originals decrypted (each checked against the row it was sealed for)."""
        for column, (table, pk) in _SEALED_BY.items():
            if column in row:
                row[column] = self._open(table, column, row[pk], row[column])
        return row

    # -- mapping keys ---------------------------------------------------------------------------

    def key_usage(self) -> dict[str, int]:
        """How many stored originals each mapping key id (hex) encrypts."""
        usage: dict[str, int] = {}
        with self._lock:
            for table, (_, originals) in ENCRYPTED.items():
                for column in originals:
                    for kid, count in self.db.execute(
                            f"SELECT hex(substr({column}, 2, 4)), COUNT(*) FROM {table} "
                            f"WHERE typeof({column}) = 'blob' GROUP BY 1").fetchall():
                        usage[kid.lower()] = usage.get(kid.lower(), 0) + count
        return usage

    def rotate_mapping_key(self, batch: int = 500) -> dict[str, Any]:
        """Put a new mapping key first in the ring, re-encrypt every original under it in short
        transactions (the node keeps writing in between), then drop the keys no row uses any more.

        Crash-safe at every step: the ring file is replaced atomically and always holds every key a
        committed row uses; running it again finishes an interrupted rotation (under yet another key)."""
        with rotation_lock(self.ring.path):
            active = self.ring.add_key()
            moved = self._reencrypt(batch)
            with self._lock, self._tx():  # no writer can commit under an old key while the ring shrinks
                in_use = {int(kid, 16) for kid in self.key_usage()}
                retired = self.ring.retire(in_use)
        return {"active": f"{active:08x}", "reencrypted": moved, "retired": [f"{k:08x}" for k in retired]}

    def _reencrypt(self, batch: int) -> int:
        """Re-seal, `batch` rows per transaction, every original not under the active key; until none is left."""
        moved = 0
        while True:
            done = 0
            for table, (pk, originals) in ENCRYPTED.items():
                for column in originals:
                    done += self._reencrypt_batch(table, pk, column, batch)
            moved += done
            if done == 0:
                return moved

    def _reencrypt_batch(self, table: str, pk: str, column: str, batch: int) -> int:
        with self._lock, self._tx():
            self.ring.refresh(strict=True)
            header = bytes([1]) + self.ring.active_id.to_bytes(4, "big")
            rows = self.db.execute(
                f"SELECT {pk}, {column} FROM {table} WHERE typeof({column}) = 'blob' AND substr({column}, 1, 5) != ? "
                f"LIMIT ?", [header, batch]).fetchall()
            for key, stored in rows:
                value = self._open(table, column, key, stored)
                self.db.execute(f"UPDATE {table} SET {column} = ? WHERE {pk} = ?",
                                [self._seal(table, column, key, value), key])
        return len(rows)

    # -- audit ----------------------------------------------------------------------------------

    def audit(self, event: str, **detail: Any) -> None:
        """Append one audit record (pseudonyms and operator facts only, never originals)."""
        with self._lock, self._tx():
            self._audit(event, detail)

    def _audit(self, event: str, detail: dict[str, Any]) -> None:
        """Append one chained record; the chain head is read inside this write transaction (several
        processes write the same trail), never cached."""
        assert self.db.conn.in_transaction, "audit records are chained inside a write transaction"
        head = self.db.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
        record_id, prev = (head[0] + 1, head[1] or chain.GENESIS) if head else (1, chain.GENESIS)
        when, text = _iso(_now()), json.dumps(detail, sort_keys=True)
        digest = chain.chain_hash(prev, record_id, when, event, text)
        self.db.execute("INSERT INTO audit (id, time, event, detail, prev, hash) VALUES (?, ?, ?, ?, ?, ?)",
                        [record_id, when, event, text, prev, digest])
        if self._sinks:
            self._unsent.append({"id": record_id, "time": when, "event": event, "detail": detail,
                                 "prev": prev, "hash": digest})

    def audit_log(self, event: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """The last `limit` records (all by default), oldest first, as {id, time, event, detail, hash}."""
        with self._lock:
            rows = self.db.execute(
                "SELECT id, time, event, detail, hash FROM audit WHERE ? IS NULL OR event = ? ORDER BY id DESC "
                "LIMIT ?", [event, event, -1 if limit is None else limit]).fetchall()
        return [{"id": r[0], "time": r[1], "event": r[2], "detail": json.loads(r[3]), "hash": r[4]}
                for r in reversed(rows)]

    def verify_audit(self) -> chain.Verdict:
        """Walk the hash chain from the first record; the first broken link or edited record, if any."""
        with self._lock:
            rows = self.db.execute("SELECT id, time, event, detail, prev, hash FROM audit ORDER BY id")
            return chain.verify(rows, self._audit_id_of)

    def _audit_id_of(self, digest: str) -> int | None:
        row = self.db.execute("SELECT id FROM audit WHERE hash = ? LIMIT 1", [digest]).fetchone()
        return row[0] if row else None

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

    def prune_sent(self, before: float, batch: int = 5000) -> int:
        """Delete the queue rows of instances delivered before `before` (epoch seconds), `batch` rows
        per transaction (the workers' commits wait for none longer than that); audited with the count.
        Mappings and the audit trail are never pruned."""
        count = 0
        while True:
            with self._lock, self._tx():
                done = self.db.execute("DELETE FROM queue WHERE id IN (SELECT id FROM queue WHERE status = ? "
                                       "AND updated < ? LIMIT ?)", [SENT, before, batch]).rowcount
            count += done
            if done < batch:
                break
        if count:
            self.audit("queue_pruned", rows=count, sent_before=_iso(before))
        return count

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
    """BEGIN IMMEDIATE … COMMIT (ROLLBACK on error) on an autocommit connection; re-entrant.
    The outermost one calls `on_commit` after COMMIT returned, `on_rollback` after ROLLBACK."""

    def __init__(self, conn: sqlite3.Connection, on_commit: Any = None, on_rollback: Any = None) -> None:
        self.conn = conn
        self.outer = False
        self.on_commit, self.on_rollback = on_commit, on_rollback

    def __enter__(self) -> None:
        self.outer = not self.conn.in_transaction
        if self.outer:
            self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: Any, *_: Any) -> None:
        if not self.outer:
            return
        if kind:
            try:
                if self.conn.in_transaction:  # SQLite already rolled back on SQLITE_FULL, IOERR, NOMEM
                    self.conn.execute("ROLLBACK")
            finally:
                if self.on_rollback:
                    self.on_rollback()
            return
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            if self.on_rollback:
                self.on_rollback()
            raise
        if self.on_commit:
            self.on_commit()


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
