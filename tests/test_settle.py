"""ack = "received" (issue 15, lead 5): Success once the original is durable, de-identified after.

The folder of acknowledged originals (`Received`), the settler that takes them through the
pipeline (a refusal becomes a quarantine entry, a full disk leaves the original waiting), and the
node end to end with DCMTK peers: a study arrives de-identified, a malformed instance is
acknowledged and quarantined (never forwarded), and a SIGKILL loses nothing acknowledged.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pydicom
import pytest

from conftest import free_port, storescu, wait_for
from node.pipeline import CANNOT_DEIDENTIFY, CANNOT_UNDERSTAND, Pipeline, Safeguards
from node.release import Releaser
from node.settle import Received, Settler
from node.spool import Quarantine, Spool
from node.store import Store
from studies import make_study
from test_e2e import _part10, _send_raw, assert_no_identity
from test_guard import deidentifier

GARBAGE = b"\x08\x00\x16\x00UI\xff\x7fnot really a dataset"


def _received(tmp_path: Path, name: str, body: bytes) -> Path:
    """A file as pynetdicom leaves it in the worker's incoming folder."""
    incoming = tmp_path / "incoming"
    incoming.mkdir(exist_ok=True)
    path = incoming / name
    path.write_bytes(body)
    return path


def test_kept_originals_are_moved_private_and_listed_oldest_first(tmp_path):
    received = Received(tmp_path / "received")
    first = received.keep(_received(tmp_path, "a", b"one"), "CT-01 ROOM", 1)
    second = received.keep(_received(tmp_path, "b", b"two"), "MR01", 2)
    (received.root / "stray.tmp").write_bytes(b"x")  # not a name keep() writes: ignored
    (received.root / "1-2-3.dcm").write_bytes(b"x")

    assert not (tmp_path / "incoming" / "a").exists()  # moved, not copied
    assert stat.S_IMODE(received.root.stat().st_mode) == 0o700
    waiting = received.waiting()
    assert [a.path for a in waiting] == [first, second]
    assert [(a.calling_aet, a.priority) for a in waiting] == [("CT-01 ROOM", 1), ("MR01", 2)]
    assert waiting[0].path.read_bytes() == b"one"
    assert received.count() == 2


def _settler(root: Path, safeguards: Safeguards | None = None) -> tuple[Settler, Store, Quarantine]:
    pipeline = Pipeline(deidentifier(), Store(root / "telenode.sqlite"), Spool(root / "spool"), ["remote"],
                        safeguards=safeguards or Safeguards(), quarantine=Quarantine(root / "quarantine"))
    assert pipeline.quarantine is not None
    settler = Settler(pipeline, Received(root / "received"), pipeline.quarantine, pipeline.store)
    return settler, pipeline.store, pipeline.quarantine


def test_settled_instances_are_queued_and_a_refusal_is_quarantined(tmp_path):
    settler, store, quarantine = _settler(tmp_path / "node")
    study = make_study(tmp_path / "study", instances=2, series=1)
    for index, path in enumerate(study.files):
        settler.received.keep(_received(tmp_path, f"s{index}", path.read_bytes()), "MODALITY", 0)
    settler.received.keep(_received(tmp_path, "bad", GARBAGE), "MODALITY", 0)

    assert settler.settle_all() is True
    assert settler.received.count() == 0  # every original left the folder
    assert store.status()["remote"]["pending"] == 2
    entries = quarantine.entries()
    assert len(entries) == 1 and entries[0].kind == "refused"
    assert entries[0].record["status"] == f"0x{CANNOT_UNDERSTAND:04X}"  # what the default mode answers
    assert quarantine.file(entries[0].id).read_bytes() == GARBAGE
    assert [e["quarantine_id"] for e in store.audit_records("quarantined")] == [entries[0].id]
    store.close()


def test_a_refusal_by_policy_can_be_released_once_the_policy_changes(tmp_path):
    """burned_in = "reject" answers 0xC220 by default; after receipt the original is held instead,
    and `quarantine retry` under a changed policy sends it on, as for any held original."""
    root = tmp_path / "node"
    settler, store, quarantine = _settler(root, Safeguards(burned_in="reject"))
    study = make_study(tmp_path / "study", instances=1, series=1)
    ultrasound = pydicom.dcmread(study.files[0])
    ultrasound.Modality = "US"  # usually carries burned-in text
    ultrasound.save_as(tmp_path / "us.dcm")
    settler.received.keep(_received(tmp_path, "us", (tmp_path / "us.dcm").read_bytes()), "MODALITY", 0)
    assert settler.settle_all() is True
    [entry] = quarantine.entries()
    assert entry.kind == "refused" and entry.record["status"] == f"0x{CANNOT_DEIDENTIFY:04X}"
    assert "burned-in" in entry.reason
    assert store.status().get("remote", {}).get("pending", 0) == 0  # never queued

    passing = Pipeline(deidentifier(), store, Spool(root / "spool"), ["remote"],
                       safeguards=Safeguards(burned_in="pass"), quarantine=quarantine)
    released = Releaser(quarantine, store, Spool(root / "spool"), passing, ["remote"]).release(entry.id, "ops")
    assert released.released, released.why
    assert store.status()["remote"]["pending"] == 1
    assert quarantine.count() == 0
    store.close()


