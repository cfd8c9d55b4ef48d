"""STOW-RS ingest (POST /dicomweb/studies) with dicomweb-client as the sender, into the C-STORE pipeline."""

from __future__ import annotations

import io
import json

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from conftest import wait_for
from http_node import HttpNode, remote  # noqa: F401 (a fixture)
from studies import make_study

pytestmark = pytest.mark.dcmtk

REFERENCED, FAILED = "00081199", "00081198"
CANNOT_UNDERSTAND, DATASET_MISMATCH = 0xC210, 0xA900


@pytest.fixture(scope="module")
def node(tmp_path_factory, remote) -> HttpNode:
    running = HttpNode(tmp_path_factory.mktemp("node"), [(remote.ae_title, remote.port)]).start()
    yield running
    running.kill()


def related(parts: list[bytes], boundary: str = "telenode-test-boundary") -> tuple[bytes, str]:
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
                    for part in parts) + f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_dicomweb_client_stores_a_study_that_arrives_deidentified(node, remote, tmp_path):
    study = make_study(tmp_path / "s", instances=3, series=2)
    client = DICOMwebClient(f"{node.url}/dicomweb", headers={"Authorization": f"Bearer {node.token}"})
    before = set(remote.files())
    answer = client.store_instances([pydicom.dcmread(p) for p in study.files])
    assert sorted(item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence) == sorted(study.sop_uids)
    assert {item.ReferencedSOPClassUID for item in answer.ReferencedSOPSequence} == {"1.2.840.10008.5.1.4.1.1.2"}
    assert "FailedSOPSequence" not in answer
    assert wait_for(lambda: len(set(remote.files()) - before) == 3, 30), "STOW-RS instances were not forwarded"
    arrived = [pydicom.dcmread(p) for p in set(remote.files()) - before]
    for ds, path in zip(arrived, set(remote.files()) - before):
        raw = path.read_bytes().lower()
        assert all(value.lower().encode() not in raw for value in study.identifying_strings)
        assert ds.PatientID.startswith("TESTORG-") and ds.SOPInstanceUID.startswith("2.25.")
    # The same pipeline and mapping store: reidentify recovers the sender's UID; anonymize-stream agrees.
    found = json.loads(node.cli("reidentify", arrived[0].SOPInstanceUID, "--reason", "t", check=True).stdout)
    assert found["sop_instance_uid"] in study.sop_uids
    original = study.files[study.sop_uids.index(found["sop_instance_uid"])]
    with node.client() as api:
        again = api.post("/api/anonymize-stream", files={"file": ("a", original.read_bytes())})
    assert pydicom.dcmread(io.BytesIO(again.content)).SOPInstanceUID == arrived[0].SOPInstanceUID


def test_stow_reports_failed_instances_with_the_senders_uids(node, tmp_path):
    study = make_study(tmp_path / "s", instances=1, series=1)
    good = study.files[0].read_bytes()
    with node.client() as api:
        body, kind = related([good, b"definitely not a DICOM data set"])
        mixed = api.post("/dicomweb/studies", content=body, headers={"Content-Type": kind})
        assert mixed.status_code == 202 and mixed.headers["content-type"] == "application/dicom+json"
        answer = mixed.json()
        assert answer[REFERENCED]["Value"][0]["00081155"]["Value"] == [study.sop_uids[0]]
        assert answer[FAILED]["Value"][0]["00081197"]["Value"] == [CANNOT_UNDERSTAND]

        body, kind = related([b"nope"])
        none = api.post("/dicomweb/studies", content=body, headers={"Content-Type": kind})
        assert none.status_code == 409 and REFERENCED not in none.json()

        body, kind = related([good])
        other = api.post("/dicomweb/studies/1.2.3.4.5", content=body, headers={"Content-Type": kind})
        assert other.status_code == 409
        failed = other.json()[FAILED]["Value"][0]
        assert failed["00081155"]["Value"] == [study.sop_uids[0]] and failed["00081197"]["Value"] == [DATASET_MISMATCH]
        same = api.post(f"/dicomweb/studies/{study.study_uid}", content=body, headers={"Content-Type": kind})
        assert same.status_code == 200


def test_stow_415_for_other_media_types_and_400_for_a_bad_body(node):
    with node.client() as api:
        assert api.post("/dicomweb/studies", content=b"x", headers={"Content-Type": "application/dicom"}
                        ).status_code == 415
        assert api.post("/dicomweb/studies", content=b"x", headers={
            "Content-Type": 'multipart/related; type="application/dicom+xml"; boundary=b'}).status_code == 415
        assert api.post("/dicomweb/studies", content=b"--b--\r\n", headers={
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}).status_code == 400


def test_stow_instances_are_counted_in_metrics(node, tmp_path):
    study = make_study(tmp_path / "s", instances=2, series=1)
    with node.client() as api:
        body, kind = related([p.read_bytes() for p in study.files])
        assert api.post("/dicomweb/studies", content=body, headers={"Content-Type": kind}).status_code == 200
        text = api.get("/metrics").text
    received = _value(text, 'telenode_instances_received_total{source="stow"}')
    stored = _value(text, 'telenode_instances_stored_total{source="stow"}')
    assert received >= 2 and stored >= 2


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in /metrics")
