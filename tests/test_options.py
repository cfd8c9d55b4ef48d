"""PS3.15 options on pydicom's own test files: SR cleaning (E.3.4), overlays (E.3.3), dates in text (E.3.5)."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.data import get_testdata_file

from node.deid import Deidentifier, Pseudonymizer
from node.deid.guard import Guard

KEY = bytes(range(32))


def deidentify(name: str, options: list[str], **changes):
    ds = pydicom.dcmread(get_testdata_file(name))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    record = Deidentifier(Pseudonymizer(KEY, "ORG"), options).apply(ds)
    assert Guard().check(ds, record) is None
    return ds


def content_items(ds) -> list:
    items, stack = [], list(ds.get("ContentSequence", []))
    while stack:
        item = stack.pop(0)
        items.append(item)
        stack.extend(item.get("ContentSequence", []))
    return items


def test_sr_basic_D_dummies_text_keeps_codes_and_measurements():
    """test-SR.dcm, Basic: Content Sequence is D: text dummied, PN/DATE/UIDREF replaced, codes kept."""
    original = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
    ds = deidentify("test-SR.dcm", [])
    before, after = content_items(original), content_items(ds)
    assert len(before) == len(after)
    for old, new in zip(before, after):
        assert old.get("ValueType") == new.get("ValueType")
        assert old.get("ConceptNameCodeSequence") == new.get("ConceptNameCodeSequence")
        if old.get("ValueType") == "TEXT":
            assert new.TextValue == "ANONYMIZED"
        if old.get("ValueType") == "NUM":
            assert new.MeasuredValueSequence == old.MeasuredValueSequence
        if old.get("ValueType") == "UIDREF":
            assert new.UID != old.UID and new.UID.startswith("2.25.")
        if old.get("ValueType") == "DATE":
            assert new.Date == "19000101"


def test_sr_clean_structured_content_C_keeps_words_removes_identity():
    """test-SR.dcm with clean_structured_content (113104): the narrative keeps its words, loses the names."""
    original = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
    text_item = next(i for i in content_items(original) if i.get("ValueType") == "TEXT")
    planted = "Seen by Riesmeier for Test S R on 2001-02-13; nodule 5 mm"
    ds = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
    next(i for i in content_items(ds) if i.get("ValueType") == "TEXT").TextValue = planted
    record = Deidentifier(Pseudonymizer(KEY, "ORG"), ["clean_structured_content"]).apply(ds)
    text = next(i for i in content_items(ds) if i.get("ValueType") == "TEXT").TextValue
    assert "nodule 5 mm" in text and "Seen by" in text
    for identity in ("Riesmeier", "Test", "2001-02-13"):
        assert identity.lower() not in text.lower()
    assert Guard().check(ds, record) is None
    assert "113104" in record.method_codes and text_item.TextValue  # the original had text to clean


def test_overlay_basic_X_removes_the_overlay_group():
    """examples_overlay.dcm, Basic: Overlay Data (60xx,3000) is X, and its group goes with it."""
    ds = deidentify("examples_overlay.dcm", [])
    assert not [e for e in ds if e.tag.group & 0xFF00 == 0x6000]


def test_overlay_clean_graphics_C_removes_graphics_overlay_keeps_roi():
    """clean_graphics (113103): a G (graphics) overlay may be text and is removed; an R (ROI) overlay stays."""
    ds = deidentify("examples_overlay.dcm", ["clean_graphics"])
    assert not [e for e in ds if e.tag.group & 0xFF00 == 0x6000]
    roi = pydicom.dcmread(get_testdata_file("examples_overlay.dcm"))
    data = roi[0x60003000].value
    roi[0x60000040].value = "R"
    record = Deidentifier(Pseudonymizer(KEY, "ORG"), ["clean_graphics"]).apply(roi)
    assert roi[0x60003000].value == data and "113103" in record.method_codes


@pytest.mark.parametrize("written", ["19561103", "1956-11-03", "03.11.1956", "11/03/1956"])
def test_clean_descriptors_C_removes_birth_date_in_common_written_forms(written):
    """clean_descriptors (113105): the birth date goes from text in the forms people write it."""
    ds = deidentify("CT_small.dcm", ["clean_descriptors"], PatientBirthDate="19561103",
                    StudyDescription=f"CT CHEST born {written} follow-up")
    assert written not in ds.StudyDescription and "CT CHEST" in ds.StudyDescription
