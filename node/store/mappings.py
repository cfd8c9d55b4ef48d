"""Mappings: the original ↔ pseudonym pairs of every instance, and their lookup by pseudonym.

Original values (PHI) live only in the patients/studies/series/instances/uids
tables, and only sealed by the mapping keyring (node/keys.py owns the format:
AES-256-GCM, bound to table, column and row). Rows are found by pseudonym, which
is itself a keyed HMAC of the original, so no lookup needs an original in clear.
"""

from __future__ import annotations

from typing import Any

from node.deid.record import DeidRecord
from node.keys import Keyring
from node.store.db import Database, iso, now
from node.store.trail import Trail

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


class Mappings:
    """Record and look up originals; every write is audited in the same transaction."""

    def __init__(self, core: Database, ring: Keyring, trail: Trail) -> None:
        self.core, self.ring, self.trail = core, ring, trail

    def __repr__(self) -> str:
        return f"Mappings({str(self.core.path)!r})"

    def record(self, record: DeidRecord, *, source: str, calling_aet: str, priority: int) -> None:
        """Insert or update the rows of one instance and its `deidentified` audit record (caller's transaction)."""
        when = iso(now())
        self.ring.refresh(strict=True)  # inside the write transaction: a rotation that renamed the ring file is seen
        patient, study = record.pseudo_patient_id, record.pseudo_study_instance_uid
        seal, execute = self.ring.seal, self.core.execute
        execute(
            "INSERT INTO patients VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(pseudo_patient_id) DO UPDATE SET "
            "last_seen = excluded.last_seen, patient_name = COALESCE(excluded.patient_name, patient_name), "
            "patient_birth_date = COALESCE(excluded.patient_birth_date, patient_birth_date)",
            [patient, seal("patients", "patient_id", patient, record.patient_id),
             seal("patients", "issuer_of_patient_id", patient, record.issuer_of_patient_id),
             seal("patients", "patient_name", patient, record.patient_name), record.pseudo_patient_name,
             seal("patients", "patient_birth_date", patient, record.patient_birth_date), when, when],
        )
        execute(
            "INSERT INTO studies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(pseudo_study_instance_uid) DO UPDATE SET "
            "priority = MAX(priority, excluded.priority), accession_number = COALESCE(excluded.accession_number, "
            "accession_number), pseudo_accession_number = COALESCE(NULLIF(excluded.pseudo_accession_number, ''), "
            "pseudo_accession_number)",
            [study, seal("studies", "study_instance_uid", study, record.study_instance_uid),
             seal("studies", "accession_number", study, record.accession_number), record.pseudo_accession_number,
             seal("studies", "study_date", study, record.study_date), patient, calling_aet, when, priority],
        )
        series = record.pseudo_series_instance_uid
        execute(
            "INSERT OR IGNORE INTO series VALUES (?, ?, ?, ?)",
            [series, seal("series", "series_instance_uid", series, record.series_instance_uid), record.modality,
             study],
        )
        sop = record.pseudo_sop_instance_uid
        execute(
            "INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?)",
            [sop, seal("instances", "sop_instance_uid", sop, record.sop_instance_uid), record.sop_class_uid,
             series, calling_aet, when, source],
        )
        self.core.db.conn.executemany(
            "INSERT OR IGNORE INTO uids VALUES (?, ?)",
            [(new, seal("uids", "original_uid", new, old)) for old, new in record.uid_map.items()])
        self.trail.append("deidentified", {
            "source": source, "calling_aet": calling_aet, "patient_id": record.pseudo_patient_id,
            "study_instance_uid": record.pseudo_study_instance_uid,
            "sop_instance_uid": record.pseudo_sop_instance_uid, "method_codes": list(record.method_codes),
            "overrides": list(record.overrides),
        })

    def lookup(self, pseudonym: str) -> dict[str, Any] | None:
        """The originals behind a pseudonymous PatientID, AccessionNumber or UID; None if unknown."""
        value = pseudonym.strip()
        with self.core.read():
            for query in (_INSTANCE, _SERIES, _STUDY, _ACCESSION, _PATIENT, _UID):
                cursor = self.core.execute(query, [value])
                row = cursor.fetchone()
                if row is not None:
                    return self._opened(dict(zip([d[0] for d in cursor.description], row, strict=True)))
        return None

    def _opened(self, row: dict[str, Any]) -> dict[str, Any]:
        """A lookup row with its originals decrypted (each checked against the row it was sealed for)."""
        for column, (table, pk) in _SEALED_BY.items():
            if column in row:
                row[column] = self.ring.unseal(table, column, row[pk], row[column])
        return row


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
