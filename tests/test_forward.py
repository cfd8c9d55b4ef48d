"""The forwarder against real peers on loopback: DCMTK storescp and in-process pynetdicom SCPs.

Instances are real Part 10 files (pydicom's CT_small.dcm with new UIDs) written
into a real spool and queued in a real SQLite store; a `Forwarder` thread sends
them. Remotes refuse, are down, come up late, reject or abort; the tests check
what arrived (counted in the remote's handler) and what the queue says.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import CTImageStorage

from conftest import StorageSCP, free_port, wait_for
from node.config import Destination
from node.deid.record import DeidRecord
from node.forward import Forwarder
from node.spool import Spool
from node.store import FAILED, PENDING, SENT, Store

CT_SMALL = get_testdata_file("CT_small.dcm")
FAST = dict(retry_delay=0.2, retry_multiplier=2.0, max_retry_delay=0.5, connect_timeout=3.0, acse_timeout=5.0,
            dimse_timeout=10.0, network_timeout=10.0)
DOWN = "remote unreachable or aborted"
REJECTED = "association rejected: Called AE title not recognised (permanent, service user)"
MR = "1.2.840.10008.5.1.4.1.1.4"


# -- building blocks ------------------------------------------------------------------------


class Queue:
    """A real store and spool, plus a helper that writes and queues anonymized-ish CT instances."""

    def __init__(self, folder: Path, destinations: tuple[str, ...] = ("remote",)) -> None:
        self.store = Store(folder / "telenode.sqlite")
        self.spool = Spool(folder / "spool")
        self.destinations = destinations
        self.study = generate_uid()
        self.series = generate_uid()

    def add(self, priority: int = 0, *, sop_uid: str | None = None, syntax: str = ExplicitVRLittleEndian,
            destinations: tuple[str, ...] | None = None) -> str:
        """Spool one CT instance with a fresh (or given) pseudonymous SOP Instance UID and queue it."""
        ds = pydicom.dcmread(CT_SMALL)
        uid = sop_uid or generate_uid()
        original = ds.SOPInstanceUID
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.file_meta.TransferSyntaxUID = syntax
        ds.StudyInstanceUID, ds.SeriesInstanceUID = self.study, self.series
        ds.PatientID, ds.PatientName = "TESTORG-PSEUDO1", "TESTORG-PSEUDO1"
        path = self.spool.path_for(uid)
        size = self.spool.write(path, lambda handle: ds.save_as(handle, enforce_file_format=True))
        record = DeidRecord(
            patient_id="1CT1", patient_name="CompressedSamples^CT1", pseudo_patient_id="TESTORG-PSEUDO1",
            study_instance_uid="1.3.6.1.4.1.5962.1.2.1", pseudo_study_instance_uid=self.study,
            series_instance_uid="1.3.6.1.4.1.5962.1.3.1", pseudo_series_instance_uid=self.series, modality="CT",
            sop_instance_uid=original, pseudo_sop_instance_uid=uid, sop_class_uid=str(ds.SOPClassUID),
            method_codes=("113100",),
        )
        self.store.record_instance(record, calling_aet="MODALITY", path=str(path), size=size,
                                   transfer_syntax=syntax, destinations=list(destinations or self.destinations),
                                   priority=priority)
        return uid

    def row(self, uid: str, destination: str = "remote") -> dict:
        cursor = self.store.db.execute(
            "SELECT * FROM queue WHERE pseudo_sop_instance_uid = ? AND destination = ? ORDER BY id DESC",
            [uid, destination])
        return dict(zip([d[0] for d in cursor.description], cursor.fetchone()))

    def count(self, state: str, destination: str = "remote") -> int:
        return self.store.status().get(destination, {}).get(state, 0)

    def spooled(self, uid: str) -> bool:
        return self.spool.path_for(uid).exists()


class Remote(StorageSCP):
    """The shared in-process Storage SCP (conftest) as this module's remote: CT only, AE title REMOTE."""

    def __init__(self, port: int | None = None, ae_title: str = "REMOTE",
                 respond: Callable[[str, int], int | Dataset] = lambda uid, n: 0x0000,
                 require_called_aet: bool = False) -> None:
        super().__init__(port, ae_title, respond, contexts=(CTImageStorage,), require_called_aet=require_called_aet)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Callable]:
    """Factories for queues, remotes and forwarders; everything started is stopped afterwards."""
    forwarders: list[Forwarder] = []
    remotes: list[Remote] = []
    queues: list[Queue] = []

    class H:
        @staticmethod
        def queue(destinations: tuple[str, ...] = ("remote",)) -> Queue:
            q = Queue(tmp_path / f"node{len(queues)}", destinations)
            queues.append(q)
            return q

        @staticmethod
        def remote(**kwargs) -> Remote:
            r = Remote(**kwargs)
            remotes.append(r)
            return r

        @staticmethod
        def forwarder(q: Queue, port: int, ae_title: str = "REMOTE", name: str = "remote", **kwargs) -> Forwarder:
            destination = Destination(name=name, ae_title=ae_title, host="127.0.0.1", port=port, **{**FAST, **kwargs})
            f = Forwarder(destination, q.store, q.spool, "TELENODE")
            forwarders.append(f)
            f.start()
            return f

    yield H
    for f in forwarders:
        f.stop(15)
    for r in remotes:
        r.stop()
    for q in queues:
        q.store.close()


