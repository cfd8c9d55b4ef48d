"""Security of the mapping store and the privileged acts: encrypted originals, the hash-chained audit
trail, operators and reasons, key files 0600, mapping key rotation under load, schema-2 migration.

Real SQLite files, real `telenode` processes and DCMTK storescu/storescp where it is end to end.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, Node, free_port, storescu, wait_for
from node import cli
from node.audit import chain_hash
from node.keys import KeyFileError, Keyring, MappingKeyError
from node.spool import Quarantine, QuarantineEntry
from node.store import Store
from studies import make_study
from test_store import ORIGINAL_BIRTH, make_record, queue


def telenode(node: Node, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m node ARGS --config FILE` with an environment without TELENODE_OPERATOR/REASON."""
    clean = {k: v for k, v in os.environ.items() if k not in ("TELENODE_OPERATOR", "TELENODE_REASON")}
    return subprocess.run([sys.executable, "-m", "node", *args, "--config", str(node.config)],
                          capture_output=True, text=True, cwd=REPO, timeout=120, env={**clean, **(env or {})})


def database(node: Node) -> Path:
    return node.folder / "var" / "telenode.sqlite"


def add_security(node: Node, text: str) -> None:
    node.config.write_text(node.config.read_text() + "\n[security]\n" + text + "\n")


def raw_bytes(path: Path) -> bytes:
    """The database file and its WAL as bytes, as a thief copying the folder would get them."""
    return b"".join(p.read_bytes() for p in (path, path.with_name(path.name + "-wal")) if p.exists())


def sql_dump(path: Path) -> str:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return "\n".join(conn.iterdump())
    finally:
        conn.close()


def originals_of(study) -> list[str]:
    phi = study.phi
    return [phi["PatientName"], "SMITHERSON", "JOHANNA", phi["PatientID"], "4417-2291", phi["IssuerOfPatientID"],
            phi["PatientBirthDate"], phi["AccessionNumber"], "20240517", study.study_uid,
            study.frame_of_reference_uid, *study.series_uids, *study.sop_uids]


# -- encrypted originals ------------------------------------------------------------------------


def test_database_copy_reveals_no_original_but_reidentify_does(tmp_path, make_node, make_storescp):
    """A study through a running node: the SQLite file and its WAL, as bytes and as SQL, hold none of the
    names, IDs, accession, birth date, study date or UIDs sent; reidentify still returns every one."""
    study = make_study(tmp_path / "study", instances=4, series=2)
    remote = make_storescp().start()
    node = make_node([(remote.ae_title, remote.port)]).start()
    assert storescu(node.port, study.files).returncode == 0
    assert wait_for(lambda: len(remote.files()) == 4)
    db = database(node)
    running = raw_bytes(db)  # while the node runs: WAL not yet checkpointed
    assert node.stop() == 0
    stopped, dump = raw_bytes(db), sql_dump(db)
    for value in originals_of(study):
        for where, content in (("bytes (running)", running), ("bytes", stopped)):
            assert value.encode() not in content and value.lower().encode() not in content.lower(), \
                f"{value!r} in {where}"
        assert value not in dump, f"{value!r} in the SQL dump"

    import pydicom
    arrived = [pydicom.dcmread(p) for p in remote.files()]
    found = json.loads(telenode(node, "reidentify", arrived[0].PatientID, "--reason", "t").stdout)
    assert found["patient_id"] == study.phi["PatientID"] and found["patient_name"] == study.phi["PatientName"]
    assert found["patient_birth_date"] == study.phi["PatientBirthDate"]
    assert found["issuer_of_patient_id"] == study.phi["IssuerOfPatientID"]
    seen = set()
    for ds in arrived:
        one = json.loads(telenode(node, "reidentify", ds.SOPInstanceUID, "--reason", "t").stdout)
        seen.add(one["sop_instance_uid"])
        assert one["accession_number"] == study.phi["AccessionNumber"] and one["study_date"] == "20240517"
        assert one["study_instance_uid"] == study.study_uid and one["series_instance_uid"] in study.series_uids
    assert seen == set(study.sop_uids)
    frame = json.loads(telenode(node, "reidentify", arrived[0].FrameOfReferenceUID, "--reason", "t").stdout)
    assert frame["original_uid"] == study.frame_of_reference_uid


