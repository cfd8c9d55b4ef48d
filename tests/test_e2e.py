"""End to end against real peers: DCMTK storescu → telenode → DCMTK storescp (and pynetdicom).

These are the spine's acceptance tests: nothing identifying arrives, grouping
is kept one to one, pixels are byte-identical, references are remapped,
re-sent instances get the same pseudonyms, `reidentify` recovers the
originals, disallowed AEs are refused at association, malformed data sets get
a failure status, and a SIGKILL loses nothing that was acknowledged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from conftest import echo, free_port, storescu, wait_for
from studies import make_study


def received_datasets(files: list[Path]) -> list[pydicom.FileDataset]:
    return [pydicom.dcmread(p) for p in files]


def assert_no_identity(files: list[Path], identifying: list[str]) -> None:
    for path in files:
        raw = path.read_bytes().lower()
        for value in identifying:
            assert value.lower().encode() not in raw, f"{value!r} leaked into {path.name}"


def test_study_arrives_anonymized_grouped_and_reidentifiable(tmp_path, make_node, make_storescp):
    study = make_study(tmp_path / "study", instances=6, series=2)
    remote = make_storescp().start()
    node = make_node([(remote.ae_title, remote.port)]).start()

    sent = storescu(node.port, study.files)
    assert sent.returncode == 0, sent.stderr
    assert wait_for(lambda: len(remote.files()) == 6), f"{len(remote.files())} of 6 arrived"
    assert_no_identity(remote.files(), study.identifying_strings)

    out = received_datasets(remote.files())
    originals = {p.name: pydicom.dcmread(p) for p in study.files}
    # Grouping one to one: one study, two series, six distinct instances.
    assert len({ds.StudyInstanceUID for ds in out}) == 1
    assert len({ds.SeriesInstanceUID for ds in out}) == 2
    assert len({ds.SOPInstanceUID for ds in out}) == 6
    for ds in out:
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.PatientID.startswith("TESTORG-")
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPInstanceUID.startswith("2.25.")
        assert "113100" in [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]

    # Pixels byte-identical: match each output to its original through reidentify.
    by_original = {}
    for ds in out:
        found = json.loads(node.cli("reidentify", ds.SOPInstanceUID, "--reason", "test", check=True).stdout)
        by_original[found["sop_instance_uid"]] = ds
    assert set(by_original) == set(study.sop_uids)
    for original in originals.values():
        assert by_original[original.SOPInstanceUID].PixelData == original.PixelData

    # References stay valid: each Referenced SOP Instance UID points at an instance that arrived.
    arrived = {ds.SOPInstanceUID for ds in out}
    references = [ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID for ds in out if "ReferencedImageSequence" in ds]
    assert len(references) == 5 and set(references) <= arrived

    # Re-identification of patient, accession and study; audited.
    patient = json.loads(node.cli("reidentify", out[0].PatientID, check=True).stdout)
    assert patient["patient_id"] == study.phi["PatientID"]
    assert patient["patient_name"] == study.phi["PatientName"]
    study_row = json.loads(node.cli("reidentify", out[0].StudyInstanceUID, check=True).stdout)
    assert study_row["study_instance_uid"] == study.study_uid
    assert study_row["accession_number"] == study.phi["AccessionNumber"]
    accession = json.loads(node.cli("reidentify", out[0].AccessionNumber, check=True).stdout)
    assert accession["study_instance_uid"] == study.study_uid
    unknown = node.cli("reidentify", "2.25.1234")
    assert unknown.returncode == 1 and "unknown" in unknown.stderr

    status = json.loads(node.cli("status", "--json", check=True).stdout)
    assert status["destinations"]["remote0"]["sent"] == 6
    assert status["destinations"]["remote0"]["pending"] == 0
    assert node.stop() == 0

    # No PHI in the node's own log either.
    assert_no_identity([node.log], [v for v in study.phi.values()] + [study.study_uid])


def test_resent_study_gets_same_pseudonyms_after_restart(tmp_path, make_node, make_storescp):
    study = make_study(tmp_path / "study", instances=3, series=1)
    first = make_storescp().start()
    node = make_node([(first.ae_title, first.port)]).start()
    assert storescu(node.port, study.files).returncode == 0
    assert wait_for(lambda: len(first.files()) == 3)
    assert node.stop() == 0
    first.stop()

    second = make_storescp(port=first.port).start()
    node.start()
    assert storescu(node.port, study.files).returncode == 0
    assert wait_for(lambda: len(second.files()) == 3)
    assert [p.name for p in first.files()] == [p.name for p in second.files()]  # same SOP Instance UIDs
    a, b = received_datasets(first.files()), received_datasets(second.files())
    assert {ds.StudyInstanceUID for ds in a} == {ds.StudyInstanceUID for ds in b}
    assert {ds.PatientID for ds in a} == {ds.PatientID for ds in b}
    assert {ds.AccessionNumber for ds in a} == {ds.AccessionNumber for ds in b}


def test_calling_ae_not_allowed_is_rejected_at_association(tmp_path, make_node):
    node = make_node([("TELERAD", free_port())], allowed=["CT01"]).start()
    refused = echo(node.port, calling="INTRUDER")
    assert refused.returncode != 0
    assert "reject" in (refused.stdout + refused.stderr).lower()
    assert echo(node.port, calling="CT01").returncode == 0
    assert wait_for(lambda: "association_rejected" in node.log.read_text())


def _send_raw(port: int, path: Path) -> int:
    """Send a Part 10 file byte for byte (no decoding) with pynetdicom; return the C-STORE status."""
    from pynetdicom import _config

    previous, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        ae = AE(ae_title="FUZZER")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="TELENODE")
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assoc.release()
        return int(status.Status)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def _part10(path: Path, body: bytes, sop_uid: str = "1.2.3.4.5") -> Path:
    meta = Dataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    from pydicom.filewriter import write_file_meta_info

    with open(path, "wb") as handle:
        handle.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(handle, pydicom.dataset.FileMetaDataset(meta))
        handle.write(body)
    return path


def test_malformed_datasets_get_failure_status_and_node_keeps_serving(tmp_path, make_node):
    node = make_node([("TELERAD", free_port())]).start()
    # An element claiming ~4 GiB (explicit VR OB, 4-byte length) in a few bytes of PDU.
    huge = (b"\x08\x00\x16\x00UI\x1a\x001.2.840.10008.5.1.4.1.1.2\x00"
            b"\x08\x00\x18\x00UI\x0a\x001.2.3.4.5\x00"
            b"\xe0\x7f\x10\x00OB\x00\x00\xf0\xff\xff\xffabcd")
    garbage = b"\x08\x00\x16\x00UI\xff\x7fnot really a dataset"
    for name, body in (("huge.dcm", huge), ("garbage.dcm", garbage)):
        status = _send_raw(node.port, _part10(tmp_path / name, body))
        assert status >= 0xA000, f"{name}: status 0x{status:04X}"
    assert echo(node.port).returncode == 0
    assert node.proc.poll() is None
    status = json.loads(node.cli("status", "--json", check=True).stdout)
    assert status["destinations"]["remote0"]["pending"] == 0  # nothing refused was queued


def test_sigkill_with_remote_down_loses_nothing_and_sends_once(tmp_path, make_node, make_scp):
    study = make_study(tmp_path / "study", instances=8, series=2)
    remote_port = free_port()
    node = make_node([("TELERAD", remote_port)]).start()
    sent = storescu(node.port, study.files)
    assert sent.returncode == 0, sent.stderr  # all 8 acknowledged while the remote is down
    node.kill()

    remote = make_scp(port=remote_port).start()
    node.start()
    assert wait_for(lambda: len(remote.uids()) >= 8, 60), f"{len(remote.uids())} of 8 arrived"
    wait_for(lambda: len(remote.uids()) > 8, 2)  # give duplicates a chance to show up
    assert len(remote.uids()) == 8
    assert len(set(remote.uids())) == 8
    assert node.stop() == 0


def test_sigterm_is_not_held_by_an_idle_tcp_connection(tmp_path, make_node):
    """A health check that connects and sends nothing must not delay a graceful stop by the ACSE timeout."""
    import socket
    import time

    node = make_node([("TELERAD", free_port())]).start()
    with socket.create_connection(("127.0.0.1", node.port)):
        started = time.monotonic()
        assert node.stop() == 0
        assert time.monotonic() - started < 10


def test_sigterm_right_after_the_port_opens_still_stops_gracefully(tmp_path, make_node):
    """The signal handlers are in place before the port listens: exit 0, not killed by the default action."""
    node = make_node([("TELERAD", free_port())])
    for _ in range(3):
        node.start()
        assert node.stop() == 0
