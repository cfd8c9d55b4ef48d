"""Burned-in text read by OCR (`burned_in = "ocr"`): is the instance's identity drawn into its pixels?

The attribute rules cannot see text in the image. With this policy the pipeline decodes a
suspect image (pixels.burned_in_reason; every image with `ocr_all_images`), reads it with
Tesseract (Debian `tesseract-ocr`, through pytesseract) and searches what it reads for the
instance's identity in every spelling (variants.py). The first frame is read (cine loops and
multi-frame screens repeat their overlay text); 16-bit images are windowed to their full range,
MONOCHROME1 inverted, colour converted to grey, small images enlarged so that Tesseract sees
text of at least ~20 pixels, and the image is read both as it is and inverted (Tesseract reads
dark text on light best; scanners burn light text on dark).

What it returns are the regions (x, y, width, height, in pixels of the image) of words that
belong to a match; never the words themselves. A failure to decode or to run Tesseract is an
`OcrError`: the caller cannot claim the pixels are clean.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from node.deid.guard import vocabulary
from node.deid.pixels import CLEAN_PIXEL_DATA, blank
from node.deid.variants import Identity, Matcher, variants

#: Tesseract reads text best at 20-40 pixels high; overlay text on a 256-pixel US image is ~8-12.
MIN_SIDE = 1024
TESSERACT_CONFIG = "--psm 11 --oem 1"  # sparse text anywhere in the image, LSTM engine


class OcrError(Exception):
    """The image could not be read (no Tesseract, pixels not decodable); carries no PHI."""


@dataclass(frozen=True)
class Region:
    """Where identifying text was read, in pixels of the image (never what was read)."""

    x: int
    y: int
    width: int
    height: int
    kind: str

    def rectangle(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.width, self.height

    def __str__(self) -> str:
        return f"{self.kind} at ({self.x},{self.y},{self.width},{self.height})"


def available() -> bool:
    """Tesseract and pytesseract are installed."""
    try:
        import pytesseract  # noqa: F401
    except ImportError:
        return False
    return shutil.which("tesseract") is not None


def find_identity(ds: Dataset, matcher: Matcher) -> list[Region]:
    """Regions of the first frame where Tesseract reads the identity `matcher` knows."""
    if not available():
        raise OcrError("tesseract-ocr or pytesseract not installed")
    try:
        grey = _grey(ds)
    except Exception as exc:  # a syntax without a decoder, a malformed frame, …
        raise OcrError(f"cannot decode the pixels ({type(exc).__name__})") from None
    scale = max(1.0, MIN_SIDE / max(grey.shape))
    regions: list[Region] = []
    for image in (grey, 255 - grey):
        regions.extend(_read(image, scale, matcher))
        if regions:
            break
    return _merge(regions)


def _grey(ds: Dataset) -> Any:
    """The first frame as 8-bit grey, dark text on light background where it can tell."""
    pixels = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[0]
    if pixels.ndim == 3:  # colour: pixel_array is RGB (YBR converted)
        pixels = pixels[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    pixels = pixels.astype(np.float32)
    low, high = float(pixels.min()), float(pixels.max())
    grey = np.zeros(pixels.shape, np.uint8) if high <= low else ((pixels - low) * (255.0 / (high - low))).astype(np.uint8)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        grey = 255 - grey
    return grey


def _read(grey: Any, scale: float, matcher: Matcher) -> list[Region]:
    import pytesseract
    from PIL import Image

    image = Image.fromarray(grey)
    if scale > 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    try:
        data = pytesseract.image_to_data(image, config=TESSERACT_CONFIG, output_type=pytesseract.Output.DICT)
    except Exception as exc:  # TesseractError, TesseractNotFoundError, a killed process
        raise OcrError(f"tesseract failed ({type(exc).__name__})") from None
    return [Region(round(x / scale), round(y / scale), round(w / scale) + 1, round(h / scale) + 1, kind)
            for x, y, w, h, kind in _matches(data, matcher)]


def _matches(data: dict[str, list], matcher: Matcher) -> list[tuple[int, int, int, int, str]]:
    """Boxes of the words, line by line, that a match of the identity covers."""
    lines: dict[tuple[int, int, int], list[int]] = {}
    for index, word in enumerate(data["text"]):
        if str(word).strip():
            lines.setdefault((data["block_num"][index], data["par_num"][index], data["line_num"][index]), []).append(index)
    found = []
    for indexes in lines.values():
        text, spans = "", []
        for index in indexes:
            start = len(text)
            text += str(data["text"][index]).strip() + " "
            spans.append((start, len(text) - 1, index))
        for hit in matcher.hits(text):
            words = [i for start, end, i in spans if start < hit.end and end > hit.start]
            if words:
                left = min(data["left"][i] for i in words)
                top = min(data["top"][i] for i in words)
                right = max(data["left"][i] + data["width"][i] for i in words)
                bottom = max(data["top"][i] + data["height"][i] for i in words)
                found.append((left, top, right - left, bottom - top, hit.kind))
    return found


def _merge(regions: list[Region]) -> list[Region]:
    """Each region once, padded by 2 pixels so that anti-aliased edges go with the text."""
    seen: dict[tuple[int, int, int, int], Region] = {}
    for r in regions:
        seen.setdefault((r.x, r.y, r.width, r.height), Region(max(0, r.x - 2), max(0, r.y - 2),
                                                              r.width + 4, r.height + 4, r.kind))
    return list(seen.values())


@dataclass(frozen=True)
class Verdict:
    """What OCR decided for one image: hold it (reason), or forward it (with the codes of any cleaning)."""

    hold: str | None = None
    codes: tuple[dict[str, str], ...] = ()


def verdict(ds: Dataset, identity: Identity, clean: bool) -> Verdict:
    """Read the image; identity found → hold with its regions, or blank them when `clean` (113101)
    and read again; nothing found → forward. Never quotes what was read."""
    if "PixelData" not in ds:
        return Verdict()
    matcher = variants(identity, vocabulary())
    try:
        regions = find_identity(ds, matcher)
        if regions and clean:
            blank(ds, [r.rectangle() for r in regions])
            left = find_identity(ds, matcher)
            if not left:
                return Verdict(codes=(CLEAN_PIXEL_DATA,))
            regions = left
    except OcrError as exc:
        return Verdict(hold=f"OCR could not read the image: {exc}")
    except Exception as exc:  # blanking could not decode or write the pixels
        return Verdict(hold=f"pixel cleaning failed ({type(exc).__name__})")
    if not regions:
        return Verdict()
    return Verdict(hold="identity burned into the pixels, read by OCR: " + "; ".join(map(str, regions)))
