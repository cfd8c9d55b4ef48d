"""The HTTP gateway against a running node: a real httpx client, every status code of the contract.

One `telenode serve` (2 SCP workers, [http] on a free port, a DCMTK storescp as its
destination) serves the module; tests that need another configuration start their own.
"""

from __future__ import annotations

import io
import json
import stat
from datetime import datetime
from pathlib import Path

import pydicom
import pytest

from conftest import free_port, storescu, wait_for
from http_node import HttpNode, make_http_node, remote  # noqa: F401 (fixtures)
from studies import PHI, make_study

pytestmark = pytest.mark.dcmtk


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("roots")


@pytest.fixture(scope="module")
def node(tmp_path_factory, remote, roots) -> HttpNode:
    folder = tmp_path_factory.mktemp("node")
    running = HttpNode(folder, [(remote.ae_title, remote.port)], roots=[roots],
                       extra="max_request_mb = 1").start()
    yield running
    running.kill()


@pytest.fixture
def api(node):
    with node.client() as client:
        yield client


def assert_no_phi(data: bytes, study) -> None:
    lowered = data.lower()
    for value in study.identifying_strings:
        assert value.lower().encode() not in lowered, f"{value!r} leaked"


def dataset(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


# -- no token: health, metrics, page ---------------------------------------------------------------


def test_healthz_metrics_and_page_need_no_token(node):
    with node.client(token="") as client:
        health = client.get("/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        text = client.get("/metrics")
        assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
        for name in ("telenode_instances_received_total", "telenode_instances_stored_total",
                     "telenode_instances_refused_total", "telenode_instances_quarantined_total",
                     'telenode_instances_forwarded_total{destination="remote0"}',
                     'telenode_instances_failed_total{destination="remote0"}',
                     'telenode_queue_depth{destination="remote0"}',
                     'telenode_queue_oldest_age_seconds{destination="remote0"}',
                     "telenode_processing_seconds_bucket"):
            assert name in text.text, name
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<meta http-equiv="refresh"' in page.text and "remote0" in page.text
        assert "<script" not in page.text and "http://" not in page.text.replace(node.url, "")


# -- the token ------------------------------------------------------------------------------------------


PROTECTED = [("POST", "/api/anonymize-stream"), ("POST", "/api/batch-prepare"), ("GET", "/api/batches/x"),
             ("POST", "/dicomweb/studies")]


@pytest.mark.parametrize("method,path", PROTECTED)
def test_api_and_dicomweb_answer_401_without_the_right_token(node, method, path):
    for token in ("", "wrong-" + node.token, node.token[:-1]):
        with node.client(token=token) as client:
            answer = client.request(method, path, content=b"x")
        assert answer.status_code == 401, (token, answer.text)
        assert answer.json() == {"error": "missing or invalid bearer token"}
        assert answer.headers["www-authenticate"].startswith("Bearer")
    with node.client(token="") as client:  # another scheme with the right secret is not enough
        answer = client.request(method, path, headers={"Authorization": f"Basic {node.token}"})
    assert answer.status_code == 401


def test_token_is_compared_in_constant_time(monkeypatch):
    """The check goes through hmac.compare_digest (a plain == leaks the token's prefix through timing)."""
    from node.http import app

    calls = []
    real = app.hmac.compare_digest
    monkeypatch.setattr(app.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))

    class Ctx:
        token = "s3cret-token-value-0123456789"

    class Req:
        def __init__(self, value: str) -> None:
            self.headers = {"authorization": value}

    assert app.authorized(Ctx, Req("Bearer s3cret-token-value-0123456789"))
    assert not app.authorized(Ctx, Req("Bearer s3cret-token-value-012345678X"))
    assert len(calls) == 2 and calls[0] == (Ctx.token.encode(), Ctx.token.encode())


def test_token_file_is_created_0600(node):
    path = node.folder / "var" / "http.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(node.token) >= 32


# -- anonymize-stream ----------------------------------------------------------------------------------


def test_anonymize_stream_returns_the_deidentified_file_with_tracking_headers(node, api, tmp_path, remote):
    study = make_study(tmp_path / "s", instances=1, series=1)
    before = len(remote.files())
    answer = api.post("/api/anonymize-stream", files={"file": ("x.dcm", study.files[0].read_bytes(),
                                                               "application/dicom")})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/dicom"
    assert_no_phi(answer.content, study)
    ds = dataset(answer.content)
    assert ds.PatientID.startswith("TESTORG-") and ds.SOPInstanceUID.startswith("2.25.")
    assert answer.headers["x-cloud-study-id"] == ds.AccessionNumber != PHI["AccessionNumber"]
    assert datetime.fromisoformat(answer.headers["x-processed-at"]).tzinfo is not None
    # The raw application/dicom body: the same pseudonyms (same key, same mapping store).
    raw = api.post("/api/anonymize-stream", content=study.files[0].read_bytes(),
                   headers={"Content-Type": "application/dicom"})
    assert raw.status_code == 200
    assert dataset(raw.content).SOPInstanceUID == ds.SOPInstanceUID
    # Queues nothing: nothing is pending and nothing reaches the remote.
    status = json.loads(node.cli("status", "--json", check=True).stdout)
    assert status["destinations"]["remote0"]["pending"] == 0
    assert len(remote.files()) == before
    # The mapping store knows it: reidentify finds the original.
    found = json.loads(node.cli("reidentify", ds.SOPInstanceUID, "--reason", "test", check=True).stdout)
    assert found["patient_id"] == PHI["PatientID"]
    assert not list((node.folder / "var" / "incoming" / "http").iterdir()), "uploads left behind"


def test_anonymize_stream_400_without_a_file_or_not_dicom(api):
    cases = [
        {"files": {"other": ("x.dcm", b"DICM", "application/dicom")}},  # no field 'file'
        {"data": {"file": "just text"}, "files": {"unused": ("a", b"b")}},
        {"content": b"", "headers": {"Content-Type": "application/dicom"}},
        {"content": b"not dicom at all" * 20, "headers": {"Content-Type": "application/dicom"}},
        {"files": {"file": ("x.dcm", b"PK\x03\x04 a zip, not DICOM" * 10, "application/dicom")}},
        {"json": {"file": "x"}},
    ]
    for case in cases:
        answer = api.post("/api/anonymize-stream", **case)
        assert answer.status_code == 400, (case, answer.text)
        assert set(answer.json()) == {"error"}


def test_anonymize_stream_422_holds_a_burned_in_suspect(node, api, tmp_path):
    study = make_study(tmp_path / "s", instances=1, series=1)
    ds = pydicom.dcmread(study.files[0])
    ds.BurnedInAnnotation = "YES"
    ds.save_as(study.files[0])
    answer = api.post("/api/anonymize-stream", files={"file": ("x.dcm", study.files[0].read_bytes())})
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert set(body) == {"error", "quarantine_id"} and body["quarantine_id"]
    assert_no_phi(answer.content, study)
    held = json.loads(node.cli("quarantine", "list", "--json", check=True).stdout)
    assert body["quarantine_id"] in [entry["id"] for entry in held]


def test_anonymize_stream_413_past_the_size_limit(api):
    answer = api.post("/api/anonymize-stream", content=b"\0" * (1024 * 1024 + 10),
                      headers={"Content-Type": "application/dicom"})
    assert answer.status_code == 413 and "error" in answer.json()


def test_same_pseudonyms_over_http_and_over_c_store(node, api, remote, tmp_path):
    study = make_study(tmp_path / "s", instances=1, series=1)
    before = set(remote.files())
    sent = storescu(node.port, study.files)
    assert sent.returncode == 0, sent.stderr
    assert wait_for(lambda: len(set(remote.files()) - before) == 1, 30), "C-STORE did not reach the remote"
    (arrived,) = set(remote.files()) - before
    by_cstore = pydicom.dcmread(arrived)
    answer = api.post("/api/anonymize-stream", files={"file": ("a", study.files[0].read_bytes())})
    over_http = dataset(answer.content)
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID", "PatientName",
                    "AccessionNumber", "FrameOfReferenceUID"):
        assert getattr(over_http, keyword) == getattr(by_cstore, keyword), keyword
    assert answer.headers["x-cloud-study-id"] == by_cstore.AccessionNumber
    assert over_http.PixelData == by_cstore.PixelData


