"""The PS3.15 Annex E rule engine (node/deid/rules.py) against its own table and the standard.

Action codes (PS3.15 Table E.1-1a): D dummy, Z zero-length, X remove, K keep, C clean,
U remap UID, and the combined codes X/Z, X/D, Z/D, X/Z/D, X/Z/U*. The engine resolves the
combined codes without IOD type information (rules.py module docstring):
non-sequences X/Z → Z, X/D, Z/D, X/Z/D → D; on a sequence K keeps the items and applies the
table inside them, D (and X/D, Z/D) does the same and also replaces untabled free text (LT, ST,
UT, UC, PN) with a dummy, C cleans that text instead, Z, X/Z and X/Z/D empty the sequence, and
X/Z/U* keeps the items with their UIDs remapped. Overlay data removed (X) takes its overlay group.
"""

from __future__ import annotations

import copy
import datetime
import importlib.util
import io
import json
from pathlib import Path
from typing import Any, Callable

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset, FileDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, MRImageStorage

from node.deid import SUPPORTED_OPTIONS, DeidError, Deidentifier, Pseudonymizer
from node.deid.rules import IDENTIFIER_SEQUENCE, TABLE_OPTIONS
from node.deid.pseudonyms import patient_key

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "ps3.15"
PS315 = json.loads((REPO / "node" / "deid" / "ps315.json").read_text())
#: The standard's data files sit beside the checkout in development, not necessarily in CI:
#: the tests that compare against them directly skip without them (ps315.json is committed).
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/ps3.15 (the standard's tables) not beside the checkout")

KEY = b"k" * 32
ORG = "ORG"

#: Untabled sequence used to nest every tabled attribute one level down.
NEST_SEQ = 0x00400260  # Performed Protocol Code Sequence
#: Elements placed in every sequence item built below; the engine must keep/clean them per the table.
ITEM_KEEP = 0x00080100  # Code Value: not in Table E.1-1 → kept
ITEM_REMOVE = 0x00101040  # Patient's Address: X
ITEM_REF_UID = 0x00081155  # Referenced SOP Instance UID: U
ITEM_REF_CLASS = 0x00081150  # Referenced SOP Class UID: not tabled, a definition UID → untouched
ITEM_FREE_TEXT = 0x0040A160  # Text Value (UT): not tabled; free text, dummied inside a D sequence

PATIENT_NAME, PATIENT_ID, ACCESSION = 0x00100010, 0x00100020, 0x00080050

#: PS3.6 (2026d) VRs of Table E.1-1 rows newer than pydicom 3.0's data dictionary.
EXTRA_VR = {
    0x00100012: "LT",  # Name to Use
    0x00100013: "UT",  # Name to Use Comment
    0x00100016: "UT",  # Pronoun Comment
    0x00100042: "UT",  # Sex Parameters for Clinical Use Category Comment
    0x00100045: "UT",  # Gender Identity Comment
    0x00100047: "UR",  # Sex Parameters for Clinical Use Category Reference
    0x00102162: "UC",  # Ethnic Groups
    0x3004007F: "LO",  # Dose Calculation Model Name
}

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

_FILE_BYTES: dict[str, bytes] = {}


def load(name: str = "CT_small.dcm") -> FileDataset:
    """A fresh, independent copy of one of pydicom's test files."""
    if name not in _FILE_BYTES:
        _FILE_BYTES[name] = Path(get_testdata_file(name)).read_bytes()
    return dcmread(io.BytesIO(_FILE_BYTES[name]))


def deid(*options: str, key: bytes = KEY) -> Deidentifier:
    return Deidentifier(Pseudonymizer(key, ORG), options=options)


def table_vr(tag: int, name: str) -> str | None:
    """The attribute's VR: pydicom's dictionary, PS3.6 for newer rows, else None (can't build)."""
    try:
        return str(dictionary_VR(tag)).split(" or ")[0]
    except KeyError:
        pass
    if tag in EXTRA_VR:
        return EXTRA_VR[tag]
    if name.endswith("Sequence") or name.endswith("Sequence (Trial)"):
        return "SQ"
    if name.endswith("DateTime"):
        return "DT"
    return None


def hextag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def uid(n: int, root: str = "1.2.826.0.1.3680043.10.543") -> str:
    return f"{root}.{n}"


def sq_item(n: int) -> Dataset:
    """A sequence item with kept, removed (X), remapped (U) and free-text attributes."""
    item = Dataset()
    item.add_new(ITEM_REF_CLASS, "UI", CTImageStorage)
    item.add_new(ITEM_REF_UID, "UI", uid(n, "1.2.826.0.1.3680043.10.544"))
    item.add_new(ITEM_KEEP, "SH", "KEEPME")
    item.add_new(ITEM_REMOVE, "LO", "1 SECRET ROAD")
    item.add_new(ITEM_FREE_TEXT, "UT", f"lesion {n} mm in left lobe")
    return item


def sample(vr: str, n: int) -> Any:
    """A plausible original value for `vr`, distinct per row where the VR allows it."""
    text = {
        "AE": f"AE{n}", "CS": f"ORIG{n}", "SH": f"ORIG{n}", "LO": f"ORIGINAL VALUE {n}",
        "LT": f"ORIGINAL TEXT {n}", "ST": f"ORIGINAL TEXT {n}", "UT": f"ORIGINAL TEXT {n}",
        "UC": f"ORIGINAL VALUE {n}", "UR": f"http://example.org/orig/{n}", "PN": f"DOE{n}^JANE",
        "AS": "045Y", "DA": "20010203", "DT": "20010203040506", "TM": "101112", "DS": "12.5", "IS": "42",
        "UI": uid(n),
    }
    if vr in text:
        return text[vr]
    if vr in ("US", "SS", "UL", "SL", "SV", "UV"):
        return 7
    if vr in ("FL", "FD"):
        return 1.5
    if vr == "AT":
        return 0x00100010
    if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
        return b"\x01\x02\x03\x04\x05\x06\x07\x08"
    if vr == "SQ":
        return Sequence([sq_item(n)])
    raise AssertionError(f"no sample for VR {vr}")


def norm(value: Any) -> Any:
    """A comparable form of an element value (PersonName, DSfloat, MultiValue → str/list)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (MultiValue, list)):
        return [norm(v) for v in value]
    return None if value is None else str(value)


def is_empty(value: Any) -> bool:
    return value is None or value == "" or value == b"" or (isinstance(value, (list, MultiValue, Sequence)) and len(value) == 0)


def phi_dataset() -> FileDataset:
    """CT_small with a made-up patient's identity planted at top level and nested."""
    ds = load()
    ds.PatientName = "SMITHERSON^JOHANNA"
    ds.PatientID = "MRN-4417-2291"
    ds.IssuerOfPatientID = "SAINT-ELSEWHERE"
    ds.PatientBirthDate = "19561103"
    ds.AccessionNumber = "ACC99887766"
    ds.InstitutionName = "Saint Elsewhere General"
    ds.ReferringPhysicianName = "HOUSE^GREGORY"
    ds.OtherPatientIDs = "OLDMRN-0077"
    ds.StudyDescription = "CT CHEST FOR SMITHERSON"
    nested = Dataset()
    nested.PatientName = "SMITHERSON^JOHANNA"
    nested.PatientID = "MRN-4417-2291"
    nested.AccessionNumber = "ACC99887766"
    nested.InstitutionName = "Saint Elsewhere General"
    nested.ReferringPhysicianName = "HOUSE^GREGORY"
    nested.CodeValue = "P1"
    ds.PerformedProtocolCodeSequence = Sequence([nested])
    return ds


def saved_bytes(ds: FileDataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def private_tags(ds: Dataset) -> set[int]:
    return {int(e.tag) for e in ds if e.tag.group & 1}


# ---------------------------------------------------------------------------------------------
# the table-driven cases
# ---------------------------------------------------------------------------------------------

ROWS: list[tuple[int, dict, str]] = []
UNBUILDABLE: list[str] = []
for _n, (_key, _rule) in enumerate(PS315["tags"].items()):
    _tag = int(_key, 16)
    _vr = table_vr(_tag, _rule["name"])
    if _vr is None:
        UNBUILDABLE.append(f"{hextag(_tag)} {_rule['name']}")
    else:
        ROWS.append((_tag, _rule, _vr))


def row_id(tag: int, rule: dict, vr: str, action: str) -> str:
    return f"{hextag(tag)}-{action}-{vr}-{rule['name'][:40]}"


#: Expected outcome of each Basic/option action on a non-sequence and on a sequence (module docstring).
OUTCOME = {"X": "absent", "Z": "empty", "X/Z": "empty", "D": "dummy", "X/D": "dummy", "Z/D": "dummy",
           "X/Z/D": "dummy", "U": "uid", "K": "kept", "X/Z/U*": "uid"}
OUTCOME_SQ = {"X": "absent", "Z": "empty", "X/Z": "empty", "X/Z/D": "empty", "D": "dummy items",
              "X/D": "dummy items", "Z/D": "dummy items", "K": "keep items", "U": "keep items",
              "X/Z/U*": "keep items"}


class Case:
    """One attribute planted in CT_small (top level or in an untabled sequence item), de-identified."""

    def __init__(self, tag: int, vr: str, n: int, nested: bool, options: tuple[str, ...] = ()):
        self.tag, self.vr, self.options = tag, vr, options
        self.ds = load()
        self.ds.AccessionNumber = "ACC12345"
        if tag == PATIENT_NAME:
            value: Any = str(self.ds.PatientName)  # the patient's own name, wherever it occurs
        elif tag == PATIENT_ID:
            value = self.ds.PatientID
        elif tag == ACCESSION:
            value = "ACC12345"
        elif tag == 0x00020003:
            value = self.ds.SOPInstanceUID  # as in any Part 10 file
        else:
            value = sample(vr, n)
        if nested:
            item = Dataset()
            item.CodeValue = "P1"
            item.CodingSchemeDesignator = "99LOCAL"
            item.add_new(tag, vr, value)
            self.ds.add_new(NEST_SEQ, "SQ", Sequence([item]))
            self.container: Callable[[], Dataset] = lambda: self.ds[NEST_SEQ].value[0]
        elif tag >> 16 == 0x0002:
            self.ds.file_meta.add_new(tag, vr, value)
            self.container = lambda: self.ds.file_meta
        else:
            self.ds.add_new(tag, vr, value)
            self.container = lambda: self.ds
        self.before = copy.deepcopy(self.container()[tag].value)
        self.pseudonyms = Pseudonymizer(KEY, ORG)
        self.record = Deidentifier(self.pseudonyms, options=options).apply(self.ds)
        if nested:
            assert NEST_SEQ in self.ds and len(self.ds[NEST_SEQ].value) == 1, "untabled sequence not kept"
            assert self.container().CodeValue == "P1", "untabled element in the kept item changed"

    @property
    def after(self) -> Any:
        return self.container()[self.tag].value

    def check(self, outcome: str) -> None:
        """Assert `outcome` (absent, empty, dummy, uid, kept, clean) for the planted attribute."""
        tag, container = self.tag, self.container()
        if outcome == "absent":
            assert tag not in container, "X: attribute must be removed"
            return
        assert tag in container, f"{outcome}: attribute must stay present"
        if tag in (PATIENT_NAME, PATIENT_ID):
            expected = self.record.pseudo_patient_name if tag == PATIENT_NAME else self.record.pseudo_patient_id
            assert str(self.after) == expected and str(self.after) != norm(self.before)
            return
        if tag == ACCESSION:
            assert str(self.after) == self.pseudonyms.accession("ACC12345")
            assert len(str(self.after)) == 16 and str(self.after) != "ACC12345"
            return
        if outcome == "empty":
            assert is_empty(self.after), f"Z: expected zero length, got {self.after!r}"
        elif outcome == "dummy":
            assert not is_empty(self.after), "D: value must be non-zero length"
            assert norm(self.after) != norm(self.before), "D: original value kept"
            if self.vr == "UI":
                assert str(self.after).startswith("2.25.")
        elif outcome == "uid":
            assert str(self.after).startswith("2.25."), f"U: not a 2.25 UID: {self.after!r}"
            assert str(self.after) != str(self.before)
            assert self.record.uid_map[str(self.before)] == str(self.after)
        elif outcome == "kept":
            assert norm(self.after) == norm(self.before), "K: value changed"
        elif outcome in ("keep items", "dummy items"):
            self.check_clean_items(remap=True, dummy_text=outcome == "dummy items")
        else:
            raise AssertionError(outcome)

    def check_clean_items(self, remap: bool, dummy_text: bool) -> None:
        """The sequence keeps its item; inside it X applies, U remaps, codes stay, free text per D/K."""
        items = self.after
        assert len(items) == 1, "sequence items must be kept"
        item = items[0]
        original = self.before[0]
        assert ITEM_REMOVE not in item, "item not cleaned: Patient's Address (X) survived"
        if dummy_text and IDENTIFIER_SEQUENCE.search(keyword_for_tag(self.tag) or ""):
            # items that are identifiers (a person's codes) lose their codes too (issue 10)
            assert item[ITEM_KEEP].value == "ANONYMIZED", "D: identifier code kept"
        else:
            assert item[ITEM_KEEP].value == "KEEPME"
        assert item[ITEM_REF_CLASS].value == CTImageStorage, "SOP Class UID must not be remapped"
        new_ref, old_ref = str(item[ITEM_REF_UID].value), str(original[ITEM_REF_UID].value)
        if remap:
            assert new_ref.startswith("2.25.") and new_ref != old_ref, "UID in item not remapped (U)"
        else:
            assert new_ref == old_ref
        text = item[ITEM_FREE_TEXT].value
        if dummy_text:
            assert text not in (None, "") and text != original[ITEM_FREE_TEXT].value, "D: free text kept"
        else:
            assert text == original[ITEM_FREE_TEXT].value, "K: free text changed"


def basic_cases(nested: bool) -> list:
    cases = []
    for n, (tag, rule, vr) in enumerate(ROWS):
        if nested and tag >> 16 == 0x0002:
            continue  # file meta elements cannot occur in an item
        cases.append(pytest.param(tag, vr, n, rule["basic"], id=row_id(tag, rule, vr, rule["basic"])))
    return cases


def expected_outcome(action: str, vr: str) -> str:
    return (OUTCOME_SQ if vr == "SQ" else OUTCOME)[action]


# ---------------------------------------------------------------------------------------------
# 0. the table itself
# ---------------------------------------------------------------------------------------------


@needs_shared
def test_ps315_json_is_generated_from_table_e1_1():
    """ps315.json equals what scripts/gen_ps315.py builds from Table E.1-1 and E.3.10-1 today."""
    spec = importlib.util.spec_from_file_location("gen_ps315", REPO / "scripts" / "gen_ps315.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.build(SHARED) == PS315


@needs_shared
def test_every_table_e1_1_row_has_its_basic_action():
    """Every plain-tag row of Table E.1-1 (2026d) is in ps315.json with the same Basic action code."""
    rows = json.loads((SHARED / "confidentiality_profile_attributes.json").read_text())
    plain = [r for r in rows if "X" not in r["tag"].upper() and "WHERE" not in r["tag"].upper()]
    assert len(rows) == 657 and len(plain) == len(PS315["tags"]) == 653
    for row in plain:
        key = row["tag"][1:5].upper() + row["tag"][6:10].upper()
        assert PS315["tags"][key]["basic"] == row["basicProfile"], row["tag"]


def test_few_rows_skipped_for_unknown_vr():
    """Only a handful of 2026d rows have a VR neither pydicom nor this file knows; they are skipped."""
    assert len(ROWS) + len(UNBUILDABLE) == len(PS315["tags"])
    assert len(UNBUILDABLE) <= 5, UNBUILDABLE


# ---------------------------------------------------------------------------------------------
# 1. every Basic Profile action, top level and nested
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag,vr,n,action", basic_cases(nested=False))
def test_basic_profile_action_top_level(tag, vr, n, action):
    """Basic Profile action (D/Z/X/U/X/Z/X/D/Z/D/X/Z/D/X/Z/U*) on a top-level attribute, as resolved."""
    Case(tag, vr, n, nested=False).check(expected_outcome(action, vr))


@pytest.mark.parametrize("tag,vr,n,action", basic_cases(nested=True))
def test_basic_profile_action_nested_in_kept_sequence(tag, vr, n, action):
    """Basic Profile action on the attribute inside an item of an untabled, kept sequence (0040,0260)."""
    assert "00400260" not in PS315["tags"]
    Case(tag, vr, n, nested=True).check(expected_outcome(action, vr))


def option_cases(option: str, actions: set[str], vrs: set[str] | None = None) -> list:
    cases = []
    for n, (tag, rule, vr) in enumerate(ROWS):
        action = rule["options"].get(option)
        if action in actions and (vrs is None or vr in vrs):
            cases.append(pytest.param(tag, vr, n, id=row_id(tag, rule, vr, action)))
    return cases


K_CASES = [
    pytest.param(option, tag, vr, n, id=f"{option}-{p.id}")
    for option in SUPPORTED_OPTIONS
    for p in option_cases(option, {"K"})
    for tag, vr, n in [p.values]
]


@pytest.mark.parametrize("option,tag,vr,n", K_CASES)
def test_option_K_keeps_value(option, tag, vr, n):
    """K under a claimed option: non-sequence value unchanged; sequence kept with items cleaned."""
    case = Case(tag, vr, n, nested=False, options=(option,))
    if vr == "SQ":
        case.check_clean_items(remap=option != "retain_uids", dummy_text=False)
    else:
        case.check("kept")


@pytest.mark.parametrize("tag,vr,n", option_cases("retain_long_modified_dates", {"C"}, {"DA", "DT"}))
def test_retain_long_modified_dates_C_shifts_dates(tag, vr, n):
    """C under Modified Dates: DA shifted by the patient's offset; DT date part shifted, time kept."""
    case = Case(tag, vr, n, nested=False, options=("retain_long_modified_dates",))
    rec = case.record
    offset = case.pseudonyms.date_offset_days(
        patient_key(rec.patient_id, rec.issuer_of_patient_id, rec.patient_name, rec.patient_birth_date,
                    rec.study_instance_uid))
    assert -3650 <= offset <= -1
    shifted = (datetime.date(2001, 2, 3) + datetime.timedelta(days=offset)).strftime("%Y%m%d")
    assert str(case.after) == (shifted if vr == "DA" else shifted + "040506")


SEEDS = ("retain_safe_private", "retain_device_identity", "clean_descriptors", "clean_graphics")


def resolved_outcome(action: str, vr: str, options: tuple[str, ...]) -> str:
    """What the resolved action does to a value of this VR (module docstring of rules.py)."""
    if action == "K" and vr == "SQ":
        return "keep items" if "retain_uids" not in options else "keep items, UIDs kept"
    if action != "C":
        return expected_outcome(action, vr)
    if vr == "SQ":
        return "clean items"
    if vr in ("DA", "DT"):
        return "shifted" if "retain_long_modified_dates" in options else "dummy"
    if vr == "UI":
        return "uid"
    if vr == "PN":
        return "dummy"
    return "kept"  # text with no identifier in it, times, ages, numbers, binary: unchanged by C


def claimed_action(rule: dict, options: tuple[str, ...]) -> str:
    """The spec, written independently of the engine: a claimed option's cell replaces the Basic
    action; where claimed options disagree, keeping (K) wins over cleaning (C)."""
    claimed = [rule["options"][o] for o in options if o in rule["options"]]
    for action in ("K", "C"):
        if action in claimed:
            return action
    return claimed[0] if claimed else rule["basic"]


def column_cases(options_sets: list[tuple[str, ...]], nested: bool) -> list:
    """Every row that has a cell for any of the options, with the action resolved for the set."""
    cases = []
    for options in options_sets:
        for n, (tag, rule, vr) in enumerate(ROWS):
            if nested and tag >> 16 == 0x0002 or not set(rule["options"]) & set(options):
                continue
            action = claimed_action(rule, options)
            name = "+".join(options) if options != SEEDS else "seeds"
            cases.append(pytest.param(options, tag, vr, n, action, id=f"{name}-{row_id(tag, rule, vr, action)}"))
    return cases


def check_resolved(case: "Case", outcome: str) -> None:
    if outcome == "shifted":
        after, before = str(case.after), str(case.before)
        assert after != before and len(after) == len(before) and after[8:] == before[8:], "C: date not shifted"
    elif outcome == "clean items":
        case.check_clean_items(remap="retain_uids" not in case.options, dummy_text=False)
    elif outcome == "keep items, UIDs kept":
        case.check_clean_items(remap=False, dummy_text=False)
    else:
        case.check(outcome)


ALONE = [(option,) for option in TABLE_OPTIONS]
#: The one pair of columns whose cells disagree on some rows (K vs C on device calibration dates).
CONFLICT = ("retain_device_identity", "retain_long_modified_dates")


@pytest.mark.parametrize("options,tag,vr,n,action", column_cases(ALONE + [SEEDS, CONFLICT], nested=False))
def test_option_column_top_level(options, tag, vr, n, action):
    """Each option alone, the seeds' combination and the one conflicting pair: every row with a claimed column."""
    check_resolved(Case(tag, vr, n, nested=False, options=options), resolved_outcome(action, vr, options))


@pytest.mark.parametrize("options,tag,vr,n,action", column_cases(ALONE + [SEEDS, CONFLICT], nested=True))
def test_option_column_nested(options, tag, vr, n, action):
    """The same inside an item of an untabled, kept sequence."""
    check_resolved(Case(tag, vr, n, nested=True, options=options), resolved_outcome(action, vr, options))


CLEAN_TEXT_VRS = {"LO", "SH", "ST", "LT", "UT", "UC", "CS"}


@pytest.mark.parametrize("tag,vr,n", option_cases("clean_descriptors", {"C"}, CLEAN_TEXT_VRS | {"PN"}))
def test_clean_descriptors_C_removes_patient_name(tag, vr, n):
    """C under Clean Descriptors: the patient's name is cut out of text, other words stay; PN is dummied."""
    ds = load()
    ds.PatientName = "SMITHERSON^JOHANNA"
    original = "HEAD JOHANNA" if vr in ("SH", "CS") else "CT HEAD OF Smitherson, JOHANNA DONE"
    ds.add_new(tag, vr, "DOE^JANE" if vr == "PN" else original)
    deid("clean_descriptors").apply(ds)
    assert tag in ds
    value = str(ds[tag].value)
    if vr == "PN":
        assert value not in ("", "DOE^JANE")
        return
    assert "HEAD" in value
    assert "SMITHERSON" not in value.upper() and "JOHANNA" not in value.upper()


# ---------------------------------------------------------------------------------------------
# 2. masks: curves, overlays, private groups
# ---------------------------------------------------------------------------------------------


def test_curve_group_50xx_X_removed():
    """(50xx,xxxx) Curve Data: X on every element of every curve group."""
    ds = load()
    ds.add_new(0x50000005, "US", 2)
    ds.add_new(0x50003000, "OW", b"\x00\x01" * 8)
    ds.add_new(0x50020010, "US", 4)
    ds.add_new(0x501E0022, "LO", "CURVE DESCRIPTION")
    deid().apply(ds)
    assert not [e.tag for e in ds if 0x5000 <= e.tag.group <= 0x50FF]


def add_overlay(ds: Dataset, group: int, overlay_type: str = "G", data: bool = True) -> None:
    ds.add_new(group << 16 | 0x0010, "US", 128)
    ds.add_new(group << 16 | 0x0011, "US", 128)
    ds.add_new(group << 16 | 0x0040, "CS", overlay_type)
    ds.add_new(group << 16 | 0x0050, "SS", [1, 1])
    if data:
        ds.add_new(group << 16 | 0x3000, "OW", b"\xff" * 2048)
    ds.add_new(group << 16 | 0x4000, "LT", "SMITH OVERLAY NOTE")


def overlay_group(ds: Dataset, group: int) -> set[int]:
    return {int(e.tag) for e in ds if e.tag.group == group}


def test_overlay_data_X_takes_its_overlay_group():
    """(60xx,3000) Overlay Data X (with (60xx,4000) X): the data-less overlay group goes with it."""
    ds = load()
    for group in (0x6000, 0x6002):
        add_overlay(ds, group)
    deid().apply(ds)
    assert overlay_group(ds, 0x6000) == overlay_group(ds, 0x6002) == set()


def test_overlay_comments_X_other_overlay_elements_kept():
    """(60xx,4000) Overlay Comments X; untabled overlay elements such as (60xx,0010) Rows are kept."""
    ds = load()
    add_overlay(ds, 0x6000, data=False)
    deid().apply(ds)
    assert overlay_group(ds, 0x6000) == {0x60000010, 0x60000011, 0x60000040, 0x60000050}
    assert ds[0x60000010].value == 128 and ds[0x60000040].value == "G"


def test_clean_graphics_C_keeps_roi_overlay_removes_graphics_overlay():
    """clean_graphics (C on overlay data): an ROI overlay (type R) keeps its data, a G overlay goes."""
    ds = load()
    add_overlay(ds, 0x6000, "R")
    add_overlay(ds, 0x6002, "G")
    deid("clean_graphics").apply(ds)
    assert ds[0x60003000].value == b"\xff" * 2048 and ds[0x60000010].value == 128
    assert 0x60023000 not in ds


def test_private_elements_X_under_basic_profile():
    """(gggg,eeee) odd groups: X under the Basic Profile, at top level and inside items."""
    ds = load()
    assert len(private_tags(ds)) == 179
    item = Dataset()
    item.CodeValue = "P1"
    item.add_new(0x00090010, "LO", "ACME_PRIVATE")
    item.add_new(0x00091001, "LO", "SMITH")
    ds.add_new(NEST_SEQ, "SQ", Sequence([item]))
    deid().apply(ds)
    assert private_tags(ds) == set()
    assert private_tags(ds[NEST_SEQ].value[0]) == set() and ds[NEST_SEQ].value[0].CodeValue == "P1"


SAFE_IN_CT_SMALL = {("GEMS_ACQU_01", 0x0019, 0x23), ("GEMS_ACQU_01", 0x0019, 0x24), ("GEMS_ACQU_01", 0x0019, 0x27),
                    ("GEMS_SERS_01", 0x0025, 0x07), ("GEMS_PARM_01", 0x0043, 0x27)}


def safe_source() -> set[tuple[str, int, int]]:
    """Table E.3.10-1 as (creator, group, element low byte): from the standard's data file when present."""
    if SHARED.is_dir():
        rows = json.loads((SHARED / "safe_private_attributes.json").read_text())["rows"]
        return {(r["private_creator"].strip(), int(r["tag"][1:5], 16), int(r["tag"][8:10], 16)) for r in rows}
    return {(creator, int(group, 16), int(low, 16)) for creator, group, low in PS315["safe_private"]}


def test_retain_safe_private_C_keeps_exactly_table_e3_10_1_elements():
    """retain_safe_private (C on privates): the 5 safe GE elements and their creators stay, the rest go."""
    ds = load()
    before = {int(e.tag): e.value for e in ds if e.tag.group & 1}
    expected: set[int] = set()
    found: set[tuple[str, int, int]] = set()
    for tag in before:
        group, element = tag >> 16, tag & 0xFFFF
        if element >= 0x1000:
            creator = str(ds[group << 16 | element >> 8].value).strip()
            if (creator, group, element & 0xFF) in safe_source():
                expected |= {tag, group << 16 | element >> 8}
                found.add((creator, group, element & 0xFF))
    assert found == SAFE_IN_CT_SMALL
    deid("retain_safe_private").apply(ds)
    assert private_tags(ds) == expected and len(expected) == 8
    for tag in expected:
        assert ds[tag].value == before[tag]


def move_block(ds: Dataset, group: int, old: int, new: int) -> None:
    """Move one private block (creator and its elements) to another block number."""
    for elem in [e for e in ds if e.tag.group == group and (e.tag.element == old or e.tag.element >> 8 == old)]:
        del ds[elem.tag]
        element = new if elem.tag.element == old else new << 8 | elem.tag.element & 0xFF
        ds.add_new(group << 16 | element, elem.VR, elem.value)


def test_retain_safe_private_matches_creator_not_block_number():
    """Safe private match is by creator + low byte: a moved block stays safe, an impostor creator does not."""
    ds = load()
    move_block(ds, 0x0019, 0x10, 0x42)
    ds.add_new(0x00190010, "LO", "OTHER_VENDOR_01")  # the old block slot, another creator
    ds.add_new(0x00191023, "DS", "1.0")
    deid("retain_safe_private").apply(ds)
    assert ds[0x00190042].value == "GEMS_ACQU_01"
    assert {0x00194223, 0x00194224, 0x00194227} <= private_tags(ds)
    assert 0x00191023 not in ds and 0x00190010 not in ds
    assert not [t for t in private_tags(ds) if t >> 16 == 0x0019 and t not in (0x00190042, 0x00194223, 0x00194224, 0x00194227)]


def test_retain_safe_private_element_without_creator_removed():
    """A would-be safe element whose Private Creator is missing cannot be matched: removed."""
    ds = load()
    del ds[0x00250010]
    deid("retain_safe_private").apply(ds)
    assert not [t for t in private_tags(ds) if t >> 16 == 0x0025]


# ---------------------------------------------------------------------------------------------
# 3. options
# ---------------------------------------------------------------------------------------------


def test_retain_uids_K_keeps_instance_uids():
    """retain_uids: U → K for Study/Series/SOP Instance and Frame of Reference UIDs."""
    ds = load()
    originals = {k: ds[k].value for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                           "FrameOfReferenceUID")}
    record = deid("retain_uids").apply(ds)
    for keyword, value in originals.items():
        assert ds[keyword].value == value, keyword
    assert ds.file_meta.MediaStorageSOPInstanceUID == originals["SOPInstanceUID"]
    assert record.pseudo_study_instance_uid == originals["StudyInstanceUID"]


def test_basic_U_replaces_instance_uids():
    """Basic Profile: Study/Series/SOP Instance and Frame of Reference UIDs get U (2.25 UIDs)."""
    ds = load()
    originals = {k: ds[k].value for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                           "FrameOfReferenceUID")}
    record = deid().apply(ds)
    for keyword, value in originals.items():
        assert ds[keyword].value.startswith("2.25.") and ds[keyword].value != value, keyword
    assert record.pseudo_sop_instance_uid == ds.SOPInstanceUID
    assert record.pseudo_study_instance_uid == ds.StudyInstanceUID
    assert record.pseudo_series_instance_uid == ds.SeriesInstanceUID


def test_retain_long_full_dates_K_keeps_dates():
    """retain_long_full_dates: StudyDate (Z), ContentDate (Z/D), AcquisitionDateTime (X/Z/D) → K."""
    ds = load()
    ds.AcquisitionDateTime = "19970430112936"
    deid("retain_long_full_dates").apply(ds)
    assert ds.StudyDate == "20040119" and ds.ContentDate == "19970430" and ds.SeriesDate == "19970430"
    assert ds.AcquisitionDateTime == "19970430112936"
    assert ds.StudyTime == "072730"


def test_basic_dates_Z_and_D():
    """Basic Profile: StudyDate Z → empty, SeriesDate X/D → dummy, AcquisitionDate X/Z → empty."""
    ds = load()
    deid().apply(ds)
    assert is_empty(ds.StudyDate)
    assert ds.SeriesDate not in ("", "19970430")
    assert is_empty(ds.AcquisitionDate)


def dated(patient_id: str, study_date: str, acquisition_dt: str) -> FileDataset:
    ds = load()
    ds.PatientID = patient_id
    ds.StudyDate = study_date
    ds.AcquisitionDateTime = acquisition_dt
    ds.StudyInstanceUID = uid(int(study_date), "1.2.826.0.1.3680043.10.545")
    return ds


def as_date(text: str) -> datetime.date:
    return datetime.datetime.strptime(text[:8], "%Y%m%d").date()


def test_retain_long_modified_dates_C_same_offset_per_patient():
    """retain_long_modified_dates: dates shifted by one per-patient offset, intervals hold, DT time kept."""
    engine = deid("retain_long_modified_dates")
    first, second = dated("PAT-1", "20200101", "20200101123456.250000"), dated("PAT-1", "20200315", "20200316")
    engine.apply(first)
    engine.apply(second)
    shift1 = (as_date(first.StudyDate) - datetime.date(2020, 1, 1)).days
    shift2 = (as_date(second.StudyDate) - datetime.date(2020, 3, 15)).days
    assert shift1 == shift2 != 0 and -3650 <= shift1 <= -1
    assert (as_date(second.StudyDate) - as_date(first.StudyDate)).days == 74
    assert first.AcquisitionDateTime[8:] == "123456.250000"
    assert (as_date(first.AcquisitionDateTime) - datetime.date(2020, 1, 1)).days == shift1
    assert (as_date(second.AcquisitionDateTime) - datetime.date(2020, 3, 16)).days == shift1
    assert first.StudyTime == "072730"  # times are not shifted by a whole-day offset
    assert first.LongitudinalTemporalInformationModified == "MODIFIED"


def test_retain_long_modified_dates_offset_differs_between_patients():
    """retain_long_modified_dates: another patient (under this key) gets another offset."""
    engine = deid("retain_long_modified_dates")
    shifts = set()
    for index in range(4):
        ds = dated(f"PAT-{index}", "20200101", "20200101")
        engine.apply(ds)
        shifts.add((as_date(ds.StudyDate) - datetime.date(2020, 1, 1)).days)
    assert len(shifts) > 1


def test_retain_device_identity_K():
    """retain_device_identity: DeviceSerialNumber and StationName (X/Z/D) → K; without it they're replaced."""
    ds = load()
    ds.DeviceSerialNumber = "SN-8812-XQ"
    deid("retain_device_identity").apply(ds)
    assert ds.DeviceSerialNumber == "SN-8812-XQ" and ds.StationName == "CT01_OC0"
    ds = load()
    ds.DeviceSerialNumber = "SN-8812-XQ"
    deid().apply(ds)
    assert ds.get("DeviceSerialNumber") != "SN-8812-XQ" and ds.get("StationName") != "CT01_OC0"


def test_retain_patient_characteristics_K():
    """retain_patient_characteristics: PatientSex (Z) and PatientAge (X) → K."""
    ds = load()
    deid("retain_patient_characteristics").apply(ds)
    assert ds.PatientSex == "O" and ds.PatientAge == "000Y"
    ds = load()
    deid().apply(ds)
    assert is_empty(ds.PatientSex) and "PatientAge" not in ds


def test_clean_descriptors_C_study_description():
    """clean_descriptors: StudyDescription (X → C) keeps its words but loses the patient's name."""
    ds = phi_dataset()
    deid("clean_descriptors").apply(ds)
    assert "SMITHERSON" not in ds.StudyDescription.upper()
    assert ds.StudyDescription.split() == ["CT", "CHEST", "FOR"]
    ds = phi_dataset()
    deid().apply(ds)
    assert "StudyDescription" not in ds


def test_retain_institution_identity_K():
    """retain_institution_identity: InstitutionName (X/Z/D) → K."""
    ds = load()
    deid("retain_institution_identity").apply(ds)
    assert ds.InstitutionName == "JFK IMAGING CENTER"


def test_date_options_exclusive():
    """retain_long_full_dates and retain_long_modified_dates together: ValueError."""
    with pytest.raises(ValueError):
        deid("retain_long_full_dates", "retain_long_modified_dates")


def test_unknown_option_rejected():
    """An option that isn't a Table E.1-1 column: ValueError."""
    with pytest.raises(ValueError):
        deid("retain_everything")


def test_missing_study_uid_is_deid_error():
    """Without Study Instance UID the engine refuses (DeidError), with no PHI in the message."""
    ds = load()
    del ds.StudyInstanceUID
    with pytest.raises(DeidError) as info:
        deid().apply(ds)
    assert "CompressedSamples" not in str(info.value) and "1CT1" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# 4. attributes the profile adds; 5. file meta
# ---------------------------------------------------------------------------------------------


def codes(ds: Dataset) -> list[str]:
    return [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]


def test_patient_identity_removed_and_basic_code():
    """PatientIdentityRemoved YES; method codes [113100] (DCM) for the Basic Profile; REMOVED dates."""
    ds = load()
    record = deid().apply(ds)
    assert ds.PatientIdentityRemoved == "YES"
    assert codes(ds) == ["113100"] and record.method_codes == ("113100",)
    assert all(item.CodingSchemeDesignator == "DCM" for item in ds.DeidentificationMethodCodeSequence)
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"


@pytest.mark.parametrize("option,code,longitudinal", [
    ("retain_uids", "113110", "REMOVED"),
    ("retain_safe_private", "113111", "REMOVED"),
    ("retain_device_identity", "113109", "REMOVED"),
    ("retain_institution_identity", "113112", "REMOVED"),
    ("retain_patient_characteristics", "113108", "REMOVED"),
    ("clean_descriptors", "113105", "REMOVED"),
    ("retain_long_full_dates", "113106", "UNMODIFIED"),
    ("retain_long_modified_dates", "113107", "MODIFIED"),
])
def test_option_method_code_and_longitudinal_flag(option, code, longitudinal):
    """Each claimed option adds its CID 7050 code after 113100; the temporal flag follows the date option."""
    ds = load()
    deid(option).apply(ds)
    assert codes(ds) == ["113100", code]
    assert ds.LongitudinalTemporalInformationModified == longitudinal


def test_file_meta_follows_new_sop_instance_uid():
    """File meta: MediaStorageSOPInstanceUID (U) = new SOPInstanceUID; SourceApplicationEntityTitle gone."""
    ds = load()
    original = ds.SOPInstanceUID
    assert ds.file_meta.SourceApplicationEntityTitle == "CLUNIE1"
    deid().apply(ds)
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID != original
    assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
    assert "SourceApplicationEntityTitle" not in ds.file_meta
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    reread = dcmread(io.BytesIO(saved_bytes(ds)))
    assert reread.file_meta.MediaStorageSOPInstanceUID == reread.SOPInstanceUID


# ---------------------------------------------------------------------------------------------
# 6. pixels, references, determinism, well-known UIDs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm",
                                  "SC_rgb_jpeg_dcmtk.dcm", "MR_small_implicit.dcm"])
