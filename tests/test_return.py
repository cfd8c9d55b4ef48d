"""The return path end to end: a study goes out through a real `telenode serve` to a DCMTK storescp (the
reader's PACS); results built from what arrived (an SR report, a key object selection, a presentation
state, with the reader's own UIDs) come back with DCMTK storescu to the return AE; the hospital's
storescp receives them with the originals, the reader's UIDs kept and every reference intact.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pydicom
import pytest
from conftest import PEER_ENV, Node, StoreSCP, dcmtk, free_port, storescu, wait_for
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from studies import PHI, Study, make_study

from node import config

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
GRAYSCALE_PS = "1.2.840.10008.5.1.4.1.1.11.1"
RETURN_AE = "TELENODE_RET"
RESULTS = 200  # sent back in one association, killed part way


class UniqueStoreSCP(StoreSCP):
    """storescp writing every received instance to its own file (+uf): a duplicate shows as a second file."""

    def start(self) -> UniqueStoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "-aet", self.ae_title, "-od", str(self.folder), "+uf", "+xa", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=PEER_ENV)
        assert wait_for(lambda: self.proc.poll() is not None or _echo(self), 15), "storescp did not start"
        return self


def _echo(peer: StoreSCP) -> bool:
    from conftest import echo

    return echo(peer.port, called=peer.ae_title).returncode == 0


def with_return(node: Node, hospital_port: int, extra: str = "") -> Node:
    """Add a [return] section (return AE, hospital destination) to a Node's config."""
    node.return_port = free_port()
    node.config.write_text(node.config.read_text() + "\n" + "\n".join([
        "[return]", f'ae_title = "{RETURN_AE}"', f"port = {node.return_port}", 'allowed_calling_aets = ["TELERAD"]',
        "", "[[return.destinations]]", 'name = "hospital"', 'ae_title = "HOSPACS"', 'host = "127.0.0.1"',
        f"port = {hospital_port}", "retry_delay = 0.3", "max_retry_delay = 1.0", "", extra]))
    return node


def send_back(node: Node, files: list[Path], calling: str = "TELERAD") -> subprocess.CompletedProcess:
    return storescu(node.return_port, files, calling=calling, called=RETURN_AE, extra=("-v",))


def _meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _result(arrived: list[Dataset], sop_class: str) -> Dataset:
    """A reader's result in the arrived (pseudonymous) study: the patient and study copied from what
    arrived (birth date empty, issuer absent, as the Basic Profile left them); its own series and SOP UIDs."""
    first = arrived[0]
    ds = Dataset()
    ds.file_meta = _meta(sop_class, generate_uid())
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName = first.PatientID, first.PatientName
    ds.PatientBirthDate = first.get("PatientBirthDate", "")
    ds.PatientSex = "F"
    ds.StudyInstanceUID = first.StudyInstanceUID
    ds.AccessionNumber = first.get("AccessionNumber", "")
    ds.StudyDate = first.get("StudyDate", "")
    ds.ContentDate = first.get("StudyDate", "") or "20261201"
    ds.StudyTime = ds.ContentTime = "101500"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber, ds.InstanceNumber = 900, 1
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.Manufacturer = "TELERAD READER"
    return ds


def _sop_refs(images: list[Dataset]) -> Sequence:
    items = []
    for image in images:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = image.SOPClassUID, image.SOPInstanceUID
        items.append(item)
    return Sequence(items)


def _evidence(images: list[Dataset]) -> Sequence:
    """CurrentRequestedProcedureEvidenceSequence: study → series → instances, nested."""
    series_items = []
    for series_uid in sorted({str(i.SeriesInstanceUID) for i in images}):
        series = Dataset()
        series.SeriesInstanceUID = series_uid
        series.ReferencedSOPSequence = _sop_refs([i for i in images if i.SeriesInstanceUID == series_uid])
        series_items.append(series)
    study = Dataset()
    study.StudyInstanceUID = images[0].StudyInstanceUID
    study.ReferencedSeriesSequence = Sequence(series_items)
    return Sequence([study])


