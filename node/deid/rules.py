"""The PS3.15 Annex E rule engine: Table E.1-1 actions and options, applied recursively.

The rules come from `ps315.json`, generated from the standard's table by
`scripts/gen_ps315.py` and loaded once per process. `Deidentifier.apply`
walks a pydicom dataset in place: every element of the table gets its action
(D, Z, X, K, C, U and the combined codes, the option's action replacing the
Basic one when the option is claimed), inside every sequence item too; the
mask rows (curves 50xx, overlay data and comments 60xx) and private groups
are handled by mask; attributes not in the table are kept, except that any
instance UID they hold is remapped so that references stay consistent.
Large values (pixel data) are never decoded: an element is only read when
its action needs its value.

How the combined codes are resolved (no IOD type information is consulted,
so the conformant choice is taken): X/Z → Z, X/D, Z/D and X/Z/D → D. On a
sequence: K keeps the items and applies the table inside them; D (and X/D,
Z/D) does the same and also replaces the free text the table does not list
(SR Text Value, comments: LT, ST, UT, UC, PN) with a dummy, so the structure,
codes and measurements stay; C (an option's clean) does the same but cleans
that text of identifying values instead; Z, X/Z and X/Z/D empty it; X/Z/U*
keeps the items so that their UIDs are remapped (U) inside them.
Overlay data removed (X) takes its whole overlay group with it.
"""

from __future__ import annotations

import copy
import datetime
import json
import re
from functools import lru_cache
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Iterable, Sequence

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID_dictionary

from node import __version__
from node.deid.guard import identity_matcher, needle_strings, needles
from node.deid.variants import PERSON_NAME, Identity
from node.deid.pseudonyms import Pseudonymizer, patient_key
from node.deid.record import DeidRecord

TABLE: dict[str, Any] = json.loads(resources.files("node.deid").joinpath("ps315.json").read_text())
#: Known-safe technical attributes (scripts/gen_safe_attributes.py): all that `unlisted = "remove"` keeps.
SAFE_ATTRIBUTES: frozenset[str] = frozenset(
    entry["tag"].upper() for entry in
    json.loads(resources.files("node.deid").joinpath("safe_attributes.json").read_text())["attributes"])
UNLISTED_POLICIES = ("keep", "remove")

#: Table E.1-1 option columns, plus Clean Pixel Data (E.3.1), which acts on pixels (node/deid/pixels.py).
TABLE_OPTIONS: tuple[str, ...] = tuple(TABLE["options"])
SUPPORTED_OPTIONS: tuple[str, ...] = TABLE_OPTIONS + ("clean_pixel_data",)

#: When claimed options give a row different actions, the most retaining one wins.
OPTION_PRECEDENCE = ("K", "C", "U", "D", "Z/D", "X/Z/U*", "Z", "X/D", "X/Z/D", "X/Z", "X")

#: Combined codes on a non-sequence element → the action taken (see module docstring).
COMBINED = {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "X/Z/U*": "U"}
#: …and on a sequence: dummy the items' free text ("D"), keep and clean them ("K"), or empty it ("Z").
COMBINED_SQ = {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "Z", "X/Z/U*": "K", "U": "K"}

TEXT = "ANONYMIZED"
#: D: a non-zero-length dummy valid for the VR (UI is remapped instead).
DUMMY: dict[str, Any] = {
    "AE": TEXT, "AS": "000D", "CS": TEXT, "DA": "19000101", "DS": "0", "DT": "19000101000000",
    "IS": "0", "LO": TEXT, "LT": TEXT, "PN": TEXT, "SH": TEXT, "ST": TEXT, "TM": "000000",
    "UC": TEXT, "UR": "urn:anonymized", "UT": TEXT,
    "FL": 0.0, "FD": 0.0, "SL": 0, "SS": 0, "UL": 0, "US": 0, "SV": 0, "UV": 0, "AT": 0,
}
BINARY_DUMMY = b"\x00" * 8  # OB, OW, OD, OF, OL, OV, UN: 8 bytes fit every width

TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "SH", "ST", "UC", "UT", "UR"})
#: Free text inside D / C sequences (SR TextValue, comments): replaced or cleaned with the sequence.
#: LO and SH stay: inside content items they are codes and labels, not prose.
FREE_TEXT_VRS = frozenset({"LT", "ST", "UT", "UC", "PN"})
#: VRs of values kept on purpose that the leak guard then excuses elsewhere.
RETAINED_VRS = frozenset({"DA", "DT"}) | TEXT_VRS
#: VRs C knows how to clean; other values keep their dictionary VR's meaning (numbers, binary data).
CLEANABLE_VRS = frozenset({"PN", "DA", "DT", "UI", "SQ", "TM", "AS"}) | TEXT_VRS
#: VRs whose removed originals the leak guard searches for (see guard.py).
NEEDLE_VRS = frozenset({"PN", "DA", "DT", "UI"}) | TEXT_VRS

#: UI attributes outside the table that name definitions (classes, syntaxes,
#: coding schemes), not instances: never remapped.
DEFINITION_UID = re.compile(r"SOPClass|TransferSyntax|ImplementationClass|CodingScheme|CreatorUID|"
                            r"ContextUID|MappingResource|CreatorVersion|TemplateUID")

#: Equipment attributes the table keeps: their values are expected in the output.
VENDOR_TAGS = frozenset({0x00080070, 0x00081090, 0x00181020, 0x00181016, 0x00181018, 0x00181019})

CONTEXT_GROUP_UID = re.compile(r"1\.2\.840\.10008\.6\.1\.\d{1,5}")

#: Sequences whose items *are* identifiers (a person's or an institution's codes): a D on them
#: dummies every value of their items, codes included, not just their free text.
IDENTIFIER_SEQUENCE = re.compile(r"Identification|InstitutionCode|HumanPerformer|IssuerOf|OtherPatientIDs")
#: Overlay Description (60xx,0022), Overlay Label (60xx,1500), Curve Description and Label (50xx,0022 and
#: 50xx,2500): free text about the graphics, cleaned (C) whatever the options (the table does not list them).
GRAPHICS_TEXT = frozenset({(0x6000, 0x0022), (0x6000, 0x1500), (0x5000, 0x0022), (0x5000, 0x2500)})
#: File meta elements kept (the rest, e.g. RTV Communication SOP Instance UID, go): PS3.10 7.1 required ones.
META_KEEP = frozenset({0x00020000, 0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013})
#: A dotted number long enough to be a UID, inside any text (Referenced File ID, comments, CS).
UID_IN_TEXT = re.compile(r"(?<![\d.])[0-2](?:\.\d+){3,}(?![\d.])")

SCHEME_TAGS = frozenset({0x00080102, 0x00080103})  # Coding Scheme Designator and Version

PATIENT_ID = 0x00100020
PATIENT_NAME = 0x00100010
ACCESSION_NUMBER = 0x00080050



class DeidError(Exception):
    """The dataset cannot be de-identified with certainty; the message carries no PHI."""


def is_well_known_uid(value: str) -> bool:
    """SOP classes, transfer syntaxes, coding schemes and other UIDs the standard itself defines.

    Only a UID the standard defines (pydicom's UID dictionary, and the context group UIDs of
    PS3.6 Table A-3) is well-known: an instance UID a device minted under 1.2.840.10008 is remapped.
    """
    return value in UID_dictionary or bool(CONTEXT_GROUP_UID.fullmatch(value))


def resolve(rule: dict[str, Any], options: frozenset[str]) -> str:
    """The action for one row: the claimed options' actions replace the Basic one."""
    claimed = [action for option, action in rule["options"].items() if option in options]
    if not claimed:
        return rule["basic"]
    return min(claimed, key=OPTION_PRECEDENCE.index)


