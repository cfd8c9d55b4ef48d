#!/usr/bin/env python3
"""Generate node/deid/safe_attributes.json: the known-safe technical attributes of `unlisted = "remove"`.

With `[anonymization] unlisted = "remove"` every standard attribute that Table E.1-1 does not list is
removed unless it is on this list. The list is derived from pydicom's data dictionary, not typed by
hand: an attribute is safe when

* its VR cannot carry words (numbers, code strings, tags, binary values, times) and it belongs to a
  group of image description, geometry or acquisition parameters (GROUPS below); or
* it is a UID (instance UIDs are remapped by the engine whatever the list says; definition UIDs
  name SOP classes, syntaxes and schemes); or
* it is a sequence whose name says it holds references, codes or technical parameters
  (SEQUENCE_WORDS): the sequence stays and its items are checked element by element; or
* it is on the explicit list (EXPLICIT), each with its reason: coded values, a few code strings
  outside those groups, pixel data.

Free text (LO, LT, SH, ST, UT, UC, PN, AE, UR) and dates (DA, DT) are never safe by pattern: the
first can hold anything, the second identify. Each entry records the rule that admitted it.

    python3 scripts/gen_safe_attributes.py [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from pydicom.datadict import DicomDictionary, RepeatersDictionary

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "node" / "deid" / "safe_attributes.json"
TABLE = ROOT / "node" / "deid" / "ps315.json"

#: VRs that hold no words: numbers, code strings, tags, binary values, times, ages.
WORDLESS_VRS = {"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "DS", "IS", "AT", "CS", "TM", "AS",
                "OB", "OW", "OF", "OD", "OL", "OV", "US or SS", "OB or OW", "US or OW", "US or SS or OW"}
#: Groups of image description, geometry and acquisition parameters, and what they describe.
GROUPS = {
    0x0018: "acquisition parameters", 0x0020: "geometry and image relationships",
    0x0022: "ophthalmic acquisition parameters", 0x0024: "visual field parameters",
    0x0028: "pixel description", 0x003A: "waveform description", 0x0042: "document description",
    0x0048: "whole slide microscopy geometry", 0x0052: "OCT acquisition parameters",
    0x0054: "nuclear medicine and PET acquisition parameters", 0x0060: "histogram description",
    0x0062: "segmentation description", 0x0064: "deformation geometry", 0x0066: "surface geometry",
    0x0068: "implant template geometry", 0x0070: "presentation state geometry and graphics",
    0x0072: "hanging protocol layout", 0x0076: "implant assembly geometry", 0x0078: "implant template",
    0x3002: "RT image geometry", 0x3004: "RT dose description", 0x3006: "RT structure geometry",
    0x3008: "RT treatment record parameters", 0x300A: "RT plan parameters", 0x300C: "RT references",
    0x2050: "presentation LUT", 0x5200: "functional group structure", 0x5400: "waveform description", 0x6000: "overlay description",
    0x7FE0: "pixel data",
}
#: Sequences kept as structure (their items are checked element by element).
SEQUENCE_WORDS = re.compile(r"^Referenced|Code Sequence$|Functional Groups|Parameters|Position|Orientation|"
                            r"Pixel|Frame|Plane|Dimension|Window|LUT|Graphic|Shape|Contour|Beam|Dose|Geometry|"
                            r"Measure|Units|Mapping|Segment|Derivation|Source Image|Purpose of Reference|Regions|Waveform|"
                            r"Channel|Fraction|Setup|Coding Scheme Identification")
#: Explicit additions outside the patterns, each with its reason.
EXPLICIT = {
    "CodeValue": "coded value: a coding scheme's code, not free text",
    "CodingSchemeDesignator": "coded value: the name of a coding scheme",
    "CodingSchemeVersion": "coded value: a scheme's version",
    "CodeMeaning": "coded value: the scheme's meaning of a code",
    "LongCodeValue": "coded value", "URNCodeValue": "coded value",
    "ContextIdentifier": "coded value: a context group's number", "MappingResource": "coded value: a resource",
    "ContextGroupVersion": "coded value: a context group's version",
    "SpecificCharacterSet": "how the text is encoded",
    "ImageType": "kind of image (ORIGINAL/DERIVED …)", "Modality": "kind of equipment",
    "SOPClassUID": "what kind of object this is", "InstanceNumber": "position in the series",
    "SeriesNumber": "position in the study", "AcquisitionNumber": "position in the acquisition",
    "PresentationIntentType": "for presentation or processing", "BurnedInAnnotation": "pixel text flag",
    "RecognizableVisualFeatures": "pixel face flag", "LossyImageCompression": "pixel history",
    "LossyImageCompressionRatio": "pixel history", "LossyImageCompressionMethod": "pixel history",
    "ValueType": "SR structure", "RelationshipType": "SR structure", "ContinuityOfContent": "SR structure",
    "NumericValue": "SR measurement", "FloatingPointValue": "SR measurement",
    "BodyPartExamined": "anatomy (a code string)", "Laterality": "anatomy", "ImageLaterality": "anatomy",
    "ViewPosition": "projection", "PatientOrientation": "image orientation in patient terms",
    "PatientPosition": "patient position on the equipment", "ScanOptions": "acquisition option codes",
    "ConversionType": "secondary capture kind", "QualityControlImage": "flag", "AnatomicRegionSequence": "anatomy code",
    "ConceptNameCodeSequence": "SR concept code", "ConceptCodeSequence": "SR coded value",
    "MeasuredValueSequence": "SR measurement", "ContentTemplateSequence": "SR template",
    "TemplateIdentifier": "SR template number", "PixelData": "the image itself (burned-in text: see burned_in)",
    "Manufacturer": "equipment make: a reader needs it to interpret vendor-specific images",
    "ManufacturerModelName": "equipment model: as Manufacturer", "SoftwareVersions": "equipment software: as Manufacturer",
    "PositionReferenceIndicator": "geometry: the anatomical reference of the frame of reference",
    "ImagedNucleus": "MR acquisition parameter", "SequenceName": "MR acquisition parameter",
    "TransmitCoilName": "MR acquisition parameter", "ReceiveCoilName": "MR acquisition parameter",
    "ConvolutionKernel": "CT reconstruction parameter", "FilterType": "acquisition parameter",
    "RescaleType": "pixel value units", "ProcessingFunction": "pixel processing",
    "StageNumber": "stress echo structure", "NumberOfStages": "stress echo structure",
    "ViewNumber": "stress echo structure", "NumberOfViewsInStage": "stress echo structure",
    "ExaminedBodyThickness": "acquisition geometry",
    "CompletionFlag": "SR document status (a code string)", "VerificationFlag": "SR document status (a code string)",
    "ApprovalStatus": "RT object status (a code string)", "SimpleFrameList": "frame references (numbers)",
}


def generate() -> list[dict[str, str]]:
    tabled = set(json.loads(TABLE.read_text())["tags"])
    entries: dict[str, dict[str, str]] = {}
    for tag, (vr, _vm, name, _retired, keyword) in sorted(DicomDictionary.items()):
        key = f"{tag:08X}"
        if key in tabled or not keyword or tag >> 16 in (0x0000, 0x0002, 0x0004, 0xFFFE):
            continue  # the table's own rows, commands, file meta, directories, item delimiters
        reason = _reason(tag >> 16, vr, name, keyword)
        if reason:
            entries[key] = {"tag": key, "keyword": keyword, "reason": reason}
    for mask, (vr, _vm, _name, _retired, keyword) in sorted(RepeatersDictionary.items()):
        if mask.startswith("60xx") and vr in WORDLESS_VRS and mask[4:] not in ("3000", "4000"):
            entries[mask.upper().replace("X", "x")] = {"tag": mask, "keyword": keyword,
                                                       "reason": f"overlay description ({vr})"}
    return list(entries.values())


def _reason(group: int, vr: str, name: str, keyword: str) -> str:
    if keyword in EXPLICIT:
        return EXPLICIT[keyword]
    if vr == "UI":
        return "UID: instance UIDs are remapped, definition UIDs name classes and schemes"
    if vr == "SQ" and SEQUENCE_WORDS.search(name):
        return "structure: references, codes or parameters; items checked element by element"
    if group in GROUPS and vr in WORDLESS_VRS:
        return f"{GROUPS[group]} ({vr})"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    entries = generate()
    lines = ",\n".join(json.dumps(entry, ensure_ascii=False) for entry in entries)  # one entry a line: diffable
    args.output.write_text(f'{{"generated_by": "scripts/gen_safe_attributes.py", "count": {len(entries)},\n'
                           f' "attributes": [\n{lines}\n]}}\n')
    print(f"{len(entries)} safe attributes → {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