def _code(value: str, meaning: str) -> Sequence:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, "DCM", meaning
    return Sequence([code])


def sr_report(arrived: list[Dataset]) -> Dataset:
    ds = _result(arrived, BASIC_TEXT_SR)
    ds.Modality = "SR"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ConceptNameCodeSequence = _code("121069", "Findings")
    ds.CurrentRequestedProcedureEvidenceSequence = _evidence(arrived)
    text = Dataset()
    text.RelationshipType, text.ValueType = "CONTAINS", "TEXT"
    text.ConceptNameCodeSequence = _code("121071", "Finding")
    text.TextValue = (f"No acute findings for patient {arrived[0].PatientID}, accession {arrived[0].AccessionNumber}. "
                      f"Compare image {arrived[0].SOPInstanceUID}.")
    ds.ContentSequence = Sequence([text])
    return ds


def key_objects(arrived: list[Dataset]) -> Dataset:
    ds = _result(arrived, KEY_OBJECT_SELECTION)
    ds.Modality = "KO"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = _code("113000", "Of Interest")
    ds.CurrentRequestedProcedureEvidenceSequence = _evidence(arrived[:2])
    items = []
    for image in arrived[:2]:
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", "IMAGE"
        item.ReferencedSOPSequence = _sop_refs([image])
        items.append(item)
    ds.ContentSequence = Sequence(items)
    del ds.AccessionNumber, ds.PatientBirthDate, ds.StudyDate  # lacking: the originals come from the mapping
    return ds


def presentation_state(arrived: list[Dataset]) -> Dataset:
    ds = _result(arrived, GRAYSCALE_PS)
    ds.Modality = "PR"
    ds.ContentLabel, ds.PresentationCreationDate = "READER", ds.ContentDate
    series = Dataset()
    series.SeriesInstanceUID = arrived[0].SeriesInstanceUID
    series.ReferencedImageSequence = _sop_refs([arrived[0]])
    ds.ReferencedSeriesSequence = Sequence([series])
    return ds


