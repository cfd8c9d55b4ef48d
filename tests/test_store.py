"""The SQLite mapping store: schema, mappings and lookup, the forwarding queue, status and audit.

Every test uses a real database file under tmp_path; nothing is mocked.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest

from node.deid.record import DeidRecord
from node.store import FAILED, INFLIGHT, PENDING, SCHEMA_VERSION, SENT, QueueRow, Store, empty_status

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
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    tables = set(store.db.table_names())
    assert {"patients", "studies", "series", "instances", "uids", "queue", "audit", "destinations"} <= tables
    assert set(store.db["destinations"].columns_dict) == {"name", "paused", "last_error", "error_time", "updated"}
    assert store.db["destinations"].pks == ["name"]
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
        assert [r.id for r in second.claim_batch("a", 10)] == [1]
        assert [r.id for r in second.claim_batch("b", 10)] == [2]
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
    store.mark_sent([first[0].id])
    queue(store, record)
    got = rows(store)
    assert [r["status"] for r in got] == [SENT, PENDING]
    assert [r.id for r in store.claim_batch("remote", 10)] == [got[1]["id"]]


def test_claim_batch_orders_priority_then_id(store):
    """claim_batch returns due pending rows by priority DESC, then insertion order; limited and per destination."""
    priorities = [0, -1, 1, 0, 1, 0, -1]
    for n, priority in enumerate(priorities, start=1):
        queue(store, make_record(n), priority=priority)
    queue(store, make_record(99), destinations=("other",), priority=5)
    first = store.claim_batch("remote", 3)
    assert [(r.priority, r.id) for r in first] == [(1, 3), (1, 5), (0, 1)]
    rest = store.claim_batch("remote", 100)
    assert [(r.priority, r.id) for r in rest] == [(0, 4), (0, 6), (-1, 2), (-1, 7)]
    assert [r.pseudo_sop_instance_uid for r in store.claim_batch("other", 10)] == ["2.25.130099"]
    assert store.claim_batch("nowhere", 10) == []
    assert store.claim_batch("remote", 100) == []


def test_claim_batch_marks_inflight(store):
    """Claiming marks the rows in flight: a second claim does not return them, only rows queued since."""
    for n in range(3):
        queue(store, make_record(n))
    first = store.claim_batch("remote", 10)
    assert len(first) == 3
    assert isinstance(first[0], QueueRow) and first[0].destination == "remote" and first[0].status == INFLIGHT
    assert [r["status"] for r in rows(store)] == [INFLIGHT] * 3
    assert all(r["attempts"] == 0 and r["failures"] == 0 for r in rows(store))  # claiming is not an attempt
    assert store.claim_batch("remote", 10) == []
    assert store.next_due("remote") is None  # nothing pending: in-flight rows are not waiting
    queue(store, make_record(7))
    second = store.claim_batch("remote", 10)
    assert [r.pseudo_sop_instance_uid for r in second] == ["2.25.13007"]
    assert not {r.id for r in first} & {r.id for r in second}


def test_queue_row_repr_holds_pseudonyms_only(store):
    """A claimed row (and its repr, which may reach a log or a traceback) carries no original value."""
    record = make_record(3)
    queue(store, record)
    [row] = store.claim_batch("remote", 10)
    text = repr(row)
    assert record.pseudo_sop_instance_uid in text and "'remote'" in text
    for original in (record.patient_id, record.patient_name, record.patient_birth_date, record.accession_number,
                     record.study_instance_uid, record.series_instance_uid, record.sop_instance_uid):
        assert original not in text
    assert store.failed_row(row.id) == row  # the claimed record is the stored row, in flight


def test_mark_sent_single_destination_returns_path(store):
    """With one destination, mark_sent returns the spool path and the row leaves the queue."""
    record = make_record()
    queue(store, record, path="/spool/one.dcm")
    batch = store.claim_batch("remote", 10)
    assert store.mark_sent([r.id for r in batch]) == ["/spool/one.dcm"]
    assert store.claim_batch("remote", 10) == []
    assert rows(store)[0]["status"] == SENT
    assert store.mark_sent([]) == []


def test_mark_sent_waits_for_every_destination(store):
    """The path is returned only when the last destination's row is sent, not before."""
    queue(store, make_record(1), destinations=("a", "b"), path="/spool/1.dcm")
    queue(store, make_record(2), destinations=("a", "b"), path="/spool/2.dcm")
    a = store.claim_batch("a", 10)
    assert store.mark_sent([r.id for r in a]) == []  # b still needs both files
    b = store.claim_batch("b", 10)
    assert store.mark_sent([b[0].id]) == ["/spool/1.dcm"]
    assert store.mark_sent([b[1].id]) == ["/spool/2.dcm"]