@dataclass
class _Context:
    """What one dataset's walk needs: the pseudonymizer, the originals, what was remapped."""

    pseudonyms: Pseudonymizer
    record: DeidRecord
    keep_uids: bool
    shift_days: int | None
    identifiers: list[str] = field(default_factory=list)
    to_clean: list[DataElement] = field(default_factory=list)
    kept_text: list[DataElement] = field(default_factory=list)
    remap: Any = None  # original UID → pseudonym (Deidentifier._uid bound to this context)

    def remap_quoted_uids(self, text: str) -> str:
        """Original UIDs quoted in text (Referenced File ID, comments) get their pseudonyms."""
        def replace(match: re.Match[str]) -> str:
            uid = match.group()
            known = uid in self.record.uid_map
            return self.remap(uid) if known or (len(uid) >= 16 and not is_well_known_uid(uid)) else uid

        return text if self.keep_uids else UID_IN_TEXT.sub(replace, text)

    def tidy_kept_text(self) -> None:
        """Text the table does not list is kept, but not the identity in it: quoted original UIDs
        get their pseudonyms, and every spelling of the instance's identifying values
        (variants.py) is removed; in code strings, whole names only."""
        if not self.kept_text:
            return
        matcher = identity_matcher(self.record)
        for elem in self.kept_text:
            kinds = (PERSON_NAME,) if elem.VR == "CS" else None

            def tidy(text: str, kinds: tuple[str, ...] | None = kinds) -> str:
                return matcher.remove(self.remap_quoted_uids(text), kinds)

            if isinstance(elem.value, bytes):  # UN: searched by the guard as Latin-1, so tidied as such
                text = elem.value.decode("latin-1")
                tidied = tidy(text)
                if tidied != text:
                    data = tidied.encode("latin-1", "replace")
                    elem.value = data + b" " * (len(data) % 2)
            elif isinstance(elem.value, (MultiValue, list)):
                values = [tidy(str(v)) for v in elem.value]
                if values != [str(v) for v in elem.value]:  # untouched values keep their exact form
                    elem.value = values
            elif (tidied := tidy(str(elem.value))) != str(elem.value):
                elem.value = tidied

    def clean_text(self) -> None:
        """C on text: remove the patient's identifiers and every identifying value the walk
        removed anywhere in the dataset (observer names, organizations, IDs), keep the rest."""
        if not self.to_clean:
            return
        found = needles(self.record.removed_values)
        words = {w.upper() for w in self.identifiers if len(w) >= 2} | {n for n, k in found.items() if k != "UID"}
        pattern = _words_pattern(frozenset(words)) if words else None
        matcher = identity_matcher(self.record)  # every spelling of them (variants.py), as the guard searches

        def clean(text: str) -> str:
            text = pattern.sub("", text).strip() if pattern is not None else text
            return matcher.remove(self.remap_quoted_uids(text))

        for elem in self.to_clean:
            if isinstance(elem.value, (MultiValue, list)):
                elem.value = [clean(str(v)) for v in elem.value]
            else:
                elem.value = clean(str(elem.value))