def test_an_original_stays_waiting_while_the_disk_refuses_it(tmp_path, monkeypatch):
    settler, store, _ = _settler(tmp_path / "node")
    study = make_study(tmp_path / "study", instances=2, series=1)
    for index, path in enumerate(study.files):
        settler.received.keep(_received(tmp_path, f"s{index}", path.read_bytes()), "MODALITY", 0)

    def full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(settler.pipeline.spool, "write", full)
    assert settler.settle_all() is False
    assert settler.received.count() == 2  # nothing acknowledged is dropped
    monkeypatch.undo()
    assert settler.settle_all() is True
    assert settler.received.count() == 0
    assert store.status()["remote"]["pending"] == 2
    store.close()


def test_run_settles_what_arrives_and_stops_when_asked(tmp_path):
    settler, store, _ = _settler(tmp_path / "node")
    stop = threading.Event()
    thread = threading.Thread(target=settler.run, args=(stop,))
    thread.start()
    try:
        study = make_study(tmp_path / "study", instances=1, series=1)
        settler.received.keep(_received(tmp_path, "late", study.files[0].read_bytes()), "MODALITY", 0)
        assert wait_for(lambda: settler.received.count() == 0, 10)
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert store.status()["remote"]["pending"] == 1
    store.close()


def test_run_settles_a_few_at_once_and_each_original_once(tmp_path, monkeypatch):
    """Three threads overlap one instance's fsyncs and commit with another's work; every original
    goes through the pipeline exactly once."""
    settler, store, _ = _settler(tmp_path / "node")
    study = make_study(tmp_path / "study", instances=12, series=1)
    for index, path in enumerate(study.files):
        settler.received.keep(_received(tmp_path, f"s{index}", path.read_bytes()), "MODALITY", 0)
    receive, lock = settler.pipeline.receive, threading.Lock()
    seen: list[Path] = []
    in_hand, most = set(), [0]

    def counted(source, **kwargs):
        with lock:
            seen.append(Path(source))
            in_hand.add(source)
            most[0] = max(most[0], len(in_hand))
        try:
            return receive(source, **kwargs)
        finally:
            with lock:
                in_hand.discard(source)

    monkeypatch.setattr(settler.pipeline, "receive", counted)
    stop = threading.Event()
    thread = threading.Thread(target=settler.run, args=(stop, 3))
    thread.start()
    try:
        assert wait_for(lambda: settler.received.count() == 0, 30)
    finally:
        stop.set()
        thread.join(10)
    assert len(seen) == 12 and len(set(seen)) == 12
    assert most[0] > 1  # they did overlap
    assert store.status()["remote"]["pending"] == 12
    store.close()


def _ack_received(node) -> None:
    node.config.write_text(node.config.read_text().replace("[node]\n", '[node]\nack = "received"\n', 1))


@pytest.mark.slow
def test_ack_received_node_forwards_deidentified_and_quarantines_what_it_cannot_read(
        tmp_path, make_node, make_storescp):
    study = make_study(tmp_path / "study", instances=6, series=2)
    remote = make_storescp().start()
    node = make_node([(remote.ae_title, remote.port)])
    _ack_received(node)
    node.start()

    sent = storescu(node.port, study.files)
    assert sent.returncode == 0, sent.stderr
    assert _send_raw(node.port, _part10(tmp_path / "garbage.dcm", GARBAGE)) == 0x0000  # acknowledged on receipt
    assert wait_for(lambda: len(remote.files()) == 6), f"{len(remote.files())} of 6 arrived"
    assert_no_identity(remote.files(), study.identifying_strings)
    assert all(pydicom.dcmread(p).PatientIdentityRemoved == "YES" for p in remote.files())

    assert wait_for(lambda: json.loads(node.cli("status", "--json").stdout)["quarantine"] == 1, 10)
    status = json.loads(node.cli("status", "--json", check=True).stdout)
    assert status["received"] == 0 and status["quarantine_by_kind"] == {"refused": 1}
    assert not os.listdir(node.folder / "var" / "received")
    assert node.stop() == 0
    assert len(remote.files()) == 6  # the unreadable one was never forwarded


@pytest.mark.slow
def test_ack_received_sigkill_loses_nothing_acknowledged(tmp_path, make_node, make_scp):
    """Killed right after the sender had Success for every instance: all arrive after a restart,
    whether the settler had de-identified them or not; a node restarted with the default ack
    settles what a received-mode node left."""
    study = make_study(tmp_path / "study", instances=8, series=2)
    remote_port = free_port()
    node = make_node([("TELERAD", remote_port)])
    _ack_received(node)
    node.start()
    sent = storescu(node.port, study.files)
    assert sent.returncode == 0, sent.stderr
    node.kill()
    kept = Received(node.folder / "var" / "received").count()

    node.config.write_text(node.config.read_text().replace('ack = "received"\n', "", 1))  # back to the default
    remote = make_scp(port=remote_port).start()
    node.start()
    assert wait_for(lambda: len(set(remote.uids())) >= 8, 60), f"{len(set(remote.uids()))} of 8 arrived"
    assert len(set(remote.uids())) == 8
    assert Received(node.folder / "var" / "received").count() == 0
    assert node.stop() == 0
    if kept:
        assert '"received_settled"' in node.log.read_text()