def test_ciphertexts_are_bound_to_their_row_and_column(tmp_path):
    """A sealed value copied into another row (or column) fails authentication instead of lying."""
    store = Store(tmp_path / "telenode.sqlite")
    one, two = make_record(1, patient="1"), make_record(1, patient="2")
    queue(store, one)
    queue(store, two)
    blob = store.db.execute("SELECT patient_name FROM patients WHERE pseudo_patient_id = ?",
                            [one.pseudo_patient_id]).fetchone()[0]
    store.db.execute("UPDATE patients SET patient_name = ? WHERE pseudo_patient_id = ?", [blob, two.pseudo_patient_id])
    with pytest.raises(MappingKeyError) as caught:
        store.lookup(two.pseudo_patient_id)
    assert one.patient_name not in str(caught.value) and two.patient_name not in str(caught.value)
    store.db.execute("UPDATE patients SET patient_id = ? WHERE pseudo_patient_id = ?", [blob, one.pseudo_patient_id])
    with pytest.raises(MappingKeyError):
        store.lookup(one.pseudo_patient_id)
    store.close()


def test_mapping_key_is_separate_0600_and_never_shown(tmp_path):
    """Store(path) creates mapping.key beside the database, 0600, distinct from any pseudonym key;
    reprs of the keyring and the store show key ids at most."""
    store = Store(tmp_path / "db" / "telenode.sqlite")
    key_file = tmp_path / "db" / "mapping.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key_hex = [line for line in key_file.read_text().splitlines() if not line.startswith("#")][0]
    for text in (repr(store), repr(store.ring)):
        assert key_hex not in text and key_hex[:16] not in text
    queue(store, make_record())
    store.close()
    assert key_hex.encode() not in raw_bytes(tmp_path / "db" / "telenode.sqlite")


def test_losing_the_mapping_key_loses_reidentification_not_pseudonyms(tmp_path):
    """Pseudonyms come from the pseudonym key: with a new mapping key the same instance gets the same
    pseudonyms, but the old originals cannot be decrypted (a clear error, no plaintext)."""
    study = make_study(tmp_path / "in", instances=1, series=1)
    node = Node(tmp_path / "node", [("TELERAD", free_port())])
    assert telenode(node, "anonymize", str(study.files[0]), "--output", str(tmp_path / "a")).returncode == 0
    (node.folder / "var" / "mapping.key").unlink()
    assert telenode(node, "anonymize", str(study.files[0]), "--output", str(tmp_path / "b")).returncode == 0
    import pydicom
    a, b = (pydicom.dcmread(tmp_path / out / study.files[0].name) for out in ("a", "b"))
    assert (a.PatientID, a.SOPInstanceUID, a.StudyInstanceUID) == (b.PatientID, b.SOPInstanceUID, b.StudyInstanceUID)
    pseudo = a.PatientID
    result = telenode(node, "reidentify", pseudo, "--reason", "t")
    assert result.returncode == 1 and "not in the keyring" in result.stderr
    assert study.phi["PatientID"] not in result.stdout + result.stderr


# -- schema-2 migration -------------------------------------------------------------------------