# -- delivery ---------------------------------------------------------------------------------


def test_all_arrive_at_dcmtk_storescp(harness, make_storescp):
    """Every queued instance arrives intact at DCMTK storescp; the queue says sent and the spool empties."""
    q = harness.queue()
    uids = [q.add() for _ in range(12)]
    originals = {uid: q.spool.path_for(uid).read_bytes() for uid in uids}
    remote = make_storescp().start()
    forwarder = harness.forwarder(q, remote.port, ae_title=remote.ae_title)
    assert wait_for(lambda: q.count(SENT) == 12, 60), q.store.status()
    forwarder.stop(15)

    received = {}
    for path in remote.files():
        ds = pydicom.dcmread(path)
        received[ds.SOPInstanceUID] = ds
    assert set(received) == set(uids)
    reference = pydicom.dcmread(CT_SMALL)
    for uid, ds in received.items():
        assert ds.PixelData == reference.PixelData
        assert ds.PatientID == "TESTORG-PSEUDO1"
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        # the data set (after the file meta) is what was spooled; storescp drops trailing padding (FFFC,FFFC)
        sent = pydicom.dcmread(pydicom.filebase.DicomBytesIO(originals[uid]))
        for data in (ds, sent):
            data.pop(0xFFFCFFFC, None)
        assert ds.to_json_dict() == sent.to_json_dict()
    status = q.store.status()["remote"]
    assert status[PENDING] == 0 and status[FAILED] == 0 and status["oldest_pending_age_s"] is None
    assert not any(q.spooled(uid) for uid in uids)
    assert list(q.spool.root.rglob("*.dcm")) == [] and list(q.spool.root.rglob(".*.tmp")) == []


def test_dimse_priority_follows_queue_priority(harness):
    """Queue priority 1 is sent as DIMSE HIGH (1), 0 as MEDIUM (0) and negative as LOW (2)."""
    q = harness.queue()
    high, medium, low = q.add(priority=1), q.add(priority=0), q.add(priority=-1)
    remote = harness.remote().start()
    harness.forwarder(q, remote.port)
    assert wait_for(lambda: q.count(SENT) == 3), q.store.status()
    with remote.lock:
        priorities = {uid: p for uid, p, _ in remote.received}
    assert priorities == {high: 1, medium: 0, low: 2}


# -- refusals -----------------------------------------------------------------------------------


def test_out_of_resources_is_retried_forever_without_counting_and_blocks_nothing(harness):
    """0xA7xx for one instance: retried with backoff, never counted or failed; the others are sent once."""
    q = harness.queue()
    bad = q.add(priority=1)
    good = [q.add() for _ in range(6)]

    def respond(uid: str, seen: int):
        if uid != bad:
            return 0x0000
        answer = Dataset()
        answer.Status = 0xA700
        answer.ErrorComment = "Out of resources"
        return answer

    remote = harness.remote(respond=respond).start()
    harness.forwarder(q, remote.port, max_failures=2, batch_size=3)
    assert wait_for(lambda: q.count(SENT) == 6 and remote.times(bad) >= 4, 30), q.store.status()
    assert all(remote.times(uid) == 1 for uid in good)
    row = q.row(bad)
    assert row["status"] in (PENDING, "inflight") and row["failures"] == 0 and row["attempts"] >= 3
    assert q.store.status()["remote"]["last_error"] == "status 0xA700: Out of resources"