class Deidentifier:
    """Applies the Basic Profile with the claimed options; one per process, thread-safe."""

    def __init__(self, pseudonyms: Pseudonymizer, options: Iterable[str] = (),
                 overrides: Iterable[tuple[int, str, Any]] = (), unlisted: str = "keep") -> None:
        if unlisted not in UNLISTED_POLICIES:
            raise ValueError(f"unlisted must be one of {', '.join(UNLISTED_POLICIES)}")
        self.remove_unlisted = unlisted == "remove"
        self.options = frozenset(options)
        unknown = self.options - set(SUPPORTED_OPTIONS)
        if unknown:
            raise ValueError(f"unsupported option(s): {', '.join(sorted(unknown))}")
        if {"retain_long_full_dates", "retain_long_modified_dates"} <= self.options:
            raise ValueError("retain_long_full_dates and retain_long_modified_dates exclude each other")
        self.pseudonyms = pseudonyms
        self.actions: dict[int, str] = {int(tag, 16): resolve(rule, self.options) for tag, rule in TABLE["tags"].items()}
        self.masks = [
            (int(m["group_mask"], 16), int(m["group"], 16), int(m["element_mask"], 16), int(m["element"], 16),
             resolve(m, self.options))
            for m in TABLE["masks"]
        ]
        self.private_action = resolve(TABLE["private"], self.options)
        self.safe_private = {(creator, int(group, 16), int(low, 16)) for creator, group, low in TABLE["safe_private"]}
        # Claimed options in table order: the codes written to DeidentificationMethodCodeSequence.
        self.applied = [TABLE["basic_profile"]] + [TABLE["options"][o] for o in TABLE_OPTIONS if o in self.options]
        # Rows with a Clean Descriptors column describe rather than identify: not leak-guard needles.
        self.descriptors = {int(tag, 16) for tag, rule in TABLE["tags"].items() if "clean_descriptors" in rule["options"]}
        self.overrides = tuple(overrides)

    # -- public ---------------------------------------------------------------------------------

    def apply(self, ds: FileDataset, extra_codes: Sequence[dict[str, str]] = ()) -> DeidRecord:
        """De-identify `ds` in place and return the original ↔ pseudonym record.

        `extra_codes` are further CID 7050 codes to declare (Clean Pixel Data when pixels were cleaned).
        """
        record = self._originals(ds)
        key = patient_key(record.patient_id, record.issuer_of_patient_id, record.patient_name,
                          record.patient_birth_date, record.study_instance_uid)
        record.pseudo_patient_id = self.pseudonyms.patient_id(key)
        record.pseudo_patient_name = self.pseudonyms.patient_name(key)
        record.pseudo_accession_number = self.pseudonyms.accession(record.accession_number) if record.accession_number else ""
        ctx = _Context(
            pseudonyms=self.pseudonyms,
            record=record,
            keep_uids="retain_uids" in self.options,
            shift_days=self.pseudonyms.date_offset_days(key) if "retain_long_modified_dates" in self.options else None,
            identifiers=_identifiers(ds),
        )
        ctx.remap = lambda uid: self._uid(uid, ctx)
        # copies: the walk changes elements in place, and "keep" means the value as it came
        kept_by_override = {tag: copy.deepcopy(ds[tag]) for tag, action, _ in self.overrides
                            if action == "keep" and tag in ds}
        self._walk(ds, ctx)
        ctx.tidy_kept_text()
        ctx.clean_text()
        # Type 2 in every composite IOD: present even if the sender left them out.
        ds.PatientID = record.pseudo_patient_id
        ds.PatientName = record.pseudo_patient_name
        record.pseudo_study_instance_uid = self._uid(record.study_instance_uid, ctx)
        record.pseudo_series_instance_uid = self._uid(record.series_instance_uid, ctx)
        record.pseudo_sop_instance_uid = self._uid(record.sop_instance_uid, ctx)
        record.overrides = self._override(ds, kept_by_override, record)
        applied = self.applied + list(extra_codes)
        self._mark(ds, applied)
        self._file_meta(ds)
        record.method_codes = tuple(code["code"] for code in applied)
        return record

    def identity_of(self, ds: Dataset) -> Identity:
        """The identifying values of an original instance, top level, before any walk: what OCR
        looks for in its pixels (the same rows the leak guard takes its needles from)."""
        values: list[tuple[int, str, str]] = []
        for tag in ds.keys():
            action = self._action(tag)
            if action in (None, "K") or tag >> 16 & 1 or tag in self.descriptors:
                continue
            vr = _vr(ds, tag)
            if vr in ("PN", "DA", "DT") or vr in TEXT_VRS:
                values.extend((int(tag), vr, text) for text in needle_strings(ds[tag].value) if text)
        return Identity(tuple(values))

    # -- the walk -------------------------------------------------------------------------------

    def _walk(self, ds: Dataset, ctx: _Context, mode: str = "") -> None:
        """Apply the table to every element of `ds`; `mode` is "dummy" inside a D sequence, "clean" inside C."""
        self._private(ds)
        self._walk_private(ds, ctx, mode)
        for tag in list(ds.keys()):
            if tag & 0xFFFF == 0 or tag >> 16 & 1:  # group lengths go (recomputed); private done above
                if tag & 0xFFFF == 0:
                    del ds[tag]
                continue
            if tag not in ds:  # went with its overlay group
                continue
            action = self._action(tag)
            if action is None:
                self._untabled(ds, tag, ctx, mode)
            else:
                self._act(ds, tag, action, ctx, mode)

    def _action(self, tag: int) -> str | None:
        action = self.actions.get(tag)
        if action is not None:
            return action
        group, element = tag >> 16, tag & 0xFFFF
        for group_mask, group_value, element_mask, element_value, mask_action in self.masks:
            if group & group_mask == group_value and element & element_mask == element_value:
                return mask_action
        if (group & 0xFF00, element) in GRAPHICS_TEXT and group & 1 == 0:
            return "C"
        return None

    def _private(self, ds: Dataset) -> None:
        """Private groups: X under the Basic Profile; C (keep only Table E.3.10-1) with Retain Safe Private."""
        private = [tag for tag in ds.keys() if tag >> 16 & 1]
        if not private or self.private_action == "K":
            return
        keep: set[int] = set()
        if self.private_action == "C":
            for tag in private:
                group, element = tag >> 16, tag & 0xFFFF
                if element >= 0x1000 and self._is_safe(ds, group, element):
                    keep.update((tag, (group << 16) | (element >> 8)))  # the element and its creator
        for tag in private:
            if tag not in keep:
                del ds[tag]

    def _walk_private(self, ds: Dataset, ctx: _Context, mode: str) -> None:
        """Retained private elements: a sequence's items get the table's rules like any other,
        text (and UN, as Latin-1) loses the instance's identity like untabled text."""
        for tag in [t for t in ds.keys() if t >> 16 & 1 and t & 0xFF00]:
            elem = ds[tag]
            if elem.VR == "SQ":
                for item in elem.value or []:
                    self._walk(item, ctx, mode)
            elif elem.VR in TEXT_VRS | {"PN", "UN"} and elem.value not in (None, "", b""):
                ctx.kept_text.append(elem)

    def _is_safe(self, ds: Dataset, group: int, element: int) -> bool:
        """Table E.3.10-1 match by private creator, group and element low byte, never by block."""
        creator = ds.get((group << 16) | (element >> 8))
        name = str(creator.value).strip() if creator is not None and creator.value else ""
        return (name, group, element & 0xFF) in self.safe_private

    def _untabled(self, ds: Dataset, tag: int, ctx: _Context, mode: str) -> None:
        """Not in Table E.1-1: kept, but instance UIDs are remapped, sequences walked, and free text
        inside a D (dummy) or C (clean) sequence replaced or cleaned like the sequence itself."""
        if self.remove_unlisted and not _is_safe_attribute(tag):
            del ds[tag]  # strict allow-list: neither in the table nor known to be a safe technical attribute
            return
        vr = _vr(ds, tag)
        if vr == "SQ":
            for item in ds[tag].value:
                self._walk(item, ctx, mode)
        elif vr == "UI" and not ctx.keep_uids and not DEFINITION_UID.search(keyword_for_tag(tag) or ""):
            self._remap(ds[tag], ctx)
        elif mode == "identifier" and vr in TEXT_VRS | {"PN"} and ds[tag].value not in (None, ""):
            if tag not in SCHEME_TAGS:  # "DCM", "99LOCAL": a scheme's name, not the person's
                self._note(ctx, tag, vr, ds[tag].value)
            ds[tag].value = DUMMY[vr]
        elif tag in VENDOR_TAGS:
            # Kept by the table; test and phantom data often name the vendor as the institution
            # ("SIEMENS"): the same word removed from InstitutionName is then no leak here.
            ctx.record.retained_values.update(needle_strings(ds[tag].value))
        elif mode and vr in FREE_TEXT_VRS and ds[tag].value not in (None, ""):
            if mode == "dummy":
                self._note(ctx, tag, vr, ds[tag].value)
                ds[tag].value = DUMMY[vr]
            else:
                self._clean(ds[tag], vr, ctx)
        elif vr in TEXT_VRS | {"PN"} and ds[tag].value not in (None, ""):
            ctx.kept_text.append(ds[tag])  # searched once every identifying value and UID is known

    def _act(self, ds: Dataset, tag: int, action: str, ctx: _Context, mode: str) -> None:
        vr = _vr(ds, tag)
        action = (COMBINED_SQ if vr == "SQ" else COMBINED).get(action, action)
        if action != "K" and vr in NEEDLE_VRS and (action != "C" or vr in ("PN", "DA", "DT", "UI")):
            self._note(ctx, tag, vr, ds[tag].value)  # C keeps cleaned text: not a needle itself
        if action == "X":
            self._remove(ds, tag)
        elif action == "K":
            if vr == "SQ":
                for item in ds[tag].value:
                    self._walk(item, ctx, mode)
            elif vr in RETAINED_VRS:
                ctx.record.retained_values.update(needle_strings(ds[tag].value))
        elif tag in (PATIENT_ID, PATIENT_NAME, ACCESSION_NUMBER):
            self._identity(ds[tag], ctx)
        elif action == "Z":
            ds[tag].value = [] if vr == "SQ" else None
        elif action == "D":
            if vr == "SQ":
                mode = "identifier" if IDENTIFIER_SEQUENCE.search(keyword_for_tag(tag) or "") else "dummy"
                for item in ds[tag].value:
                    self._walk(item, ctx, mode)
            else:
                self._dummy(ds[tag], vr, ctx)
        elif action == "U":
            self._remap(ds[tag], ctx)
        elif action == "C":
            if vr == "SQ":
                for item in ds[tag].value:
                    self._walk(item, ctx, "clean")
            elif tag >> 16 & 0xFF00 == 0x6000 and tag & 0xFFFF == 0x3000:
                self._clean_overlay(ds, tag)
            elif vr not in CLEANABLE_VRS and vr != _dictionary_vr(tag):
                del ds[tag]  # C on a value that is not text (UN, a wrong VR): nothing to clean it by
            else:
                self._clean(ds[tag], vr, ctx)
        else:
            raise DeidError(f"no rule for action {action} on ({tag >> 16:04X},{tag & 0xFFFF:04X})")

    def _note(self, ctx: _Context, tag: int, vr: str, value: Any) -> None:
        """Remember an identifying original for the leak guard (descriptors are not identifying)."""
        if vr in ("PN", "DA", "DT", "UI") or tag not in self.descriptors:
            ctx.record.removed_values.append((vr, value))
            ctx.record.identity.append((tag, vr, value))

    # -- actions --------------------------------------------------------------------------------

    @staticmethod
    def _remove(ds: Dataset, tag: int) -> None:
        """X. Overlay data (60xx,3000) takes its whole overlay group: an overlay without data is not one."""
        group = tag >> 16
        if group & 0xFF00 == 0x6000 and tag & 0xFFFF == 0x3000:
            for other in [t for t in ds.keys() if t >> 16 == group]:
                del ds[other]
        else:
            del ds[tag]

    def _clean_overlay(self, ds: Dataset, tag: int) -> None:
        """Clean Graphics on overlay data: an ROI overlay (type R) is outlines, kept; a graphics
        overlay (type G) may be burned-in text, which cannot be told from shapes: removed."""
        overlay_type = ds.get((tag & 0xFFFF0000) | 0x0040)
        if overlay_type is None or str(overlay_type.value).strip().upper() != "R":
            self._remove(ds, tag)

    def _identity(self, elem: DataElement, ctx: _Context) -> None:
        """PatientID, PatientName and AccessionNumber get pseudonyms wherever they occur."""
        value = str(elem.value or "").strip()
        record = ctx.record
        if elem.tag == ACCESSION_NUMBER:
            elem.value = ctx.pseudonyms.accession(value) if value else None
        elif elem.tag == PATIENT_ID:
            same = value == record.patient_id
            elem.value = record.pseudo_patient_id if same or not value else ctx.pseudonyms.patient_id(
                patient_key(value, "", "", "", ""))
        else:
            same = value.upper() == record.patient_name.upper()
            elem.value = record.pseudo_patient_name if same or not value else TEXT

    def _dummy(self, elem: DataElement, vr: str, ctx: _Context) -> None:
        if vr == "UI":
            self._remap(elem, ctx)
        elif vr in DUMMY:
            elem.value = DUMMY[vr]
        else:
            elem.value = BINARY_DUMMY

    def _uid(self, original: str, ctx: _Context) -> str:
        if not original or ctx.keep_uids or is_well_known_uid(original):
            return original
        new = ctx.record.uid_map.get(original)
        if new is None:
            new = ctx.record.uid_map[original] = ctx.pseudonyms.uid(original)
        return new

    def _remap(self, elem: DataElement, ctx: _Context) -> None:
        if elem.VR != "UI" or elem.value in (None, ""):
            if elem.VR != "UI" and elem.value not in (None, ""):
                elem.value = DUMMY.get(elem.VR, BINARY_DUMMY)  # U on a non-UID value: never keep it
            return
        if isinstance(elem.value, (MultiValue, list)):
            elem.value = [self._uid(str(v).strip("\x00 "), ctx) for v in elem.value]
        else:
            elem.value = self._uid(str(elem.value).strip("\x00 "), ctx)

    def _clean(self, elem: DataElement, vr: str, ctx: _Context) -> None:
        """C: a value of similar meaning with nothing identifying in it."""
        if vr == "SQ":
            for item in elem.value:
                self._walk(item, ctx)
        elif vr == "UI":
            self._remap(elem, ctx)
        elif vr in ("DA", "DT"):
            elem.value = _shift(elem.value, vr, ctx.shift_days) if ctx.shift_days is not None else DUMMY[vr]
        elif vr == "PN":
            elem.value = TEXT if elem.value else None
        elif vr in TEXT_VRS and elem.value:
            ctx.to_clean.append(elem)  # once every identifying value of the dataset is known
        # TM, AS, numbers and binary values carry no identity once dates are shifted: kept.

    # -- attributes the profile adds --------------------------------------------------------------

    @staticmethod
    def _retain(elem: DataElement, record: DeidRecord) -> None:
        if elem.VR in RETAINED_VRS:
            record.retained_values.update(needle_strings(elem.value))

    def _override(self, ds: Dataset, kept: dict[int, DataElement], ctx_record: DeidRecord) -> tuple[str, ...]:
        """[anonymization.overrides], top level, after the profile: keep, remove, empty or set."""
        applied = []
        for tag, action, value in self.overrides:
            name = keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
            if action == "keep" and tag in kept:
                ds[tag] = kept[tag]
                self._retain(ds[tag], ctx_record)
            elif action == "remove" and tag in ds:
                del ds[tag]
            elif action == "empty":
                ds[tag] = DataElement(tag, _vr(ds, tag) if tag in ds else _dictionary_vr(tag), None)
            elif action == "set":
                ds[tag] = DataElement(tag, _vr(ds, tag) if tag in ds else _dictionary_vr(tag), value)
                self._retain(ds[tag], ctx_record)
            else:
                continue
            applied.append(f"{name}={action}")
        return tuple(applied)


    def _mark(self, ds: Dataset, applied: Sequence[dict[str, str]]) -> None:
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = [f"telenode {__version__}"] + [code["meaning"] for code in applied]
        items = []
        for code in applied:
            item = Dataset()
            item.CodeValue = code["code"]
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = code["meaning"]
            items.append(item)
        ds.DeidentificationMethodCodeSequence = DicomSequence(items)
        if "retain_long_full_dates" in self.options:
            ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
        elif "retain_long_modified_dates" in self.options:
            ds.LongitudinalTemporalInformationModified = "MODIFIED"
        else:
            ds.LongitudinalTemporalInformationModified = "REMOVED"

    def _file_meta(self, ds: FileDataset) -> None:
        meta = ds.file_meta
        for tag in [t for t in meta.keys() if t not in META_KEEP]:
            del meta[tag]  # the sending system's names, private data, RTV UIDs: nothing beyond PS3.10's
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = f"TELENODE_{__version__}"[:16]

    @staticmethod
    def _originals(ds: FileDataset) -> DeidRecord:
        def text(keyword: str) -> str:
            value = ds.get(keyword)
            return "" if value is None else str(value).strip()

        record = DeidRecord(
            patient_id=text("PatientID"),
            issuer_of_patient_id=text("IssuerOfPatientID"),
            patient_name=text("PatientName"),
            patient_birth_date=text("PatientBirthDate"),
            study_instance_uid=text("StudyInstanceUID"),
            accession_number=text("AccessionNumber"),
            study_date=text("StudyDate"),
            series_instance_uid=text("SeriesInstanceUID"),
            modality=text("Modality"),
            sop_instance_uid=text("SOPInstanceUID"),
            sop_class_uid=text("SOPClassUID"),
        )
        if not record.study_instance_uid or not record.series_instance_uid or not record.sop_instance_uid:
            raise DeidError("no Study, Series or SOP Instance UID")
        return record


