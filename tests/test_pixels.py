"""Burned-in text (node/deid/pixels.py) and what the pipeline does about it.

Table E.1-1 rules cannot see text drawn into the pixels. PS3.15 E.3.1 Clean Pixel Data Option
(CID 7050 code 113101) removes it by blanking known regions; without it, an instance that may carry
burned-in text is rejected, quarantined or passed according to the node's `burned_in` policy. These
tests run real pydicom test files (native, RLE, JPEG, JPEG 2000) through the real pipeline with a real
spool, quarantine and SQLite store, and compare decoded pixels before and after.
"""

from __future__ import annotations

import json
import stat
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
)

from node.config import PixelRule
from node.deid import Deidentifier, Pseudonymizer
from node.deid.pixels import blank, burned_in_reason
from node.pipeline import CANNOT_DEIDENTIFY, SUCCESS, Pipeline, Safeguards
from node.spool import Quarantine, Spool
from node.store import Store

KEY = b"p" * 32
CLEAN_PIXEL_DATA = "113101"  # PS3.15 E.3.1, CID 7050
RECT = (20, 20, 20, 10)  # x, y, width, height: a region with image content in every file used
US_RULE = PixelRule(rectangles=(RECT,), modality="US")


def read(name: str) -> FileDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(get_testdata_file(name))


def save(ds: FileDataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def decoded(path: Path) -> np.ndarray:
    """All frames of a file's pixel data as (frames, rows, columns[, samples])."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    return pixels if int(ds.get("NumberOfFrames", 1) or 1) > 1 else pixels[None, ...]


def as_ultrasound(ds: FileDataset, multiframe: bool = False) -> FileDataset:
    ds.Modality = "US"
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage if multiframe else UltrasoundImageStorage
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    return ds


class Node:
    """A pipeline with its own store, spool and quarantine under one folder."""

    def __init__(self, root: Path, safeguards: Safeguards) -> None:
        self.store = Store(root / "telenode.sqlite")
        self.spool = Spool(root / "spool")
        self.quarantine = Quarantine(root / "quarantine")
        self.pipeline = Pipeline(Deidentifier(Pseudonymizer(KEY, "ORG")), self.store, self.spool, ["remote"],
                                 safeguards=safeguards, quarantine=self.quarantine)

    def receive(self, path: Path):
        return self.pipeline.receive(path, calling_aet="MODALITY")

    def spooled(self) -> list[Path]:
        return sorted(self.spool.root.glob("*/*.dcm"))


@pytest.fixture
def node(tmp_path) -> Callable[..., Node]:
    nodes: list[Node] = []

    def make(**safeguards) -> Node:
        made = Node(tmp_path / f"node{len(nodes)}", Safeguards(**safeguards))
        nodes.append(made)
        return made

    yield make
    for made in nodes:
        made.store.close()


def assert_blanked(before: np.ndarray, after: np.ndarray, fill: int = 0, rect=RECT) -> None:
    """Inside the rectangle every frame holds `fill`; outside it every pixel equals the original."""
    x, y, width, height = rect
    assert after.shape == before.shape
    assert before[:, y:y + height, x:x + width].max() != fill or before[:, y:y + height, x:x + width].min() != fill, \
        "the rectangle was already blank: the test would prove nothing"
    assert (after[:, y:y + height, x:x + width] == fill).all()
    mask = np.ones(before.shape[:3], dtype=bool)
    mask[:, y:y + height, x:x + width] = False
    assert np.array_equal(after[mask], before[mask])


def assert_cleaned_output(path: Path, syntax: str = ExplicitVRLittleEndian) -> FileDataset:
    """Native (explicit VR little endian unless said), BurnedInAnnotation NO, 113101 declared, identity removed."""
    out = pydicom.dcmread(path)
    assert out.file_meta.TransferSyntaxUID == syntax
    assert out.BurnedInAnnotation == "NO"
    assert out.PatientIdentityRemoved == "YES"
    codes = [(item.CodeValue, item.CodingSchemeDesignator) for item in out.DeidentificationMethodCodeSequence]
    assert (CLEAN_PIXEL_DATA, "DCM") in codes
    assert codes[0] == ("113100", "DCM")
    return out


# -- burned_in_reason ----------------------------------------------------------------------------

def _ct() -> FileDataset:
    return read("CT_small.dcm")


def _with(ds: FileDataset, **values) -> FileDataset:
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize("build,expected", [
    (lambda: _with(_ct(), BurnedInAnnotation="YES"), "BurnedInAnnotation is YES"),
    (lambda: _ct(), None),
    (lambda: _with(as_ultrasound(_ct()), BurnedInAnnotation="NO"), None),
    (lambda: _with(read("SC_rgb_rle.dcm"), BurnedInAnnotation="NO"), None),
    (lambda: _with(read("examples_rgb_color.dcm"), BurnedInAnnotation="NO"), None),
    (lambda: _with(_ct(), SOPClassUID=SecondaryCaptureImageStorage),
     "SOP class usually carries burned-in text (secondary capture or ultrasound)"),
    (lambda: _with(_ct(), SOPClassUID=UltrasoundMultiFrameImageStorage),
     "SOP class usually carries burned-in text (secondary capture or ultrasound)"),
    (lambda: _with(_ct(), Modality="US"), "modality usually carries burned-in text"),
    (lambda: _with(_ct(), ImageType=["DERIVED", "SECONDARY", "SCREEN SAVE"]), "screen save or dose screen"),
    (lambda: _with(_ct(), SeriesDescription="Dose Report"), "screen save or dose screen"),
], ids=["yes", "ct-no-flag", "us-no", "sc-no", "real-us-no", "sc-sop-class", "us-sop-class", "us-modality",
        "screen-save", "dose-report"])
def test_burned_in_reason(build, expected):
    """BurnedInAnnotation YES/NO decides; else SC/US SOP classes, US modality, screen saves, dose reports are suspect, CT not."""
    assert burned_in_reason(build()) == expected


def test_burned_in_reason_without_pixel_data():
    """Without pixel data nothing can be burned in, even for an ultrasound flagged YES."""
    ds = _with(read("examples_rgb_color.dcm"), BurnedInAnnotation="YES")
    assert burned_in_reason(ds) is not None
    del ds.PixelData
    assert burned_in_reason(ds) is None


def test_burned_in_reason_never_quotes_a_value():
    """The reason names the rule, not the instance's values (they may be identifying)."""
    ds = _with(_ct(), SeriesDescription="DOSE FOR SMITHERSON", ImageType=["DERIVED", "SMITHERSON"])
    assert "SMITHERSON" not in (burned_in_reason(ds) or "").upper()


def test_low_dose_ct_is_not_a_dose_screen():
    """An original, primary, axial low-dose CT series is an acquisition, not a dose screen."""
    ds = _with(_ct(), SeriesDescription="LOW DOSE CHEST", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])
    assert burned_in_reason(ds) is None