@pytest.mark.parametrize("code, comment", [(0xA900, "Data set does not match SOP class"), (0xC000, "")])
def test_refused_instance_fails_alone(harness, code, comment):
    """One instance the remote refuses ends failed with its status after max_failures; the others are sent."""
    q = harness.queue()
    bad = q.add(priority=1)  # first in every batch
    good = [q.add() for _ in range(6)]

    def respond(uid: str, seen: int):
        if uid != bad:
            return 0x0000
        answer = Dataset()
        answer.Status = code
        if comment:
            answer.ErrorComment = comment
        return answer

    remote = harness.remote(respond=respond).start()
    harness.forwarder(q, remote.port, max_failures=3, batch_size=3)
    assert wait_for(lambda: q.count(FAILED) == 1 and q.count(SENT) == 6, 60), q.store.status()
    time.sleep(0.8)  # longer than any retry delay: nothing more is sent

    assert sorted(remote.uids()) == sorted(good)
    assert all(remote.times(uid) == 1 for uid in good)
    assert remote.times(bad) == 3
    row = q.row(bad)
    assert row["status"] == FAILED and row["failures"] == 3 and row["attempts"] == 3
    expected = f"status 0x{code:04X}" + (f": {comment}" if comment else "")
    assert row["last_error"] == expected
    status = q.store.status()["remote"]
    assert status == {PENDING: 0, "inflight": 0, SENT: 6, FAILED: 1, "oldest_pending_age_s": None,
                      "last_error": expected, "paused": False}
    assert not any(q.spooled(uid) for uid in good)


def test_refusal_then_success_is_sent(harness):
    """An instance refused fewer than max_failures times and then accepted ends sent, received once stored."""
    q = harness.queue()
    flaky = q.add()
    others = [q.add() for _ in range(3)]
    remote = harness.remote(respond=lambda uid, seen: 0xC000 if uid == flaky and seen < 2 else 0x0000).start()
    harness.forwarder(q, remote.port, max_failures=3)
    assert wait_for(lambda: q.count(SENT) == 4), q.store.status()
    assert remote.times(flaky) == 3 and remote.uids().count(flaky) == 1
    assert sorted(remote.uids()) == sorted([flaky, *others])
    row = q.row(flaky)
    assert row["status"] == SENT and row["failures"] == 2 and row["last_error"] is None
    assert q.store.status()["remote"][FAILED] == 0


def test_warning_status_counts_as_stored(harness):
    """A warning status (0xB000 coercion) means stored: the row is sent, not retried."""
    q = harness.queue()
    uid = q.add()
    remote = harness.remote(respond=lambda u, seen: 0xB000).start()
    harness.forwarder(q, remote.port)
    assert wait_for(lambda: q.count(SENT) == 1), q.store.status()
    time.sleep(0.6)
    assert remote.times(uid) == 1
    assert not q.spooled(uid)


def test_missing_spool_file_fails_without_blocking(harness):
    """A queued instance whose spool file vanished is marked failed at once; the others are sent."""
    q = harness.queue()
    gone = q.add(priority=1)
    others = [q.add() for _ in range(3)]
    q.spool.path_for(gone).unlink()
    remote = harness.remote().start()
    harness.forwarder(q, remote.port)
    assert wait_for(lambda: q.count(SENT) == 3 and q.count(FAILED) == 1), q.store.status()
    assert sorted(remote.uids()) == sorted(others)
    assert q.row(gone)["last_error"] == "spool file missing"


def test_corrupt_spool_file_does_not_stop_the_forwarder(harness):
    """An unreadable spool file fails on its own; the instances queued behind it are still sent."""
    q = harness.queue()
    corrupt = q.add(priority=1)
    others = [q.add() for _ in range(3)]
    q.spool.path_for(corrupt).write_bytes(b"this is not a DICOM file" * 10)
    remote = harness.remote().start()
    harness.forwarder(q, remote.port, max_failures=2)
    assert wait_for(lambda: q.count(SENT) == 3, 6), q.store.status()
    assert sorted(remote.uids()) == sorted(others)