def test_pixel_data_byte_identical(name):
    """Pixel Data (not in Table E.1-1) is kept byte for byte, native or encapsulated, through a write."""
    ds = load(name)
    pixels, syntax = ds.PixelData, ds.file_meta.TransferSyntaxUID
    deid().apply(ds)
    assert ds.PixelData == pixels
    reread = dcmread(io.BytesIO(saved_bytes(ds)))
    assert reread.PixelData == pixels and reread.file_meta.TransferSyntaxUID == syntax


def test_referenced_sop_instance_uid_U_matches_referenced_dataset():
    """U is consistent: ReferencedSOPInstanceUID in ReferencedImageSequence (X/Z/U*) → target's new UID."""
    engine = deid()
    first, second = load(), load()
    second.SOPInstanceUID = uid(2, "1.2.826.0.1.3680043.10.546")
    second.file_meta.MediaStorageSOPInstanceUID = second.SOPInstanceUID
    ref = Dataset()
    ref.ReferencedSOPClassUID = first.SOPClassUID
    ref.ReferencedSOPInstanceUID = first.SOPInstanceUID
    second.ReferencedImageSequence = Sequence([ref])
    engine.apply(first)
    engine.apply(second)
    assert len(second.ReferencedImageSequence) == 1
    assert second.ReferencedImageSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert second.ReferencedImageSequence[0].ReferencedSOPClassUID == CTImageStorage
    assert first.FrameOfReferenceUID == second.FrameOfReferenceUID
    assert first.StudyInstanceUID == second.StudyInstanceUID
    assert first.SOPInstanceUID != second.SOPInstanceUID


