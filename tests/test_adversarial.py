"""An adversarial corpus for issue 10: one patient's identity planted where profiles miss it, spelled
the way departments write it, one instance per category, in explicit or implicit VR little endian.

`SECRETS` are the planted spellings; `survivors(path)` lists those still readable in a file (its
text values in canonical form, file meta and private groups included, UN and binary values read as
text, and its raw bytes for the ASCII ones).
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from node.deid.variants import canonical

ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root: a site's instance UIDs, remapped by the node
NAME = "MÜLLER^JÜRGEN=山田^太郎=やまだ^たろう"
IDENTITY = {
    "PatientID": "JP7733019", "PatientBirthDate": "19620304", "AccessionNumber": "A0080417",
    "PatientAddress": "Hauptstraße 12, 80331 München", "PatientTelephoneNumbers": "+49 89 1234567",
    "InstitutionName": "Klinikum Nordstadt", "ReferringPhysicianName": "WEBER^ANNA",
    "OperatorsName": "SCHNEIDER^KLAUS", "OtherPatientIDs": "KH-99120475", "StudyDate": "20250611",
}
#: Spellings that must not survive (compared in canonical form: case, accents, separators).
SECRETS = [
    "muller", "mueller", "jurgen", "juergen", "yamada", "tarou", "山田", "太郎", "やまだ", "たろう",
    "jmuller", "19620304", "1962 03 04", "04 03 1962", "03 04 1962", "4 marz 1962", "march 4 1962",
    "1962年3月4日", "7733019", "0080417", "hauptstr", "munchen", "muenchen", "1234567", "nordstadt",
    "weber", "schneider", "emp55123", "99120475",
]


def base(implicit: bool, charset: str = "ISO_IR 192") -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid(ROOT)
    ds.StudyInstanceUID = generate_uid(ROOT)
    ds.SeriesInstanceUID = generate_uid(ROOT)
    ds.FrameOfReferenceUID = generate_uid(ROOT)
    ds.PatientName = NAME if charset == "ISO_IR 192" else "MÜLLER^JÜRGEN"
    for keyword, value in IDENTITY.items():
        setattr(ds, keyword, value)
    ds.Modality = "CT"
    ds.BurnedInAnnotation = "NO"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(64, dtype="<u2").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ds


def spellings(ds: Dataset, implicit: bool) -> None:
    """Untabled text with the identity spelled otherwise (E.1: the profile keeps untabled attributes)."""
    ds.LUTExplanation = "Juergen Mueller / J. MULLER / jmuller"
    ds.DetectorDescription = "DOB 04.03.1962, 4. März 1962, March 4, 1962, 1962年3月4日, MRN 7733019"
    ds.WindowCenterWidthExplanation = ["YAMADA_TAROU", "ﾔﾏﾀﾞ ﾀﾛｳ 山田太郎様"]
    ds.TextValue = "tel. 089 1234567, Hauptstrasse 12, 80331 Muenchen, acc 80417, ID:KH-99120475"


def un_and_wrong_vr(ds: Dataset, implicit: bool) -> None:
    """Tabled attributes whose VR says nothing: UN (explicit), a wrong VR, and a 2026d tag pydicom lacks."""
    if not implicit:
        del ds.PatientAddress
        ds.add_new(0x00101040, "UN", "Hauptstraße 12, 80331 München".encode())
        ds.add_new(0x00081030, "OB", b"CT for MUELLER JUERGEN ")  # Study Description as OB
    ds.add_new(0x00100012, "UN", "Jürgen Müller 19620304 ".encode())  # Name to Use (2026d)


def identifier_sequences(ds: Dataset, implicit: bool) -> None:
    """(0008,1072) Operator Identification Sequence (X/D) whose items are codes identifying a person."""
    code = Dataset()
    code.CodeValue = "EMP55123"
    code.CodingSchemeDesignator = "99HOSP"
    code.CodeMeaning = "Schneider badge"
    item = Dataset()
    item.PersonIdentificationCodeSequence = Sequence([code])
    item.InstitutionName = "Klinikum Nordstadt"
    ds.OperatorIdentificationSequence = Sequence([item])


def private_groups(ds: Dataset, implicit: bool) -> None:
    """A vendor's private block with names, and a private sequence with a person in it."""
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x10, "LO", "MUELLER JUERGEN")
    inner = Dataset()
    inner.PatientName = "MÜLLER^JÜRGEN"
    inner.LUTExplanation = "for jmuller"
    block.add_new(0x11, "SQ", Sequence([inner]))
    gems = ds.private_block(0x0043, "GEMS_PARM_01", create=True)  # (0043,xx27): Table E.3.10-1 safe
    gems.add_new(0x27, "SH", "jmuller 4.3.1962")