def queue_mr(q: Queue, priority: int) -> str:
    """Spool and queue one MR Image Storage instance (a SOP class the in-process remote does not accept)."""
    ds = pydicom.dcmread(CT_SMALL)
    uid = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MR
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    path = q.spool.path_for(uid)
    size = q.spool.write(path, lambda h: ds.save_as(h, enforce_file_format=True))
    q.store.record_instance(
        DeidRecord(pseudo_patient_id="TESTORG-PSEUDO1", pseudo_study_instance_uid=q.study,
                   pseudo_series_instance_uid=generate_uid(), pseudo_sop_instance_uid=uid, sop_class_uid=MR),
        calling_aet="MODALITY", path=str(path), size=size, transfer_syntax=ExplicitVRLittleEndian,
        destinations=["remote"], priority=priority)
    return uid


def test_unaccepted_sop_class_is_counted_against_the_instance(harness):
    """In a batch with accepted contexts, an instance of an unaccepted SOP class is refused; the others are sent."""
    q = harness.queue()
    ct = [q.add() for _ in range(2)]
    mr = queue_mr(q, priority=1)  # first in the batch
    remote = harness.remote().start()  # supports CT only
    harness.forwarder(q, remote.port, max_failures=5)
    assert wait_for(lambda: q.count(SENT) == 2), q.store.status()
    assert sorted(remote.uids()) == sorted(ct)
    row = q.row(mr)
    assert row["failures"] >= 1
    assert row["status"] != SENT
    assert remote.times(mr) == 0


def test_unaccepted_sop_class_fails_and_does_not_block(harness):
    """An instance of a SOP class the remote never accepts ends failed and does not hold up the rest."""
    q = harness.queue()
    ct = [q.add() for _ in range(3)]
    mr = queue_mr(q, priority=1)  # alone in each batch of one
    remote = harness.remote().start()  # supports CT only
    harness.forwarder(q, remote.port, max_failures=2, batch_size=1)
    assert wait_for(lambda: q.count(SENT) == 3 and q.count(FAILED) == 1, 6), q.store.status()
    assert sorted(remote.uids()) == sorted(ct)
    assert "no accepted presentation context" in q.row(mr)["last_error"]


# -- remote unavailable --------------------------------------------------------------------------


def test_remote_down_then_up_delivers_exactly_once(harness):
    """With no listener at first, rows wait (no failure counted); once a listener starts all arrive exactly once."""
    q = harness.queue()
    uids = [q.add() for _ in range(10)]
    port = free_port()
    harness.forwarder(q, port, batch_size=4)
    assert wait_for(lambda: q.store.status()["remote"]["last_error"] == DOWN, 15), q.store.status()
    time.sleep(1.0)  # several retries while down
    status = q.store.status()["remote"]
    assert status[PENDING] == 10 and status[SENT] == 0 and status[FAILED] == 0
    assert all(q.row(uid)["failures"] == 0 for uid in uids)  # an outage counts against no instance
    assert q.row(uids[0])["due"] > q.row(uids[0])["created"] + 0.1  # but pushes the next try back
    assert all(q.spooled(uid) for uid in uids)

    remote = harness.remote(port=port).start()
    assert wait_for(lambda: q.count(SENT) == 10, 30), q.store.status()
    time.sleep(1.0)  # anything sent twice would show up now
    assert sorted(remote.uids(None)) == sorted(uids)
    assert len(remote.received) == 10
    assert q.store.status()["remote"]["last_error"] is None
    assert not any(q.spooled(uid) for uid in uids)


def test_rejected_association_keeps_rows_pending(harness):
    """An association rejection (wrong called AE) is transient: rows stay pending with the error, nothing fails."""
    q = harness.queue()
    uids = [q.add() for _ in range(3)]
    remote = harness.remote(ae_title="REMOTE", require_called_aet=True).start()
    wrong = harness.forwarder(q, remote.port, ae_title="WRONGAE")
    assert wait_for(lambda: q.store.status()["remote"]["last_error"] == REJECTED, 15), \
        q.store.status()
    time.sleep(0.8)
    assert remote.received == []
    status = q.store.status()["remote"]
    assert status[PENDING] == 3 and status[FAILED] == 0
    wrong.stop(15)

    # The queue outlives the worker: a corrected forwarder on the same store delivers everything.
    harness.forwarder(q, remote.port, ae_title="REMOTE")
    assert wait_for(lambda: q.count(SENT) == 3), q.store.status()
    assert sorted(remote.uids()) == sorted(uids)