def test_source_image_sequence_X_Z_U_star_remapped():
    """(0008,2112) Source Image Sequence, X/Z/U*: items kept, instance UID remapped, class UID kept."""
    ds, other = load(), load("MR_small.dcm")
    ref = Dataset()
    ref.ReferencedSOPClassUID = MRImageStorage
    ref.ReferencedSOPInstanceUID = other.SOPInstanceUID
    ds.SourceImageSequence = Sequence([ref])
    engine = deid()
    engine.apply(ds)
    engine.apply(other)
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == other.SOPInstanceUID
    assert ds.SourceImageSequence[0].ReferencedSOPClassUID == MRImageStorage


def pseudonyms_of(key: bytes) -> tuple:
    ds = phi_dataset()
    record = deid(key=key).apply(ds)
    return (ds.PatientID, str(ds.PatientName), ds.AccessionNumber, ds.StudyInstanceUID, ds.SeriesInstanceUID,
            ds.SOPInstanceUID, ds.FrameOfReferenceUID, record.pseudo_patient_id)


def test_pseudonyms_deterministic_per_key():
    """Same key → identical pseudonyms (D/U/Z identity values); another key → all different."""
    first, again, other = pseudonyms_of(KEY), pseudonyms_of(KEY), pseudonyms_of(b"q" * 32)
    assert first == again
    assert all(a != b for a, b in zip(first, other))
    assert first[0].startswith(f"{ORG}-") and str(first[1]) == first[0]
    assert len(first[2]) == 16


