"""The SQLite mapping store: schema, mappings and lookup, the forwarding queue, status and audit.

Every test uses a real database file under tmp_path; nothing is mocked.
"""

from __future__ import annotations

import json
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from node.deid.record import DeidRecord
from node.store import FAILED, PENDING, SCHEMA_VERSION, SENT, Store

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"

ORIGINAL_NAME = "Doe^Johnathan"
ORIGINAL_ID = "MRN-778899"
ORIGINAL_ACCESSION = "ACC-20240611-42"
ORIGINAL_BIRTH = "19510203"


def make_record(n: int = 1, *, patient: str = "1") -> DeidRecord:
    """A DeidRecord with distinct originals and pseudonyms at every level (n varies the instance)."""
    study, series, sop = f"1.2.826.0.1.3680043.99.{patient}.1", f"1.2.826.0.1.3680043.99.{patient}.1.1", \
        f"1.2.826.0.1.3680043.99.{patient}.1.1.{n}"
    frame_of_ref = f"1.2.826.0.1.3680043.99.{patient}.7"
    p_study, p_series, p_sop = f"2.25.{patient}100", f"2.25.{patient}200", f"2.25.{patient}300{n}"
    p_for = f"2.25.{patient}400"
    return DeidRecord(
        patient_id=ORIGINAL_ID + patient, issuer_of_patient_id="HOSP", patient_name=ORIGINAL_NAME + patient,
        patient_birth_date=ORIGINAL_BIRTH, pseudo_patient_id=f"TESTORG-P{patient}",
        pseudo_patient_name=f"TESTORG-NAME{patient}",
        study_instance_uid=study, pseudo_study_instance_uid=p_study, accession_number=ORIGINAL_ACCESSION + patient,
        pseudo_accession_number=f"PACC{patient}", study_date="20240611",
        series_instance_uid=series, pseudo_series_instance_uid=p_series, modality="CT",
        sop_instance_uid=sop, pseudo_sop_instance_uid=p_sop, sop_class_uid=CT,
        uid_map={study: p_study, series: p_series, sop: p_sop, frame_of_ref: p_for},
        method_codes=("113100", "113105"),
    )


def queue(store: Store, record: DeidRecord, destinations=("remote",), priority: int = 0, path: str | None = None,
          size: int = 1000, transfer_syntax: str = EXPLICIT) -> None:
    """Queue one instance for the destinations as the pipeline does."""
    store.record_instance(record, calling_aet="MODALITY", path=path or f"/spool/{record.pseudo_sop_instance_uid}.dcm",
                          size=size, transfer_syntax=transfer_syntax, destinations=list(destinations),
                          priority=priority)


def rows(store: Store, sql: str = "SELECT * FROM queue ORDER BY id", params=()) -> list[dict]:
    cursor = store.db.execute(sql, list(params))
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, r)) for r in cursor.fetchall()]


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "db" / "telenode.sqlite")
    yield s
    s.close()


# -- schema -------------------------------------------------------------------------------------


def test_schema_version_and_wal(store):
    """A new database carries PRAGMA user_version == SCHEMA_VERSION and runs in WAL mode."""
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 1
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    tables = set(store.db.table_names())
    assert {"patients", "studies", "series", "instances", "uids", "queue", "audit"} <= tables
    # A separate connection agrees: the settings are in the file, not only in this connection.
    other = sqlite3.connect(store.path)
    try:
        assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert other.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    finally:
        other.close()


def test_synchronous_full(store):
    """Commits are durable on return: the connection runs with synchronous=FULL (2)."""
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_database_file_is_private(store):
    """The database (it holds PHI) and its WAL/SHM companions are readable by the owner only (0600)."""
    queue(store, make_record())  # forces WAL/SHM files into existence
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    for suffix in ("-wal", "-shm"):
        companion = store.path.with_name(store.path.name + suffix)
        if companion.exists():
            assert stat.S_IMODE(companion.stat().st_mode) & 0o077 == 0, f"{companion.name} is group/world readable"


def test_newer_schema_is_refused(tmp_path):
    """A database written by a newer telenode (higher user_version) is refused, not downgraded."""
    path = tmp_path / "telenode.sqlite"
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(sqlite3.DatabaseError, match="newer"):
        Store(path)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    finally:
        conn.close()