# -- the burned_in policy in the pipeline -------------------------------------------------------------

def _secondary_capture(folder: Path) -> Path:
    return save(read("SC_rgb_rle.dcm"), folder / "sc.dcm")


def _ultrasound(folder: Path) -> Path:
    return save(as_ultrasound(_ct()), folder / "us.dcm")


SUSPECTS = {"secondary-capture": _secondary_capture, "ultrasound": _ultrasound}


@pytest.mark.parametrize("kind", SUSPECTS)
def test_policy_reject(tmp_path, node, kind):
    """burned_in = "reject": 0xC220, nothing spooled, nothing quarantined, nothing queued."""
    source = SUSPECTS[kind](tmp_path)
    n = node(burned_in="reject")
    outcome = n.receive(source)
    assert outcome.status == CANNOT_DEIDENTIFY == 0xC220
    assert n.spooled() == []
    assert n.quarantine.count() == 0
    assert n.store.db["queue"].count == 0


@pytest.mark.parametrize("kind", SUSPECTS)
def test_policy_quarantine(tmp_path, node, kind):
    """burned_in = "quarantine": status 0x0000, nothing spooled, the original held with kind burned_in."""
    source = SUSPECTS[kind](tmp_path)
    n = node(burned_in="quarantine")
    outcome = n.receive(source)
    assert outcome.status == SUCCESS
    assert n.spooled() == []
    assert n.store.db["queue"].count == 0
    entries = n.quarantine.entries()
    assert len(entries) == 1
    assert entries[0].kind == "burned_in"
    assert entries[0].reason == burned_in_reason(pydicom.dcmread(source))
    held = n.quarantine.root / f"{entries[0].id}.dcm"
    assert held.read_bytes() == source.read_bytes()
    assert stat.S_IMODE(held.stat().st_mode) == 0o600
    assert [e["kind"] for e in n.store.audit_records("quarantined")] == ["burned_in"]


