"""The leak guard: no identifying value of the input may survive in the output.

A profile alone never guarantees that: vendors put names in free text, in
private tags, in odd places. Before an instance is spooled, the guard takes
the identifying values the rule engine removed or replaced (every value it
did not keep), turns them into needles, and searches every element of the
de-identified dataset for them: file meta, sequences, private elements,
text and small binary values alike (OB and UN read for their printable runs;
pixel data and OW values over 64 KiB — waveform samples, LUTs, curves — excepted), case-insensitively.

Which values become needles (the documented rule, so that common values raise
no false alarm):

* person names (PN): the whole name and each component of 3 characters or
  more, except components that are words of the DICOM dictionary's attribute
  names or placeholders ("Last^First", "Enter text");
* text (AE, CS, LO, SH, ST, LT, UT, UC, UR) of attributes that identify rather
  than describe (Table E.1-1 rows without a Clean Descriptors column: IDs,
  addresses, telephone numbers, institution, station, device serials…): the
  whole value when it has 4 characters or more — descriptors (study
  description, protocol name, comments) are not needles: their words
  legitimately recur in kept attributes;
* dates (DA, and the date part of DT): YYYYMMDD and YYYY-MM-DD, except the
  dummy date 19000101;
* UIDs (UI) that were remapped: the original UID;
* never: times, numbers, binary values, values with fewer than two letters
  unless they hold 6 or more digits that are not all the same (so not "-0400",
  "0000000", series numbers or counts), and any text or date that the
  engine kept on purpose in some element (an option's or the table's K, or a
  keep/set override): that value is then expected in the output. Person
  names and UIDs are never excused; a value copied into an attribute the
  table does not list is not "kept on purpose".

Every needle is searched in every spelling that real text uses (node/deid/variants.py:
Unicode forms, name separators, orders, initials, transliterations and logins, written
dates in four languages, IDs with prefixes and leading zeros, telephone digits, address
parts), in one canonical form, between characters that are not letters, digits or "_"
("ANN" does not match inside "ANNOTATION", "TOSHIBA" not inside "TOSHIBA_MEC"); name
components of 5 letters or more and CJK names also inside a word ("XSMITH", "山田様").
Code strings (CS) are searched for whole person names and original UIDs only: single
words there are a scheme's terms. Coded values (Code Value, Coding Scheme Designator, …),
numbers (DS, IS and binary numeric VRs), times and ages are not searched.
A hit names the attribute path, never the value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydicom.datadict import DicomDictionary
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from node.deid.record import DeidRecord
from node.deid.variants import PERSON_NAME, Identity, Matcher, canonical, variants

TEXT_VRS = frozenset({"AE", "CS", "LO", "SH", "ST", "LT", "UT", "UC", "UR"})
SKIP_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # pixel data is not searched
#: Code strings, numbers and times: "1234567" the exposure is not patient 1234567.
UNSEARCHED_VRS = frozenset({"DS", "IS", "TM", "AS", "US", "SS", "UL", "SL", "FL", "FD", "AT", "SV", "UV",
                            "OF", "OD", "OL", "OV"})
#: Coded values: words from a coding scheme, not free text ("TEST" the code is not Mr Test).
CODE_KEYWORDS = frozenset({"CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "LongCodeValue",
                           "URNCodeValue", "ContextIdentifier", "MappingResource", "ContextGroupVersion"})
MAX_BINARY = 1 << 20  # larger binary values (waveforms, documents already replaced) are not searched
#: OW values hold samples, LUTs and curves (16-bit words, not text): only small ones are searched.
MAX_WORDS = 1 << 16
DUMMIES = frozenset({"ANONYMIZED", "19000101", "19000101000000"})
#: Needle kinds an option may keep on purpose elsewhere; names and UIDs never are.
RETAINABLE = frozenset({"text", "date"})


@dataclass(frozen=True)
class Leak:
    """Where an identifying value was found (the value itself is never carried)."""

    path: str
    kind: str

    def __str__(self) -> str:
        return f"identifying value ({self.kind}) found in {self.path}"


def needles(removed: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """Needle (upper case) → kind, from (VR, original value) pairs the engine did not keep."""
    found: dict[str, str] = {}
    for vr, value in removed:
        for text in _strings(value):
            for needle, kind in _needles_of(vr, text):
                if needle and needle.upper() not in DUMMIES:
                    found.setdefault(needle.upper(), kind)
    return found


def _needles_of(vr: str, text: str) -> Iterator[tuple[str, str]]:
    text = text.strip().strip("\x00").strip()
    if vr == "PN":
        if len(text) >= 3 and not _weak(text):
            yield text, "person name"
        for part in re.split(r"[\^=,. ]+", text):
            if len(part) >= 3 and not _weak(part) and part.upper() not in vocabulary():
                yield part, "person name component"
    elif vr in TEXT_VRS:
        if len(text) >= 4 and not _weak(text) and text.upper() not in vocabulary():
            yield text, "text"
    elif vr in ("DA", "DT"):
        date = text[:8]
        if re.fullmatch(r"\d{8}", date):
            yield date, "date"
            yield f"{date[:4]}-{date[4:6]}-{date[6:]}", "date"
    elif vr == "UI":
        if len(text) >= 10:
            yield text, "UID"


#: Placeholders that test and demo data put where names go.
PLACEHOLDERS = frozenset({"ENTER", "HERE", "UNKNOWN", "ANONYMOUS", "NONE", "NULL", "TEST", "DEMO", "SAMPLE"})


@lru_cache(maxsize=1)
def vocabulary() -> frozenset[str]:
    """Words of the DICOM data dictionary's attribute names ("NAME", "FIRST", "LAST", "GREEN"…), plus
    placeholders: as a name component or a short value they would raise false alarms on coded text."""
    words = {w.upper() for entry in DicomDictionary.values() for w in re.split(r"[^A-Za-z]+", entry[2]) if len(w) >= 3}
    return frozenset(words | PLACEHOLDERS)


def _weak(text: str) -> bool:
    """Too common to search for: fewer than 2 letters unless 6+ digits that aren't one repeated digit."""
    letters = sum(c.isalpha() for c in text)
    digits = [c for c in text if c.isdigit()]
    if letters >= 2:
        return False
    return not (len(digits) >= 6 and len(set(digits)) > 1)