def test_reopen_keeps_data(tmp_path):
    """Mappings, queue rows and audit survive closing and reopening the same file."""
    path = tmp_path / "telenode.sqlite"
    first = Store(path)
    record = make_record()
    queue(first, record, destinations=("a", "b"))
    first.audit("reidentify", pseudonym=record.pseudo_patient_id, reason="test")
    first.close()

    second = Store(path)
    try:
        assert second.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        found = second.lookup(record.pseudo_sop_instance_uid)
        assert found is not None and found["sop_instance_uid"] == record.sop_instance_uid
        assert [r["id"] for r in second.claim_batch("a", 10)] == [1]
        assert [r["id"] for r in second.claim_batch("b", 10)] == [2]
        assert [a["event"] for a in second.audit_records()] == ["deidentified", "reidentify"]
        # Reopening did not re-run the schema or duplicate anything.
        assert second.db.execute("SELECT COUNT(*) FROM queue").fetchone()[0] == 2
    finally:
        second.close()


# -- mappings and lookup ------------------------------------------------------------------------


def test_lookup_by_pseudo_patient_id(store):
    """A pseudonymous PatientID leads back to the patient's original ID, issuer, name and birth date."""
    record = make_record()
    queue(store, record)
    found = store.lookup(record.pseudo_patient_id)
    assert found == {
        "level": "patient", "patient_id": record.patient_id, "issuer_of_patient_id": "HOSP",
        "patient_name": record.patient_name, "patient_birth_date": ORIGINAL_BIRTH,
        "pseudo_patient_id": record.pseudo_patient_id,
    }


def test_lookup_by_pseudo_accession(store):
    """A pseudonymous AccessionNumber leads back to the study with its original accession and patient."""
    record = make_record()
    queue(store, record)
    found = store.lookup(record.pseudo_accession_number)
    assert found["level"] == "study"
    assert found["accession_number"] == record.accession_number
    assert found["study_instance_uid"] == record.study_instance_uid
    assert found["patient_id"] == record.patient_id
    assert found["patient_name"] == record.patient_name


def test_lookup_by_pseudo_study_uid(store):
    """A pseudonymous StudyInstanceUID resolves at study level to the original UID, accession and date."""
    record = make_record()
    queue(store, record)
    found = store.lookup(record.pseudo_study_instance_uid)
    assert found["level"] == "study"
    assert found["study_instance_uid"] == record.study_instance_uid
    assert found["accession_number"] == record.accession_number
    assert found["study_date"] == "20240611"
    assert found["pseudo_study_instance_uid"] == record.pseudo_study_instance_uid
    assert found["patient_id"] == record.patient_id


def test_lookup_by_pseudo_series_uid(store):
    """A pseudonymous SeriesInstanceUID resolves at series level with its study and patient."""
    record = make_record()
    queue(store, record)
    found = store.lookup(record.pseudo_series_instance_uid)
    assert found["level"] == "series"
    assert found["series_instance_uid"] == record.series_instance_uid
    assert found["modality"] == "CT"
    assert found["study_instance_uid"] == record.study_instance_uid
    assert found["patient_id"] == record.patient_id


def test_lookup_by_pseudo_sop_instance_uid(store):
    """A pseudonymous SOPInstanceUID resolves at instance level to the whole original hierarchy."""
    record = make_record()
    queue(store, record)
    found = store.lookup(record.pseudo_sop_instance_uid)
    assert found["level"] == "instance"
    assert found["sop_instance_uid"] == record.sop_instance_uid
    assert found["sop_class_uid"] == CT
    assert found["series_instance_uid"] == record.series_instance_uid
    assert found["study_instance_uid"] == record.study_instance_uid
    assert found["accession_number"] == record.accession_number
    assert found["patient_id"] == record.patient_id
    assert found["patient_name"] == record.patient_name


def test_lookup_by_other_pseudo_uid(store):
    """Any other remapped UID (here a Frame of Reference UID) resolves through uid_map at 'uid' level."""
    record = make_record()
    queue(store, record)
    found = store.lookup("2.25.1400")
    assert found == {"level": "uid", "original_uid": "1.2.826.0.1.3680043.99.1.7", "pseudo_uid": "2.25.1400"}


def test_lookup_strips_whitespace(store):
    """Pasted pseudonyms with surrounding whitespace (DICOM padding) still resolve."""
    record = make_record()
    queue(store, record)
    assert store.lookup(f"  {record.pseudo_patient_id} \n")["patient_id"] == record.patient_id


