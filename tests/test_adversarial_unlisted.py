"""`[anonymization] unlisted = "remove"`: the strict allow-list mode (issue 10, part 3).

Every standard attribute that Table E.1-1 does not list and that is not on the generated list of
known-safe technical attributes (node/deid/safe_attributes.json, scripts/gen_safe_attributes.py)
is removed, in sequences too. "keep" (the default) is the standard's behaviour.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from node import config
from node.deid import Deidentifier, Pseudonymizer
from node.deid.guard import Guard
from test_adversarial import survivors, write_corpus

REPO = Path(__file__).resolve().parents[1]
SAFE = json.loads((REPO / "node" / "deid" / "safe_attributes.json").read_text())["attributes"]
FREE_TEXT = {"LO", "LT", "SH", "ST", "UT", "UC", "PN", "AE", "UR", "DA", "DT"}


def _engine(unlisted: str, options=()) -> Deidentifier:
    return Deidentifier(Pseudonymizer(b"u" * 32, "ORG"), options, unlisted=unlisted)


def _ct() -> pydicom.FileDataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.LUTExplanation = "window for a VIP"  # untabled free text
    ds.DetectorDescription = "bay 3, Dr House's detector"
    ds.add_new(0x00991000, "LO", "creator")  # private: its own rule
    ds.add_new(0x00301234, "LO", "unknown text")  # not in the dictionary
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-D3000", "SRT", "Chest"
    item.LUTExplanation = "nested free text"
    ds.AnatomicRegionSequence = Sequence([item])
    return ds


def test_the_committed_list_is_what_the_script_generates():
    spec = importlib.util.spec_from_file_location("gen", REPO / "scripts" / "gen_safe_attributes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.generate() == SAFE


def test_every_entry_has_a_reason_and_no_free_text_comes_in_by_pattern():
    assert len(SAFE) > 1000
    for entry in SAFE:
        assert entry["reason"], entry
        if entry["tag"].startswith("60xx"):
            continue
        vr = dictionary_VR(int(entry["tag"], 16))
        explicit = not entry["reason"].startswith(("UID", "structure")) and "(" not in entry["reason"]
        assert vr not in FREE_TEXT or explicit, entry  # only the explicit list names a text attribute


def test_remove_keeps_safe_technical_attributes_and_drops_the_rest():
    ds = _ct()
    record = _engine("remove").apply(ds)
    for keyword in ("Rows", "Columns", "PixelSpacing", "ImagePositionPatient", "KVP", "SliceThickness",
                    "RescaleSlope", "ImageType", "SOPClassUID", "PixelData"):
        assert keyword in ds, keyword
    for keyword in ("LUTExplanation", "DetectorDescription"):
        assert keyword not in ds, keyword
    assert 0x00301234 not in ds
    item = ds.AnatomicRegionSequence[0]
    assert item.CodeMeaning == "Chest" and "LUTExplanation" not in item
    # what the profile adds is there, and the guard finds nothing
    assert ds.PatientIdentityRemoved == "YES" and ds.PatientID == record.pseudo_patient_id
    assert Guard().check(ds, record) is None


def test_keep_is_the_default_and_the_standards_behaviour():
    ds = _ct()
    Deidentifier(Pseudonymizer(b"u" * 32, "ORG")).apply(ds)
    assert ds.LUTExplanation == "window for a VIP" and 0x00301234 in ds


def test_remove_on_every_pydicom_test_file_keeps_pixels_and_geometry():
    """On real files: the image and its description stay; what goes is counted (for the README)."""
    from test_guard import SWEEP

    removed = 0
    for path in SWEEP:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            keep, strict = pydicom.dcmread(path), pydicom.dcmread(path)
            _engine("keep").apply(keep)
            record = _engine("remove").apply(strict)
        removed += len(set(keep.keys()) - set(strict.keys()))
        for keyword in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation", "PixelData"):
            assert (keyword in keep) == (keyword in strict), (path, keyword)
        assert Guard().check(strict, record) is None, path
    print(f"unlisted=remove removed {removed} attributes over {len(SWEEP)} files")


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_remove_on_the_adversarial_corpus(tmp_path, implicit):
    for path in write_corpus(tmp_path, implicit):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            record = _engine("remove", ["retain_safe_private", "clean_descriptors"]).apply(ds)
        assert Guard().check(ds, record) is None
        out = tmp_path / f"out-{path.name}"
        ds.save_as(out, enforce_file_format=True)
        assert survivors(out) == [], path.name


def test_config_key(tmp_path):
    text = ('[anonymization]\nunlisted = "{}"\n[[destinations]]\nname = "r"\nae_title = "R"\n'
            'host = "127.0.0.1"\nport = 104\n')
    path = tmp_path / "t.toml"
    path.write_text(text.format("remove"))
    assert config.load(path).unlisted == "remove"
    path.write_text(text.format("drop"))
    with pytest.raises(config.ConfigError, match="anonymization.unlisted"):
        config.load(path)
    path.write_text(text.replace('unlisted = "{}"\n', ""))
    assert config.load(path).unlisted == "keep"
