"""Fault tests end to end: a real `telenode serve` between real peers on loopback.

Modalities are DCMTK storescu or a pynetdicom SCU; remotes are DCMTK storescp
(with unique file names, so that a duplicate delivery shows up as a second
file) or in-process pynetdicom SCPs that refuse a SOP class, answer a failure
status, accept only some transfer syntaxes or record the order of arrival.
Each test injects one fault and checks what the modality was told and what the
remote ended up with: every acknowledged instance arrives, exactly once, or is
failed and quarantined with a reason.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage

from conftest import PEER_ENV, REPO, StoreSCP, dcmtk, echo, free_port, storescu, wait_for
from node.store import Store
from studies import make_study

# -- peers ------------------------------------------------------------------------------------


class UniqueStoreSCP(StoreSCP):
    """DCMTK storescp writing every received instance to its own file (+uf): duplicates stay visible."""

    def start(self) -> "UniqueStoreSCP":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "-aet", self.ae_title, "-od", str(self.folder), "+uf", "+xa", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=PEER_ENV)
        assert wait_for(lambda: echo(self.port, called=self.ae_title).returncode == 0, 15), "storescp did not start"
        return self

    def arrived(self) -> list[str]:
        """SOP Instance UIDs of the complete instances on disk, one entry per file (a killed storescp may
        leave a partial file behind: that one was never acknowledged and does not count)."""
        uids = []
        for path in self.files():
            try:
                ds = pydicom.dcmread(path)
                if len(ds.PixelData) == ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8:
                    uids.append(str(ds.SOPInstanceUID))
            except Exception:  # a partial file
                continue
        return uids


@dataclass
class Received:
    uid: str
    sop_class: str
    syntax: str
    priority: int
    status: int
    dataset: Dataset


class Peer:
    """An in-process pynetdicom Storage SCP supporting only the given (SOP class, syntaxes); records every
    C-STORE in order; `respond(dataset, times seen before)` chooses the status (default Success), None aborts."""

    def __init__(self, port: int | None = None, contexts: tuple = ((CTImageStorage, ALL_TRANSFER_SYNTAXES),),
                 respond: Callable[[Dataset, int], int | Dataset | None] | None = None,
                 ae_title: str = "TELERAD") -> None:
        self.port = port or free_port()
        self.contexts = contexts
        self.respond = respond or (lambda ds, seen: 0x0000)
        self.ae_title = ae_title
        self.received: list[Received] = []
        self.lock = threading.Lock()
        self.server: Any = None

    def _on_store(self, event: Any) -> int | Dataset:
        ds = event.dataset
        ds.file_meta = event.file_meta
        uid = str(event.request.AffectedSOPInstanceUID)
        with self.lock:
            seen = sum(1 for r in self.received if r.uid == uid)
        answer = self.respond(ds, seen)
        if answer is None:  # the remote aborts the association instead of answering: nothing stored
            with self.lock:
                self.received.append(Received(uid, str(event.context.abstract_syntax),
                                              str(event.context.transfer_syntax), int(event.request.Priority), -1, ds))
            event.assoc.abort()
            return 0xA700
        status = int(answer.Status if isinstance(answer, Dataset) else answer)
        with self.lock:
            self.received.append(Received(uid, str(event.context.abstract_syntax), str(event.context.transfer_syntax),
                                          int(event.request.Priority), status, ds))
        return answer

    def start(self) -> "Peer":
        ae = AE(ae_title=self.ae_title)
        for sop_class, syntaxes in self.contexts:
            ae.add_supported_context(sop_class, syntaxes)
        ae.network_timeout = 10
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        """Like a remote PACS going down: open associations are aborted, the port closes."""
        if self.server is not None:
            for assoc in self.server.active_associations:
                assoc.abort()
            self.server.shutdown()
            self.server = None

    def stored(self) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.status == 0x0000]

    def uids(self) -> list[str]:
        return [r.uid for r in self.stored()]


@pytest.fixture(autouse=True)
def _restricted_storage() -> Iterator[None]:
    """The in-process SCPs must support only what they are told to (node.scp, if imported, would switch
    pynetdicom to unrestricted storage for the whole process)."""
    previous = _config.UNRESTRICTED_STORAGE_SERVICE
    _config.UNRESTRICTED_STORAGE_SERVICE = False
    yield
    _config.UNRESTRICTED_STORAGE_SERVICE = previous


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[Any]:
    """Factories for DCMTK and pynetdicom remotes; every one started is stopped afterwards."""
    started: list[Any] = []

    class Factory:
        @staticmethod
        def dcmtk(port: int | None = None) -> UniqueStoreSCP:
            scp = UniqueStoreSCP(tmp_path / f"storescp{len(started)}", port or free_port())
            started.append(scp)
            return scp

        @staticmethod
        def pynetdicom(**kwargs: Any) -> Peer:
            peer = Peer(**kwargs)
            started.append(peer)
            return peer

    yield Factory
    for peer in started:
        peer.stop()


# -- helpers ----------------------------------------------------------------------------------


def cli(node: Any, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    """`python3 -m node ARGS --config FILE` (the option after the sub-sub-command, for `quarantine list`)."""
    result = subprocess.run([sys.executable, "-m", "node", *args, "--config", str(node.config)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def status(node: Any) -> dict[str, dict[str, Any]]:
    return json.loads(node.cli("status", "--json", check=True).stdout)["destinations"]


def quarantined(node: Any) -> list[dict[str, Any]]:
    return json.loads(cli(node, "quarantine", "list", "--json", check=True).stdout)


def events(node: Any, name: str) -> list[dict[str, Any]]:
    """The node's JSON log lines for one event."""
    found = []
    for line in node.log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == name:
            found.append(record)
    return found