SCHEMA_2 = [
    "CREATE TABLE patients (pseudo_patient_id TEXT PRIMARY KEY, patient_id TEXT, issuer_of_patient_id TEXT, "
    "patient_name TEXT, pseudo_patient_name TEXT, patient_birth_date TEXT, first_seen TEXT, last_seen TEXT)",
    "CREATE TABLE studies (pseudo_study_instance_uid TEXT PRIMARY KEY, study_instance_uid TEXT, "
    "accession_number TEXT, pseudo_accession_number TEXT, study_date TEXT, pseudo_patient_id TEXT, "
    "calling_aet TEXT, received TEXT, priority INTEGER)",
    "CREATE TABLE series (pseudo_series_instance_uid TEXT PRIMARY KEY, series_instance_uid TEXT, modality TEXT, "
    "pseudo_study_instance_uid TEXT)",
    "CREATE TABLE instances (pseudo_sop_instance_uid TEXT PRIMARY KEY, sop_instance_uid TEXT, sop_class_uid TEXT, "
    "pseudo_series_instance_uid TEXT, calling_aet TEXT, received TEXT, source TEXT)",
    "CREATE TABLE uids (pseudo_uid TEXT PRIMARY KEY, original_uid TEXT)",
    "CREATE TABLE queue (id INTEGER PRIMARY KEY, destination TEXT, pseudo_sop_instance_uid TEXT, sop_class_uid TEXT, "
    "transfer_syntax TEXT, path TEXT, size INTEGER, priority INTEGER, status TEXT, attempts INTEGER, "
    "failures INTEGER, due FLOAT, created FLOAT, updated FLOAT, last_error TEXT)",
    "CREATE TABLE audit (id INTEGER PRIMARY KEY, time TEXT, event TEXT, detail TEXT)",
    "CREATE TABLE destinations (name TEXT PRIMARY KEY, paused INTEGER, last_error TEXT, error_time FLOAT, "
    "updated FLOAT)",
]


def schema_2_database(path: Path) -> None:
    """A database as telenode 0.1 (schema 2) wrote it: originals in plain text."""
    r = make_record()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    for statement in SCHEMA_2:
        conn.execute(statement)
    conn.execute("INSERT INTO patients VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 [r.pseudo_patient_id, r.patient_id, r.issuer_of_patient_id, r.patient_name, r.pseudo_patient_name,
                  r.patient_birth_date, "2024-06-11T10:00:00Z", "2024-06-11T10:00:00Z"])
    conn.execute("INSERT INTO studies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 [r.pseudo_study_instance_uid, r.study_instance_uid, r.accession_number, r.pseudo_accession_number,
                  r.study_date, r.pseudo_patient_id, "MODALITY", "2024-06-11T10:00:00Z", 0])
    conn.execute("INSERT INTO series VALUES (?, ?, ?, ?)",
                 [r.pseudo_series_instance_uid, r.series_instance_uid, "CT", r.pseudo_study_instance_uid])
    conn.execute("INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?)",
                 [r.pseudo_sop_instance_uid, r.sop_instance_uid, r.sop_class_uid, r.pseudo_series_instance_uid,
                  "MODALITY", "2024-06-11T10:00:00Z", "scp"])
    conn.executemany("INSERT INTO uids VALUES (?, ?)", [(new, old) for old, new in r.uid_map.items()])
    for n in range(3):
        conn.execute("INSERT INTO audit (time, event, detail) VALUES (?, ?, ?)",
                     ["2024-06-11T10:00:00Z", "deidentified", json.dumps({"n": n})])
    conn.execute("PRAGMA user_version=2")
    conn.commit()
    conn.close()


def test_schema_2_database_migrates_and_its_originals_get_encrypted(tmp_path):
    """Opening a schema-2 file seals every plaintext original in place (and scrubs the old pages),
    chains the existing audit records, and lookups answer as before."""
    path = tmp_path / "telenode.sqlite"
    schema_2_database(path)
    r = make_record()
    values = [r.patient_id, r.patient_name, r.accession_number, r.study_instance_uid, r.series_instance_uid,
              r.sop_instance_uid, ORIGINAL_BIRTH, "1.2.826.0.1.3680043.99.1.7", "HOSP", "20240611"]
    assert all(v.encode() in raw_bytes(path) for v in values[:3])
    store = Store(path)
    try:
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == 3
        found = store.lookup(r.pseudo_sop_instance_uid)
        assert found["patient_id"] == r.patient_id and found["sop_instance_uid"] == r.sop_instance_uid
        assert found["accession_number"] == r.accession_number and found["patient_birth_date"] == ORIGINAL_BIRTH
        assert store.lookup("2.25.1400")["original_uid"] == "1.2.826.0.1.3680043.99.1.7"
        verdict = store.verify_audit()
        assert verdict.intact and verdict.count == 3
        assert sum(store.key_usage().values()) == 4 + 3 + 1 + 1 + 4
    finally:
        store.close()
    content, dump = raw_bytes(path), sql_dump(path)
    for value in values:
        assert value.encode() not in content, f"{value!r} still in the file after migration"
        assert value not in dump
    again = Store(path)  # a second open changes nothing
    assert again.lookup(r.pseudo_patient_id)["patient_name"] == r.patient_name
    again.close()