def write(ds: Dataset, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def read_all(files: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in files]


def strings(ds: Dataset) -> list[str]:
    """Every string value of a data set, nested sequences included."""
    found: list[str] = []

    def visit(item: Dataset) -> None:
        for elem in item:
            if elem.VR == "SQ":
                for child in elem.value:
                    visit(child)
            elif isinstance(elem.value, (str, pydicom.valuerep.PersonName)):
                found.append(str(elem.value))
            elif isinstance(elem.value, pydicom.multival.MultiValue):
                found.extend(str(v) for v in elem.value)

    visit(ds)
    return found


def uids_in(seq: Sequence, keyword: str) -> list[str]:
    """Values of `keyword` anywhere below `seq`."""
    values: list[str] = []
    for item in seq:
        for elem in item:
            if elem.keyword == keyword:
                values.append(str(elem.value))
            elif elem.VR == "SQ":
                values.extend(uids_in(elem.value, keyword))
    return values


@pytest.fixture
def roundtrip(tmp_path, make_node, make_storescp, request):
    """Node between the reader's PACS and the hospital; a 4-image study already went out and arrived."""

    def build(options: list[str] | None = None) -> tuple[Node, StoreSCP, StoreSCP, Study, list[Dataset]]:
        reader = make_storescp(name="reader").start()
        hospital = StoreSCP(tmp_path / "hospital", free_port(), "HOSPACS").start()
        request.addfinalizer(hospital.stop)
        node = with_return(make_node([("TELERAD", reader.port)], options=options), hospital.port).start()
        study = make_study(tmp_path / "study", instances=4, series=2)
        sent = storescu(node.port, study.files)
        assert sent.returncode == 0, sent.stderr
        assert wait_for(lambda: len(reader.files()) == 4, 60), "the study did not reach the reader"
        return node, reader, hospital, study, read_all(reader.files())

    return build


def test_results_come_back_to_the_hospital_with_the_originals(tmp_path, roundtrip):
    node, reader, hospital, study, arrived = roundtrip()
    results = {"sr": sr_report(arrived), "ko": key_objects(arrived), "pr": presentation_state(arrived)}
    files = [write(ds, tmp_path / "results", name) for name, ds in results.items()]
    back = send_back(node, files)
    assert back.returncode == 0, back.stderr
    assert wait_for(lambda: len(hospital.files()) == 3, 60), f"{len(hospital.files())} of 3 results arrived"

    delivered = {str(ds.SOPInstanceUID): ds for ds in read_all(hospital.files())}
    original_sops = set(study.sop_uids)
    pseudonyms = {str(a.SOPInstanceUID) for a in arrived} | {str(a.SeriesInstanceUID) for a in arrived}
    pseudonyms |= {str(arrived[0].StudyInstanceUID), str(arrived[0].PatientID), str(arrived[0].AccessionNumber)}
    for name, result in results.items():
        ds = delivered[str(result.SOPInstanceUID)]  # the reader's own SOP Instance UID kept
        assert ds.SeriesInstanceUID == result.SeriesInstanceUID  # the reader's own series kept
        assert ds.PatientID == PHI["PatientID"]
        assert ds.IssuerOfPatientID == PHI["IssuerOfPatientID"]  # removed on the way out: from the mapping
        assert str(ds.PatientName) == PHI["PatientName"]
        assert ds.PatientBirthDate == PHI["PatientBirthDate"]  # emptied on the way out: from the mapping
        assert ds.AccessionNumber == PHI["AccessionNumber"]
        assert ds.StudyInstanceUID == study.study_uid
        assert ds.StudyDate == "20240517"
        assert ds.PatientSex == "F" and ds.Manufacturer == "TELERAD READER"  # the reader's other values stay
        leftover = [s for s in strings(ds) if any(p in s for p in pseudonyms) or "TESTORG-" in s]
        assert leftover == [], f"{name}: pseudonyms left: {leftover}"
        if name in ("sr", "ko"):
            evidence = ds.CurrentRequestedProcedureEvidenceSequence
            assert uids_in(evidence, "StudyInstanceUID") == [study.study_uid]
            assert set(uids_in(evidence, "SeriesInstanceUID")) <= set(study.series_uids)
            assert set(uids_in(evidence, "ReferencedSOPInstanceUID")) <= original_sops
    sr = delivered[str(results["sr"].SOPInstanceUID)]
    text = sr.ContentSequence[0].TextValue
    assert PHI["PatientID"] in text and PHI["AccessionNumber"] in text
    assert any(uid in text for uid in study.sop_uids)
    assert len(set(uids_in(sr.CurrentRequestedProcedureEvidenceSequence, "ReferencedSOPInstanceUID"))) == 4
    ko = delivered[str(results["ko"].SOPInstanceUID)]
    assert set(uids_in(ko.ContentSequence, "ReferencedSOPInstanceUID")) <= original_sops
    pr = delivered[str(results["pr"].SOPInstanceUID)]
    assert pr.ReferencedSeriesSequence[0].SeriesInstanceUID in study.series_uids
    assert pr.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID in original_sops
    assert pr.PatientIdentityRemoved == "NO" if "PatientIdentityRemoved" in pr else True

    assert len(reader.files()) == 4  # nothing received on the return AE goes outbound

    audit = [json.loads(line) for line in node.cli("audit", "show", "--event", "return_reidentified",
                                                   check=True).stdout.splitlines()]
    assert {r["detail"]["sop_instance_uid"] for r in audit} == {str(r.SOPInstanceUID) for r in results.values()}
    assert all(r["detail"]["calling_aet"] == "TELERAD" and r["detail"]["mappings"] for r in audit)
    trail = node.cli("audit", "show", check=True).stdout + node.log.read_text()
    for value in (PHI["PatientID"], PHI["AccessionNumber"], "SMITHERSON", study.study_uid, *study.sop_uids):
        assert value not in trail  # logs and the audit trail carry pseudonyms only
    status = json.loads(node.cli("status", "--json", check=True).stdout)
    assert status["destinations"]["hospital"]["sent"] == 3
    assert node.cli("audit", "verify").returncode == 0
    assert node.stop() == 0


def test_unknown_and_mixed_pseudonyms_are_refused_and_never_forwarded(tmp_path, roundtrip):
    node, reader, hospital, study, arrived = roundtrip()
    other = make_study(tmp_path / "other", instances=1, series=1,
                       phi={"PatientID": "MRN-OTHER-1", "PatientName": "OTHER^PATIENT", "AccessionNumber": "ACC2"})
    assert storescu(node.port, other.files).returncode == 0
    assert wait_for(lambda: len(reader.files()) == 5, 60)
    other_arrived = [ds for ds in read_all(reader.files()) if ds.PatientID != arrived[0].PatientID]

    stranger = sr_report(arrived)
    stranger.PatientID, stranger.PatientName, stranger.AccessionNumber = "NOT-OURS-1", "NOBODY", "X1"
    stranger.StudyInstanceUID = generate_uid()
    stranger.CurrentRequestedProcedureEvidenceSequence = _evidence([_fake_image()])
    stranger.ContentSequence[0].TextValue = "nothing of ours"
    mixed = sr_report(arrived + other_arrived)  # evidence of two patients

    for ds in (stranger, mixed):  # 0xC230, 0xC231: DCMTK names the range, the audit record the code
        sent = send_back(node, [write(ds, tmp_path / "bad", ds.SOPInstanceUID)])
        assert "Received Store Response (Error: CannotUnderstand)" in sent.stderr, sent.stderr
    rejected = send_back(node, [write(sr_report(arrived), tmp_path / "ok", "sr")], calling="INTRUDER")
    assert rejected.returncode != 0  # calling AE not in return.allowed_calling_aets: association rejected
    wait_for(lambda: len(hospital.files()) > 0, 3)
    assert hospital.files() == []
    refusals = [json.loads(line)["detail"] for line in
                node.cli("audit", "show", "--event", "return_refused", check=True).stdout.splitlines()]
    assert {r["status"] for r in refusals} == {"0xC230", "0xC231"}
    status = json.loads(node.cli("status", "--json", check=True).stdout)
    assert status["destinations"]["hospital"]["pending"] == 0


def _fake_image() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "2.25." + "1" * 38
    ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    return ds


def test_modified_dates_are_shifted_back(tmp_path, roundtrip):
    node, _, hospital, study, arrived = roundtrip(["retain_long_modified_dates"])
    assert arrived[0].StudyDate != "20240517"  # shifted on the way out
    report = sr_report(arrived)
    report.ContentDate = arrived[0].StudyDate
    report.AcquisitionDateTime = f"{arrived[0].StudyDate}101500"
    report.PatientBirthDate = ""
    assert send_back(node, [write(report, tmp_path / "results", "sr")]).returncode == 0
    assert wait_for(lambda: len(hospital.files()) == 1, 60)
    ds = read_all(hospital.files())[0]
    assert ds.StudyDate == ds.ContentDate == "20240517"
    assert ds.AcquisitionDateTime == "20240517101500"
    assert ds.PatientBirthDate == PHI["PatientBirthDate"]
    assert ds.StudyInstanceUID == study.study_uid


def test_sigkill_during_the_return_delivers_every_acknowledged_result_exactly_once(tmp_path, make_node,
                                                                                      make_storescp):
    reader = make_storescp(name="reader").start()
    hospital_port = free_port()  # the hospital is down while the results come back
    node = with_return(make_node([("TELERAD", reader.port)]), hospital_port).start()
    study = make_study(tmp_path / "study", instances=2, series=1)
    assert storescu(node.port, study.files).returncode == 0
    assert wait_for(lambda: len(reader.files()) == 2, 60)
    arrived = read_all(reader.files())
    files = []
    for index in range(RESULTS):
        report = sr_report(arrived)
        report.InstanceNumber = index + 1
        files.append(write(report, tmp_path / "results", f"sr{index:02d}"))
    sending = subprocess.Popen(
        [dcmtk("storescu"), "-v", "-aet", "TELERAD", "-aec", RETURN_AE, "127.0.0.1", str(node.return_port),
         *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=PEER_ENV)
    spooled = node.folder / "var" / "return" / "spool"
    assert wait_for(lambda: len(list(spooled.glob("*/*.dcm"))) >= 10, 60, 0.01), "no result was acknowledged"
    node.kill()
    output = sending.communicate(timeout=60)[0]
    acknowledged = _acknowledged_files(output, files)
    assert 5 <= len(acknowledged) < RESULTS, output[-2000:]

    hospital = UniqueStoreSCP(tmp_path / "hospital", hospital_port, "HOSPACS").start()
    try:
        node.start()
        want = {str(pydicom.dcmread(f).SOPInstanceUID) for f in acknowledged}
        assert wait_for(lambda: want <= set(_arrived(hospital)), 60), "an acknowledged result is missing"
        wait_for(lambda: len(hospital.files()) > len(want) + 1, 3)  # give duplicates a chance to show up
        arrived_uids = _arrived(hospital)
        assert len(arrived_uids) == len(set(arrived_uids)), "a result was delivered twice"
        assert len(arrived_uids) <= len(want) + 1  # at most the one in flight when killed, never acknowledged
        assert all(ds.PatientID == PHI["PatientID"] for ds in read_all(hospital.files()))
        assert node.stop() == 0
    finally:
        hospital.stop()


def _acknowledged_files(output: str, files: list[Path]) -> list[Path]:
    """storescu -v: the files whose C-STORE got a Success response (in order)."""
    acknowledged, current = [], None
    for line in output.splitlines():
        sending = re.search(r"Sending file: (.+)$", line)
        if sending:
            current = Path(sending.group(1).strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acknowledged.append(current)
    assert set(acknowledged) <= set(files)
    return acknowledged


def _arrived(peer: StoreSCP) -> list[str]:
    uids = []
    for path in peer.files():
        try:
            uids.append(str(pydicom.dcmread(path).SOPInstanceUID))
        except Exception:  # a partial file: never acknowledged
            continue
    return uids


# -- configuration ------------------------------------------------------------------------------------


BASE = """
[node]
host = "127.0.0.1"
port = 11112
[[destinations]]
name = "telerad"
ae_title = "TELERAD"
host = "127.0.0.1"
port = 11113
"""


def _load(tmp_path: Path, text: str) -> config.Settings:
    path = tmp_path / "telenode.toml"
    path.write_text(BASE + text)
    return config.load(path)


def test_config_return_section_as_the_contract_shows_it(tmp_path):
    settings = _load(tmp_path, """
[return]
ae_title = "TELENODE_RET"
port = 11114
allowed_calling_aets = ["TELERAD"]
[[return.destinations]]
name = "hospital"
ae_title = "HOSPACS"
host = "127.0.0.1"
port = 11115
retry_delay = 1
max_failures = 7
[return.hl7]
port = 2575
forward_host = "127.0.0.1"
forward_port = 2576
""")
    ret = settings.return_path
    assert ret is not None and ret.ae_title == "TELENODE_RET" and ret.port == 11114
    assert ret.host == "127.0.0.1"  # defaults to [node] host
    assert ret.allowed_calling_aets == ("TELERAD",)
    assert [(d.name, d.port, d.retry_delay, d.max_failures) for d in ret.destinations] == [("hospital", 11115, 1.0, 7)]
    assert ret.hl7 is not None and (ret.hl7.port, ret.hl7.forward_port, ret.hl7.host) == (2575, 2576, "127.0.0.1")
    assert [d.name for d in settings.destinations] == ["telerad"]  # never mixed with the outbound ones
    assert _load(tmp_path, "").return_path is None


@pytest.mark.parametrize("text, key", [
    ('[return]\nae_title = "R"\nport = 11114\n[[return.destinations]]\nname = "telerad"\nae_title = "H"\n'
     'host = "h"\nport = 1\n', "return.destinations[0].name"),
    ('[return]\nae_title = "R"\nport = 11114\n', "return.destinations"),
    ('[return]\nae_title = "R"\nport = 11112\n[[return.destinations]]\nname = "h"\nae_title = "H"\n'
     'host = "h"\nport = 1\n', "return.port"),
    ('[return]\nae_title = "R"\nport = 11114\nbogus = 1\n', "return.bogus"),
    ('[return]\nport = 11114\n', "return.ae_title"),
    ('[return]\nae_title = "R"\nport = 11114\n[[return.destinations]]\nname = "h"\nae_title = "H"\nhost = "h"\n'
     'port = 1\n[return.hl7]\nport = 2575\n', "return.hl7.forward_host"),
])
def test_config_return_errors_name_the_key(tmp_path, text, key):
    with pytest.raises(config.ConfigError, match=re.escape(key)):
        _load(tmp_path, text)


def test_routes_cannot_send_outbound_data_to_a_return_destination(tmp_path):
    with pytest.raises(config.ConfigError, match="no destination named 'hospital'"):
        _load(tmp_path, '[[routes]]\ndestinations = ["hospital"]\n[return]\nae_title = "R"\nport = 11114\n'
                        '[[return.destinations]]\nname = "hospital"\nae_title = "H"\nhost = "h"\nport = 1\n')


def test_a_result_the_hospital_refuses_is_quarantined_then_released_to_it(tmp_path, make_node, make_storescp):
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    reader = make_storescp(name="reader").start()
    hospital_port = free_port()
    refusing = AE(ae_title="HOSPACS")
    refusing.supported_contexts = AllStoragePresentationContexts
    server = refusing.start_server(("127.0.0.1", hospital_port), block=False,
                                   evt_handlers=[(evt.EVT_C_STORE, lambda event: 0xC000)])
    node = with_return(make_node([("TELERAD", reader.port)]), hospital_port, "max_failures = 1\n").start()
    study = make_study(tmp_path / "study", instances=1, series=1)
    assert storescu(node.port, study.files).returncode == 0
    assert wait_for(lambda: len(reader.files()) == 1, 60)
    report = sr_report(read_all(reader.files()))
    assert send_back(node, [write(report, tmp_path / "results", "sr")]).returncode == 0

    def held() -> list[dict]:
        return json.loads(node.cli("quarantine", "list", "--json", check=True).stdout)

    try:
        assert wait_for(lambda: len(held()) == 1, 60), "the refused result was not quarantined"
    finally:
        server.shutdown()
    assert held()[0]["kind"] == "send_failed" and held()[0]["destination"] == "hospital"
    assert held()[0]["sop_instance_uid"] == report.SOPInstanceUID  # the reader's UID names it, no original
    hospital = StoreSCP(tmp_path / "hospital", hospital_port, "HOSPACS").start()
    try:
        assert node.cli("quarantine", "retry", "--all").returncode == 0
        assert wait_for(lambda: len(hospital.files()) == 1, 60)
        assert read_all(hospital.files())[0].PatientID == PHI["PatientID"]
    finally:
        hospital.stop()
    assert len(reader.files()) == 1


def test_a_taken_return_port_stops_the_start_with_one_line(tmp_path, make_node):
    import socket
    import sys

    from conftest import REPO

    node = with_return(make_node([("TELERAD", free_port())]), free_port())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", node.return_port))
        taken.listen()
        result = subprocess.run([sys.executable, "-m", "node", "serve", "--config", str(node.config)],
                                capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{node.return_port}" in result.stderr
    assert "Traceback" not in result.stderr