def test_mark_sent_keeps_path_needed_in_flight(store):
    """A file another destination is sending right now (in flight) is not returned by mark_sent."""
    queue(store, make_record(1), destinations=("a", "b"), path="/spool/1.dcm")
    a, b = store.claim_batch("a", 10), store.claim_batch("b", 10)
    assert store.mark_sent([a[0].id]) == []
    assert store.mark_sent([b[0].id]) == ["/spool/1.dcm"]


def test_mark_sent_clears_last_error(store):
    """A row that had an error and is then sent carries no last_error any more."""
    queue(store, make_record())
    row = store.claim_batch("remote", 1)[0]
    store.mark_retry(row.id, "status 0xA700", 0.0, failure=True)
    store.mark_sent([row.id])
    assert rows(store)[0]["last_error"] is None
    assert store.status()["remote"]["last_error"] is None


def test_mark_sent_clears_destination_error_of_its_destination_only(store):
    """mark_sent clears the destination-wide last_error of the sent rows' destination, not of the others."""
    queue(store, make_record(1), destinations=("a", "b"))
    store.note_error("a", "remote unreachable or aborted")
    store.note_error("b", "association rejected")
    store.mark_sent([store.claim_batch("a", 10)[0].id])
    status = store.status()
    assert status["a"]["last_error"] is None
    assert status["b"]["last_error"] == "association rejected"
    assert rows(store, "SELECT name, last_error FROM destinations ORDER BY name") == [
        {"name": "a", "last_error": None}, {"name": "b", "last_error": "association rejected"}]


def test_mark_retry_delays_and_counts(store):
    """mark_retry sets the row pending again, unclaimable until due; counts attempts, and failures only if asked."""
    queue(store, make_record(1))
    queue(store, make_record(2))
    first = store.claim_batch("remote", 1)[0]
    assert first.id == 1
    before = time.time()
    store.mark_retry(first.id, "status 0xA700: busy", 0.6, failure=True)
    row = rows(store)[0]
    assert row["status"] == PENDING
    assert row["attempts"] == 1 and row["failures"] == 1 and row["last_error"] == "status 0xA700: busy"
    assert before + 0.5 <= row["due"] <= time.time() + 0.7
    assert store.next_due("remote") <= time.time()  # row 2 is pending and due now
    assert [r.id for r in store.claim_batch("remote", 10)] == [2]
    assert store.claim_batch("remote", 10) == []  # row 1 is not due yet
    assert store.next_due("remote") == pytest.approx(row["due"])  # only row 1 is pending
    time.sleep(0.7)
    claimed = store.claim_batch("remote", 10)
    assert [r.id for r in claimed] == [1]
    assert claimed[0].failures == 1 and claimed[0].attempts == 1

    store.mark_retry(first.id, "remote unreachable", 0.0, failure=False)
    row = rows(store)[0]
    assert row["status"] == PENDING and row["attempts"] == 2 and row["failures"] == 1
    assert [r.id for r in store.claim_batch("remote", 10)] == [1]


def test_next_due(store):
    """next_due is the earliest due time of pending rows, None when nothing is pending."""
    assert store.next_due("remote") is None
    queue(store, make_record())
    row = store.claim_batch("remote", 1)[0]
    store.mark_retry(row.id, "x", 30.0, failure=True)
    due = store.next_due("remote")
    assert time.time() + 29 < due < time.time() + 31
    store.mark_failed(row.id, "x")
    assert store.next_due("remote") is None


def test_mark_failed(store):
    """mark_failed sets the row failed with the error; it is never claimed again."""
    queue(store, make_record(1))
    queue(store, make_record(2))
    row = store.claim_batch("remote", 1)[0]
    store.mark_failed(row.id, "status 0xC000: cannot understand")
    got = rows(store)[0]
    assert got["status"] == FAILED
    assert got["last_error"] == "status 0xC000: cannot understand"
    assert got["attempts"] == 1 and got["failures"] == 1
    assert [r.id for r in store.claim_batch("remote", 10)] == [2]
    assert store.recover() == 1  # row 2 only: a failed row is not brought back
    assert rows(store)[0]["status"] == FAILED
    assert [r.id for r in store.claim_batch("remote", 10)] == [2]