def test_a_scrub_another_process_prevented_is_retried_at_the_next_open(tmp_path):
    """Migration seals the originals, but while another connection reads the WAL the old plaintext
    pages cannot be scrubbed: a marker stays and the next open finishes the job."""
    path = tmp_path / "telenode.sqlite"
    schema_2_database(path)
    reader = sqlite3.connect(path)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM patients").fetchone()  # holds a read snapshot: no TRUNCATE now
    store = Store(path)
    store.close()
    marker = path.with_name(path.name + ".scrub-pending")
    assert marker.exists()
    reader.rollback()
    reader.close()
    Store(path).close()
    assert not marker.exists()
    r = make_record()
    for value in (r.patient_id, r.patient_name, r.accession_number):
        assert value.encode() not in raw_bytes(path)


# -- the audit trail ----------------------------------------------------------------------------


def audited_node(tmp_path: Path, records: int = 6) -> Node:
    node = Node(tmp_path / "node", [("TELERAD", free_port())])
    store = Store(database(node), node.folder / "var" / "mapping.key")
    queue(store, make_record())
    for n in range(records - 1):
        store.audit("reidentify", operator="dr.who", reason=f"case {n}", pseudonym=f"TESTORG-P{n}")
    store.close()
    return node


def tamper(node: Node, *statements: str) -> None:
    conn = sqlite3.connect(database(node))
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()


def test_audit_verify_intact(tmp_path):
    node = audited_node(tmp_path)
    result = telenode(node, "audit", "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == "audit trail intact: 6 records"


@pytest.mark.parametrize("statements, bad_id, what", [
    (["UPDATE audit SET detail = replace(detail, 'case 2', 'case 9') WHERE id = 4"], 4, "edited"),
    (["UPDATE audit SET time = '2020-01-01T00:00:00Z' WHERE id = 2"], 2, "edited"),
    (["DELETE FROM audit WHERE id = 3"], 4, "deleted"),
    (["DELETE FROM audit WHERE id = 3", "UPDATE audit SET id = id - 1 WHERE id > 3"], 3, "deleted or inserted"),
    (["UPDATE audit SET id = -1 WHERE id = 3", "UPDATE audit SET id = 3 WHERE id = 4",
      "UPDATE audit SET id = 4 WHERE id = -1"], 3, "reordered"),
], ids=["detail-edited", "time-edited", "row-deleted", "deleted-and-renumbered", "rows-swapped"])
def test_audit_verify_names_the_first_bad_record(tmp_path, statements, bad_id, what):
    """Editing, deleting or swapping audit rows with sqlite3 → exit 1 naming the first bad record and why."""
    node = audited_node(tmp_path)
    tamper(node, *statements)
    result = telenode(node, "audit", "verify")
    assert result.returncode == 1, result.stdout
    assert f"record {bad_id}:" in result.stdout and what in result.stdout, result.stdout


def test_audit_show_prints_json_lines(tmp_path):
    node = audited_node(tmp_path)
    lines = telenode(node, "audit", "show", "--event", "reidentify", "--limit", "2").stdout.splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["id"] for r in records] == [5, 6] and all(r["event"] == "reidentify" for r in records)
    assert records[-1]["detail"]["reason"] == "case 4" and len(records[-1]["hash"]) == 64