def test_lookup_unknown_is_none(store):
    """An unknown pseudonym, and an original value, resolve to None."""
    record = make_record()
    queue(store, record)
    assert store.lookup("2.25.999999") is None
    assert store.lookup("TESTORG-NOBODY") is None
    assert store.lookup(record.patient_id) is None  # originals are not keys
    assert store.lookup(record.sop_instance_uid) is None


def test_two_patients_do_not_mix(store):
    """Lookups of two patients' pseudonyms return each one's own originals."""
    one, two = make_record(1, patient="1"), make_record(1, patient="2")
    queue(store, one)
    queue(store, two)
    assert store.lookup(one.pseudo_patient_id)["patient_id"] == one.patient_id
    assert store.lookup(two.pseudo_patient_id)["patient_id"] == two.patient_id
    assert store.lookup(two.pseudo_sop_instance_uid)["patient_name"] == two.patient_name


def test_record_mapping_without_queue(store):
    """record_mapping (anonymize of files) stores the mapping and an audit line but queues nothing."""
    record = make_record()
    store.record_mapping(record, source="file")
    assert store.lookup(record.pseudo_sop_instance_uid)["sop_instance_uid"] == record.sop_instance_uid
    assert store.db.execute("SELECT COUNT(*) FROM queue").fetchone()[0] == 0
    assert [a["source"] for a in store.audit_records("deidentified")] == ["file"]


# -- queue ----------------------------------------------------------------------------------


def test_record_instance_queues_one_row_per_destination(store):
    """record_instance queues a pending row for each destination with the file facts."""
    record = make_record()
    queue(store, record, destinations=("a", "b"), path="/spool/x.dcm", size=4242, priority=1)
    got = rows(store)
    assert [r["destination"] for r in got] == ["a", "b"]
    for r in got:
        assert r["status"] == PENDING
        assert r["pseudo_sop_instance_uid"] == record.pseudo_sop_instance_uid
        assert r["sop_class_uid"] == CT and r["transfer_syntax"] == EXPLICIT
        assert r["path"] == "/spool/x.dcm" and r["size"] == 4242 and r["priority"] == 1
        assert r["attempts"] == 0 and r["failures"] == 0 and r["last_error"] is None


def test_resend_while_pending_does_not_duplicate(store):
    """A resend of a still-pending instance updates its row (higher priority kept) instead of adding one."""
    record = make_record()
    queue(store, record, destinations=("a", "b"), priority=0, size=100)
    queue(store, record, destinations=("a", "b"), priority=1, size=200)
    queue(store, record, destinations=("a", "b"), priority=0, size=300)
    got = rows(store)
    assert len(got) == 2
    assert [r["priority"] for r in got] == [1, 1]
    assert [r["size"] for r in got] == [300, 300]
    assert len(store.claim_batch("a", 10)) == 1


def test_resend_while_pending_updates_transfer_syntax(store):
    """A resend that arrives in another transfer syntax updates the queued row to match the rewritten file."""
    record = make_record()
    queue(store, record, transfer_syntax=EXPLICIT)
    queue(store, record, transfer_syntax=IMPLICIT)
    got = rows(store)
    assert len(got) == 1
    assert got[0]["transfer_syntax"] == IMPLICIT


def test_resend_after_sent_queues_again(store):
    """A resend of an instance already sent queues a new pending row (the remote gets it again)."""
    record = make_record()
    queue(store, record)
    first = store.claim_batch("remote", 10)
    store.mark_sent([first[0]["id"]])
    queue(store, record)
    got = rows(store)
    assert [r["status"] for r in got] == [SENT, PENDING]
    assert [r["id"] for r in store.claim_batch("remote", 10)] == [got[1]["id"]]


def test_claim_batch_orders_priority_then_id(store):
    """claim_batch returns due pending rows by priority DESC, then insertion order; limited and per destination."""
    priorities = [0, -1, 1, 0, 1, 0, -1]
    for n, priority in enumerate(priorities, start=1):
        queue(store, make_record(n), priority=priority)
    queue(store, make_record(99), destinations=("other",), priority=5)
    batch = store.claim_batch("remote", 100)
    assert [(r["priority"], r["id"]) for r in batch] == [(1, 3), (1, 5), (0, 1), (0, 4), (0, 6), (-1, 2), (-1, 7)]
    assert [r["id"] for r in store.claim_batch("remote", 3)] == [3, 5, 1]
    assert [r["pseudo_sop_instance_uid"] for r in store.claim_batch("other", 10)] == ["2.25.130099"]
    assert store.claim_batch("nowhere", 10) == []