@pytest.mark.parametrize("kind", SUSPECTS)
def test_policy_pass(tmp_path, node, kind):
    """burned_in = "pass": spooled with PatientIdentityRemoved YES, pixels untouched, no 113101 claimed."""
    source = SUSPECTS[kind](tmp_path)
    n = node(burned_in="pass")
    outcome = n.receive(source)
    assert outcome.status == SUCCESS
    assert len(n.spooled()) == 1
    assert n.quarantine.count() == 0
    out = pydicom.dcmread(n.spooled()[0])
    original = pydicom.dcmread(source)
    assert out.PatientIdentityRemoved == "YES"
    assert CLEAN_PIXEL_DATA not in [item.CodeValue for item in out.DeidentificationMethodCodeSequence]
    assert out.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert out.PixelData == original.PixelData


def test_not_suspect_ct_is_spooled_under_reject(tmp_path, node):
    """A CT without BurnedInAnnotation is not suspect: even burned_in = "reject" spools it."""
    source = save(_ct(), tmp_path / "ct.dcm")
    n = node(burned_in="reject")
    assert n.receive(source).status == SUCCESS
    assert len(n.spooled()) == 1


# -- Clean Pixel Data (PS3.15 E.3.1, 113101) ----------------------------------------------------------

def _native_multiframe_grayscale_us(folder: Path) -> Path:
    """Three native 16-bit frames, each different, as an ultrasound multi-frame image."""
    ds = as_ultrasound(_ct(), multiframe=True)
    frame = ds.pixel_array
    ds.PixelData = np.stack([frame, frame + 1, frame + 2]).astype(frame.dtype).tobytes()
    ds.NumberOfFrames = 3
    return save(ds, folder / "us_multiframe.dcm")


def _native_rgb_us(folder: Path) -> Path:
    """pydicom's real ultrasound RGB image (native explicit VR little endian)."""
    return save(read("examples_rgb_color.dcm"), folder / "us_rgb.dcm")


def _native_planar_rgb_us(folder: Path) -> Path:
    """The same ultrasound with colour-by-plane pixel data (Planar Configuration 1)."""
    ds = read("examples_rgb_color.dcm")
    ds.PixelData = ds.pixel_array.transpose(2, 0, 1).tobytes()
    ds.PlanarConfiguration = 1
    return save(ds, folder / "us_planar.dcm")


def _native_two_frame_rgb_us(folder: Path) -> Path:
    """pydicom's 2-frame RGB RLE image, decompressed to native, as an ultrasound multi-frame image."""
    ds = read("SC_rgb_rle_2frame.dcm")
    ds.decompress()
    return save(as_ultrasound(ds, multiframe=True), folder / "us_rgb_2frame.dcm")


NATIVE_US = {
    "grayscale-3-frames": _native_multiframe_grayscale_us,
    "rgb": _native_rgb_us,
    "rgb-planar": _native_planar_rgb_us,
    "rgb-2-frames": _native_two_frame_rgb_us,
}


@pytest.mark.parametrize("kind", NATIVE_US)
def test_clean_pixels_native_ultrasound(tmp_path, node, kind):
    """Clean Pixel Data (PS3.15 E.3.1, 113101): the rectangle is zeroed in every frame of a native US, all else unchanged."""
    source = NATIVE_US[kind](tmp_path)
    before = decoded(source)
    n = node(clean_pixels=True, pixel_rules=(US_RULE,), burned_in="reject")
    outcome = n.receive(source)
    assert outcome.status == SUCCESS, outcome.comment
    assert n.quarantine.count() == 0
    [spooled] = n.spooled()
    assert_cleaned_output(spooled)
    assert_blanked(before, decoded(spooled))


@pytest.mark.parametrize("name,rule", [
    ("SC_rgb_rle.dcm", PixelRule(rectangles=(RECT,), modality="OT", sop_class_uid=SecondaryCaptureImageStorage)),
    ("SC_rgb_rle_2frame.dcm", PixelRule(rectangles=(RECT,), sop_class_uid=SecondaryCaptureImageStorage,
                                        rows=100, columns=100)),
    ("JPEG2000.dcm", PixelRule(rectangles=((100, 600, 20, 10),), modality="NM",
                               sop_class_uid=SecondaryCaptureImageStorage)),
    ("SC_rgb_jpeg_dcmtk.dcm", PixelRule(rectangles=(RECT,), modality="OT")),
], ids=["rle", "rle-2-frames", "jpeg2000", "jpeg-baseline-ybr"])
def test_clean_pixels_compressed_inputs_are_written_native(tmp_path, node, name, rule):
    """RLE, JPEG 2000 and JPEG inputs are decoded, blanked and written native explicit VR little endian."""
    source = save(read(name), tmp_path / name)
    assert pydicom.dcmread(source).file_meta.TransferSyntaxUID.is_compressed
    before = decoded(source)
    n = node(clean_pixels=True, pixel_rules=(rule,), burned_in="reject")
    outcome = n.receive(source)
    assert outcome.status == SUCCESS, outcome.comment
    [spooled] = n.spooled()
    out = assert_cleaned_output(spooled)
    assert not out.file_meta.TransferSyntaxUID.is_compressed
    assert_blanked(before, decoded(spooled), rect=rule.rectangles[0])