def _originals(node: Any, sql: str, field: str) -> dict[str, str]:
    """Pseudonym → original, decrypted through the node's mapping store (originals are encrypted at rest)."""
    store = Store(node.folder / "var" / "telenode.sqlite", node.folder / "var" / "mapping.key")
    try:
        return {pseudo: store.lookup(pseudo)[field] for (pseudo,) in store.db.execute(sql).fetchall()}
    finally:
        store.close()


def mapping(node: Any) -> dict[str, str]:
    """Pseudonymous → original SOP Instance UID, read from the node's mapping store."""
    return _originals(node, "SELECT pseudo_sop_instance_uid FROM instances", "sop_instance_uid")


def studies(node: Any) -> dict[str, str]:
    """Pseudonymous → original Study Instance UID, read from the node's mapping store."""
    return _originals(node, "SELECT pseudo_study_instance_uid FROM studies", "study_instance_uid")


def queue_rows(node: Any, destination: str = "remote0") -> list[dict[str, Any]]:
    """The node's queue rows for a destination (every row, whatever its state)."""
    conn = sqlite3.connect(f"file:{node.folder / 'var' / 'telenode.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        cursor = conn.execute("SELECT * FROM queue WHERE destination = ? ORDER BY id", [destination])
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]
    finally:
        conn.close()


def queued(node: Any, destination: str = "remote0") -> list[str]:
    """Pseudonymous SOP Instance UIDs queued for a destination (every row, whatever its state)."""
    return [row["pseudo_sop_instance_uid"] for row in queue_rows(node, destination)]


def node_keys(node: Any, text: str) -> None:
    """Add keys to the [node] section of the node's config."""
    node.config.write_text(node.config.read_text().replace('data_dir = "var"', 'data_dir = "var"\n' + text))


def destination_keys(node: Any, index: int, text: str) -> None:
    """Add keys to one [[destinations]] table of the node's config."""
    name = f'name = "remote{index}"'
    node.config.write_text(node.config.read_text().replace(name, name + "\n" + text))


def append_config(node: Any, text: str) -> None:
    node.config.write_text(node.config.read_text() + "\n" + text + "\n")


