"""burned_in = "ocr" (node/deid/ocr.py): the instance's identity read by Tesseract in its pixels.

Images are made with names, IDs and dates rendered into the pixels (several fonts, sizes and
contrasts, 8 and 16 bit, MONOCHROME2, MONOCHROME1 and RGB); pydicom's test files stand for real
images without burned-in identity. Run this file as a script for the full grid and the rates:

    PYTHONPATH=. python3 tests/test_ocr.py
"""

from __future__ import annotations

import itertools
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from node.deid import Deidentifier, Pseudonymizer, ocr
from node.pipeline import SUCCESS, Pipeline, Safeguards
from node.spool import Quarantine, Spool
from node.store import Store

pytestmark = pytest.mark.skipif(not ocr.available(), reason="tesseract-ocr / pytesseract not installed")

FONTS = {
    "sans": "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "serif": "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
    "mono": "/usr/share/fonts/truetype/liberation/LiberationMono-Regular.ttf",
    "default": "",
}
TEXTS = ["MUELLER, JUERGEN", "Juergen Mueller", "ID: JP7733019", "DOB 04.03.1962", "MÜLLER^JÜRGEN 04-Mar-1962"]
CONTRASTS = {"white-on-black": (255, 0), "grey-on-dark": (170, 50), "black-on-white": (0, 255)}
SIZES = (11, 14, 20)
NAME, BIRTH, PID = "MÜLLER^JÜRGEN", "19620304", "JP7733019"


def _font(name: str, size: int):
    from PIL import ImageFont

    path = FONTS[name]
    return ImageFont.truetype(path, size) if path and Path(path).exists() else ImageFont.load_default(size=size)