def _is_safe_attribute(tag: int) -> bool:
    """On the generated allow-list; overlay groups (60xx) by their repeating form."""
    if tag >> 24 == 0x60 and not tag >> 16 & 1:
        return f"60XX{tag & 0xFFFF:04X}" in SAFE_ATTRIBUTES
    return f"{tag:08X}" in SAFE_ATTRIBUTES


def _vr(ds: Dataset, tag: int) -> str:
    """The element's VR without decoding its value (implicit VR falls back to the dictionary)."""
    raw = ds.get_item(tag, keep_deferred=True)  # never read a deferred value just to look at it
    vr = getattr(raw, "VR", None)
    if vr and vr != "UN":
        return str(vr)
    try:
        return str(dictionary_VR(tag)).split(" or ")[0]
    except KeyError:
        return str(vr or "UN")


@lru_cache(maxsize=256)
def _words_pattern(words: frozenset[str]) -> re.Pattern[str]:
    """Any of `words` as a whole word; cached, since a study's instances share their identifiers."""
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<![0-9A-Za-z])(?:{alternatives})(?![0-9A-Za-z])", re.IGNORECASE)


def _dictionary_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag)).split(" or ")[0]
    except KeyError:
        return "UN"


def _shift(value: Any, vr: str, days: int) -> Any:
    """Move every date (DA, or the date part of DT) by `days`; a value that isn't a date becomes the dummy."""
    values = list(value) if isinstance(value, (MultiValue, list)) else [value]
    shifted = []
    for item in values:
        text = str(item).strip()
        if not text:  # an unknown date stays unknown: C never invents one
            shifted.append("")
            continue
        try:
            day = datetime.datetime.strptime(text[:8], "%Y%m%d").date() + datetime.timedelta(days=days)
        except ValueError:
            shifted.append(DUMMY[vr])
            continue
        shifted.append(day.strftime("%Y%m%d") + (text[8:] if vr == "DT" else ""))
    return shifted if len(shifted) > 1 else (shifted[0] or None if shifted else None)