def _write_audit(path: str, worker: int, count: int) -> None:
    store = Store(path)
    for n in range(count):
        if n % 5 == 0:
            queue(store, make_record(n + 1, patient=str(worker)))
        else:
            store.audit("association", worker=worker, n=n)
    store.close()


def test_chain_stays_intact_with_several_processes_writing(tmp_path):
    """Four processes append to one trail at once: the head is read inside each write transaction."""
    path = tmp_path / "telenode.sqlite"
    Store(path).close()
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_write_audit, args=(str(path), w, 60)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    store = Store(path)
    verdict = store.verify_audit()
    store.close()
    assert verdict.intact, verdict.problem
    assert verdict.count == 240


def test_audit_copies_go_to_a_json_lines_file_and_syslog(tmp_path):
    """Committed records are appended to audit_file (0600, JSON lines, hashes as in the database) and sent
    to syslog over UDP (RFC 5424 header); a rolled-back record is never copied; no original in either."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    jsonl = tmp_path / "siem" / "audit.jsonl"
    store = Store(tmp_path / "telenode.sqlite", audit_file=jsonl,
                  audit_syslog=f"127.0.0.1:{receiver.getsockname()[1]}")
    record = make_record()
    queue(store, record)
    with pytest.raises(RuntimeError):
        with store.batch():
            store.audit("association", calling_aet="X")
            raise RuntimeError("rolled back")
    store.audit("reidentify", operator="dr.who", reason="board", pseudonym=record.pseudo_patient_id)
    hashes = [r["hash"] for r in store.audit_log()]
    store.close()
    assert stat.S_IMODE(jsonl.stat().st_mode) == 0o600
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(r["id"], r["event"], r["hash"]) for r in lines] == [(1, "deidentified", hashes[0]),
                                                                 (2, "reidentify", hashes[1])]
    assert lines[1]["detail"]["operator"] == "dr.who"
    datagrams = [receiver.recv(65536).decode() for _ in range(2)]
    receiver.close()
    assert all(d.startswith("<85>1 ") and " telenode " in d for d in datagrams)
    assert json.loads(datagrams[1].split(" - ", 1)[1])["hash"] == hashes[1]
    for value in (record.patient_id, record.patient_name, record.sop_instance_uid, record.accession_number):
        assert value not in jsonl.read_text() and all(value not in d for d in datagrams)


def test_audit_file_from_the_config(tmp_path):
    """[security] audit_file: the CLI's store copies its records there."""
    node = audited_node(tmp_path, records=1)
    add_security(node, 'audit_file = "var/audit.jsonl"')
    telenode(node, "reidentify", "TESTORG-P1", "--reason", "check")
    lines = (node.folder / "var" / "audit.jsonl").read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["reidentify"]


# -- operators and reasons ----------------------------------------------------------------------


def anonymized_node(tmp_path: Path) -> tuple[Node, str, object]:
    study = make_study(tmp_path / "in", instances=1, series=1)
    node = Node(tmp_path / "node", [("TELERAD", free_port())])
    assert telenode(node, "anonymize", str(study.files[0]), "--output", str(tmp_path / "out")).returncode == 0
    import pydicom
    return node, pydicom.dcmread(tmp_path / "out" / study.files[0].name).PatientID, study


def audit_rows(node: Node, event: str) -> list[dict]:
    conn = sqlite3.connect(database(node))
    rows = conn.execute("SELECT detail FROM audit WHERE event = ? ORDER BY id", [event]).fetchall()
    conn.close()
    return [json.loads(r[0]) for r in rows]