def test_well_known_uids_untouched():
    """SOPClassUID, ReferencedSOPClassUID, TransferSyntaxUID and other standard UIDs are never remapped."""
    ds = load()
    ref = Dataset()
    ref.ReferencedSOPClassUID = MRImageStorage
    ref.ReferencedSOPInstanceUID = uid(7)
    ds.ReferencedImageSequence = Sequence([ref])
    code = Dataset()
    code.CodeValue = "P1"
    code.CodingSchemeUID = "2.16.840.1.113883.6.96"  # SNOMED CT, a definition UID
    ds.PerformedProtocolCodeSequence = Sequence([code])
    syntax = ds.file_meta.TransferSyntaxUID
    deid().apply(ds)
    assert ds.SOPClassUID == CTImageStorage and ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
    assert ds.ReferencedImageSequence[0].ReferencedSOPClassUID == MRImageStorage
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID.startswith("2.25.")
    assert ds.PerformedProtocolCodeSequence[0].CodingSchemeUID == "2.16.840.1.113883.6.96"
    assert ds.file_meta.TransferSyntaxUID == syntax


def test_untabled_sequence_instance_uid_remapped():
    """Inside a sequence outside Table E.1-1 (0008,1199), the instance UID still gets U; the class UID stays."""
    assert "00081199" not in PS315["tags"]
    ds = load()
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = uid(9)
    ds.ReferencedSOPSequence = Sequence([item])
    record = deid().apply(ds)
    new = ds.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    assert new.startswith("2.25.") and record.uid_map[uid(9)] == new
    assert ds.ReferencedSOPSequence[0].ReferencedSOPClassUID == CTImageStorage