@pytest.mark.parametrize("safeguards", [
    {"clean_pixels": True, "pixel_rules": (PixelRule(rectangles=(RECT,), modality="CT"),)},
    {"clean_pixels": True, "pixel_rules": (PixelRule(rectangles=(RECT,), modality="US", rows=999),)},
    {"clean_pixels": True, "pixel_rules": (PixelRule(rectangles=(RECT,), modality="US", manufacturer="NOSUCH"),)},
    {"clean_pixels": False, "pixel_rules": (US_RULE,)},
], ids=["other-modality", "other-rows", "other-manufacturer", "option-not-claimed"])
def test_rule_that_does_not_apply_leaves_it_to_the_policy(tmp_path, node, safeguards):
    """A non-matching rule (or Clean Pixel Data not claimed) blanks nothing: the quarantine policy holds the original."""
    source = _ultrasound(tmp_path)
    n = node(burned_in="quarantine", **safeguards)
    outcome = n.receive(source)
    assert outcome.status == SUCCESS
    assert n.spooled() == []
    [entry] = n.quarantine.entries()
    assert entry.kind == "burned_in"
    assert (n.quarantine.root / f"{entry.id}.dcm").read_bytes() == source.read_bytes()


def test_first_matching_rule_is_used(tmp_path, node):
    """Rules are tried in order; the first that matches gives the rectangles."""
    source = _native_rgb_us(tmp_path)
    before = decoded(source)
    rules = (PixelRule(rectangles=((0, 0, 4, 4),), modality="CT"),
             PixelRule(rectangles=((20, 10, 30, 6),), modality="US", rows=240, columns=320),
             PixelRule(rectangles=(RECT,), modality="US"))
    n = node(clean_pixels=True, pixel_rules=rules, burned_in="reject")
    assert n.receive(source).status == SUCCESS
    assert_blanked(before, decoded(n.spooled()[0]), rect=(20, 10, 30, 6))


@pytest.mark.parametrize("pixel_representation,bits_stored,fill", [
    (1, 16, (1 << 15) - 1),
    (0, 12, (1 << 12) - 1),
], ids=["signed-16", "unsigned-12"])
def test_monochrome1_blanks_to_the_maximum(tmp_path, node, pixel_representation, bits_stored, fill):
    """In MONOCHROME1 black is the largest stored value: the rectangle gets it, not 0."""
    ds = as_ultrasound(_ct())
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PixelRepresentation = pixel_representation
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    source = save(ds, tmp_path / "mono1.dcm")
    before = decoded(source)
    assert before.max() < fill
    n = node(clean_pixels=True, pixel_rules=(US_RULE,), burned_in="reject")
    assert n.receive(source).status == SUCCESS
    [spooled] = n.spooled()
    assert pydicom.dcmread(spooled).PhotometricInterpretation == "MONOCHROME1"
    assert_blanked(before, decoded(spooled), fill=fill)


def _undecodable_jpeg(folder: Path) -> Path:
    """A JPEG baseline secondary capture whose only fragment is cut to its first 200 bytes."""
    ds = read("SC_rgb_jpeg_dcmtk.dcm")
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:200]])
    path = save(ds, folder / "broken_jpeg.dcm")
    with pytest.raises(Exception):
        pydicom.dcmread(path).pixel_array
    return path


def test_undecodable_pixels_fall_back_to_quarantine(tmp_path, node):
    """Undecodable pixels under a matching rule cannot be claimed clean: the original is quarantined instead."""
    source = _undecodable_jpeg(tmp_path)
    n = node(clean_pixels=True, pixel_rules=(PixelRule(rectangles=(RECT,), modality="OT"),), burned_in="quarantine")
    outcome = n.receive(source)
    assert outcome.status == SUCCESS
    assert n.spooled() == []
    [entry] = n.quarantine.entries()
    assert entry.kind == "burned_in"
    assert "pixel cleaning failed" in entry.reason
    assert (n.quarantine.root / f"{entry.id}.dcm").read_bytes() == source.read_bytes()


