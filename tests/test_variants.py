"""Identity-anchored variants (node/deid/variants.py): every spelling real text uses, and no more.

Each category of the issue (Unicode forms, name separators and orders, initials, transliteration,
glued logins, CJK names, written dates, IDs, telephone numbers, addresses) gets planted spellings that
must be found, and near misses that must not; then the same through the real engine: Clean (C,
clean_descriptors) removes the spelling, and the leak guard finds it where the profile keeps it.
"""

from __future__ import annotations

import time

import pydicom
import pytest
from pydicom.data import get_testdata_file

from node.deid import Deidentifier, Pseudonymizer
from node.deid.guard import Guard, vocabulary
from node.deid.variants import Identity, canonical, variants

NAME, BIRTH, PID = 0x00100010, 0x00100030, 0x00100020
PHONE, ADDRESS, STUDY_DT = 0x00102154, 0x00101040, 0x0008002A
UNTABLED_LO = 0x00283003  # LUT Explanation: not in Table E.1-1, kept as is


def matcher(*values):
    return variants(Identity(tuple(values)), vocabulary())


GERMAN = matcher((NAME, "PN", "MÜLLER^JÜRGEN"), (BIRTH, "DA", "19620304"))
JAPANESE = matcher((NAME, "PN", "Yamada^Tarou=山田^太郎=やまだ^たろう"))
SMITH = matcher((NAME, "PN", "SMITH^JOHN"))
IDS = matcher((PID, "LO", "JP7733019"), (0x00080050, "SH", "0080417"), (PHONE, "SH", "+49 (89) 123-4567"),
              (ADDRESS, "LO", "Hauptstraße 12, 80331 München"))


@pytest.mark.parametrize("text", [
    "Jürgen Müller", "JURGEN MULLER", "Juergen Mueller", "MULLER, JURGEN", "Müller_Jürgen", "MüllerJürgen",
    "J. MULLER", "MULLER J", "jmuller", "login xmuller01", "Ｍｕｌｌｅｒ", "Mu\u0308ller",
])
def test_german_name_spellings(text):
    assert GERMAN.first(text) is not None


@pytest.mark.parametrize("text", [
    "Yamada Tarou", "YAMADA_TAROU", "YamadaTarou", "Yamada, Tarou", "Tarou Yamada", "山田太郎", "山田様",
    "ヤマダ タロウ", "ﾔﾏﾀﾞ ﾀﾛｳ", "やまだ",
])
def test_japanese_name_spellings(text):
    assert JAPANESE.first(text) is not None


@pytest.mark.parametrize("text", ["jsmith", "J. SMITH", "Smith, John", "JOHN_SMITH", "smith john"])
def test_initial_and_login_forms(text):
    assert SMITH.first(text) is not None


@pytest.mark.parametrize("text", [
    "19620304", "1962-03-04", "04.03.1962", "04/03/1962", "03/04/1962", "4.3.1962", "1962/3/4",
    "4 March 1962", "March 4, 1962", "March 4th, 1962", "04-Mar-1962", "4. März 1962", "4 mars 1962",
    "4 de marzo de 1962", "1962年3月4日", "19620304093000", "DOB: 04031962",
])
def test_birth_date_forms(text):
    assert GERMAN.first(text) == "date"


@pytest.mark.parametrize("text", [
    "MRN 7733019", "ID:JP-7733019", "JP 7733019", "acc 80417", "ACC 0080417", "00080417",
    "call 089 1234567", "tel. 123 45 67", "Hauptstrasse 12", "Hauptstraße 12", "80331 München", "muenchen",
])
def test_ids_phones_addresses(text):
    assert IDS.first(text) == "text"


@pytest.mark.parametrize("m,text", [
    (GERMAN, "ANNOTATION"), (GERMAN, "1962 protocol v3.4"), (GERMAN, "19620305"),
    (GERMAN, "March 1962"), (SMITH, "SMITS"), (SMITH, "JOHNSON"), (IDS, "7733018"),
    (IDS, "series 80418"), (IDS, "Hauptbahnhof"), (JAPANESE, "山"), (GERMAN, "TOSHIBA_MEC"),
])
def test_near_misses_do_not_match(m, text):
    assert m.first(text) is None


def test_remove_keeps_the_rest_of_the_text():
    assert GERMAN.remove("CT for J. Müller, born 4. März 1962, follow-up") == "CT for, born, follow-up"
    assert JAPANESE.remove("検査 山田太郎 様") == "検査 様"


def test_canonical_keeps_ascii_length():
    text = "Mr. SMITH_J (ID: 42)"
    folded, origin = canonical(text)
    assert origin is None and len(folded) == len(text) and folded == "mr  smith_j  id  42 "


def test_matcher_is_cached_per_identity():
    values = ((NAME, "PN", "NEWNAME^ALICE"), (BIRTH, "DA", "19700101"))
    assert matcher(*values) is matcher(*values)


# -- through the engine -------------------------------------------------------------------------------

def _patient(**text):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = "MÜLLER^JÜRGEN"
    ds.PatientBirthDate = "19620304"
    ds.PatientID = "JP7733019"
    for keyword, value in text.items():
        setattr(ds, keyword, value)
    return ds


def _deid(ds, options=()):
    return Deidentifier(Pseudonymizer(b"v" * 32, "ORG"), options).apply(ds)


@pytest.mark.parametrize("text", ["CT Juergen Mueller", "CT J. MULLER 04.03.1962", "CT for ID:JP-7733019",
                                  "Kopf 4. März 1962"])
def test_clean_descriptors_removes_every_spelling(text):
    ds = _patient(StudyDescription=text)
    record = _deid(ds, ["clean_descriptors"])
    cleaned = str(ds.StudyDescription)
    assert cleaned.startswith(text.split()[0])  # the descriptor's own words stay
    assert Guard().check(ds, record) is None


@pytest.mark.parametrize("text", ["Juergen Mueller", "jmuller", "04.03.1962", "March 4, 1962", "MRN 7733019"])
def test_engine_removes_spellings_from_kept_text_and_the_guard_finds_them_behind_it(text):
    ds = _patient()
    ds[UNTABLED_LO] = pydicom.DataElement(UNTABLED_LO, "LO", f"window {text}")
    record = _deid(ds)
    kept = str(ds[UNTABLED_LO].value)
    assert kept.startswith("window") and text not in kept  # the engine took the identity out of untabled text
    assert Guard().check(ds, record) is None
    ds[UNTABLED_LO].value = f"window {text}"  # as if it had missed it: the guard finds it
    leak = Guard().check(ds, record)
    assert leak is not None and leak.path == "LUTExplanation"
    assert text not in str(leak)


def test_code_strings_lose_whole_names_only():
    ds = _patient(BodyPartExamined="MUELLER_JUERGEN")
    record = _deid(ds)
    assert not ds.BodyPartExamined
    ds.BodyPartExamined = "MUELLER_JUERGEN"
    assert Guard().check(ds, record) is not None
    ds = _patient(PatientName="CHEST^JOHANNA", BodyPartExamined="CHEST")
    record = _deid(ds)
    assert ds.BodyPartExamined == "CHEST"
    assert Guard().check(ds, record) is None


def test_guard_cost_per_instance():
    """The guard on CT_small (with its private groups) stays in the low milliseconds per instance."""
    runs = []
    for _ in range(20):
        ds = _patient()
        record = _deid(ds)
        started = time.perf_counter()
        assert Guard().check(ds, record) is None
        runs.append(time.perf_counter() - started)
    median = sorted(runs)[len(runs) // 2]
    print(f"guard median per instance: {median * 1000:.2f} ms")
    assert median < 0.05
