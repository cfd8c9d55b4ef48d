"""Pixels: which instances may carry burned-in text, and blanking configured rectangles.

The profile's attribute rules cannot see text drawn into the image. An
instance is *suspect* when it says so (BurnedInAnnotation = YES), or when it
belongs to the kinds that usually carry burned-in text — secondary capture,
ultrasound, screen saves and dose screens — unless it says it does not
(BurnedInAnnotation = NO); and always when an overlay is embedded in the
unused high bits of the pixel data (the retired form), since removing the
overlay group under the profile would leave its bits in the image. The node's policy (`burned_in`) decides what
happens to a suspect instance; with the Clean Pixel Data option (PS3.15
E.3.1, code 113101) a matching `pixel_rules` entry blanks its rectangles
first, and a cleaned instance is no longer suspect.

Blanking decodes the pixel data (native, RLE, JPEG family and JPEG 2000
through pydicom's decoders and the pylibjpeg plugins) and writes it back
uncompressed (explicit VR little endian; a big endian file stays big
endian; YBR becomes RGB): lossless, whatever came in. Only instances that
are cleaned are ever decoded. Pixel rules apply to every image they match,
suspect or not (a CT scout with the name burned in is not "suspect").
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from pydicom.dataset import Dataset, FileDataset
from pydicom.uid import ExplicitVRLittleEndian

from node import codecs
from node.config import PixelRule

CLEAN_PIXEL_DATA = {"code": "113101", "meaning": "Clean Pixel Data Option"}

#: Storage SOP classes whose images usually have text burned in.
SUSPECT_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.7",      # Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.1",    # Multi-frame Single Bit SC
    "1.2.840.10008.5.1.4.1.1.7.2",    # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",    # Multi-frame Grayscale Word SC
    "1.2.840.10008.5.1.4.1.1.7.4",    # Multi-frame True Color SC
    "1.2.840.10008.5.1.4.1.1.6.1",    # Ultrasound Image
    "1.2.840.10008.5.1.4.1.1.6.2",    # Enhanced US Volume
    "1.2.840.10008.5.1.4.1.1.3.1",    # Ultrasound Multi-frame Image
    "1.2.840.10008.5.1.4.1.1.6",      # Ultrasound Image (retired)
    "1.2.840.10008.5.1.4.1.1.3",      # Ultrasound Multi-frame Image (retired)
})
SUSPECT_MODALITIES = frozenset({"US", "SC", "OT", "XC", "DOC"})
SUSPECT_IMAGE_TYPES = ("SCREEN SAVE", "DOSE", "SCREENSHOT")
#: A dose screen's series description ("Dose Report", "Dose Info"), not a "Low Dose Chest" CT.
DOSE_SCREEN = re.compile(r"\bDOSE[ _-]*(REPORT|INFO|SUMMARY|SCREEN|RECORD|SR)\b|\bPATIENT PROTOCOL\b")


def burned_in_reason(ds: FileDataset) -> str | None:
    """Why this (original) instance may carry burned-in text, or None. Never quotes a value."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return None
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if flag == "YES":
        return "BurnedInAnnotation is YES"
    if _embedded_overlay(ds):  # whatever the flag says: the overlay's bits are in the pixels
        return "overlay embedded in the pixel data's unused bits"
    if flag == "NO":
        return None
    if str(ds.get("SOPClassUID", "")) in SUSPECT_SOP_CLASSES:
        return "SOP class usually carries burned-in text (secondary capture or ultrasound)"
    if str(ds.get("Modality", "") or "").strip().upper() in SUSPECT_MODALITIES:
        return "modality usually carries burned-in text"
    image_type = " ".join(str(v) for v in (ds.get("ImageType") or [])).upper()
    series = str(ds.get("SeriesDescription", "") or "").upper()
    if any(word in image_type for word in SUSPECT_IMAGE_TYPES) or DOSE_SCREEN.search(series):
        return "screen save or dose screen"
    return None


def _embedded_overlay(ds: FileDataset) -> bool:
    """A (retired) overlay stored in the high bits of Pixel Data: an overlay group without
    Overlay Data whose Overlay Bit Position is above zero. Removing the group would leave it there."""
    for group in range(0x6000, 0x6020, 2):
        position = ds.get((group << 16) | 0x0102)
        if position is not None and (group << 16) | 0x3000 not in ds and int(position.value or 0) > 0:
            return True
    return False


def matching_rule(ds: FileDataset, rules: Sequence[PixelRule]) -> PixelRule | None:
    """The first pixel rule whose every given criterion matches the original instance."""
    for rule in rules:
        if _matches(ds, rule):
            return rule
    return None


def _matches(ds: FileDataset, rule: PixelRule) -> bool:
    def text(keyword: str) -> str:
        return str(ds.get(keyword, "") or "").strip().upper()

    return (
        (not rule.modality or text("Modality") == rule.modality.upper())
        and (not rule.manufacturer or rule.manufacturer.upper() in text("Manufacturer"))
        and (not rule.model or rule.model.upper() in text("ManufacturerModelName"))
        and (not rule.sop_class_uid or text("SOPClassUID") == rule.sop_class_uid.upper())
        and (not rule.rows or int(ds.get("Rows", 0) or 0) == rule.rows)
        and (not rule.columns or int(ds.get("Columns", 0) or 0) == rule.columns)
    )


def blank(ds: Dataset, rectangles: Sequence[tuple[int, int, int, int]]) -> None:
    """Blank (x, y, width, height) rectangles in every frame; write native explicit VR little endian.

    Raises if the pixel data cannot be decoded: the caller then cannot claim clean pixels.
    """
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_compressed:
        codecs.require(syntax)  # NoDecoderInstalled: the JPEG extra is not installed (see node/codecs.py)
        ds.decompress(generate_instance_uid=False)  # native; photometric interpretation updated (YBR → RGB)
        syntax = ds.file_meta.TransferSyntaxUID
    pixels: Any = ds.pixel_array.copy()  # YBR comes back as RGB
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    fill = _background(ds)
    view = pixels if frames > 1 else pixels[None, ...]
    for x, y, width, height in rectangles:
        if samples > 1:
            view[:, y:y + height, x:x + width, :] = fill
        else:
            view[:, y:y + height, x:x + width] = fill
    if samples > 1:
        ds.PlanarConfiguration = 0  # pixel_array is colour-by-pixel …
        if str(ds.get("PhotometricInterpretation", "")).startswith("YBR"):
            ds.PhotometricInterpretation = "RGB"  # … and already converted from YBR
    if syntax.is_little_endian:
        ds.PixelData = pixels.tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    else:  # pydicom will not re-encode a big endian data set as little endian: stay big endian
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(">")).tobytes()
    ds.BurnedInAnnotation = "NO"


def _background(ds: Dataset) -> int:
    """Black: 0, except MONOCHROME1 where black is the largest stored value."""
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        bits = int(ds.get("BitsStored", 8) or 8)
        return (1 << bits) - 1 if int(ds.get("PixelRepresentation", 0) or 0) == 0 else (1 << (bits - 1)) - 1
    return 0