def test_undecodable_pixels_fall_back_to_reject(tmp_path, node):
    """With burned_in = "reject", undecodable pixels under a matching rule are refused (0xC220)."""
    source = _undecodable_jpeg(tmp_path)
    n = node(clean_pixels=True, pixel_rules=(PixelRule(rectangles=(RECT,), modality="OT"),), burned_in="reject")
    outcome = n.receive(source)
    assert outcome.status == 0xC220
    assert n.spooled() == [] and n.quarantine.count() == 0


@pytest.mark.parametrize("name", ["ExplVR_BigEnd.dcm", "MR_small_bigendian.dcm"], ids=["rgb-8bit", "gray-16bit"])
def test_clean_pixels_big_endian_native(tmp_path, node, name):
    """A native explicit VR big endian ultrasound is cleaned and stays big endian (pydicom won't switch endianness)."""
    ds = read(name)
    assert not ds.is_little_endian
    source = save(as_ultrasound(ds), tmp_path / name)
    before = decoded(source)
    n = node(clean_pixels=True, pixel_rules=(US_RULE,), burned_in="reject")
    outcome = n.receive(source)
    assert outcome.status == SUCCESS, outcome.comment
    [spooled] = n.spooled()
    assert_cleaned_output(spooled, ExplicitVRBigEndian)
    assert_blanked(before, decoded(spooled))


def _native_ybr_full(folder: Path) -> Path:
    ds = read("SC_rgb_dcmtk_+eb+cy+n1.dcm")
    ds.decompress(as_rgb=False)  # native YBR_FULL
    assert ds.PhotometricInterpretation == "YBR_FULL"
    return save(as_ultrasound(ds), folder / "ybr_full.dcm")


def _native_ybr_full_422(folder: Path) -> Path:
    ds = read("SC_ybr_full_422_uncompressed.dcm")
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    return save(as_ultrasound(ds), folder / "ybr_full_422.dcm")


@pytest.mark.parametrize("build", [_native_ybr_full, _native_ybr_full_422], ids=["ybr-full", "ybr-full-422"])
def test_clean_pixels_native_ybr(tmp_path, node, build):
    """A native YBR ultrasound is cleaned losslessly: outside the rectangle the colours are unchanged."""
    source = build(tmp_path)
    before = decoded(source)  # pydicom's RGB rendering of the original
    n = node(clean_pixels=True, pixel_rules=(US_RULE,), burned_in="reject")
    outcome = n.receive(source)
    assert outcome.status == SUCCESS, outcome.comment
    [spooled] = n.spooled()
    assert_cleaned_output(spooled)
    assert_blanked(before, decoded(spooled))


def test_cleaned_instance_passes_the_guard_and_keeps_no_identity(tmp_path, node):
    """A cleaned ultrasound still goes through the profile: no original name or UID in the output."""
    ds = as_ultrasound(_ct())
    ds.PatientName = "SMITHERSON^JOHANNA"
    original_uid = str(ds.SOPInstanceUID)
    source = save(ds, tmp_path / "us.dcm")
    n = node(clean_pixels=True, pixel_rules=(US_RULE,), burned_in="reject")
    outcome = n.receive(source)
    assert outcome.status == SUCCESS
    data = n.spooled()[0].read_bytes()
    assert b"SMITHERSON" not in data and original_uid.encode() not in data
    assert outcome.sop_instance_uid != original_uid
    assert json.dumps(n.store.audit_records()).find("SMITHERSON") == -1


def test_overlay_embedded_in_pixel_bits_is_suspect_even_when_flag_says_no():
    """A retired embedded overlay (60xx,0102 > 0, no 60xx,3000) lives in the pixels: suspect whatever the flag."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.BurnedInAnnotation = "NO"
    assert burned_in_reason(ds) is None
    ds.add_new(0x60000102, "US", 15)
    assert "embedded" in burned_in_reason(ds)
    ds.add_new(0x60003000, "OW", b"\x00" * 8)
    assert burned_in_reason(ds) is None


def test_blanking_a_compressed_image_keeps_its_sop_instance_uid():
    """pydicom's decompress() mints a new SOP Instance UID unless told not to: the original must stay."""
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm"))
    original = ds.SOPInstanceUID
    blank(ds, ((0, 0, 4, 4),))
    assert ds.SOPInstanceUID == original
