"""Synthetic studies with realistic identifying attributes, for tests that drive real peers.

Built from pydicom's CT_small.dcm (which carries GE private groups), with the
identity of a made-up patient planted in the places modalities put it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

#: Identifying values planted in every instance; none may reach the remote PACS.
PHI = {
    "PatientName": "SMITHERSON^JOHANNA^QUINN",
    "PatientID": "MRN-4417-2291",
    "IssuerOfPatientID": "SAINT-ELSEWHERE",
    "PatientBirthDate": "19561103",
    "AccessionNumber": "ACC99887766",
    "InstitutionName": "Saint Elsewhere General Hospital",
    "InstitutionAddress": "12 Harbour Road, Springfield",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "OperatorsName": "TECHNOLOGIST^ANNA",
    "StudyID": "SID4417",
    "StationName": "CTSCANNER7",
    "DeviceSerialNumber": "SN-8812-XQ",
    "StudyDescription": "CT CHEST FOR SMITHERSON",
    "OtherPatientIDs": "OLDMRN-0077",
    "PatientAddress": "99 Lighthouse Lane",
    "PatientTelephoneNumbers": "555-0199-321",
}


@dataclass
class Study:
    """Files of one synthetic study and the original values to look for."""

    files: list[Path]
    study_uid: str
    series_uids: list[str]
    sop_uids: list[str]
    frame_of_reference_uid: str
    phi: dict[str, str] = field(default_factory=lambda: dict(PHI))

    @property
    def identifying_strings(self) -> list[str]:
        """Every original value that must not appear in any output byte."""
        values = [v for v in self.phi.values()]
        values += ["SMITHERSON", "JOHANNA", "4417-2291", self.study_uid, self.frame_of_reference_uid]
        return values + self.series_uids + self.sop_uids


def make_study(folder: Path, instances: int = 6, series: int = 2, phi: dict[str, str] | None = None) -> Study:
    """Write `instances` CT images in `series` series of one study; each references its predecessor."""
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    values = dict(PHI, **(phi or {}))
    study_uid, frame_uid = generate_uid(), generate_uid()
    series_uids = [generate_uid() for _ in range(series)]
    sop_uids: list[str] = []
    files: list[Path] = []
    for index in range(instances):
        ds = copy.deepcopy(template)
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20240517"
        ds.StudyTime = "101500"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uids[index % series]
        ds.SeriesNumber = index % series + 1
        ds.InstanceNumber = index + 1
        ds.FrameOfReferenceUID = frame_uid
        sop_uid = generate_uid()
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.SourceApplicationEntityTitle = "CT_MODALITY"
        if sop_uids:
            ref = Dataset()
            ref.ReferencedSOPClassUID = ds.SOPClassUID
            ref.ReferencedSOPInstanceUID = sop_uids[-1]
            ds.ReferencedImageSequence = Sequence([ref])
        # A nested identity: the request attributes carry the accession and the physician again.
        request = Dataset()
        request.AccessionNumber = values["AccessionNumber"]
        request.RequestedProcedureID = "RP-" + values["PatientID"]
        request.ScheduledProcedureStepID = "SPS4417"
        ds.RequestAttributesSequence = Sequence([request])
        ds.PixelData = bytes((index * 7 + i) % 251 for i in range(len(ds.PixelData)))
        path = folder / f"IM{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sop_uids.append(sop_uid)
        files.append(path)
    return Study(files, study_uid, series_uids, sop_uids, frame_uid)
