"""The schema, as an ordered list of migrations run forward on open (`PRAGMA user_version`).

Each migration is one function of the database and the mapping keyring, applied
in order inside one write transaction; a database newer than this telenode is
refused. Migration 3 sealed the plaintext originals of older databases; since
the freed pages could still hold them, a marker file beside the database asks
for a scrub (VACUUM and an emptied WAL) until one has fully succeeded.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from node import audit as chain
from node import log
from node.keys import Keyring
from node.store.db import Database
from node.store.mappings import ENCRYPTED


@dataclass(frozen=True)
class Migration:
    """Brings the schema from version - 1 to `version`."""

    version: int
    apply: Callable[[Database, Keyring], None]


def _schema_1(core: Database, ring: Keyring) -> None:
    db = core.db
    db.table("patients").create({
        "pseudo_patient_id": str, "patient_id": str, "issuer_of_patient_id": str, "patient_name": str,
        "pseudo_patient_name": str, "patient_birth_date": str, "first_seen": str, "last_seen": str,
    }, pk="pseudo_patient_id", if_not_exists=True)
    db.table("studies").create({
        "pseudo_study_instance_uid": str, "study_instance_uid": str, "accession_number": str,
        "pseudo_accession_number": str, "study_date": str, "pseudo_patient_id": str,
        "calling_aet": str, "received": str, "priority": int,
    }, pk="pseudo_study_instance_uid", if_not_exists=True)
    db.table("series").create({
        "pseudo_series_instance_uid": str, "series_instance_uid": str, "modality": str,
        "pseudo_study_instance_uid": str,
    }, pk="pseudo_series_instance_uid", if_not_exists=True)
    db.table("instances").create({
        "pseudo_sop_instance_uid": str, "sop_instance_uid": str, "sop_class_uid": str,
        "pseudo_series_instance_uid": str, "calling_aet": str, "received": str, "source": str,
    }, pk="pseudo_sop_instance_uid", if_not_exists=True)
    db.table("uids").create({"pseudo_uid": str, "original_uid": str}, pk="pseudo_uid", if_not_exists=True)
    db.table("queue").create({
        "id": int, "destination": str, "pseudo_sop_instance_uid": str, "sop_class_uid": str,
        "transfer_syntax": str, "path": str, "size": int, "priority": int, "status": str,
        "attempts": int, "failures": int, "due": float, "created": float, "updated": float, "last_error": str,
    }, pk="id", if_not_exists=True)
    db.table("audit").create({"id": int, "time": str, "event": str, "detail": str}, pk="id", if_not_exists=True)
    db.table("studies").create_index(["pseudo_accession_number"], if_not_exists=True)
    db.table("queue").create_index(["destination", "status", "priority", "id"], if_not_exists=True)
    db.table("queue").create_index(["pseudo_sop_instance_uid", "status"], if_not_exists=True)


def _schema_2(core: Database, ring: Keyring) -> None:
    """Per-destination state: paused by an operator, the last destination-wide error."""
    core.db.table("destinations").create({
        "name": str, "paused": int, "last_error": str, "error_time": float, "updated": float,
    }, pk="name", if_not_exists=True)


def _schema_3(core: Database, ring: Keyring) -> None:
    """Originals encrypted (plaintext rows of older databases sealed in place), audit hash chain.

    Idempotent: only TEXT values are sealed (ciphertexts are BLOBs), only unchained records chained."""
    if _has_rows(core):
        scrub_marker(core.path).touch(mode=0o600)  # before sealing: a crash after the commit still scrubs
    columns = set(core.db["audit"].columns_dict)
    for name in ("prev", "hash"):
        if name not in columns:
            core.execute(f"ALTER TABLE audit ADD COLUMN {name} TEXT")
    seal_plaintext(core, ring)
    _chain_unchained(core)


#: Every migration, oldest first; the last one's version is the schema this telenode writes.
MIGRATIONS: tuple[Migration, ...] = (Migration(1, _schema_1), Migration(2, _schema_2), Migration(3, _schema_3))
SCHEMA_VERSION = MIGRATIONS[-1].version


def migrate(core: Database, ring: Keyring) -> None:
    """Run the migrations the database lacks, in one transaction; then scrub if one is owed."""
    with core.write():
        version = core.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"database schema {version} is newer than this telenode ({SCHEMA_VERSION})")
        for migration in MIGRATIONS:
            if version < migration.version:
                migration.apply(core, ring)
        core.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    if scrub_marker(core.path).exists():  # this open's migration, or one whose scrub could not finish
        _scrub(core)


def seal_plaintext(core: Database, ring: Keyring) -> int:
    """Encrypt every original still stored as TEXT; returns how many were sealed."""
    core.execute("PRAGMA secure_delete=ON")  # freed plaintext cells are zeroed, not just unlinked
    sealed = 0
    for table, (pk, originals) in ENCRYPTED.items():
        for column in originals:
            rows = core.execute(f"SELECT {pk}, {column} FROM {table} WHERE typeof({column}) = 'text'").fetchall()
            for key, value in rows:
                core.execute(f"UPDATE {table} SET {column} = ? WHERE {pk} = ?",
                             [ring.seal(table, column, key, value), key])
            sealed += len(rows)
    core.execute("PRAGMA secure_delete=OFF")
    return sealed


def _chain_unchained(core: Database) -> None:
    prev = chain.GENESIS
    for record_id, when, event, detail, digest in core.execute(
            "SELECT id, time, event, detail, hash FROM audit ORDER BY id").fetchall():
        if digest is None:
            digest = chain.chain_hash(prev, record_id, when, event, detail)
            core.execute("UPDATE audit SET prev = ?, hash = ? WHERE id = ?", [prev, digest, record_id])
        prev = digest


def scrub_marker(path: Path) -> Path:
    return path.with_name(path.name + ".scrub-pending")


def _has_rows(core: Database) -> bool:
    return any(core.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() for table in ENCRYPTED
               if core.db[table].exists())


def _scrub(core: Database) -> None:
    """After sealing plaintext: rewrite the file and empty the WAL so no old page keeps an original.
    Until that has fully succeeded a marker file stays beside the database, and every open retries."""
    try:
        with core.read():
            core.execute("PRAGMA busy_timeout=2000")  # at open: don't hold a start for 30 s
            try:
                core.execute("VACUUM")
                busy = core.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            finally:
                core.execute("PRAGMA busy_timeout=30000")
    except sqlite3.OperationalError as exc:
        busy, reason = 1, str(exc)
    else:
        reason = "another connection is reading the write-ahead log"
    if busy:  # another process holds the database: retried at the next open
        log.get("store").warning("store_scrub_deferred", reason=reason)
        return
    scrub_marker(core.path).unlink(missing_ok=True)
