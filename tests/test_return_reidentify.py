"""Re-identification rules of the return path on a real mapping store (no network): DICOM data sets and
HL7 messages built from what the de-identifier produced, with the originals checked value by value."""

from __future__ import annotations

import copy
from pathlib import Path

import pydicom
import pytest
from studies import PHI, make_study

from node import hl7
from node.deid import Deidentifier, Pseudonymizer
from node.returnpath import MIXED_PATIENTS, NOT_OURS, Refused, Reidentifier, shift_date
from node.store import Store

KEY = bytes(range(32))


def outbound(tmp_path: Path, options: tuple[str, ...] = (), **phi: str):
    """De-identify a one-image study, record its mapping; the anonymized data set and the store."""
    study = make_study(tmp_path / f"study{len(list(tmp_path.iterdir()))}", instances=1, series=1, phi=phi or None)
    pseudonyms = Pseudonymizer(KEY, "TESTORG")
    ds = pydicom.dcmread(study.files[0])
    record = Deidentifier(pseudonyms, options).apply(ds)
    return ds, record, study, pseudonyms


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "db" / "telenode.sqlite")
    yield s
    s.close()


def test_attributes_lacking_or_empty_come_from_the_mapping_and_reader_uids_stay(tmp_path, store):
    ds, record, study, pseudonyms = outbound(tmp_path)
    store.record_mapping(record, source="test")
    returning = copy.deepcopy(ds)
    del returning.PatientID, returning.AccessionNumber  # lacking
    returning.PatientName = ""  # empty
    returning.IssuerOfPatientID = "READER-ISSUER"  # the reader's own: would misfile the original ID
    reader_uid = "2.25.99999999999999999999999999"
    returning.SOPInstanceUID = reader_uid
    returning.ImageComments = f"see {ds.SOPInstanceUID}. Accession {ds.AccessionNumber}"
    Reidentifier(store, pseudonyms, False).apply(returning)
    assert returning.PatientID == PHI["PatientID"] and returning.IssuerOfPatientID == PHI["IssuerOfPatientID"]
    assert str(returning.PatientName) == PHI["PatientName"] and returning.PatientBirthDate == PHI["PatientBirthDate"]
    assert returning.AccessionNumber == PHI["AccessionNumber"]
    assert returning.StudyInstanceUID == study.study_uid and returning.SeriesInstanceUID == study.series_uids[0]
    assert returning.FrameOfReferenceUID == study.frame_of_reference_uid  # a UID only the uids table knows
    assert returning.SOPInstanceUID == reader_uid
    assert returning.ImageComments == f"see {study.sop_uids[0]}. Accession {PHI['AccessionNumber']}"
    assert "DeidentificationMethod" not in returning and returning.PatientIdentityRemoved == "NO"


def test_issuer_absent_in_the_original_is_removed_not_invented(tmp_path, store):
    ds, record, _, pseudonyms = outbound(tmp_path, IssuerOfPatientID="")
    store.record_mapping(record, source="test")
    ds.IssuerOfPatientID = "TELERAD"
    Reidentifier(store, pseudonyms, False).apply(ds)
    assert "IssuerOfPatientID" not in ds


def test_modified_dates_shift_back_every_date_and_datetime(tmp_path, store):
    ds, record, _, pseudonyms = outbound(tmp_path, ("retain_long_modified_dates",))
    store.record_mapping(record, source="test")
    shifted = str(ds.StudyDate)
    assert shifted != "20240517"
    ds.AcquisitionDateTime = f"{shifted}101500.5"
    ds.ContentDate = shifted
    Reidentifier(store, pseudonyms, True).apply(ds)
    assert ds.StudyDate == ds.ContentDate == "20240517"
    assert ds.AcquisitionDateTime == "20240517101500.5"


