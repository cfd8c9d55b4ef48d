"""Hostile peers against a running node (issue 16): PDU limits, protocol violations, partial
originals, idle-connection floods. The peer is tests/hostile.py, raw sockets, no library.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PEER_ENV, dcmtk, echo, storescu, wait_for
from hostile import (A_ABORT, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_RELEASE_RP, A_RELEASE_RQ, CT_IMAGE, EXPLICIT_LE,
                     P_DATA_TF, Peer, associate_rq, c_store_command, p_data, pdu, pdv)
from studies import make_study

GIB4 = 0xFFFFFFF0


def _lines(node) -> list[dict]:
    return [json.loads(line) for line in node.log.read_text().splitlines() if line.startswith("{")]


def _violations(node) -> list[dict]:
    return [e for e in _lines(node) if e["event"] == "protocol_violation"]


def _incoming(node) -> list[Path]:
    root = node.folder / "var" / "incoming"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def _workers(node) -> list[int]:
    children = Path(f"/proc/{node.proc.pid}/task/{node.proc.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.fixture
def node(make_node, make_storescp):
    remote = make_storescp().start()
    running = make_node([(remote.ae_title, remote.port)])
    running.config.write_text(running.config.read_text().replace("[node]\n", "[node]\nworkers = 2\n", 1))
    running.start()
    running.remote = remote
    yield running
    running.stop()


def _expect_abort(peer: Peer, reason: int) -> None:
    reply = peer.read()
    assert reply is not None and reply.pdu_type == A_ABORT, reply
    assert reply.abort_reason == (2, reason)
    assert peer.closed()


def _one_clean_warning(node, contains: str) -> None:
    assert wait_for(lambda: len(_violations(node)) == 1, 10), _lines(node)[-10:]
    time.sleep(0.3)  # anything else the abort logs would show up now
    violation = _violations(node)[0]
    assert violation["level"] == "warning" and contains in violation["reason"], violation
    text = node.log.read_text()
    assert "Traceback" not in text and '"level": "error"' not in text


# -- 1. PDU limits -------------------------------------------------------------------------------------


def test_p_data_longer_than_announced_is_aborted_at_once_and_memory_stays_flat(node):
    peer = Peer(node.port)
    assert peer.associate() == [1]
    before = {pid: _rss_kib(pid) for pid in _workers(node)}
    peer.send(pdu(P_DATA_TF, b"", length=GIB4))  # 4 GiB announced ...
    _expect_abort(peer, 0x06)
    streamed = 0
    sender = Peer(node.port)  # ... and a second peer that streams without waiting for an answer
    assert sender.associate() == [1]
    try:
        sender.send(pdu(P_DATA_TF, b"", length=GIB4))
        chunk = bytes(1 << 20)
        for _ in range(128):
            sender.send(chunk)
            streamed += len(chunk)
    except OSError:
        pass  # the node closed the connection: what it would have buffered is not even sent
    after = {pid: _rss_kib(pid) for pid in _workers(node)}
    growth = max(after[pid] - before.get(pid, after[pid]) for pid in after)
    assert growth < 32 * 1024, (growth, streamed)  # KiB; unguarded, pynetdicom buffered all 128 MiB
    assert streamed < 128 << 20  # the node stopped reading long before
    assert wait_for(lambda: len(_violations(node)) == 2, 10)
    assert echo(node.port).returncode == 0  # and it still serves


def test_oversized_associate_request_is_aborted_before_it_is_read(node):
    peer = Peer(node.port)
    peer.send(pdu(1, b"", length=GIB4))
    _expect_abort(peer, 0x06)
    _one_clean_warning(node, "PDU type 0x01")


# -- 3. protocol violations ---------------------------------------------------------------------------


def test_pdv_for_a_context_never_accepted_is_aborted(node):
    peer = Peer(node.port)
    assert peer.associate() == [1]
    peer.send(p_data(pdv(99, 0x03, c_store_command(CT_IMAGE, "1.2.3.4"))))
    _expect_abort(peer, 0x06)
    _one_clean_warning(node, "presentation context 99")
    assert wait_for(lambda: _incoming(node) == [], 5)


def test_associate_request_inside_an_association_is_an_unexpected_pdu(node):
    peer = Peer(node.port)
    assert peer.associate() == [1]
    peer.send(associate_rq("TELENODE", "HOSTILE", [(1, CT_IMAGE, [EXPLICIT_LE])]))
    _expect_abort(peer, 0x02)
    _one_clean_warning(node, "unexpected PDU type 0x01")


def test_data_before_its_command_is_aborted(node):
    peer = Peer(node.port)
    assert peer.associate() == [1]
    peer.send(p_data(pdv(1, 0x02, b"\x08\x00\x16\x00")))
    _expect_abort(peer, 0x05)
    _one_clean_warning(node, "data fragment before its command")


def test_malformed_pdv_is_aborted(node):
    peer = Peer(node.port)
    assert peer.associate() == [1]
    peer.send(pdu(P_DATA_TF, b"\x00\x00\x00\x01\x01"))  # a PDV item of length 1 (at least 2)
    _expect_abort(peer, 0x06)
    _one_clean_warning(node, "malformed PDV")


def test_unknown_pdu_type_is_aborted(node):
    peer = Peer(node.port)
    peer.send(pdu(0x42, b"\x00" * 4))
    _expect_abort(peer, 0x01)
    _one_clean_warning(node, "unrecognised PDU type 0x42")


# -- 4. no PHI left behind ---------------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["close", "abort"])
def test_partial_original_is_deleted_when_the_peer_goes(node, ending):
    peer = Peer(node.port)
    assert peer.associate() == [1]
    peer.send(p_data(pdv(1, 0x03, c_store_command(CT_IMAGE, "1.2.826.0.1.3680043.99.1"))))
    peer.send(p_data(pdv(1, 0x00, b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100")))  # first data fragment, not last
    assert wait_for(lambda: len(_incoming(node)) == 1, 10)  # the partial original is on disk
    if ending == "abort":
        peer.send(pdu(A_ABORT, b"\x00\x00\x00\x00"))
    peer.close()
    assert wait_for(lambda: _incoming(node) == [], 5)  # at once, not at the sweep (60 s and more)


def test_whole_instances_still_arrive(node, tmp_path, make_storescp):
    """The guard checks every PDU of a real transfer: DCMTK storescu at the node's PDU limit passes."""
    study = make_study(tmp_path / "study", instances=3, series=1)
    result = storescu(node.port, study.files)
    assert result.returncode == 0, result.stderr
    assert _violations(node) == []