def uids(ds: Dataset, implicit: bool) -> None:
    """Original UIDs where no U row looks: CS, text, a device UID under 1.2.840.10008, the file meta."""
    ds.ReferencedFileID = ["DIR", str(ds.SOPInstanceUID)]
    ds.ImageComments = f"prior {ds.StudyInstanceUID}"
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = "1.2.840.10008.999.4711.19620304"  # not a defined DICOM UID
    ds.ReferencedImageSequence = Sequence([ref])
    ds.file_meta.add_new(0x00020033, "UI", str(ds.SOPInstanceUID))  # RTV Communication SOP Instance UID
    ds.file_meta.add_new(0x00020016, "AE", "MUELLER_WS")


def overlays_and_curves(ds: Dataset, implicit: bool) -> None:
    """Overlay and curve labels and descriptions, with and without overlay data (60xx,0022/1500; 50xx)."""
    for group, data in ((0x6000, False), (0x6002, True)):
        ds.add_new((group << 16) | 0x0010, "US", 8)
        ds.add_new((group << 16) | 0x0011, "US", 8)
        ds.add_new((group << 16) | 0x0040, "CS", "R")
        ds.add_new((group << 16) | 0x0050, "SS", [1, 1])
        ds.add_new((group << 16) | 0x0100, "US", 1)
        ds.add_new((group << 16) | 0x0102, "US", 0)
        ds.add_new((group << 16) | 0x0022, "LO", "ROI of MUELLER 04.03.1962")
        ds.add_new((group << 16) | 0x1500, "LO", "jmuller")
        if data:
            ds.add_new((group << 16) | 0x3000, "OW", b"\x00" * 8)
    ds.add_new(0x50000005, "US", 1)
    ds.add_new(0x50002500, "LO", "Schneider curve")
    ds.add_new(0x50000022, "LO", "for Juergen Mueller")


def code_strings(ds: Dataset, implicit: bool) -> None:
    """Names in code strings: Content Label and a body part."""
    ds.ContentLabel = "MUELLER_JUERGEN"
    ds.BodyPartExamined = "JMULLER"


def nested(ds: Dataset, implicit: bool) -> None:
    """Deep in untabled sequences: a protocol code meaning and text two levels down."""
    inner = Dataset()
    inner.CodeValue = "P1"
    inner.CodingSchemeDesignator = "99LOCAL"
    inner.CodeMeaning = "protocol for Juergen Mueller, DOB 04-Mar-1962"
    outer = Dataset()
    outer.PerformedProtocolCodeSequence = Sequence([inner])
    outer.LUTExplanation = "山田太郎"
    ds.add_new(0x00400260, "SQ", Sequence([outer]))


CATEGORIES = {f.__name__: f for f in (spellings, un_and_wrong_vr, identifier_sequences, private_groups, uids,
                                      overlays_and_curves, code_strings, nested)}