# -- batch-prepare -----------------------------------------------------------------------------------


def _prepare(api, folder, **extra):
    return api.post("/api/batch-prepare", json={"StudyDirectory": str(folder), **extra})


def test_batch_prepare_stages_every_study_with_a_manifest(node, api, roots):
    folder = roots / "two-studies"
    first = make_study(folder / "patient-a" / "study1", instances=3, series=2)
    second = make_study(folder / "patient-b", instances=2, series=1, phi={"AccessionNumber": "ACC5550001"})
    (folder / "notes.txt").write_text("not dicom")
    answer = _prepare(api, folder, Priority="STAT", OrganizationId="TESTORG")
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert set(result) == {"BatchId", "Success", "TotalFiles", "SuccessfulFiles", "ManifestPath",
                           "StagingDirectory"}
    assert result["TotalFiles"] == 6 and result["SuccessfulFiles"] == 5 and result["Success"] is False
    staging = Path(result["StagingDirectory"])
    assert Path(result["ManifestPath"]) == staging / "manifest.json"
    manifest = json.loads(Path(result["ManifestPath"]).read_text())
    assert manifest["Version"] == "1.0" and manifest["BatchId"] == result["BatchId"]
    assert manifest["Priority"] == "STAT" and datetime.fromisoformat(manifest["SubmittedAt"]).tzinfo
    assert manifest["TotalStudies"] == 2 and manifest["TotalImages"] == 5
    by_count = {s["ImageCount"]: s for s in manifest["Studies"]}
    assert set(by_count) == {3, 2}
    assert sorted(by_count[3]["Files"]) == [f"patient-a/study1/IM{i:04d}.dcm" for i in range(3)]
    for entry in manifest["Studies"]:
        assert entry["StudyInstanceUID"].startswith("2.25.") and len(entry["CloudStudyId"]) == 16
        for relative in entry["Files"]:
            staged = pydicom.dcmread(staging / relative)
            assert staged.StudyInstanceUID == entry["StudyInstanceUID"]
            assert staged.AccessionNumber == entry["CloudStudyId"]
            assert_no_phi((staging / relative).read_bytes(), first)
            assert_no_phi((staging / relative).read_bytes(), second)
    assert_no_phi(json.dumps(manifest).encode(), first)
    progress = api.get(f"/api/batches/{result['BatchId']}")
    assert progress.status_code == 200
    assert progress.json() == {"BatchId": result["BatchId"], "State": "done", "TotalFiles": 6, "ProcessedFiles": 6,
                               "SuccessfulFiles": 5, "ManifestPath": result["ManifestPath"]}