def fresh(name: str, folder: Path | None = None) -> tuple[Dataset, Path | None]:
    """A pydicom test file with new study, series and instance UIDs (saved under `folder` if given)."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{Path(name).stem}-{ds.SOPInstanceUID[-8:]}.dcm"
        ds.save_as(path, enforce_file_format=True)
    return ds, path


def c_store(port: int, datasets: list[Dataset], priority: int = 0, calling: str = "MODALITY") -> list[int]:
    """Send data sets with a pynetdicom SCU (one context per SOP class and syntax); return the statuses."""
    ae = AE(ae_title=calling)
    for pair in dict.fromkeys((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets):
        ae.add_requested_context(*pair)
    assoc = ae.associate("127.0.0.1", port, ae_title="TELENODE")
    assert assoc.is_established, "telenode refused the association"
    try:
        return [int(assoc.send_c_store(ds, priority=priority).Status) for ds in datasets]
    finally:
        assoc.release()


def storescu_popen(port: int, files: list[Path], nagle: bool = False) -> subprocess.Popen:
    """storescu -v in the background; with `nagle`, TCP_NODELAY is left unset: each image then waits out a
    delayed ACK (~20 images/s instead of ~80), so that a study is still coming in a few seconds later."""
    env = {k: v for k, v in PEER_ENV.items() if k != "TCP_NODELAY"} if nagle else PEER_ENV
    return subprocess.Popen([dcmtk("storescu"), "-v", "-aet", "MODALITY", "-aec", "TELENODE", "127.0.0.1", str(port),
                             *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def acknowledged(storescu_output: str) -> list[str]:
    """Files storescu -v got a Success response for."""
    done, current = [], None
    for line in storescu_output.splitlines():
        if line.startswith("I: Sending file: "):
            current = line[len("I: Sending file: "):].strip()
        elif line.startswith("I: Received Store Response (Success)") and current:
            done.append(current)
            current = None
    return done


def settled(node: Any, destination: str = "remote0") -> bool:
    row = status(node).get(destination, {})
    return row.get("pending", 1) == 0 and row.get("inflight", 1) == 0


# -- 1. remote down, then up --------------------------------------------------------------------


def test_remote_down_midway_then_up_every_image_arrives_exactly_once(tmp_path, make_node, peers):
    """A remote that dies after part of a 40-image study gets every image exactly once when it is back."""
    study = make_study(tmp_path / "study", instances=40, series=2)
    first = peers.dcmtk().start()
    node = make_node([(first.ae_title, first.port)]).start()

    modality = storescu_popen(node.port, study.files[:20])
    assert wait_for(lambda: len(first.files()) >= 3, 30), "nothing arrived before the remote went down"
    first.stop()  # the remote PACS goes down in the middle of the study
    out, _ = modality.communicate(timeout=120)
    assert modality.returncode == 0, out
    rest = storescu(node.port, study.files[20:])  # the modality carries on while the remote is down
    assert rest.returncode == 0, rest.stdout + rest.stderr

    assert wait_for(lambda: status(node)["remote0"]["pending"] > 0 and status(node)["remote0"]["last_error"], 30), \
        status(node)
    down = status(node)["remote0"]
    assert down["pending"] + down["inflight"] + down["sent"] == 40
    assert "unreachable" in down["last_error"] or "lost" in down["last_error"], down

    second = peers.dcmtk(port=first.port).start()
    assert wait_for(lambda: len(set(first.arrived() + second.arrived())) == 40 and settled(node), 60), \
        (len(first.arrived()), len(second.arrived()), status(node))
    wait_for(lambda: len(first.arrived() + second.arrived()) > 40, 2)  # give a duplicate time to show up
    arrived = first.arrived() + second.arrived()
    assert len(arrived) == 40, f"{len(arrived) - len(set(arrived))} duplicate deliveries"
    assert set(arrived) == set(queued(node))
    assert set(mapping(node).values()) == set(study.sop_uids)
    final = status(node)["remote0"]
    assert final["sent"] == 40 and final["failed"] == 0 and not final["last_error"], final
    assert node.stop() == 0


def test_remote_aborting_mid_study_gets_every_image_exactly_once(tmp_path, make_node, peers):
    """A remote that aborts the association instead of answering one C-STORE: retried, nothing lost or doubled."""
    def respond(ds: Dataset, seen: int) -> int | None:
        return None if int(ds.InstanceNumber) in (4, 9) and seen == 0 else 0x0000

    remote = peers.pynetdicom(respond=respond).start()
    node = make_node([(remote.ae_title, remote.port)]).start()
    study = make_study(tmp_path / "study", instances=12, series=2)
    sent = storescu(node.port, study.files)
    assert sent.returncode == 0, sent.stdout + sent.stderr

    assert wait_for(lambda: len(set(remote.uids())) == 12 and settled(node), 30), (len(remote.uids()), status(node))
    wait_for(lambda: len(remote.uids()) > 12, 2)  # give a duplicate time to show up
    assert sorted(remote.uids()) == sorted(queued(node)) and len(remote.uids()) == 12
    aborted = [r.uid for r in remote.received if r.status == -1]
    assert len(aborted) == 2 and set(aborted) <= set(remote.uids())
    assert [row["failures"] for row in queue_rows(node)] == [0] * 12  # a lost association counts against no one
    row = status(node)["remote0"]
    assert (row["sent"], row["failed"]) == (12, 0), row
    assert quarantined(node) == []
    assert node.stop() == 0


# -- 2. a SOP class the remote refuses ------------------------------------------------------------


def _refused_mr(tmp_path: Path, make_node: Any, peers: Any) -> tuple[Any, Peer, Any, list[str]]:
    """A CT-only remote; a CT study with one MR instance sent first. Returns node, remote, study, MR pseudo UID."""
    remote = peers.pynetdicom(contexts=((CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),)).start()
    node = make_node([(remote.ae_title, remote.port)]).start()
    study = make_study(tmp_path / "study", instances=5, series=1)
    mr, mr_path = fresh("MR_small.dcm", tmp_path / "mr")
    sent = storescu(node.port, [mr_path, *study.files])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    pseudo = [p for p, o in mapping(node).items() if o == mr.SOPInstanceUID]
    assert len(pseudo) == 1
    assert wait_for(lambda: len(remote.uids()) == 5 and status(node)["remote0"]["failed"] == 1, 30), \
        (len(remote.uids()), status(node))
    return node, remote, study, pseudo


def test_sop_class_refused_by_remote_fails_alone_and_is_quarantined(tmp_path, make_node, peers):
    """A remote that supports only CT: the MR instance is failed and quarantined, the CTs behind it arrive."""
    node, remote, study, (mr_uid,) = _refused_mr(tmp_path, make_node, peers)
    assert sorted(remote.uids()) == sorted(p for p, o in mapping(node).items() if o in study.sop_uids)
    assert len(set(remote.uids())) == 5 and mr_uid not in remote.uids()
    row = status(node)["remote0"]
    assert (row["sent"], row["failed"], row["pending"]) == (5, 1, 0), row
    entries = quarantined(node)
    assert len(entries) == 1, entries
    entry = entries[0]
    assert entry["kind"] == "send_failed"
    assert entry["destination"] == "remote0"
    assert entry["sop_instance_uid"] == mr_uid and entry["sop_class_uid"] == MRImageStorage
    assert entry["reason"].strip()
    assert node.stop() == 0


# -- 3. a failure status for one instance ----------------------------------------------------------


def test_failure_status_for_one_instance_fails_it_after_max_failures(tmp_path, make_node, peers):
    """A remote answering 0xC000 for one instance: tried max_failures times, failed, quarantined; others once."""
    def respond(ds: Dataset, seen: int) -> int | Dataset:
        if int(ds.InstanceNumber) == 3:
            answer = Dataset()
            answer.Status = 0xC000
            answer.ErrorComment = "cannot store this one"
            return answer
        return 0x0000

    remote = peers.pynetdicom(respond=respond).start()
    node = make_node([(remote.ae_title, remote.port)])
    destination_keys(node, 0, "max_failures = 2")
    node.start()
    study = make_study(tmp_path / "study", instances=6, series=1)
    sent = storescu(node.port, study.files)
    assert sent.returncode == 0, sent.stdout + sent.stderr

    assert wait_for(lambda: status(node)["remote0"]["failed"] == 1 and settled(node), 30), status(node)
    victim = [r.uid for r in remote.received if int(r.dataset.InstanceNumber) == 3]
    assert len(victim) == 2 and len(set(victim)) == 1, f"victim tried {len(victim)} times, expected max_failures=2"
    assert len(remote.uids()) == 5 and len(set(remote.uids())) == 5
    assert victim[0] not in remote.uids()
    assert {(row["pseudo_sop_instance_uid"], row["status"], row["failures"]) for row in queue_rows(node)
            if row["status"] != "sent"} == {(victim[0], "failed", 2)}
    row = status(node)["remote0"]
    assert (row["sent"], row["failed"]) == (5, 1), row
    (entry,) = quarantined(node)
    assert entry["kind"] == "send_failed" and entry["destination"] == "remote0"
    assert entry["sop_instance_uid"] == victim[0]
    assert "0xC000" in entry["reason"] and "cannot store this one" in entry["reason"], entry
    assert node.stop() == 0


# -- 4. transcoding only when the remote needs it -------------------------------------------------------


def test_explicit_vr_ct_is_converted_for_an_implicit_only_remote(tmp_path, make_node, peers):
    """A remote accepting CT only in implicit VR LE receives the explicit-VR CTs converted, pixels identical."""
    remote = peers.pynetdicom(contexts=((CTImageStorage, [ImplicitVRLittleEndian]),)).start()
    node = make_node([(remote.ae_title, remote.port)]).start()
    study = make_study(tmp_path / "study", instances=4, series=1)
    assert all(pydicom.dcmread(p).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian for p in study.files)
    sent = storescu(node.port, study.files)
    assert sent.returncode == 0, sent.stdout + sent.stderr

    assert wait_for(lambda: len(remote.uids()) == 4 and settled(node), 30), (len(remote.uids()), status(node))
    assert {r.syntax for r in remote.stored()} == {ImplicitVRLittleEndian}
    originals = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p).PixelData for p in study.files}
    to_original = mapping(node)
    for r in remote.stored():
        assert r.dataset.PixelData == originals[to_original[r.uid]]
    assert len(events(node, "transcoded")) == 4
    assert status(node)["remote0"]["failed"] == 0
    assert node.stop() == 0


def _send_compressed_mr(make_node: Any, peers: Any) -> tuple[Any, Peer, Peer, dict[str, Dataset]]:
    """An MR remote in explicit VR LE only (remote0), one that also takes RLE and JPEG 2000 (remote1), and an RLE
    and a JPEG 2000 lossless MR sent to the node. Returns node, the two remotes, originals by study UID."""
    plain = peers.pynetdicom(contexts=((MRImageStorage, [ExplicitVRLittleEndian]),)).start()
    capable = peers.pynetdicom(contexts=((MRImageStorage, [RLELossless, JPEG2000Lossless, ExplicitVRLittleEndian]),)
                               ).start()
    node = make_node([(plain.ae_title, plain.port), (capable.ae_title, capable.port)]).start()
    originals = {}
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"):
        ds, _ = fresh(name)
        originals[ds.StudyInstanceUID] = ds
    for ds in originals.values():  # one association per syntax, as a modality would
        assert c_store(node.port, [ds]) == [0x0000]
    assert wait_for(lambda: len(plain.stored()) == 2 and len(capable.stored()) == 2
                    and settled(node, "remote0") and settled(node, "remote1"), 30), status(node)
    return node, plain, capable, originals


def test_compressed_instance_is_decompressed_only_for_a_remote_that_needs_it(tmp_path, make_node, peers):
    """RLE and JPEG 2000 MR: decoded to explicit VR LE for an uncompressed-only remote, unchanged for the other."""
    node, plain, capable, originals = _send_compressed_mr(make_node, peers)
    to_original = studies(node)
    for r in plain.stored():
        original = originals[to_original[r.dataset.StudyInstanceUID]]
        assert r.syntax == ExplicitVRLittleEndian
        assert r.dataset.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert (r.dataset.pixel_array == original.pixel_array).all()
    for r in capable.stored():
        original = originals[to_original[r.dataset.StudyInstanceUID]]
        assert r.syntax == original.file_meta.TransferSyntaxUID  # no decompression when not needed
        assert r.dataset.PixelData == original.PixelData  # encapsulated bytes unchanged
        assert r.uid in queued(node, "remote1")
    assert {to_original[r.dataset.StudyInstanceUID] for r in plain.stored()} == set(originals)
    assert {to_original[r.dataset.StudyInstanceUID] for r in capable.stored()} == set(originals)
    transcoded = events(node, "transcoded")
    assert len(transcoded) == 2 and {e["destination"] for e in transcoded} == {"remote0"}, transcoded
    assert status(node)["remote0"]["failed"] == status(node)["remote1"]["failed"] == 0
    # The decoded copy is the same instance: its pseudonymous SOP Instance UID, not one minted by the decoder
    # (pydicom's Dataset.decompress() generates a new one unless told not to).
    for r in plain.stored():
        assert r.dataset.file_meta.MediaStorageSOPInstanceUID == r.dataset.SOPInstanceUID == r.uid
    assert sorted(plain.uids()) == sorted(capable.uids()) == sorted(queued(node, "remote0"))
    assert all(cli(node, "reidentify", uid, "--reason", "test").returncode == 0 for uid in plain.uids())


# -- 5. STAT jumps the queue -------------------------------------------------------------------------


def test_stat_instances_jump_a_queue_of_routine_ones(tmp_path, make_node, peers):
    """60 routine CTs wait for a down remote; a C-STORE HIGH one and a STAT-routed one arrive among the first 10."""
    remote_port = free_port()
    node = make_node([("TELERAD", remote_port)])
    append_config(node, '[[routes]]\nname = "emergency"\ncalling_aets = ["ER01"]\npriority = "stat"')
    node.start()
    routine = make_study(tmp_path / "routine", instances=60, series=2)
    sent = storescu(node.port, routine.files)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert wait_for(lambda: status(node)["remote0"]["last_error"] is not None, 30), status(node)

    high = make_study(tmp_path / "high", instances=1, series=1)
    assert c_store(node.port, [pydicom.dcmread(high.files[0])], priority=1) == [0x0000]  # C-STORE Priority HIGH
    routed = make_study(tmp_path / "routed", instances=1, series=1)
    sent = storescu(node.port, routed.files, calling="ER01")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    stat = {e["sop_instance_uid"] for e in events(node, "instance_stored") if e["priority"] == 1}
    assert len(stat) == 2, events(node, "instance_stored")[-2:]
    assert [e["routes"] for e in events(node, "instance_stored") if e["calling_aet"] == "ER01"] == [["emergency"]]

    remote = peers.pynetdicom(port=remote_port).start()
    assert wait_for(lambda: len(remote.uids()) == 62 and settled(node), 60), (len(remote.uids()), status(node))
    order = remote.uids()
    assert len(set(order)) == 62
    positions = sorted(order.index(uid) + 1 for uid in stat)
    assert positions[-1] <= 10, f"STAT instances arrived at positions {positions}"
    assert all(r.priority == 1 for r in remote.stored() if r.uid in stat)  # forwarded as C-STORE HIGH too
    assert node.stop() == 0


# -- 6. routing by modality ---------------------------------------------------------------------------


def test_route_sends_mr_only_to_its_destination_and_ct_only_to_the_default(tmp_path, make_node, peers):
    """A route sends MR only to remote1 (default = false); CT goes only to remote0."""
    ct_remote = peers.dcmtk().start()
    mr_remote = peers.dcmtk().start()
    node = make_node([(ct_remote.ae_title, ct_remote.port), (mr_remote.ae_title, mr_remote.port)])
    destination_keys(node, 1, "default = false")
    append_config(node, '[[routes]]\nname = "mr"\nmodalities = ["MR"]\ndestinations = ["remote1"]')
    node.start()
    study = make_study(tmp_path / "study", instances=3, series=1)
    mr, mr_path = fresh("MR_small.dcm", tmp_path / "mr")
    sent = storescu(node.port, [*study.files, mr_path])
    assert sent.returncode == 0, sent.stdout + sent.stderr

    assert wait_for(lambda: len(ct_remote.arrived()) == 3 and len(mr_remote.arrived()) == 1
                    and settled(node, "remote0") and settled(node, "remote1"), 30), status(node)
    modalities = lambda scp: [pydicom.dcmread(p).Modality for p in scp.files()]  # noqa: E731
    assert modalities(ct_remote) == ["CT"] * 3
    assert modalities(mr_remote) == ["MR"]
    assert mapping(node)[mr_remote.arrived()[0]] == mr.SOPInstanceUID
    queues = status(node)
    assert (queues["remote0"]["sent"], queues["remote1"]["sent"]) == (3, 1), queues
    assert node.stop() == 0


# -- 7. disk floor ------------------------------------------------------------------------------------


def test_free_space_below_min_free_mb_answers_a700_and_keeps_nothing(tmp_path, make_node, peers):
    """With min_free_mb above the free space, C-STOREs get 0xA700, nothing is spooled, echo still works."""
    remote = peers.dcmtk().start()
    node = make_node([(remote.ae_title, remote.port)])
    node_keys(node, f"min_free_mb = {10**9}")
    node.start()
    study = make_study(tmp_path / "study", instances=3, series=1)

    assert c_store(node.port, [pydicom.dcmread(p) for p in study.files]) == [0xA700] * 3
    sent = storescu(node.port, study.files, extra=("-v",))
    output = sent.stdout + sent.stderr
    refusals = output.count("Received Store Response (Refused: OutOfResources)")
    assert sent.returncode != 0 and refusals >= 1 and "(Success)" not in output, output
    assert echo(node.port).returncode == 0
    assert node.proc.poll() is None

    spool = node.folder / "var" / "spool"
    leftovers = [p for p in spool.rglob("*") if p.is_file()]
    assert leftovers == [], leftovers
    incoming = node.folder / "var" / "incoming"
    assert [p for p in incoming.rglob("*") if p.is_file()] == []  # no received originals left behind
    row = status(node)["remote0"]
    assert (row["pending"], row["sent"]) == (0, 0), row
    assert remote.files() == []
    refused = events(node, "instance_refused")
    assert len(refused) == 3 + refusals and {e["status"] for e in refused} == {"0xA700"}, refused
    assert events(node, "instance_stored") == []
    assert node.stop() == 0


# -- 8. pause and resume ----------------------------------------------------------------------------


def test_paused_destination_queues_and_resume_sends(tmp_path, make_node, peers):
    """`pause remote0` keeps instances pending (status paused); `resume remote0` sends them."""
    remote = peers.dcmtk().start()
    node = make_node([(remote.ae_title, remote.port)]).start()
    assert node.cli("pause", "remote0", check=True).returncode == 0
    assert status(node)["remote0"]["paused"] is True
    study = make_study(tmp_path / "study", instances=5, series=1)
    sent = storescu(node.port, study.files)
    assert sent.returncode == 0, sent.stdout + sent.stderr

    assert not wait_for(lambda: remote.files(), 3), "a paused destination was sent to"
    row = status(node)["remote0"]
    assert row["paused"] is True and row["pending"] == 5 and row["sent"] == 0, row
    assert node.cli("resume", "remote0", check=True).returncode == 0
    assert wait_for(lambda: len(remote.arrived()) == 5 and settled(node), 30), status(node)
    row = status(node)["remote0"]
    assert row["paused"] is False and row["sent"] == 5, row
    assert sorted(remote.arrived()) == sorted(queued(node))
    assert node.stop() == 0


# -- 9. graceful stop in the middle of a study ----------------------------------------------------------


def test_sigterm_mid_study_then_restart_delivers_every_acknowledged_image_once(tmp_path, make_node, peers):
    """SIGTERM while a 100-image study comes in: exit 0; after a restart everything acknowledged arrives once."""
    def slow(ds: Dataset, seen: int) -> int:  # a remote slower than the modality: the forwarder is busy at SIGTERM
        time.sleep(0.06)
        return 0x0000

    remote = peers.pynetdicom(respond=slow).start()
    node = make_node([(remote.ae_title, remote.port)])
    node_keys(node, "stop_timeout = 0.5")
    node.start()
    study = make_study(tmp_path / "study", instances=100, series=2)

    modality = storescu_popen(node.port, study.files, nagle=True)
    assert wait_for(lambda: len(events(node, "instance_stored")) >= 20, 60), "the study did not start arriving"
    assert node.stop() == 0
    out, _ = modality.communicate(timeout=120)
    acked = acknowledged(out)
    assert 20 <= len(acked) < 100, f"{len(acked)} acknowledged: the stop did not interrupt the study"
    before_restart = len(remote.uids())
    assert before_restart < len(set(queued(node))), "nothing was left to forward after the stop"

    node.start()
    assert wait_for(lambda: settled(node) and len(set(remote.uids())) == len(set(queued(node))), 60), \
        (len(remote.uids()), status(node))
    wait_for(lambda: len(remote.received) > len(set(remote.uids())), 2)  # give a duplicate time to show up
    arrived = [r.uid for r in remote.received]
    assert len(arrived) == len(set(arrived)), f"{len(arrived) - len(set(arrived))} duplicate deliveries"
    assert set(arrived) == set(queued(node))
    logged = {e["sop_instance_uid"] for e in events(node, "instance_stored")}
    assert logged <= set(arrived)
    to_original = mapping(node)
    original_uid = {str(p): pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in study.files}
    missing = {original_uid[f] for f in acked} - {to_original[uid] for uid in arrived}
    assert not missing, f"{len(missing)} acknowledged instances never arrived"
    row = status(node)["remote0"]
    assert row["sent"] == len(arrived) and row["failed"] == 0, row
    assert node.stop() == 0


# -- 10. quarantine retry once the remote is fixed ----------------------------------------------------


def test_quarantine_retry_after_the_remote_is_fixed_delivers_the_failed_instance(tmp_path, make_node, peers):
    """A send_failed MR is released by `quarantine retry --all` once the remote accepts MR, and arrives."""
    node, refusing, _, (mr_uid,) = _refused_mr(tmp_path, make_node, peers)
    refusing.stop()
    fixed = peers.pynetdicom(port=refusing.port, contexts=((CTImageStorage, ALL_TRANSFER_SYNTAXES),
                                                           (MRImageStorage, ALL_TRANSFER_SYNTAXES))).start()
    retry = cli(node, "quarantine", "retry", "--all")
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert json.loads(retry.stdout.splitlines()[-1]) == {"released": 1, "held": 0}
    assert quarantined(node) == []

    assert wait_for(lambda: fixed.uids() == [mr_uid], 30), (fixed.uids(), status(node))
    assert fixed.stored()[0].sop_class == MRImageStorage
    assert wait_for(lambda: settled(node), 30), status(node)
    wait_for(lambda: len(fixed.received) > 1, 2)
    assert fixed.uids() == [mr_uid]  # only the released instance, once
    row = status(node)["remote0"]
    assert row["sent"] == 6, row
    assert row["failed"] == 0 and row["last_error"] is None, row  # the released failure is no longer news
    assert json.loads(node.cli("status", "--json", check=True).stdout)["quarantine"] == 0
    assert node.stop() == 0


# -- de-identification refusals, parallel workers, a killed node's leftovers -------------------------


def test_instance_that_cannot_be_deidentified_is_refused_c220_and_its_original_quarantined(tmp_path, make_node,
                                                                                           peers):
    """No Series Instance UID: the profile cannot be sure of it; 0xC220, original held as deid_failed, nothing sent."""
    remote = peers.pynetdicom().start()
    node = make_node([("TELERAD", remote.port)]).start()
    ds, _ = fresh("CT_small.dcm")
    del ds.SeriesInstanceUID
    assert c_store(node.port, [ds]) == [0xC220]
    [entry] = quarantined(node)
    assert entry["kind"] == "deid_failed"
    held = pydicom.dcmread(node.folder / "var" / "quarantine" / f"{entry['id']}.dcm")
    assert held.SOPInstanceUID == ds.SOPInstanceUID  # the original, kept inside the hospital
    assert echo(node.port).returncode == 0 and remote.uids() == []
    assert node.stop() == 0


def test_parallel_workers_share_a_backlog_and_send_each_instance_once(tmp_path, make_node, peers):
    """parallel = 2: both workers send batches of a backlog; every instance arrives exactly once."""
    port = free_port()
    node = make_node([("TELERAD", port)])
    destination_keys(node, 0, "parallel = 2\nbatch_size = 4")
    node.start()
    study = make_study(tmp_path / "study", instances=24, series=1)
    assert storescu(node.port, study.files).returncode == 0
    # 0.1 s a C-STORE: the backlog outlasts a worker's backoff after the outage (its C-ECHO probe runs
    # every 2 s), so the second worker joins even when the first resumes at once (0.02 s: 1 run in ~12
    # had the first send everything).
    remote = peers.pynetdicom(port=port, respond=lambda ds, seen: (time.sleep(0.1), 0x0000)[1]).start()
    assert wait_for(lambda: len(remote.uids()) == 24, 60), status(node)
    time.sleep(0.5)
    assert sorted(remote.uids()) == sorted(set(remote.uids()))
    assert {e["worker"] for e in events(node, "batch_sent")} == {0, 1}
    assert node.stop() == 0


def test_half_received_data_sets_of_a_killed_node_are_removed_at_start(tmp_path, make_node):
    """data_dir/incoming holds data sets being received (never acknowledged): a restart clears what a kill left."""
    node = make_node([("TELERAD", free_port())])
    incoming = node.folder / "var" / "incoming"
    incoming.mkdir(parents=True)
    leftover = incoming / "tmpkilled.dcm"
    leftover.write_bytes(b"half a data set")
    node.start()
    assert not leftover.exists()
    assert oct(incoming.stat().st_mode & 0o777) == "0o700"
    assert node.stop() == 0