def test_claim_batch_is_not_destructive(store):
    """Claiming does not change the rows: a second claim returns the same rows until they are marked."""
    for n in range(3):
        queue(store, make_record(n))
    first = store.claim_batch("remote", 10)
    assert store.claim_batch("remote", 10) == first
    assert len(first) == 3


def test_mark_sent_single_destination_returns_path(store):
    """With one destination, mark_sent returns the spool path and the row leaves the queue."""
    record = make_record()
    queue(store, record, path="/spool/one.dcm")
    batch = store.claim_batch("remote", 10)
    assert store.mark_sent([r["id"] for r in batch]) == ["/spool/one.dcm"]
    assert store.claim_batch("remote", 10) == []
    assert rows(store)[0]["status"] == SENT
    assert store.mark_sent([]) == []


def test_mark_sent_waits_for_every_destination(store):
    """The path is returned only when the last destination's row is sent, not before."""
    queue(store, make_record(1), destinations=("a", "b"), path="/spool/1.dcm")
    queue(store, make_record(2), destinations=("a", "b"), path="/spool/2.dcm")
    a = store.claim_batch("a", 10)
    assert store.mark_sent([r["id"] for r in a]) == []  # b still needs both files
    b = store.claim_batch("b", 10)
    assert store.mark_sent([b[0]["id"]]) == ["/spool/1.dcm"]
    assert store.mark_sent([b[1]["id"]]) == ["/spool/2.dcm"]


def test_mark_sent_clears_last_error(store):
    """A row that had an error and is then sent carries no last_error any more."""
    queue(store, make_record())
    row = store.claim_batch("remote", 1)[0]
    store.mark_retry(row["id"], "status 0xA700", 0.0, failure=True)
    store.mark_sent([row["id"]])
    assert rows(store)[0]["last_error"] is None
    assert store.status()["remote"]["last_error"] is None


def test_mark_retry_delays_and_counts(store):
    """mark_retry makes the row unclaimable until due, counts attempts, and failures only if asked."""
    queue(store, make_record(1))
    queue(store, make_record(2))
    first = store.claim_batch("remote", 10)[0]
    before = time.time()
    store.mark_retry(first["id"], "status 0xA700: busy", 0.6, failure=True)
    assert [r["id"] for r in store.claim_batch("remote", 10)] == [2]
    row = rows(store)[0]
    assert row["attempts"] == 1 and row["failures"] == 1 and row["last_error"] == "status 0xA700: busy"
    assert row["status"] == PENDING
    assert before + 0.5 <= row["due"] <= time.time() + 0.7
    assert store.next_due("remote") <= time.time()  # row 2 is due now
    time.sleep(0.7)
    assert [r["id"] for r in store.claim_batch("remote", 10)] == [1, 2]
    claimed = store.claim_batch("remote", 10)[0]
    assert claimed["failures"] == 1 and claimed["attempts"] == 1

    store.mark_retry(first["id"], "remote unreachable", 0.0, failure=False)
    row = rows(store)[0]
    assert row["attempts"] == 2 and row["failures"] == 1


def test_next_due(store):
    """next_due is the earliest due time of pending rows, None when nothing is pending."""
    assert store.next_due("remote") is None
    queue(store, make_record())
    row = store.claim_batch("remote", 1)[0]
    store.mark_retry(row["id"], "x", 30.0, failure=True)
    due = store.next_due("remote")
    assert time.time() + 29 < due < time.time() + 31
    store.mark_failed(row["id"], "x")
    assert store.next_due("remote") is None


def test_mark_failed(store):
    """mark_failed sets the row failed with the error; it is never claimed again."""
    queue(store, make_record(1))
    queue(store, make_record(2))
    row = store.claim_batch("remote", 1)[0]
    store.mark_failed(row["id"], "status 0xC000: cannot understand")
    got = rows(store)[0]
    assert got["status"] == FAILED
    assert got["last_error"] == "status 0xC000: cannot understand"
    assert got["attempts"] == 1 and got["failures"] == 1
    assert [r["id"] for r in store.claim_batch("remote", 10)] == [2]