def sr_dataset(text: str) -> FileDataset:
    """CT_small with an SR-like Content Sequence: a TEXT item, a person and a date, and a NUM item."""
    ds = load()
    ds.PatientName = "SMITHERSON^JOHANNA"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "121071", "DCM", "Finding"
    text_item = Dataset()
    text_item.ValueType = "TEXT"
    text_item.ConceptNameCodeSequence = Sequence([concept])
    text_item.TextValue = text
    text_item.PersonName = "WATSON^JOHN"
    text_item.Date = "20200101"
    measured = Dataset()
    measured.NumericValue = "12"
    num_item = Dataset()
    num_item.ValueType = "NUM"
    num_item.MeasuredValueSequence = Sequence([measured])
    ds.ContentSequence = Sequence([text_item, num_item])
    return ds


def test_content_sequence_D_dummies_text_keeps_structure():
    """(0040,A730) Content Sequence D: items kept, Text Value and Person Name (D) dummied, codes/numbers kept."""
    ds = sr_dataset("Seen for SMITHERSON, lesion 12 mm")
    deid().apply(ds)
    text_item, num_item = ds.ContentSequence
    assert text_item.TextValue not in ("", "Seen for SMITHERSON, lesion 12 mm")
    assert str(text_item.PersonName) not in ("", "WATSON^JOHN")
    assert text_item.Date not in ("", "20200101")
    assert text_item.ValueType == "TEXT" and text_item.ConceptNameCodeSequence[0].CodeValue == "121071"
    assert num_item.MeasuredValueSequence[0].NumericValue == 12