def test_none_of_ours_and_two_patients_are_refused_unchanged(tmp_path, store):
    first, record, _, pseudonyms = outbound(tmp_path)
    second, other, _, _ = outbound(tmp_path, PatientID="MRN-2", PatientName="SECOND^PATIENT", AccessionNumber="A2")
    store.record_mapping(record, source="test")
    store.record_mapping(other, source="test")
    reidentifier = Reidentifier(store, pseudonyms, False)
    stranger = copy.deepcopy(first)
    stranger.PatientID, stranger.AccessionNumber, stranger.PatientName = "X", "Y", "Z"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        setattr(stranger, keyword, "2.25.1" + "0" * 20)
    stranger.ReferencedImageSequence = []
    with pytest.raises(Refused) as refused:
        reidentifier.apply(stranger)
    assert refused.value.status == NOT_OURS
    mixed = copy.deepcopy(first)
    mixed.ImageComments = f"compare {second.StudyInstanceUID}"
    before = copy.deepcopy(mixed)
    with pytest.raises(Refused) as refused:
        reidentifier.apply(mixed)
    assert refused.value.status == MIXED_PATIENTS
    assert mixed == before  # refused before anything was changed
    assert PHI["PatientID"] not in str(refused.value)


def test_hl7_fields_escaped_and_a_missing_pid_added(tmp_path, store):
    ds, record, study, pseudonyms = outbound(tmp_path, IssuerOfPatientID="ST&ELSE", PatientName="O'NEIL^ANN^^DR")
    store.record_mapping(record, source="test")
    message = "\r".join([
        "MSH|^~\\&|R|R|T|H|20261201||ORU^R01|C1|P|2.5",
        f"OBR|1|{ds.AccessionNumber}||X",
        f"OBX|1|TX|R||Study {ds.StudyInstanceUID} of {ds.PatientID}||||||F",
    ])
    out, resolver = hl7.reidentify(message, Reidentifier(store, pseudonyms, False))
    segments = out.split("\r")
    assert segments[0].startswith("MSH|") and segments[1].startswith("PID|")
    pid = segments[1].split("|")
    assert pid[3] == f"{PHI['PatientID']}^^^ST\\T\\ELSE"  # & is the subcomponent separator: escaped
    assert pid[5] == "O'NEIL^ANN^^^DR"  # DICOM prefix (4th) becomes the XPN prefix (5th)
    assert pid[7] == PHI["PatientBirthDate"]
    assert segments[2].split("|")[2] == PHI["AccessionNumber"]
    assert f"Study {study.study_uid} of {PHI['PatientID']}" in segments[3]
    assert {f["level"] for f in resolver.used()} >= {"study", "patient"}


def test_hl7_birth_date_shifted_back_when_the_mapping_has_none(tmp_path, store):
    ds, record, _, pseudonyms = outbound(tmp_path, ("retain_long_modified_dates",), PatientBirthDate="")
    store.record_mapping(record, source="test")
    offset = -pseudonyms.date_offset_days("id\x00" + PHI["IssuerOfPatientID"] + "\x00" + PHI["PatientID"])
    message = f"MSH|^~\\&|R|R|T|H|1||ORU^R01|C2|P|2.5\rPID|1||{ds.PatientID}||x||20000101\r"
    out, _ = hl7.reidentify(message, Reidentifier(store, pseudonyms, True))
    assert out.split("\r")[1].split("|")[7] == shift_date("20000101", offset)
    assert shift_date("20000101", 0) == "20000101" and shift_date("junk", 5) == "junk"


def test_found_and_identity_reprs_carry_no_original(tmp_path, store):
    ds, record, _, pseudonyms = outbound(tmp_path)
    store.record_mapping(record, source="test")
    from node.returnpath import Resolver, identity

    resolver = Resolver(store, "TESTORG")
    found = resolver.value(str(ds.PatientID))
    assert found is not None and found.original == PHI["PatientID"]
    shown = repr(found) + repr(identity(resolver, pseudonyms, False)) + repr(resolver.used())
    assert PHI["PatientID"] not in shown and "SMITHERSON" not in shown and str(ds.PatientID) in shown


def test_ack_swaps_sender_and_receiver_and_quotes_the_control_id():
    received = "MSH|^~\\&|TELERAD|READER|TELENODE|HOSP|20261201||ORU^R01|C9|T|2.4\rPID|1\r"
    msh, msa = [s.split("|") for s in hl7.ack(received, "AE", "C9", "none of ours").split("\r")[:2]]
    assert msh[2:6] == ["TELENODE", "HOSP", "TELERAD", "READER"]
    assert msh[8] == "ACK^R01^ACK" and msh[10:12] == ["T", "2.4"]
    assert msa == ["MSA", "AE", "C9", "none of ours"]
    assert hl7.ack_code(hl7.frame(hl7.ack(received, "AA", "C9"), "utf-8")[1:-2]) == "AA"