def test_without_operators_reidentify_works_as_before_and_warns_without_reason(tmp_path):
    """The public contract: no flags needed; the OS user is the operator; no reason → warning, recorded."""
    node, pseudo, study = anonymized_node(tmp_path)
    result = telenode(node, "reidentify", pseudo)
    assert result.returncode == 0 and json.loads(result.stdout)["patient_id"] == study.phi["PatientID"]
    assert "no reason given" in result.stderr
    record = audit_rows(node, "reidentify")[-1]
    assert record["reason"] is None and record["reason_given"] is False and record["operator_source"] == "os_user"
    via_env = telenode(node, "reidentify", pseudo, env={"TELENODE_OPERATOR": "nurse", "TELENODE_REASON": "ward"})
    assert via_env.returncode == 0 and "warning" not in via_env.stderr
    assert audit_rows(node, "reidentify")[-1] | {"os_user": ""} == {
        "operator": "nurse", "operator_source": "env", "os_user": "", "reason": "ward", "reason_given": True,
        "pseudonym": pseudo, "found": True}
    assert telenode(node, "reidentify", "2.25.1234").returncode == 1  # unknown: 1, as before


@pytest.mark.parametrize("args, env, why", [
    ((), {}, "an operator must be named"),
    (("--operator", "mallory", "--reason", "curious"), {}, "not in [security] operators"),
    (("--operator", "dr.who"), {}, "a reason is required"),
    ((), {"TELENODE_REASON": "tumour board"}, "an operator must be named"),
], ids=["nothing", "unlisted", "no-reason", "os-user-is-not-enough"])
def test_operators_configured_refuse_and_audit(tmp_path, args, env, why):
    """With [security] operators, a missing/unlisted operator or a missing reason → exit 3, audited, no PHI."""
    node, pseudo, study = anonymized_node(tmp_path)
    add_security(node, 'operators = ["dr.who", "dr.house"]')
    result = telenode(node, "reidentify", pseudo, *args, env=env)
    assert result.returncode == 3, result.stderr
    assert why in result.stderr and result.stdout == ""
    assert study.phi["PatientID"] not in result.stderr
    refused = audit_rows(node, "reidentify_refused")
    assert len(refused) == 1 and why in refused[0]["refused"] and refused[0]["pseudonym"] == pseudo
    assert audit_rows(node, "reidentify") == []


def test_operator_and_reason_given_the_audit_record_is_committed_before_the_answer(tmp_path, monkeypatch):
    """An allowed operator with a reason gets the originals; at the moment the first byte of the answer
    is written, the audit record is already committed (seen by another connection)."""
    node, pseudo, study = anonymized_node(tmp_path)
    add_security(node, 'operators = ["dr.who"]')
    seen: list[list[dict]] = []

    class Watching(io.StringIO):
        def write(self, text: str) -> int:
            if not seen:
                seen.append(audit_rows(node, "reidentify"))
            return super().write(text)

    out = Watching()
    monkeypatch.setattr(cli.log, "configure", lambda *_, **__: None)  # keep this process's logging as it is
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.delenv("TELENODE_OPERATOR", raising=False)
    status = cli.main(["reidentify", "--config", str(node.config), pseudo, "--operator", "dr.who",
                       "--reason", "tumour board 12"])
    assert status == 0
    assert json.loads(out.getvalue())["patient_id"] == study.phi["PatientID"]
    assert len(seen[0]) == 1 and seen[0][0]["operator"] == "dr.who" and seen[0][0]["reason"] == "tumour board 12"


def test_quarantine_entry_is_a_typed_record_of_the_json_as_written(tmp_path):
    """entries()/get() give a QuarantineEntry; as_dict() is the record as written; repr shows no detail."""
    source = tmp_path / "held.dcm"
    source.write_bytes(b"not even DICOM")
    quarantine = Quarantine(tmp_path / "quarantine")
    qid = quarantine.put(source, {"kind": "send_failed", "reason": "status 0xA900", "destination": "pacs",
                                  "sop_instance_uid": "2.25.77", "queue_id": 5, "extra": "SECRET-DETAIL"})
    [entry] = quarantine.entries()
    assert entry == quarantine.get(qid) and isinstance(entry, QuarantineEntry)
    assert (entry.id, entry.kind, entry.destination, entry.sop_instance_uid) == (qid, "send_failed", "pacs", "2.25.77")
    assert entry.as_dict() == json.loads((quarantine.root / f"{qid}.json").read_text())
    assert "2.25.77" in repr(entry) and "SECRET-DETAIL" not in repr(entry)
    assert quarantine.get("../x") is None and quarantine.get("nope") is None