def test_clean_structured_content_C_cleans_sr_text():
    """clean_structured_content (C on Content Sequence): text loses the names, keeps the findings."""
    ds = sr_dataset("Seen for SMITHERSON by Dr WATSON, lesion 12 mm")
    deid("clean_structured_content").apply(ds)
    text_item = ds.ContentSequence[0]
    assert "SMITHERSON" not in text_item.TextValue.upper() and "WATSON" not in text_item.TextValue.upper()
    assert "lesion 12 mm" in text_item.TextValue
    assert str(text_item.PersonName) not in ("", "WATSON^JOHN")
    assert text_item.ConceptNameCodeSequence[0].CodeValue == "121071"


def test_retain_patient_characteristics_C_cleans_not_empties():
    """retain_patient_characteristics: Pre-Medication and Special Needs (X → C) keep non-identifying text."""
    ds = load()
    ds.PreMedication = "ASPIRIN 100MG"
    ds.SpecialNeeds = "WHEELCHAIR"
    deid("retain_patient_characteristics").apply(ds)
    assert ds.PreMedication == "ASPIRIN 100MG" and ds.SpecialNeeds == "WHEELCHAIR"


def test_retain_long_modified_dates_C_keeps_empty_date_empty():
    """retain_long_modified_dates: an empty Type 2 date (Acquisition Date) stays empty, not 19000101."""
    ds = load()
    ds.AcquisitionDate = ""
    deid("retain_long_modified_dates").apply(ds)
    assert is_empty(ds.AcquisitionDate)