def write_corpus(folder: Path, implicit: bool) -> list[Path]:
    """One file per category, plus the spellings in Latin-1 (ISO_IR 100)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, plant in CATEGORIES.items():
        ds = base(implicit)
        plant(ds, implicit)
        paths.append(_save(ds, folder / f"{name}.dcm", implicit))
    latin = base(implicit, "ISO_IR 100")
    spellings(latin, implicit)
    latin.DetectorDescription = "DOB 04.03.1962, 4. März 1962, March 4, 1962, MRN 7733019"
    latin.WindowCenterWidthExplanation = "MULLER_JURGEN"
    paths.append(_save(latin, folder / "latin1.dcm", implicit))
    return paths


def _save(ds: Dataset, path: Path, implicit: bool) -> Path:
    ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    return path


def survivors(path: Path) -> list[str]:
    """The planted spellings readable in the file at `path`."""
    ds = dcmread(path)
    text = " ".join(_texts(ds.file_meta)) + " " + " ".join(_texts(ds))
    folded = canonical(unicodedata.normalize("NFC", text))[0]
    folded = " ".join(folded.replace("_", " ").split())
    raw = path.read_bytes().lower()
    found = [s for s in SECRETS if " ".join(canonical(s)[0].split()) in folded]
    found += [s for s in SECRETS if s.isascii() and " " not in s and s.encode() in raw and s not in found]
    return found


def _texts(ds: Dataset) -> list[str]:
    out = []
    for elem in ds:
        if elem.tag == 0x7FE00010:
            continue
        if elem.VR == "SQ":
            for item in elem.value or []:
                out.extend(_texts(item))
            continue
        value = elem.value
        if isinstance(value, bytes):
            out += [value.decode("utf-8", "replace"), value.decode("latin-1")]
        elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            out += [str(v) for v in value]
        elif value is not None:
            out.append(str(value))
    return out


# -- the tests ---------------------------------------------------------------------------------------

import warnings  # noqa: E402

import pydicom  # noqa: E402
import pytest  # noqa: E402

from conftest import storescu, wait_for  # noqa: E402
from node.deid import Deidentifier, Pseudonymizer  # noqa: E402
from node.deid.guard import Guard  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # the corpus breaks VR rules on purpose

SEEDS = ["retain_safe_private", "retain_device_identity", "clean_descriptors", "clean_graphics"]
PROFILES = {"basic": [], "seeds": SEEDS}
SYNTAXES = {"explicit": False, "implicit": True}


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize("profile", PROFILES)
def test_engine_removes_every_planted_spelling_and_the_guard_agrees(tmp_path, syntax, profile):
    """Each category, through the engine: nothing planted survives, and the guard (behind it) has nothing to hold."""
    engine = Deidentifier(Pseudonymizer(b"a" * 32, "ORG"), PROFILES[profile])
    for path in write_corpus(tmp_path / "in", SYNTAXES[syntax]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            record = engine.apply(ds)
        assert Guard().check(ds, record) is None, path.name
        out = tmp_path / "out" / path.name
        out.parent.mkdir(exist_ok=True)
        ds.save_as(out, enforce_file_format=True)
        assert survivors(out) == [], path.name
        assert survivors(path), f"{path.name}: the corpus planted nothing"  # the check can fail


def test_each_category_is_caught_by_the_guard_if_the_engine_missed_it(tmp_path):
    """Written back after the engine, every category's planted text is a leak the guard names."""
    engine = Deidentifier(Pseudonymizer(b"a" * 32, "ORG"))
    for name in ("spellings", "nested", "code_strings"):
        path = write_corpus(tmp_path / name, False)[list(CATEGORIES).index(name)]
        original = pydicom.dcmread(path)
        ds = pydicom.dcmread(path)
        record = engine.apply(ds)
        for keyword in ("LUTExplanation", "DetectorDescription", "ContentLabel"):
            if keyword in original:
                setattr(ds, keyword, original[keyword].value)
        if name == "nested":
            ds[0x00400260].value[0].LUTExplanation = "山田太郎"
        assert Guard().check(ds, record) is not None, name


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize("profile", PROFILES)
def test_telenode_anonymize_lets_nothing_planted_through(tmp_path, make_node, syntax, profile):
    """`telenode anonymize` over the corpus: every file is written, none holds a planted spelling."""
    inputs = write_corpus(tmp_path / "in", SYNTAXES[syntax])
    node = make_node([("UNUSED", 9)], options=PROFILES[profile])
    result = node.cli("anonymize", str(tmp_path / "in"), "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    outputs = sorted((tmp_path / "out").rglob("*.dcm"))
    assert len(outputs) == len(inputs)
    for path in outputs:
        assert survivors(path) == [], path.name


@pytest.mark.dcmtk
@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize("profile", PROFILES)
def test_network_path_lets_nothing_planted_through(tmp_path, make_node, make_storescp, syntax, profile):
    """storescu → telenode → storescp (DCMTK), explicit and implicit VR: all arrive, none holds a planted spelling."""
    inputs = write_corpus(tmp_path / "in", SYNTAXES[syntax])
    remote = make_storescp().start()
    node = make_node([(remote.ae_title, remote.port)], options=PROFILES[profile]).start()
    propose = ("-xi",) if SYNTAXES[syntax] else ("-xe",)
    sent = storescu(node.port, inputs, extra=propose)
    assert sent.returncode == 0, sent.stderr
    assert wait_for(lambda: len(remote.files()) == len(inputs), 60), f"{len(remote.files())} of {len(inputs)} arrived"
    for path in remote.files():
        assert survivors(path) == [], path.name
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID.is_implicit_VR == SYNTAXES[syntax]
    assert node.stop() == 0


def test_retained_private_sequence_items_get_the_table():
    """A private sequence kept by Retain Safe Private has its items walked with Table E.1-1's rules."""
    engine = Deidentifier(Pseudonymizer(b"a" * 32, "ORG"), ["retain_safe_private"])
    engine.safe_private = engine.safe_private | {("ACME SAFE", 0x0009, 0x11)}  # as if Table E.3.10-1 listed it
    ds = base(False)
    private_groups(ds, False)
    ds[0x00090010].value = "ACME SAFE"
    original_name = str(ds[0x00091011].value[0].PatientName)
    record = engine.apply(ds)
    assert 0x00091011 in ds and 0x00091010 not in ds  # the listed sequence kept, the unlisted text not
    item = ds[0x00091011].value[0]
    assert str(item.PatientName) != original_name and "MÜLLER" not in str(item.PatientName)
    assert "jmuller" not in str(item.get("LUTExplanation", ""))
    assert Guard().check(ds, record) is None