def test_mark_failed_returns_path_only_when_unneeded(store):
    """mark_failed returns the spool path only once no other destination's row (pending or in flight) needs it."""
    queue(store, make_record(1), destinations=("a", "b"), path="/spool/1.dcm")  # ids 1 (a), 2 (b)
    queue(store, make_record(2), destinations=("a", "b"), path="/spool/2.dcm")  # ids 3 (a), 4 (b)
    queue(store, make_record(3), destinations=("a",), path="/spool/3.dcm")  # id 5 (a)
    assert [r.id for r in store.claim_batch("a", 10)] == [1, 3, 5]
    assert store.mark_failed(1, "status 0xC000") == []  # b's row 2 is still pending
    assert [r.id for r in store.claim_batch("b", 10)] == [2, 4]
    assert store.mark_failed(3, "status 0xC000") == []  # b's row 4 is in flight
    assert store.mark_failed(5, "status 0xC000") == ["/spool/3.dcm"]  # nobody else needs it
    assert store.mark_sent([2]) == ["/spool/1.dcm"]  # a gave up on it, b has sent it
    assert store.mark_failed(4, "status 0xC000") == ["/spool/2.dcm"]  # both gave up


def test_release_puts_inflight_rows_back_after_delay(store):
    """release() makes in-flight rows pending again, due after the delay, uncounted; other rows are untouched."""
    for n in range(1, 5):
        queue(store, make_record(n))
    store.mark_sent([store.claim_batch("remote", 1)[0].id])  # row 1 sent
    assert [r.id for r in store.claim_batch("remote", 2)] == [2, 3]  # row 4 stays pending
    untouched = {r["id"]: r for r in rows(store) if r["id"] in (1, 4)}
    before = time.time()
    store.release([1, 2, 3, 4], 0.5)
    after = time.time()
    got = {r["id"]: r for r in rows(store)}
    assert got[1] == untouched[1] and got[4] == untouched[4]
    for row_id in (2, 3):
        assert got[row_id]["status"] == PENDING
        assert before + 0.5 <= got[row_id]["due"] <= after + 0.5
        assert got[row_id]["attempts"] == 0 and got[row_id]["failures"] == 0 and got[row_id]["last_error"] is None
    assert [r.id for r in store.claim_batch("remote", 10)] == [4]  # 2 and 3 are not due yet
    time.sleep(0.6)
    assert [r.id for r in store.claim_batch("remote", 10)] == [2, 3]
    store.release([])  # nothing to do
    store.release([2, 3])  # default: due at once
    assert [r.id for r in store.claim_batch("remote", 10)] == [2, 3]


def test_recover_after_crash(tmp_path):
    """Rows a killed node left in flight come back as pending on recover(), which returns their number."""
    path = tmp_path / "telenode.sqlite"
    first = Store(path)
    for n in range(1, 6):
        queue(first, make_record(n))
    assert [r.id for r in first.claim_batch("remote", 3)] == [1, 2, 3]
    first.mark_sent([1])
    first.mark_retry(2, "status 0xA700", 0.0, failure=False)
    assert [r.id for r in first.claim_batch("remote", 1)] == [2]
    first.close()  # the "crash": rows 2 and 3 are still in flight

    second = Store(path)
    try:
        assert [r["status"] for r in rows(second)] == [SENT, INFLIGHT, INFLIGHT, PENDING, PENDING]
        assert second.status()["remote"][INFLIGHT] == 2
        assert second.recover() == 2
        got = rows(second)
        assert [r["status"] for r in got] == [SENT, PENDING, PENDING, PENDING, PENDING]
        assert got[1]["attempts"] == 1 and got[1]["last_error"] == "status 0xA700"  # history kept
        assert second.recover() == 0
        status = second.status()["remote"]
        assert status[PENDING] == 4 and status[INFLIGHT] == 0 and status[SENT] == 1
        assert [r.id for r in second.claim_batch("remote", 10)] == [2, 3, 4, 5]
    finally:
        second.close()