# ---------------------------------------------------------------------------------------------
# 7. nothing identifying in the written bytes
# ---------------------------------------------------------------------------------------------


def test_no_original_identifier_in_output_bytes():
    """After the Basic Profile, no PHI value or original UID occurs anywhere in the Part 10 bytes."""
    ds = phi_dataset()
    ds.file_meta.SourceApplicationEntityTitle = "CT_MODALITY"
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = uid(11, "1.2.826.0.1.3680043.10.547")
    ds.ReferencedImageSequence = Sequence([ref])
    forbidden = ["SMITHERSON", "JOHANNA", "MRN-4417-2291", "4417-2291", "SAINT-ELSEWHERE", "19561103",
                 "ACC99887766", "Saint Elsewhere", "HOUSE^GREGORY", "GREGORY", "OLDMRN-0077", "CT_MODALITY",
                 "CLUNIE1", "JFK IMAGING", "CT01_OC0",
                 ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID,
                 ref.ReferencedSOPInstanceUID, ds.InstanceCreatorUID]
    deid().apply(ds)
    data = saved_bytes(ds)
    leaked = [value for value in forbidden if value.encode("latin-1") in data]
    assert not leaked, f"original values in output: {leaked}"
    reread = dcmread(io.BytesIO(data))
    assert reread.PatientIdentityRemoved == "YES"
