"""Study batches on a real store: membership, completeness after stable_seconds, late arrivals, manifests.

Instances are recorded and queued through the real Store (as the pipeline does); time is
moved by giving `assign` a clock and by dating queue rows, not by sleeping.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from node.batches import Batches, recent_studies, study_token
from node.deid.record import DeidRecord
from node.store import Store

STABLE = 30.0


class Study:
    """A pseudonymous study whose instances are queued in a real store."""

    def __init__(self, store: Store, accession: str = "ACCTOKEN00000001") -> None:
        self.store, self.accession = store, accession
        self.uid, self.series = generate_uid(), [generate_uid(), generate_uid()]

    def add(self, count: int, destinations: tuple[str, ...] = ("s3",), priority: int = 0) -> list[str]:
        uids = []
        for index in range(count):
            uid = generate_uid()
            record = DeidRecord(
                patient_id="P1", pseudo_patient_id="TESTORG-AAAAAAAAAAAA", study_instance_uid=generate_uid(),
                pseudo_study_instance_uid=self.uid, accession_number="A1" if self.accession else "",
                pseudo_accession_number=self.accession, series_instance_uid=generate_uid(),
                pseudo_series_instance_uid=self.series[index % 2], modality="CT", sop_instance_uid=generate_uid(),
                pseudo_sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.2")
            self.store.record_instance(record, calling_aet="CT", path=f"/spool/{uid}.dcm", size=100,
                                       transfer_syntax="1.2.840.10008.1.2.1", destinations=list(destinations),
                                       priority=priority)
            uids.append(uid)
        return uids


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "telenode.sqlite")
    yield store
    store.close()


@pytest.fixture
def batches(store: Store) -> Batches:
    batches = Batches(store.path, STABLE)
    yield batches
    batches.close()


def age_rows(store: Store, seconds: float) -> None:
    """Pretend every queued row arrived `seconds` earlier."""
    with store.batch():
        store.db.execute("UPDATE queue SET created = created - ?", [seconds])


def send_all(store: Store, destination: str) -> None:
    rows = store.claim_batch(destination, 1000)
    store.mark_sent([r.id for r in rows])


def test_a_study_is_one_batch_complete_after_stable_seconds(store, batches):
    study = Study(store)
    uids = study.add(5)
    assert batches.assign(["s3"]) == 5
    assert batches.assign(["s3"]) == 0  # each row joins once
    states = batches.states()
    assert len(states) == 1 and states[0]["state"] == "open" and states[0]["instances"] == 5
    send_all(store, "s3")
    assert batches.settled("s3") == []  # all sent, but the study may still grow
    batches.assign(["s3"], now=max(r["last_arrival"] for r in _batches(batches)) + STABLE)
    settled = batches.settled("s3")
    assert [(b.sent, b.failed) for b in settled] == [(5, 0)]
    manifest = json.loads(batches.manifest(settled[0].batch_id, "s3").body)
    files = sorted(manifest["Studies"][0]["Files"])
    assert files == sorted(f"{study.series[i % 2]}/{uid}.dcm" for i, uid in enumerate(uids))
    assert set(manifest) == {"Version", "BatchId", "Priority", "SubmittedAt", "TotalStudies", "TotalImages", "Studies"}
    assert manifest["Version"] == "1.0" and manifest["BatchId"] == settled[0].batch_id
    assert manifest["Priority"] == "ROUTINE" and manifest["TotalStudies"] == 1 and manifest["TotalImages"] == 5
    assert manifest["Studies"][0]["CloudStudyId"] == "ACCTOKEN00000001"
    assert manifest["Studies"][0]["StudyInstanceUID"] == study.uid and manifest["Studies"][0]["ImageCount"] == 5
    assert manifest["SubmittedAt"].endswith("+00:00")


def _batches(batches: Batches) -> list[dict]:
    return batches._rows("SELECT * FROM study_batches ORDER BY first_arrival")


def test_late_instances_form_a_new_batch(store, batches):
    study = Study(store)
    study.add(3)
    age_rows(store, STABLE + 5)  # the first three arrived long ago ...
    study.add(2)  # ... these now: a gap longer than stable_seconds
    batches.assign(["s3"])
    rows = _batches(batches)
    assert len(rows) == 2 and rows[0]["complete"] is not None and rows[1]["complete"] is None
    counts = {r["batch_id"]: r["instances"] for r in batches.states()}
    assert sorted(counts.values()) == [2, 3]
    study.add(1)  # within stable_seconds of the second: joins it
    batches.assign(["s3"])
    assert sorted(r["instances"] for r in batches.states()) == [3, 3]


def test_arrivals_closer_than_stable_seconds_stay_one_batch_even_when_assigned_late(store, batches):
    study = Study(store)
    study.add(2)
    age_rows(store, STABLE - 10)
    study.add(2)
    batches.assign(["s3"], now=10**10)  # assigned long after: still one batch, complete
    rows = _batches(batches)
    assert len(rows) == 1 and rows[0]["complete"] is not None


def test_stat_instance_makes_the_batch_stat(store, batches):
    study = Study(store)
    study.add(2)
    study.add(1, priority=1)
    batches.assign(["s3"], now=10**10)
    send_all(store, "s3")
    [batch] = batches.settled("s3")
    assert batches.manifest(batch.batch_id, "s3").priority == "STAT"


def test_cloud_study_id_without_accession_is_a_token_of_the_study(store, batches):
    study = Study(store, accession="")
    study.add(1)
    batches.assign(["s3"], now=10**10)
    send_all(store, "s3")
    [batch] = batches.settled("s3")
    entry = json.loads(batches.manifest(batch.batch_id, "s3").body)["Studies"][0]
    assert entry["CloudStudyId"] == study_token(study.uid) and len(entry["CloudStudyId"]) == 16
    assert set(entry["CloudStudyId"]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")


def test_manifest_is_built_once_and_kept(store, batches):
    Study(store).add(2)
    batches.assign(["s3"], now=10**10)
    send_all(store, "s3")
    [batch] = batches.settled("s3")
    first = batches.manifest(batch.batch_id, "s3")
    batches.manifest_started(batch.batch_id, "s3")
    again = batches.manifest(batch.batch_id, "s3")
    assert again.body == first.body and again.started and not first.started
    batches.finish(batch.batch_id, "s3")
    assert batches.settled("s3") == [] and batches.summary() == {"s3": {"open": 0, "sending": 0, "done": 1,
                                                                         "failed": 0}}


def test_only_the_given_destinations_are_batched_and_failed_rows_settle(store, batches):
    study = Study(store)
    study.add(3, destinations=("s3", "pacs"))
    assert batches.assign(["s3"]) == 3
    assert {r["destination"] for r in batches.states()} == {"s3"}
    rows = store.claim_batch("s3", 10)
    store.mark_sent([rows[0].id, rows[1].id])
    assert batches.assign(["s3"], now=10**10) == 0
    assert batches.settled("s3") == []  # one still in flight
    store.mark_failed(rows[2].id, "refused")
    [batch] = batches.settled("s3")
    assert (batch.sent, batch.failed) == (2, 1)
    assert json.loads(batches.manifest(batch.batch_id, "s3").body)["TotalImages"] == 2


def test_recent_studies_by_pseudonym(store, batches):
    study = Study(store)
    study.add(2, destinations=("s3", "pacs"), priority=1)
    batches.assign(["s3"])
    send_all(store, "pacs")
    [view] = recent_studies(batches)
    assert view["study_instance_uid"] == study.uid and view["cloud_study_id"] == "ACCTOKEN00000001"
    assert view["instances"] == 2 and view["priority"] == "STAT" and view["patient_id"] == "TESTORG-AAAAAAAAAAAA"
    assert view["destinations"]["pacs"]["state"] == "sent" and view["destinations"]["s3"]["state"] == "sending"
    assert len(view["batches"]) == 1 and view["batches"][0]["destinations"]["s3"]["state"] == "open"


def test_a_destination_that_was_paused_gets_the_same_batch(store, batches):
    study = Study(store)
    study.add(3, destinations=("s3", "azure"))
    batches.assign(["s3"], now=10**10)  # s3's worker ran; the study is complete; azure's was paused
    send_all(store, "s3")
    [done] = batches.settled("s3")
    batches.manifest(done.batch_id, "s3")
    batches.finish(done.batch_id, "s3")
    batches.assign(["azure"], now=10**10)
    assert {r["batch_id"] for r in batches.states()} == {done.batch_id}
    assert {r["destination"]: r["instances"] for r in batches.states()} == {"s3": 3, "azure": 3}
    study.add(1, destinations=("s3",))  # within stable_seconds of the others, but s3 has finished that batch:
    batches.assign(["s3"], now=10**10)  # a new one
    assert len({r["batch_id"] for r in batches.states()}) == 2