def test_quarantined_originals_only_through_the_audited_cli(tmp_path):
    """`quarantine list` shows no PHI; `show` and `export` need operator + reason when operators are set,
    are audited (refusals too), and give the original's attributes / a 0600 copy."""
    node, _, study = anonymized_node(tmp_path)
    add_security(node, 'operators = ["dr.who"]')
    qid = Quarantine(node.folder / "var" / "quarantine").put(study.files[0], {"kind": "burned_in",
                                                                              "reason": "US image"})
    listing = telenode(node, "quarantine", "list")
    assert listing.returncode == 0 and qid in listing.stdout
    assert all(v not in listing.stdout for v in originals_of(study))
    assert telenode(node, "quarantine", "show", qid).returncode == 3
    shown = telenode(node, "quarantine", "show", qid, "--operator", "dr.who", "--reason", "check burned-in")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["attributes"]["PatientName"] == study.phi["PatientName"]
    target = tmp_path / "export" / "original.dcm"
    assert telenode(node, "quarantine", "export", qid, "--output", str(target)).returncode == 3
    assert not target.exists()
    exported = telenode(node, "quarantine", "export", qid, "--output", str(target), "--operator", "dr.who",
                        "--reason", "send to vendor")
    assert exported.returncode == 0, exported.stderr
    assert target.read_bytes() == study.files[0].read_bytes() and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [r["reason"] for r in audit_rows(node, "quarantine_show")] == ["check burned-in"]
    assert [r["output"] for r in audit_rows(node, "quarantine_export")] == [str(target)]
    assert len(audit_rows(node, "quarantine_show_refused")) == len(audit_rows(node, "quarantine_export_refused")) == 1


# -- key files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["pseudonym.key", "mapping.key"])
@pytest.mark.parametrize("command", ["serve", "anonymize", "reidentify", "keys"])
def test_group_readable_key_file_is_refused_at_start(tmp_path, key, command):
    """A key file chmod 0644 → exit 2 naming the file and `chmod 600`, key never echoed."""
    node, pseudo, study = anonymized_node(tmp_path)
    path = node.folder / "var" / key
    os.chmod(path, 0o644)
    args = {"serve": ("serve",), "anonymize": ("anonymize", str(study.files[0]), "--output", str(tmp_path / "o2")),
            "reidentify": ("reidentify", pseudo, "--reason", "t"), "keys": ("keys", "rotate")}[command]
    result = telenode(node, *args)
    assert result.returncode == 2, result.stderr
    assert str(path) in result.stderr and "chmod 600" in result.stderr
    secret = [line for line in path.read_text().splitlines() if not line.startswith("#")][0].strip()
    assert secret not in result.stderr + result.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # refused, not silently "fixed"


