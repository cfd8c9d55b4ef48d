"""`telenode anonymize`, `reidentify` and `status` as a user runs them (subprocesses, real SQLite)."""

from __future__ import annotations

import json
import os
import sqlite3
import stat

import pydicom

from node.store import Store
from conftest import Node, free_port
from studies import make_study


def test_anonymize_keeps_relative_paths_and_one_bad_file_does_not_stop_the_batch(tmp_path):
    study = make_study(tmp_path / "in" / "study1" / "series", instances=3, series=1)
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    node = Node(tmp_path / "node", [("TELERAD", free_port())])
    result = node.cli("anonymize", str(tmp_path / "in"), "--output", str(tmp_path / "out"))
    assert result.returncode == 1  # one file failed: the exit status says so
    assert json.loads(result.stdout) == {"anonymized": 3, "failed": 1}
    outputs = sorted((tmp_path / "out").rglob("*.dcm"))
    assert [p.relative_to(tmp_path / "out") for p in outputs] == [
        p.relative_to(tmp_path / "in") for p in study.files
    ]
    for path in outputs:
        raw = path.read_bytes().lower()
        for value in study.identifying_strings:
            assert value.lower().encode() not in raw
    ds = pydicom.dcmread(outputs[0])
    found = json.loads(node.cli("reidentify", ds.PatientID, check=True).stdout)
    assert found["patient_id"] == study.phi["PatientID"]


def test_anonymize_twice_gives_the_same_pseudonyms_and_key_is_private(tmp_path):
    study = make_study(tmp_path / "in", instances=2, series=1)
    node = Node(tmp_path / "node", [("TELERAD", free_port())])
    for out in ("a", "b"):
        node.cli("anonymize", *map(str, study.files), "--output", str(tmp_path / out), check=True)
    a = [pydicom.dcmread(tmp_path / "a" / p.name) for p in study.files]
    b = [pydicom.dcmread(tmp_path / "b" / p.name) for p in study.files]
    assert [ds.SOPInstanceUID for ds in a] == [ds.SOPInstanceUID for ds in b]
    assert [ds.PatientID for ds in a] == [ds.PatientID for ds in b]
    key = node.folder / "var" / "pseudonym.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert key.read_text().strip() not in (node.folder / "var" / "telenode.sqlite").read_bytes().decode("latin-1")


def test_reidentify_is_audited_with_operator_and_reason(tmp_path):
    study = make_study(tmp_path / "in", instances=1, series=1)
    node = Node(tmp_path / "node", [("TELERAD", free_port())])
    node.cli("anonymize", str(study.files[0]), "--output", str(tmp_path / "out"), check=True)
    pseudo = pydicom.dcmread(tmp_path / "out" / study.files[0].name).StudyInstanceUID
    node.cli("reidentify", pseudo, "--operator", "dr.who", "--reason", "report 42", check=True)
    with sqlite3.connect(node.folder / "var" / "telenode.sqlite") as db:
        rows = db.execute("select event, detail from audit where event = 'reidentify'").fetchall()
    assert len(rows) == 1
    detail = json.loads(rows[0][1])
    assert detail["operator"] == "dr.who" and detail["reason"] == "report 42" and detail["pseudonym"] == pseudo


def test_an_original_typed_by_mistake_is_not_written_into_the_audit_trail(tmp_path):
    """reidentify MRN (an original, not a pseudonym): exit 1, and the audit record keeps a digest only."""
    study = make_study(tmp_path / "in", instances=1, series=1)
    node = Node(tmp_path / "node", [("TELERAD", free_port())])
    node.cli("anonymize", str(study.files[0]), "--output", str(tmp_path / "out"), check=True)
    original = study.phi["PatientID"]
    result = node.cli("reidentify", original, "--operator", "dr.who", "--reason", "typo")
    assert result.returncode == 1
    with sqlite3.connect(node.folder / "var" / "telenode.sqlite") as db:
        [(detail,)] = db.execute("select detail from audit where event = 'reidentify'").fetchall()
    assert original not in detail
    assert json.loads(detail)["found"] is False and len(json.loads(detail)["value_sha256"]) == 16


def test_status_lists_every_destination(tmp_path):
    node = Node(tmp_path / "node", [("TELERAD", free_port()), ("CLOUD", free_port())])
    Store(node.folder / "var" / "telenode.sqlite").close()  # a node has used the data_dir, sent nothing yet
    result = node.cli("status", "--json", check=True)
    queues = json.loads(result.stdout)["destinations"]
    assert set(queues) == {"remote0", "remote1"}
    assert all(q["pending"] == 0 and q["failed"] == 0 for q in queues.values())
    table = node.cli("status", check=True).stdout
    assert "remote0" in table and "pending" in table