def _identifiers(ds: Dataset) -> list[str]:
    """Identifying strings of this patient, removed from free text by the C (clean) action."""
    words: list[str] = []
    for keyword in ("PatientName", "PatientBirthName", "PatientMotherBirthName", "OtherPatientNames"):
        for name in _values(ds.get(keyword)):
            words.append(name)
            words.extend(part for part in re.split(r"[\^= ,]+", name) if len(part) >= 2)
    for keyword in ("PatientID", "OtherPatientIDs", "AccessionNumber", "MedicalRecordLocator",
                    "PatientAddress", "PatientTelephoneNumbers", "IssuerOfPatientID"):
        words.extend(_values(ds.get(keyword)))
    for birth in _values(ds.get("PatientBirthDate")):
        words.extend(_date_forms(birth))
    return [w for w in words if w]


def _values(value: Any) -> list[str]:
    if value in (None, ""):
        return []
    return [str(v).strip() for v in value] if isinstance(value, (MultiValue, list)) else [str(value).strip()]


def _date_forms(date: str) -> list[str]:
    try:
        day = datetime.datetime.strptime(date[:8], "%Y%m%d")
    except ValueError:
        return [date]
    return [date] + [day.strftime(f) for f in ("%Y-%m-%d", "%d.%m.%Y", "%m/%d/%Y", "%d/%m/%Y", "%Y/%m/%d")]