def test_keyring_refuses_exposed_file_in_process(tmp_path):
    path = tmp_path / "mapping.key"
    Keyring(path)
    os.chmod(path, 0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        Store(tmp_path / "telenode.sqlite", path)


# -- rotation -----------------------------------------------------------------------------------


def test_rotation_finishes_an_interrupted_one(tmp_path):
    """A rotation killed after adding its key (rows under two keys) leaves everything readable;
    the next rotation moves every row to one key and retires the others."""
    store = Store(tmp_path / "telenode.sqlite")
    queue(store, make_record(1, patient="1"))
    first = store.ring.active_id
    store.ring.add_key()  # the crash: new key in the ring, rows not yet moved
    queue(store, make_record(1, patient="2"))
    assert set(store.key_usage()) == {f"{first:08x}", f"{store.ring.active_id:08x}"}
    store.close()
    reopened = Store(tmp_path / "telenode.sqlite")
    assert reopened.lookup(make_record(1, patient="1").pseudo_patient_id)["patient_id"] == ORIGINAL_ID_1
    result = reopened.rotate_mapping_key(batch=2)
    assert list(reopened.key_usage()) == [result["active"]] and len(result["retired"]) == 2
    assert len(reopened.ring.ids) == 1
    assert reopened.lookup(make_record(1, patient="2").pseudo_sop_instance_uid)["patient_name"] == "Doe^Johnathan2"
    reopened.close()


ORIGINAL_ID_1 = make_record(1, patient="1").patient_id


def test_rotate_while_a_node_runs_and_receives(tmp_path, make_node, make_storescp):
    """`telenode keys rotate` three times while storescu keeps sending: every C-STORE answered Success,
    every instance re-identifiable afterwards, no value left under a retired key."""
    remote = make_storescp().start()
    node = make_node([(remote.ae_title, remote.port)]).start()
    studies = [make_study(tmp_path / f"s{n}", instances=3, series=1) for n in range(6)]
    results: list[subprocess.CompletedProcess] = []
    rotating, done = threading.Event(), threading.Event()

    def send() -> None:  # study after study (then again: resends re-seal too) until the rotations are over
        index = 0
        while not done.is_set() or index < len(studies):
            results.append(storescu(node.port, studies[index % len(studies)].files, extra=("-v",)))
            index += 1
            if index == 2:
                rotating.set()

    sender = threading.Thread(target=send)
    sender.start()
    assert rotating.wait(60)
    rotations = [telenode(node, "keys", "rotate") for _ in range(3)]
    sent_during = len(results)
    done.set()
    sender.join(120)
    assert all(r.returncode == 0 for r in rotations), [r.stderr for r in rotations]
    assert sent_during > 3 and len(results) >= len(studies), sent_during
    for result in results:  # every C-STORE answered Success while the keys rotated
        log = result.stdout + result.stderr
        assert result.returncode == 0 and log.count("Received Store Response (Success)") == 3, log
    assert wait_for(lambda: len(remote.files()) == 18, 60)
    status = json.loads(telenode(node, "keys", "status").stdout)
    assert status["keys"] == [status["active"]] == [json.loads(rotations[-1].stdout)["active"]]
    assert list(status["values"]) == [status["active"]]
    import pydicom
    originals = {uid for study in studies for uid in study.sop_uids}
    reader = Store(database(node), node.folder / "var" / "mapping.key")  # one more process-like connection
    found = {reader.lookup(pydicom.dcmread(path).SOPInstanceUID)["sop_instance_uid"] for path in remote.files()}
    reader.close()
    assert found == originals
    answer = telenode(node, "reidentify", pydicom.dcmread(remote.files()[0]).PatientID, "--reason", "t")
    assert json.loads(answer.stdout)["patient_id"] == studies[0].phi["PatientID"]
    assert node.proc.poll() is None
    assert telenode(node, "audit", "verify").returncode == 0


# -- cost ---------------------------------------------------------------------------------------


def test_encryption_and_chaining_cost_well_under_a_millisecond_per_instance(tmp_path):
    """Sealing one instance's originals (13 values) and chaining its audit record: CPU cost per instance."""
    store = Store(tmp_path / "telenode.sqlite")
    record = make_record()
    rounds = 500
    started = time.perf_counter()
    for n in range(rounds):
        for column in ("patient_id", "issuer_of_patient_id", "patient_name", "patient_birth_date"):
            store._seal("patients", column, record.pseudo_patient_id, getattr(record, column))
        for column in ("study_instance_uid", "accession_number", "study_date"):
            store._seal("studies", column, record.pseudo_study_instance_uid, getattr(record, column))
        for old, new in record.uid_map.items():
            store._seal("uids", "original_uid", new, old)
        store._seal("series", "series_instance_uid", "2.25.1", record.series_instance_uid)
        store._seal("instances", "sop_instance_uid", "2.25.2", record.sop_instance_uid)
        store.ring.refresh()
        chain_hash("0" * 64, n, "2024-06-11T10:00:00Z", "deidentified", json.dumps({"a": n}))
    per_instance = (time.perf_counter() - started) / rounds
    store.close()
    assert per_instance < 0.0005, f"{per_instance * 1000:.3f} ms per instance"