def test_note_error_marks_due_pending_rows(store):
    """note_error records a destination-wide error on its due pending rows only."""
    queue(store, make_record(1), destinations=("a", "b"))
    store.note_error("a", "remote unreachable or aborted")
    got = rows(store)
    assert got[0]["last_error"] == "remote unreachable or aborted" and got[0]["attempts"] == 1
    assert got[1]["last_error"] is None and got[1]["attempts"] == 0
    assert store.status()["a"]["last_error"] == "remote unreachable or aborted"


def test_status_counts_age_and_last_error(store):
    """status() reports pending/sent/failed counts, oldest pending age and the last error per destination."""
    assert store.status() == {}
    for n in range(1, 6):
        queue(store, make_record(n), destinations=("a", "b"))
    time.sleep(1.1)
    a = store.claim_batch("a", 10)
    store.mark_sent([a[0]["id"], a[1]["id"]])
    store.mark_failed(a[2]["id"], "status 0xA700")
    store.mark_retry(a[3]["id"], "status 0xC000", 0.0, failure=True)
    status = store.status()
    assert set(status) == {"a", "b"}
    assert status["a"][PENDING] == 2 and status["a"][SENT] == 2 and status["a"][FAILED] == 1
    assert status["a"]["last_error"] == "status 0xC000"  # the highest id with an error
    assert 1.0 <= status["a"]["oldest_pending_age_s"] < 30
    assert status["b"] == {PENDING: 5, SENT: 0, FAILED: 0, "oldest_pending_age_s": status["b"]["oldest_pending_age_s"],
                           "last_error": None}
    assert status["b"]["oldest_pending_age_s"] >= 1.0


def test_status_without_pending(store):
    """A destination with nothing pending reports age None and its counts."""
    queue(store, make_record())
    store.mark_sent([store.claim_batch("remote", 1)[0]["id"]])
    assert store.status() == {"remote": {PENDING: 0, SENT: 1, FAILED: 0, "oldest_pending_age_s": None,
                                         "last_error": None}}


# -- audit ----------------------------------------------------------------------------------


def test_audit_rows_are_json(store):
    """audit() stores one JSON detail per event, returned with time and event by audit_records()."""
    store.audit("reidentify", pseudonym="TESTORG-P1", reason="tumour board", operator="dr_x")
    store.audit("forward_failed", destination="remote", count=3)
    raw = store.db.execute("SELECT event, detail, time FROM audit ORDER BY id").fetchall()
    assert json.loads(raw[0][1]) == {"pseudonym": "TESTORG-P1", "reason": "tumour board", "operator": "dr_x"}
    assert json.loads(raw[1][1]) == {"destination": "remote", "count": 3}
    assert all(time_.endswith("Z") and "T" in time_ for _, _, time_ in raw)
    records = store.audit_records("reidentify")
    assert len(records) == 1
    assert records[0]["event"] == "reidentify" and records[0]["reason"] == "tumour board"
    assert [r["event"] for r in store.audit_records()] == ["reidentify", "forward_failed"]


def test_deidentified_audit_has_pseudonyms_only(store):
    """The 'deidentified' audit line names pseudonyms and methods; no original value is in any audit row."""
    record = make_record()
    queue(store, record, destinations=("a", "b"))
    store.record_mapping(make_record(2), source="file", calling_aet="")
    lines = store.audit_records("deidentified")
    assert len(lines) == 2
    first = lines[0]
    assert first["patient_id"] == record.pseudo_patient_id
    assert first["study_instance_uid"] == record.pseudo_study_instance_uid
    assert first["sop_instance_uid"] == record.pseudo_sop_instance_uid
    assert first["method_codes"] == ["113100", "113105"]
    assert first["source"] == "scp" and first["calling_aet"] == "MODALITY"
    originals = [record.patient_id, record.patient_name, "Doe", "Johnathan", ORIGINAL_ID, ORIGINAL_BIRTH,
                 record.accession_number, record.study_instance_uid, record.series_instance_uid,
                 record.sop_instance_uid, "1.2.826.0.1.3680043.99"]
    for event, detail in store.db.execute("SELECT event, detail FROM audit").fetchall():
        for value in originals:
            assert value not in detail, f"original {value!r} in audit {event}"


def test_queue_holds_no_originals(store):
    """The queue table holds pseudonyms only: no original identifier appears in any of its rows."""
    record = make_record()
    queue(store, record, destinations=("a", "b"))
    dump = json.dumps(rows(store))
    for value in (record.patient_id, record.patient_name, record.accession_number, record.sop_instance_uid,
                  record.study_instance_uid):
        assert value not in dump