# -- 2. idle and half-open connections ----------------------------------------------------------------


def _idle(port: int, source: str) -> Peer | None:
    try:
        return Peer(port, source=source)
    except OSError:
        return None


@pytest.mark.parametrize("source", ["127.0.0.2", "127.0.0.1"])
def test_idle_flood_does_not_keep_a_modality_out(node, tmp_path, source):
    """200 connections that send nothing, from another address or the modality's own: a modality
    still associates at once; the idle ones are closed after association_request_timeout."""
    flood = [p for p in (_idle(node.port, source) for _ in range(200)) if p is not None]
    assert len(flood) == 200
    study = make_study(tmp_path / "study", instances=2, series=1)
    start = time.monotonic()
    result = storescu(node.port, study.files)
    took = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert took < 5.0, took
    for peer in flood:  # every idle connection ends: evicted at once, or at the 5 s request deadline
        peer.sock.settimeout(15)
        assert peer.closed()
    assert not any(e["event"] == "association_rejected" for e in _lines(node))


def test_association_request_deadline_is_configurable(make_node, make_storescp):
    remote = make_storescp().start()
    node = make_node([(remote.ae_title, remote.port)])
    node.config.write_text(node.config.read_text().replace(
        "[node]\n", "[node]\nworkers = 1\nassociation_request_timeout = 1.0\n", 1))
    node.start()
    peer = Peer(node.port)
    start = time.monotonic()
    assert peer.closed()
    assert 0.5 < time.monotonic() - start < 4.0
    assert echo(node.port).returncode == 0
    node.stop()


# -- 5. capacity as configured ------------------------------------------------------------------------


def test_a_burst_gets_every_slot_of_every_worker(make_node, make_storescp):
    """max_associations = 3 with 2 workers: 6 associations at once, whichever worker the kernel
    picks for each; the 7th is rejected with local-limit-exceeded."""
    remote = make_storescp().start()
    node = make_node([(remote.ae_title, remote.port)])
    node.config.write_text(node.config.read_text().replace(
        "[node]\n", "[node]\nworkers = 2\nmax_associations = 3\n", 1))
    node.start()
    peers = []
    for _ in range(12):  # many tries, so the kernel's spreading over workers is never even
        peer = Peer(node.port)
        peer.send(associate_rq("TELENODE", "BURST", [(1, CT_IMAGE, [EXPLICIT_LE])]))
        reply = peer.read()
        assert reply is not None
        peers.append((peer, reply))
    accepted = [p for p, r in peers if r.pdu_type == A_ASSOCIATE_AC]
    rejected = [r for p, r in peers if r.pdu_type != A_ASSOCIATE_AC]
    assert len(accepted) == 6, [r.pdu_type for _, r in peers]
    assert all(r.pdu_type == A_ASSOCIATE_RJ and r.body[1:4] == bytes([2, 3, 2]) for r in rejected)
    accepted[0].send(pdu(A_RELEASE_RQ, bytes(4)))  # a slot freed is a slot reused
    assert accepted[0].read().pdu_type == A_RELEASE_RP
    late = Peer(node.port)
    assert late.associate() == [1]
    node.stop()


# -- load, scaled down -----------------------------------------------------------------------------------


def test_several_modalities_at_once_lose_nothing(node, tmp_path, make_storescp):
    """6 DCMTK storescu at once (20 instances each) into 2 workers: every instance reaches the remote
    once, with no stolen response (issue 11's stall) and no resend."""
    studies = [make_study(tmp_path / f"study{i}", instances=20, series=1) for i in range(6)]
    senders = [subprocess.Popen([dcmtk("storescu"), "-aet", f"MOD{i}", "-aec", "TELENODE", "127.0.0.1",
                                 str(node.port), *map(str, s.files)], env=PEER_ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i, s in enumerate(studies)]
    assert [p.wait(180) for p in senders] == [0] * 6
    remote = node.remote
    assert wait_for(lambda: len(remote.files()) == 120, 120), len(remote.files())
    time.sleep(1.0)  # a resend would show up now
    sent = [e for e in _lines(node) if e["event"] == "instance_sent"]
    assert len(sent) == 120 and len({e["sop_instance_uid"] for e in sent}) == 120
    text = node.log.read_text()
    assert "unexpected" not in text and '"level": "error"' not in text and "resent" not in text