def needle_strings(value: Any) -> list[str]:
    """The text of a value as the guard compares it (stripped, one string per value)."""
    return [t.strip().strip("\x00").strip() for t in _strings(value)]


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (MultiValue, list, tuple)):
        return [str(v) for v in value if v not in (None, "")]
    if isinstance(value, bytes):
        return []
    return [str(value)]


class Guard:
    """Searches a de-identified dataset for the needles of its original, in every spelling (variants.py)."""

    def check(self, ds: Dataset, record: DeidRecord) -> Leak | None:
        """The first leak found in `ds` (file meta included), or None."""
        matcher = identity_matcher(record)
        uids = sorted((n for n, k in needles(record.removed_values).items() if k == "UID"), key=len, reverse=True)
        if not matcher and not uids:
            return None
        meta = getattr(ds, "file_meta", None)
        for dataset in (meta, ds):
            if dataset is None:
                continue
            for path, vr, text in _texts(dataset):
                kind = _search(matcher, uids, vr, text)
                if kind is not None:
                    return Leak(path, kind)
        return None


def _search(matcher: Matcher, uids: list[str], vr: str, text: str) -> str | None:
    """The kind of identifying value in one searched value, or None.

    UI values hold only digits and dots: searched for original UIDs only. Code strings hold a
    scheme's words: searched for whole person names (any spelling) and UIDs, not single words.
    """
    if uids and find_word(text.upper(), uids) is not None:
        return "UID"
    if vr == "UI":
        return None
    return matcher.first(text, (PERSON_NAME,) if vr == "CS" else None)


def identity_matcher(record: DeidRecord) -> Matcher:
    """Every spelling of the record's identifying originals, except text and dates kept on purpose."""
    excused = frozenset(excuse_key(v) for v in record.retained_values)
    values = tuple((tag, vr, text) for tag, vr, value in record.identity if vr != "UI"
                   for text in needle_strings(value) if text.upper() not in DUMMIES
                   and (vr == "PN" or excuse_key(text, vr) not in excused))
    return variants(Identity(values), vocabulary())


def excuse_key(text: str, vr: str = "") -> str:
    """How a kept value and a removed one are compared: dates by their YYYYMMDD head, text canonically."""
    text = text.strip()
    if (vr in ("DA", "DT") or not vr) and re.fullmatch(r"\d{8}(\d{0,6}(\.\d{1,6})?)?([+-]\d{4})?", text):
        return text[:8]
    return canonical(text)[0].strip()


def find_word(text: str, words: list[str]) -> str | None:
    """The first of `words` (upper case) found in `text` (upper case) as a whole word, or None.

    Plain substring search with a boundary check: compiling a regular expression of
    a few dozen look-around alternatives costs more than the whole search, per instance.
    """
    for word in words:
        start = text.find(word)
        while start != -1:
            end = start + len(word)
            if (start == 0 or not _word_char(text[start - 1])) and (end == len(text) or not _word_char(text[end])):
                return word
            start = text.find(word, start + 1)
    return None


#: Runs of 3 or more printable Latin-1 characters: where text can hide in a binary value.
PRINTABLE_RUN = re.compile(rb"[\x20-\x7e\xa0-\xff]{3,}")


def _printable(value: bytes) -> str:
    """The text a binary value could carry (its printable runs, one a line), read as Latin-1 and,
    when it decodes, as UTF-8; waveform samples and other numbers mostly fall away (and cost nothing)."""
    runs = b"\n".join(PRINTABLE_RUN.findall(value))
    text = runs.decode("latin-1")
    try:
        utf8 = value.decode("utf-8")
    except UnicodeDecodeError:
        return text
    return text if utf8.isascii() else text + "\n" + utf8


def _word_char(char: str) -> bool:
    return char.isalnum() or char == "_"


def _texts(ds: Dataset, prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """(attribute path, VR, text) for every searchable value, recursing into sequences."""
    for tag in list(ds.keys()):
        if tag in SKIP_TAGS:
            continue
        raw = ds.get_item(tag, keep_deferred=True)  # never read a deferred value just to look at it
        length = getattr(raw, "length", 0) or 0
        if length > MAX_BINARY and length != 0xFFFFFFFF:
            continue
        elem = ds[tag]
        name = elem.keyword or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
        path = f"{prefix}{name}"
        if elem.VR == "SQ":
            for index, item in enumerate(elem.value or []):
                yield from _texts(item, f"{path}[{index}].")
            continue
        if elem.VR in UNSEARCHED_VRS or elem.keyword in CODE_KEYWORDS:
            continue
        value = elem.value
        if value is None or value == "":
            continue
        if isinstance(value, bytes):
            if len(value) <= (MAX_WORDS if elem.VR == "OW" else MAX_BINARY):
                yield path, elem.VR, _printable(value)
            continue
        for text in _strings(value):
            yield path, elem.VR, text
