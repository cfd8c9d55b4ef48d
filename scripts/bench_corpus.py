"""The benchmark's synthetic corpus: deterministic, identifying, with private tags and nested sequences.

* a CT series: `count` images of 512×512×16 bit (pydicom's CT_small.dcm, which carries GE private
  groups, grown to 512×512);
* an MR series: `count` images of 256×256×16 bit (pydicom's MR_small.dcm);
* one large multi-frame CT instance of `mib` MiB of native pixel data, written frame by frame
  (never held in memory).

Every instance carries the identity of one made-up patient where modalities put it (names, IDs,
birth date, addresses, institution, physicians, station, serial number), again inside nested
sequences (request attributes, other patient IDs, referenced images, procedure codes), and a
private block of its own with a nested private sequence. Same arguments → same bytes.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

IDENTITY = {
    "PatientName": "BENCHMARK^PATRICIA^QUINN",
    "PatientID": "MRN-000123456",
    "IssuerOfPatientID": "BENCH-GENERAL",
    "PatientBirthDate": "19610214",
    "PatientSex": "F",
    "PatientAge": "063Y",
    "PatientAddress": "17 Quarry Street, Lakeside",
    "PatientTelephoneNumbers": "555-0142-771",
    "AccessionNumber": "ACC0001234",
    "InstitutionName": "Benchmark General Hospital",
    "InstitutionAddress": "1 Hospital Road, Lakeside",
    "InstitutionalDepartmentName": "Radiology",
    "ReferringPhysicianName": "REFERRER^DOCTOR",
    "PerformingPhysicianName": "RADIOLOGIST^ROSA",
    "OperatorsName": "TECHNOLOGIST^TOM",
    "StationName": "CTSCAN04",
    "DeviceSerialNumber": "SN-77120-B",
    "StudyID": "S000987",
    "StudyDescription": "CT CHEST ABDOMEN",
}
PRIVATE_CREATOR = "BENCH VENDOR 1.0"


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=["telenode-bench", *map(str, parts)])


def _identify(ds: Dataset, modality: str, series: int) -> None:
    """Plant the identity, nested sequences and a private block in `ds` (series-level values)."""
    for keyword, value in IDENTITY.items():
        setattr(ds, keyword, value)
    ds.Modality = modality
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20240517"
    ds.StudyTime, ds.SeriesTime = "101500", f"1016{series:02d}"
    ds.StudyInstanceUID = _uid("study")
    ds.FrameOfReferenceUID = _uid("frame", series)
    ds.SeriesInstanceUID = _uid("series", series)
    ds.SeriesNumber = series
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID, other.TypeOfPatientID = "OLD-4471-22", "OLD-SYSTEM", "TEXT"
    ds.OtherPatientIDsSequence = Sequence([other])
    request = Dataset()
    request.AccessionNumber = IDENTITY["AccessionNumber"]
    request.RequestedProcedureID = "RP0001"
    request.ScheduledProcedureStepID = "SPS0001"
    request.StudyInstanceUID = ds.StudyInstanceUID
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "CTCHABD", "99BENCH", "CT chest and abdomen"
    request.ScheduledProtocolCodeSequence = Sequence([code])
    ds.RequestAttributesSequence = Sequence([request])
    ds.ProcedureCodeSequence = Sequence([copy.deepcopy(code)])
    block = ds.private_block(0x0029, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", "BENCHMARK^PATRICIA")
    block.add_new(0x02, "DA", "20240517")
    inner = Dataset()
    inner_block = inner.private_block(0x0029, PRIVATE_CREATOR, create=True)
    inner_block.add_new(0x10, "LO", IDENTITY["PatientID"])
    inner_block.add_new(0x11, "DS", "1.25")
    block.add_new(0x03, "SQ", Sequence([inner]))


def _series(folder: Path, sample: str, modality: str, series: int, count: int, size: int,
            prefix: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(get_testdata_file(sample))
    _identify(template, modality, series)
    template.Rows = template.Columns = size
    template.BitsAllocated, template.BitsStored, template.HighBit = 16, 16, 15
    template.PixelRepresentation, template.SamplesPerPixel = 1, 1
    template.PhotometricInterpretation = "MONOCHROME2"
    del template.PixelData
    frame = size * size * 2
    noise = random.Random(f"{modality}{series}").randbytes(frame + 4096)
    files, previous = [], None
    for index in range(count):
        ds = copy.deepcopy(template)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(modality, series, index)
        ds.file_meta.SourceApplicationEntityTitle = f"{modality}_MODALITY"
        ds.InstanceNumber = index + 1
        ds.SliceLocation = ds.ImagePositionPatient[2] = float(index)
        if previous:
            ref = Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ds.SOPClassUID, previous
            ds.ReferencedImageSequence = Sequence([ref])
        offset = (index * 2 * 37) % 4096
        ds.add_new(0x7FE00010, "OW", noise[offset:offset + frame])
        path = folder / f"{prefix}{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        previous = ds.SOPInstanceUID
    return files


def ct_series(folder: Path, count: int) -> list[Path]:
    return _series(folder, "CT_small.dcm", "CT", 1, count, 512, "CT")


def mr_series(folder: Path, count: int) -> list[Path]:
    return _series(folder, "MR_small.dcm", "MR", 2, count, 256, "MR")


def large_instance(folder: Path, mib: int) -> tuple[Path, int]:
    """One multi-frame 512×512×16 bit CT instance with `mib` MiB of pixel data, appended frame by
    frame after the header (memory stays flat). Returns (path, number of frames)."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    _identify(ds, "CT", 3)
    frame_bytes = 512 * 512 * 2
    frames = max(1, mib * 2**20 // frame_bytes)
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = frames
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid("large", mib)
    for tag in [t for t in ds.keys() if t >= 0x7FE00010]:  # Pixel Data is appended last, below
        del ds[tag]
    path = folder / "LARGE.dcm"
    ds.save_as(path, enforce_file_format=True)
    frame = random.Random("large").randbytes(frame_bytes)
    with open(path, "ab") as handle:  # (7FE0,0010) OW, explicit VR little endian, 4-byte length
        handle.write(b"\xe0\x7f\x10\x00OW\x00\x00" + (frame_bytes * frames).to_bytes(4, "little"))
        for _ in range(frames):
            handle.write(frame)
    return path, frames