def test_batch_prepare_without_destinations_queues_nothing_with_them_delivers(node, api, roots, remote):
    study = make_study(roots / "to-send", instances=3, series=1)
    before = set(remote.files())
    quiet = _prepare(api, study.files[0].parent)
    assert quiet.status_code == 200 and quiet.json()["Success"] is True
    status = json.loads(node.cli("status", "--json", check=True).stdout)["destinations"]["remote0"]
    assert status["pending"] + status["inflight"] == 0
    sent = _prepare(api, study.files[0].parent, Destinations=["remote0"])
    assert sent.status_code == 200 and sent.json()["SuccessfulFiles"] == 3
    assert wait_for(lambda: len(set(remote.files()) - before) == 3, 30), "the batch did not reach the remote"
    for path in set(remote.files()) - before:
        assert_no_phi(path.read_bytes(), study)


def test_batch_prepare_403_outside_the_roots_whether_or_not_it_exists(api, roots, tmp_path):
    outside = tmp_path / "outside"
    make_study(outside, instances=1, series=1)
    (roots / "escape").symlink_to(outside, target_is_directory=True)
    for folder in (outside, tmp_path / "missing-outside", "/etc", "/", f"{roots}/../{outside.name}",
                   f"{roots}/../../../../etc", roots / "escape", roots / "escape" / "..", "relative/inside",
                   f"{roots}-sibling"):
        answer = _prepare(api, folder)
        assert answer.status_code == 403, (folder, answer.text)
        assert set(answer.json()) == {"error"} and str(tmp_path) not in answer.text