def image(text: str | None, font: str = "sans", size: int = 14, contrast: str = "white-on-black", bits: int = 8,
          photometric: str = "MONOCHROME2", side: int = 256) -> Dataset:
    """A secondary capture with `text` drawn at the top left over a grey gradient ('anatomy')."""
    from PIL import Image, ImageDraw

    fg, bg = CONTRASTS[contrast]
    canvas = Image.new("L", (side, side), bg)
    draw = ImageDraw.Draw(canvas)
    draw.ellipse((side // 4, side // 3, 3 * side // 4, side - 10), fill=(fg + bg) // 2)  # something else
    if text:
        draw.text((8, 8), text, fill=fg, font=_font(font, size))
    grey = np.asarray(canvas)
    ds = _secondary_capture(side)
    if photometric == "RGB":
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        pixels = np.stack([grey, grey, grey // 2 + 60], axis=-1).astype(np.uint8)
        bits = 8
    else:
        ds.SamplesPerPixel = 1
        pixels = (255 - grey if photometric == "MONOCHROME1" else grey).astype(np.uint16 if bits == 16 else np.uint8)
        if bits == 16:
            pixels = pixels * 16  # 12 bits stored
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored = bits, 12 if bits == 16 else 8
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    ds.PixelData = pixels.tobytes()
    return ds


def _secondary_capture(side: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (generate_uid() for _ in range(3))
    ds.PatientName, ds.PatientBirthDate, ds.PatientID = NAME, BIRTH, PID
    ds.Modality, ds.Rows, ds.Columns = "OT", side, side
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    return ds


ENGINE = Deidentifier(Pseudonymizer(b"o" * 32, "ORG"))


def detected(ds: Dataset) -> bool:
    return ocr.verdict(ds, ENGINE.identity_of(ds), clean=False).hold is not None


MODES = [(8, "MONOCHROME2"), (16, "MONOCHROME2"), (16, "MONOCHROME1"), (8, "RGB")]


def grid() -> list[dict]:
    """Every text × font × size × contrast, the pixel formats taken in turn (180 images)."""
    return [dict(text=t, font=f, size=s, contrast=c, bits=MODES[i % 4][0], photometric=MODES[i % 4][1])
            for i, (t, f, s, c) in enumerate(itertools.product(TEXTS, FONTS, SIZES, CONTRASTS))]


SAMPLE = [
    dict(text="MUELLER, JUERGEN", font="sans", size=14, contrast="white-on-black", bits=8, photometric="MONOCHROME2"),
    dict(text="DOB 04.03.1962", font="mono", size=11, contrast="grey-on-dark", bits=16, photometric="MONOCHROME2"),
    dict(text="ID: JP7733019", font="serif", size=20, contrast="black-on-white", bits=8, photometric="RGB"),
    dict(text="Juergen Mueller", font="default", size=14, contrast="white-on-black", bits=16, photometric="MONOCHROME1"),
]


@pytest.mark.parametrize("case", SAMPLE, ids=lambda c: f"{c['font']}-{c['size']}-{c['bits']}-{c['photometric']}")
def test_identity_rendered_into_pixels_is_found(case):
    assert detected(image(**case))


def test_image_without_identity_raises_no_alarm():
    assert not detected(image("KVP 120  mA 200  W 400 L 40"))
    assert not detected(image(None, bits=16))


def test_a_region_is_given_never_the_text():
    found = ocr.verdict(image("MUELLER, JUERGEN"), ENGINE.identity_of(image(None)), clean=False)
    assert found.hold and "(" in found.hold
    assert "MUELLER" not in found.hold.upper() and "JUERGEN" not in found.hold.upper()


def _pipeline(tmp_path: Path, clean: bool) -> tuple[Pipeline, Spool, Quarantine]:
    store = Store(tmp_path / "db.sqlite")
    spool, quarantine = Spool(tmp_path / "spool"), Quarantine(tmp_path / "quarantine")
    options = ["clean_pixel_data"] if clean else []
    engine = Deidentifier(Pseudonymizer(b"o" * 32, "ORG"), options)
    pipeline = Pipeline(engine, store, spool, ["remote"], quarantine=quarantine,
                        safeguards=Safeguards(burned_in="ocr", clean_pixels=clean))
    return pipeline, spool, quarantine


def test_pipeline_holds_identity_and_forwards_the_rest(tmp_path):
    pipeline, spool, quarantine = _pipeline(tmp_path, clean=False)
    burned, plain = tmp_path / "burned.dcm", tmp_path / "plain.dcm"
    image("MUELLER, JUERGEN").save_as(burned, enforce_file_format=True)
    image("ANGIO 3 FPS").save_as(plain, enforce_file_format=True)
    assert pipeline.receive(burned, calling_aet="US1").status == SUCCESS  # held: durable, not forwarded
    assert quarantine.count() == 1
    entry = quarantine.entries()[0]
    assert entry.kind == "burned_in" and "OCR" in entry.reason and "MUELLER" not in entry.reason.upper()
    outcome = pipeline.receive(plain, calling_aet="US1")
    assert outcome.ok and quarantine.count() == 1
    assert len(list((tmp_path / "spool").rglob("*.dcm"))) == 1


def test_pipeline_with_clean_pixel_data_blanks_the_regions(tmp_path):
    pipeline, spool, quarantine = _pipeline(tmp_path, clean=True)
    burned = tmp_path / "burned.dcm"
    image("MUELLER, JUERGEN", size=20).save_as(burned, enforce_file_format=True)
    outcome = pipeline.receive(burned, calling_aet="US1")
    assert outcome.ok and quarantine.count() == 0
    out = pydicom.dcmread(next((tmp_path / "spool").rglob("*.dcm")))
    assert "113101" in [item.CodeValue for item in out.DeidentificationMethodCodeSequence]
    assert not detected(_with_identity(out))
    assert out.pixel_array[150, 128] != 0  # the rest of the image stays


def _with_identity(ds: Dataset) -> Dataset:
    ds.PatientName, ds.PatientBirthDate, ds.PatientID = NAME, BIRTH, PID
    return ds


def test_telenode_anonymize_with_ocr(tmp_path, make_node):
    (tmp_path / "in").mkdir()
    image("MUELLER, JUERGEN").save_as(tmp_path / "in" / "burned.dcm", enforce_file_format=True)
    image("ANGIO 3 FPS").save_as(tmp_path / "in" / "plain.dcm", enforce_file_format=True)
    node = make_node([("UNUSED", 9)])
    node.config.write_text(node.config.read_text().replace("[anonymization]", '[anonymization]\nburned_in = "ocr"'))
    result = node.cli("anonymize", str(tmp_path / "in"), "--output", str(tmp_path / "out"))
    assert result.returncode != 0  # one file held
    assert [p.name for p in (tmp_path / "out").rglob("*.dcm")] == ["plain.dcm"]


# -- measurement (run as a script) -----------------------------------------------------------------

def measure() -> None:
    from test_guard import SWEEP

    cases = grid()
    started, hits, misses = time.perf_counter(), 0, []
    for case in cases:
        if detected(image(**case)):
            hits += 1
        else:
            misses.append(case)
    per = (time.perf_counter() - started) / len(cases)
    print(f"detection: {hits}/{len(cases)} = {hits / len(cases):.1%}, {per * 1000:.0f} ms per image")
    for case in misses:
        print("  missed", case)
    alarms, read, started = [], 0, time.perf_counter()
    for path in SWEEP:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            if "PixelData" not in ds:
                continue
            found = ocr.verdict(ds, ENGINE.identity_of(ds), clean=False)
        if found.hold and found.hold.startswith("OCR could not"):
            print("  unreadable", Path(path).name, found.hold)
            continue
        read += 1
        if found.hold:
            alarms.append((Path(path).name, found.hold))
    per = (time.perf_counter() - started) / max(read, 1)
    print(f"false alarms: {len(alarms)}/{read} pydicom test images, {per * 1000:.0f} ms per image")
    for name, reason in alarms:
        print("  alarm", name, reason)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    measure()