def _claim_all(store: Store, start: threading.Barrier, got: list[int], errors: list[BaseException]) -> None:
    """Claim batches of 3 until the queue is empty, appending the claimed ids to `got`."""
    try:
        start.wait(10)
        while True:
            batch = store.claim_batch("remote", 3)
            if not batch:
                return
            got.extend(r.id for r in batch)
            time.sleep(0)  # let the other claimers in
    except BaseException as exc:  # pragma: no cover - reported by the test
        errors.append(exc)


def _run_claimers(stores: list[Store]) -> list[list[int]]:
    start = threading.Barrier(len(stores))
    results: list[list[int]] = [[] for _ in stores]
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_claim_all, args=(s, start, results[i], errors)) for i, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    return results


def test_parallel_claimers_same_store_never_share_a_row(store):
    """Four threads claiming from one Store over 200 rows never get the same row id, and together get all."""
    for n in range(200):
        queue(store, make_record(n))
    results = _run_claimers([store] * 4)
    claimed = [i for result in results for i in result]
    assert len(claimed) == 200
    assert sorted(claimed) == list(range(1, 201))
    assert store.status()["remote"][INFLIGHT] == 200


def test_parallel_claimers_two_stores_never_share_a_row(tmp_path):
    """Two Store objects on the same file (two threads each) never claim the same row id across 200 rows."""
    path = tmp_path / "telenode.sqlite"
    one = Store(path)
    two = Store(path)
    try:
        for n in range(200):
            queue(one, make_record(n))
        a, b = one.claim_batch("remote", 5), two.claim_batch("remote", 5)
        assert [r.id for r in a] == [1, 2, 3, 4, 5]
        assert [r.id for r in b] == [6, 7, 8, 9, 10]  # the other connection sees the rows in flight
        results = _run_claimers([one, two, one, two])
        claimed = [r.id for r in a + b] + [i for result in results for i in result]
        assert len(claimed) == 200
        assert sorted(claimed) == list(range(1, 201))
        assert two.status()["remote"][INFLIGHT] == 200
    finally:
        one.close()
        two.close()


def test_higher_priority_waiting(store):
    """higher_priority_waiting is true only for a due pending row of strictly higher priority, same destination."""
    queue(store, make_record(1), priority=0)
    queue(store, make_record(2), priority=1)
    queue(store, make_record(3), destinations=("other",), priority=5)
    assert store.higher_priority_waiting("remote", 0) is True
    assert store.higher_priority_waiting("remote", -1) is True
    assert store.higher_priority_waiting("remote", 1) is False  # equal is not higher
    assert store.higher_priority_waiting("nowhere", 0) is False
    stat_row = store.claim_batch("remote", 1)[0]
    assert stat_row.priority == 1
    assert store.higher_priority_waiting("remote", 0) is False  # in flight is not waiting
    store.release([stat_row.id], 30.0)
    assert store.higher_priority_waiting("remote", 0) is False  # pending but not due
    store.mark_retry(stat_row.id, "status 0xA700", 0.0, failure=False)
    assert store.higher_priority_waiting("remote", 0) is True
    assert store.higher_priority_waiting("other", 4) is True and store.higher_priority_waiting("other", 5) is False


def test_pause_resume_persisted(tmp_path):
    """set_paused is stored in the file: a new Store sees it, status reports it, resume is persisted too."""
    path = tmp_path / "telenode.sqlite"
    first = Store(path)
    assert first.is_paused("a") is False  # unknown destination: not paused
    first.note_error("a", "association rejected")
    first.set_paused("a", True)
    first.set_paused("a", True)  # idempotent
    assert first.is_paused("a") is True and first.is_paused("b") is False
    first.close()

    second = Store(path)
    try:
        assert second.is_paused("a") is True
        assert second.status() == {"a": {**empty_status(), "paused": True, "last_error": "association rejected"}}
        second.set_paused("a", False)
    finally:
        second.close()

    third = Store(path)
    try:
        assert third.is_paused("a") is False
        assert third.status()["a"]["paused"] is False
        assert third.status()["a"]["last_error"] == "association rejected"  # pausing does not touch the error
    finally:
        third.close()