def test_batch_prepare_does_not_follow_a_symlinked_file_out_of_the_roots(api, roots, tmp_path):
    folder = roots / "with-link"
    make_study(folder, instances=2, series=1)
    secret = make_study(tmp_path / "secret", instances=1, series=1)
    (folder / "sneaky.dcm").symlink_to(secret.files[0])
    (folder / "linked-dir").symlink_to(secret.files[0].parent, target_is_directory=True)
    answer = _prepare(api, folder)
    assert answer.status_code == 200
    result = answer.json()
    assert result["TotalFiles"] == 3 and result["SuccessfulFiles"] == 2  # the file link counts, is not read
    staged = [p for p in Path(result["StagingDirectory"]).rglob("*.dcm")]
    assert len(staged) == 2 and not (Path(result["StagingDirectory"]) / "sneaky.dcm").exists()


def test_batch_prepare_404_inside_the_roots_but_missing(api, roots):
    for folder in (roots / "no-such-study", roots / "a" / ".." / "nothing-here"):
        answer = _prepare(api, folder)
        assert answer.status_code == 404 and set(answer.json()) == {"error"}
    assert api.get("/api/batches/0123456789abcdef").status_code == 404
    assert api.get("/api/batches/..%2F..%2Fetc").status_code == 404


def test_batch_prepare_400_for_a_bad_request(api, roots):
    make_study(roots / "ok", instances=1, series=1)
    for body in ({}, {"StudyDirectory": ""}, {"StudyDirectory": str(roots / "ok"), "OrganizationId": "OTHER"},
                 {"StudyDirectory": str(roots / "ok"), "Destinations": ["nowhere"]},
                 {"StudyDirectory": str(roots / "ok"), "Priority": "URGENT!"}):
        answer = api.post("/api/batch-prepare", json=body)
        assert answer.status_code == 400, (body, answer.text)
    assert api.post("/api/batch-prepare", content=b"{not json").status_code == 400


def test_large_batch_answers_202_and_progress(make_http_node, tmp_path):
    roots = tmp_path / "roots"
    make_study(roots / "big", instances=12, series=2)
    node = make_http_node([("NOWHERE", free_port())], roots=[roots], extra="batch_wait_seconds = 0").start()
    with node.client() as api:
        answer = _prepare(api, roots / "big")
        assert answer.status_code == 202, answer.text
        body = answer.json()
        assert answer.headers["location"] == f"/api/batches/{body['BatchId']}" == body["ProgressUrl"]
        assert body["TotalFiles"] == 12 and body["State"] in ("running", "done")
        assert wait_for(lambda: api.get(answer.headers["location"]).json()["State"] == "done", 60)
        final = api.get(answer.headers["location"]).json()
        assert final["ProcessedFiles"] == final["SuccessfulFiles"] == 12
        assert Path(final["ManifestPath"]).is_file()
    assert node.stop() == 0  # SIGTERM: the gateway stops with the node
    node.start()  # the result outlives a restart
    with node.client() as api:
        again = api.get(f"/api/batches/{body['BatchId']}")
        assert again.status_code == 200 and again.json()["State"] == "done"