def test_abort_midway_is_retried(harness):
    """The remote aborting during a C-STORE is transient: the instance is retried and stored once, not failed."""
    q = harness.queue()
    uids = [q.add() for _ in range(5)]
    victim = uids[2]
    aborted = threading.Event()

    def respond(uid: str, seen: int):
        if uid == victim and not aborted.is_set():
            aborted.set()
            return None  # abort the association instead of answering
        return 0x0000

    remote = harness.remote(respond=respond).start()
    harness.forwarder(q, remote.port, max_failures=1)  # a refusal would fail at once; an abort must not
    assert wait_for(lambda: q.count(SENT) == 5, 30), q.store.status()
    assert aborted.is_set()
    assert sorted(remote.uids()) == sorted(uids)
    assert all(remote.times(uid) == 1 for uid in uids)
    assert q.row(victim)["failures"] == 0
    assert q.store.status()["remote"][FAILED] == 0


def test_priority_instance_goes_first_when_remote_returns(harness):
    """Queued while the remote is down, one high-priority instance is received before 30 routine ones."""
    q = harness.queue()
    port = free_port()
    forwarder = harness.forwarder(q, port, batch_size=8)
    low = q.add(priority=-1)
    routine = [q.add(priority=0) for _ in range(30)]
    forwarder.wake()
    assert wait_for(lambda: q.store.status()["remote"]["last_error"] == DOWN, 15)
    high = q.add(priority=1)
    forwarder.wake()
    # A failed try puts the row back with a later due time: then the forwarder has seen the high one.
    assert wait_for(lambda: q.row(high)["due"] > q.row(high)["created"], 15), "never tried with the high one"

    remote = harness.remote(port=port).start()
    assert wait_for(lambda: q.count(SENT) == 32, 60), q.store.status()
    order = remote.uids()
    assert order[0] == high
    assert order == [high, *routine, low]


# -- several destinations ------------------------------------------------------------------------


def test_spool_file_kept_until_every_destination_has_it(harness, make_storescp):
    """With two destinations, a file stays spooled while one is down and goes once both have it."""
    q = harness.queue(destinations=("fast", "slow"))
    uids = [q.add() for _ in range(4)]
    fast = make_storescp().start()
    slow_port = free_port()
    harness.forwarder(q, fast.port, ae_title=fast.ae_title, name="fast")
    harness.forwarder(q, slow_port, name="slow")
    assert wait_for(lambda: q.count(SENT, "fast") == 4, 30), q.store.status()
    assert len(fast.files()) == 4
    time.sleep(0.5)
    assert all(q.spooled(uid) for uid in uids), "a file was deleted while a destination still needs it"
    assert q.count(PENDING, "slow") == 4

    slow = harness.remote(port=slow_port).start()
    assert wait_for(lambda: q.count(SENT, "slow") == 4, 30), q.store.status()
    assert sorted(slow.uids()) == sorted(uids)
    assert wait_for(lambda: not any(q.spooled(uid) for uid in uids), 5)


def test_resend_in_other_syntax_while_pending_is_delivered(harness):
    """An instance re-received in another transfer syntax while still queued is delivered, not failed."""
    q = harness.queue()
    uid = q.add(syntax=ExplicitVRLittleEndian)
    # The modality sends it again (same pseudonymous UID) negotiated as implicit VR: the spool file is rewritten.
    q.add(sop_uid=uid, syntax=ImplicitVRLittleEndian)
    assert q.store.db.execute("SELECT COUNT(*) FROM queue").fetchone()[0] == 1
    remote = harness.remote().start()
    harness.forwarder(q, remote.port, max_failures=2)
    assert wait_for(lambda: q.count(SENT) + q.count(FAILED) == 1, 15), q.store.status()
    assert q.count(SENT) == 1, q.store.status()
    assert remote.uids() == [uid]