def test_requeue_failed_row(store):
    """requeue adds a fresh pending row for the destination from a failed row; the failed row stays failed."""
    queue(store, make_record(1), priority=1, path="/spool/1.dcm", size=500, transfer_syntax=IMPLICIT)
    row = store.claim_batch("remote", 1)[0]
    assert store.mark_failed(row.id, "status 0xC000") == ["/spool/1.dcm"]
    failed = store.failed_row(row.id)
    assert failed is not None and failed.status == FAILED and failed.last_error == "status 0xC000"
    assert failed.attempts == 1
    assert store.failed_row(999) is None
    before = time.time()
    store.requeue("remote", dataclasses.replace(failed, path="/spool/q.dcm", size=77))
    new = rows(store)[1]
    assert new["id"] != row.id and new["destination"] == "remote"
    assert new["status"] == PENDING and new["attempts"] == 0 and new["failures"] == 0 and new["last_error"] is None
    assert new["path"] == "/spool/q.dcm" and new["size"] == 77 and new["priority"] == 1
    assert new["pseudo_sop_instance_uid"] == "2.25.13001" and new["sop_class_uid"] == CT
    assert new["transfer_syntax"] == IMPLICIT
    assert before - 1 <= new["due"] <= time.time()
    assert rows(store)[0]["status"] == FAILED
    assert [r.id for r in store.claim_batch("remote", 10)] == [new["id"]]
    store.requeue("other", {k: v for k, v in dataclasses.asdict(failed).items() if k != "priority"})
    other = rows(store)[2]
    assert other["destination"] == "other" and other["priority"] == 0 and other["status"] == PENDING
    status = store.status()
    assert status["remote"][FAILED] == 1 and status["remote"][INFLIGHT] == 1 and status["other"][PENDING] == 1


def test_note_error_is_destination_wide(store):
    """note_error records the error for the destination only; queue rows are left untouched."""
    queue(store, make_record(1), destinations=("a", "b"))
    queue(store, make_record(2), destinations=("a",))
    store.claim_batch("a", 1)
    before_rows = rows(store)
    before = time.time()
    store.note_error("a", "remote unreachable or aborted")
    assert rows(store) == before_rows
    dest = rows(store, "SELECT * FROM destinations WHERE name = 'a'")[0]
    assert dest["last_error"] == "remote unreachable or aborted" and dest["paused"] == 0
    assert before <= dest["error_time"] <= time.time()
    status = store.status()
    assert status["a"]["last_error"] == "remote unreachable or aborted"
    assert status["b"]["last_error"] is None
    store.note_error("c", "association rejected")  # a destination with nothing queued
    assert store.status()["c"] == {**empty_status(), "last_error": "association rejected"}
    store.note_error("a", "association rejected")  # the latest error wins
    assert store.status()["a"]["last_error"] == "association rejected"


def test_status_prefers_destination_error_over_row_error(store):
    """status() reports the destination-wide error in preference to the latest row error."""
    queue(store, make_record(1))
    row = store.claim_batch("remote", 1)[0]
    store.mark_retry(row.id, "status 0xA700", 0.0, failure=False)
    assert store.status()["remote"]["last_error"] == "status 0xA700"
    store.note_error("remote", "remote unreachable or aborted")
    assert store.status()["remote"]["last_error"] == "remote unreachable or aborted"


def test_status_counts_age_and_last_error(store):
    """status() reports pending/inflight/sent/failed counts, oldest waiting age, last error and paused."""
    assert store.status() == {}
    for n in range(1, 6):
        queue(store, make_record(n), destinations=("a", "b"))
    time.sleep(0.6)
    a = store.claim_batch("a", 10)
    store.mark_sent([a[0].id, a[1].id])
    store.mark_failed(a[2].id, "status 0xA700")
    store.mark_retry(a[3].id, "status 0xC000", 0.0, failure=True)  # a[4] stays in flight
    status = store.status()
    assert set(status) == {"a", "b"}
    assert status["a"][PENDING] == 1 and status["a"][INFLIGHT] == 1
    assert status["a"][SENT] == 2 and status["a"][FAILED] == 1
    assert status["a"]["last_error"] == "status 0xC000"  # the highest id with an error
    assert status["a"]["paused"] is False
    assert 0.5 <= status["a"]["oldest_pending_age_s"] < 30
    assert status["b"] == {PENDING: 5, INFLIGHT: 0, SENT: 0, FAILED: 0,
                           "oldest_pending_age_s": status["b"]["oldest_pending_age_s"], "last_error": None,
                           "paused": False}
    assert status["b"]["oldest_pending_age_s"] >= 0.5


def test_status_age_counts_inflight_rows(store):
    """oldest_pending_age_s covers in-flight rows too: an old row being sent keeps the age up."""
    queue(store, make_record(1))
    time.sleep(0.6)
    queue(store, make_record(2))
    old = store.claim_batch("remote", 1)[0]
    assert old.id == 1
    assert store.status()["remote"]["oldest_pending_age_s"] >= 0.5
    store.mark_sent([old.id])
    assert store.status()["remote"]["oldest_pending_age_s"] < 0.5


def test_status_without_pending(store):
    """A destination with nothing pending or in flight reports age None and its counts."""
    queue(store, make_record())
    store.mark_sent([store.claim_batch("remote", 1)[0].id])
    assert store.status() == {"remote": {PENDING: 0, INFLIGHT: 0, SENT: 1, FAILED: 0, "oldest_pending_age_s": None,
                                         "last_error": None, "paused": False}}


def test_empty_status_shape(store):
    """empty_status() is the per-destination shape with nothing queued, a fresh dict on every call."""
    assert empty_status() == {PENDING: 0, INFLIGHT: 0, SENT: 0, FAILED: 0, "oldest_pending_age_s": None,
                              "last_error": None, "paused": False}
    one = empty_status()
    one[PENDING] = 9
    assert empty_status()[PENDING] == 0
    store.set_paused("idle", True)
    assert store.status() == {"idle": {**empty_status(), "paused": True}}
    assert set(store.status()["idle"]) == set(empty_status())


def test_migration_from_v1(tmp_path):
    """A v1 database (no destinations table, user_version 1) is migrated to the current schema on open, its data intact."""
    path = tmp_path / "telenode.sqlite"
    old = Store(path)
    record = make_record()
    queue(old, record, destinations=("a", "b"), path="/spool/1.dcm")
    old.mark_sent([old.claim_batch("a", 10)[0].id])
    old.audit("reidentify", pseudonym=record.pseudo_patient_id, reason="test")
    old.db.execute("PRAGMA user_version=1")
    old.db.execute("DROP TABLE destinations")
    before_queue, before_audit = rows(old), old.audit_records()
    old.close()
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 1
        assert raw.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'destinations'").fetchone()[0] == 0
    finally:
        raw.close()

    new = Store(path)
    try:
        assert new.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        assert "destinations" in new.db.table_names()
        assert set(new.db["destinations"].columns_dict) == {"name", "paused", "last_error", "error_time", "updated"}
        assert rows(new) == before_queue
        assert new.audit_records() == before_audit
        assert new.lookup(record.pseudo_sop_instance_uid)["sop_instance_uid"] == record.sop_instance_uid
        assert new.status()["b"][PENDING] == 1 and new.status()["a"][SENT] == 1
        new.set_paused("b", True)
        new.note_error("b", "association rejected")
        assert new.status()["b"]["paused"] is True and new.status()["b"]["last_error"] == "association rejected"
    finally:
        new.close()
    again = Store(path)  # a second open does not migrate again or lose the v2 state
    try:
        assert again.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert again.is_paused("b") is True
        assert len(rows(again)) == len(before_queue)
    finally:
        again.close()


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


def test_a_transaction_sqlite_already_rolled_back_keeps_its_error_and_copies_nothing(tmp_path):
    """On SQLITE_FULL/IOERR SQLite rolls back by itself: the caller must see that error (not "no
    transaction is active"), and the audit records of the lost transaction must not reach the sinks."""
    import sqlite3 as sql

    store = Store(tmp_path / "db.sqlite", audit_file=tmp_path / "audit.jsonl")
    with pytest.raises(sql.OperationalError, match="disk is full"):
        with store.batch():
            store.audit("phantom", n=1)
            store.db.conn.execute("ROLLBACK")  # what SQLite does itself on SQLITE_FULL
            raise sql.OperationalError("database or disk is full")
    store.audit("real")
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [line["event"] for line in lines] == ["real"]
    assert [r["event"] for r in store.audit_records()] == ["real"]
    store.close()
