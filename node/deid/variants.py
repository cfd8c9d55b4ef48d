"""Identity-anchored variants: the spellings real text uses for an instance's identifying values.

A department writes the patient "MÜLLER^JÜRGEN", born 19620304, as "Jürgen Mueller",
"J. MULLER", "jmuller", "04.03.1962" or "4. März 1962". Both the Clean (C) action
(rules.py) and the leak guard (guard.py) search for those spellings, not just for the
value as the header spells it. Both sides are compared in one *canonical* form:

* Unicode NFKC (full-width Latin, half-width katakana), case folded, accents
  stripped (decomposed or not), katakana as hiragana, "ß" as "ss";
* every character that is neither a letter nor a digit nor "_" is a space
  (so "MULLER, J." and "MULLER J" read alike; "_" stays a word character, so a
  station "TOSHIBA" is no hit inside "TOSHIBA_MEC" — person names accept "_" as a separator).

Variants built from the identifying values (`Identity`):

* person names, for each of the alphabetic, ideographic and phonetic groups: the
  components in either order with any separator or none, initial + surname both ways
  and glued ("j muller", "jmuller"), each component of 3 letters or more that is not
  a word of the DICOM dictionary, components of 5 letters or more also glued inside a
  word or login ("XMULLER"), CJK components of 2 ideographs or 3 kana anywhere, German
  transliterations (ü → ue), anyascii's transliteration (Cyrillic, Greek, ø …, and kana to
  romaji: the phonetic group of a Japanese name gives its Latin spelling);
* dates (DA, and the date head of a DT): YYYYMMDD (also at the head of a DT), ISO,
  DD.MM.YYYY, DD/MM/YYYY, MM/DD/YYYY, without leading zeros, written out with month names
  in English, German, French and Spanish ("4 March 1962", "March 4th, 1962", "04-Mar-1962",
  "4 de marzo de 1962", "1er mars 1962") and 1962年3月4日;
* IDs and other identifying text: the whole value; its digits (5 or more) with any
  separators and leading zeros ("MRN 80417", "ID:080417", "JP-7733019"); telephone
  numbers by their last 7 digits; addresses by their comma-separated parts and their
  words of 4 letters or more.

All variants of one identity are compiled into one regular expression shaped as a trie
(one branch per first character, so the search costs about one pass over the text
whatever the number of variants), cached, since a study's instances share their identity.
"""

from __future__ import annotations

import datetime
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from anyascii import anyascii

#: Atoms of a variant besides literal characters: a separator, an optional one, leading zeros.
SEP, OPT_SEP, ZEROS = "\x01", "\x02", "\x03"
ATOM_REGEX = {SEP: "[ _]+", OPT_SEP: "[ _]*", ZEROS: "0*"}

#: How a variant is bounded: by non-word characters on both sides, only on the right, or not at all.
BOTH, RIGHT, NONE = "both", "right", "none"

PERSON_NAME = "person name"
DATE = "date"
COMPONENT = "person name component"

ADDRESS_TAGS = frozenset({0x00101040, 0x00080081, 0x00080092, 0x00401102, 0x00102152, 0x00380300})
PHONE_TAGS = frozenset({0x00102154, 0x00080094, 0x00401103, 0x00102155, 0x00080096})

MONTHS = {
    "en": ("january february march april may june july august september october november december",
           "jan feb mar apr may jun jul aug sep oct nov dec", "sept"),
    "de": ("januar februar marz april mai juni juli august september oktober november dezember",
           "jan feb mar apr mai jun jul aug sep okt nov dez", "maerz mrz"),
    "fr": ("janvier fevrier mars avril mai juin juillet aout septembre octobre novembre decembre",
           "janv fevr mars avr mai juin juil aout sept oct nov dec", ""),
    "es": ("enero febrero marzo abril mayo junio julio agosto septiembre octubre noviembre diciembre",
           "ene feb mar abr may jun jul ago sep oct nov dic", "setiembre"),
}
GERMAN = str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue", "ß": "ss", "Ä": "AE", "Ö": "OE", "Ü": "UE"})


# -- canonical form -------------------------------------------------------------------------------

@lru_cache(maxsize=8192)
def _fold(char: str) -> str:
    """One character in canonical form (possibly empty, possibly several characters)."""
    out = []
    for c in unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", char).casefold()):
        if unicodedata.category(c) == "Mn":
            continue  # accents and the kana voicing marks
        code = ord(c)
        if 0x30A1 <= code <= 0x30F6:
            c = chr(code - 0x60)  # katakana → hiragana
        out.append(c if c.isalnum() or c == "_" else " ")
    return "".join(out)


_ASCII_FOLD = str.maketrans({chr(i): (chr(i).lower() if chr(i).isalnum() or chr(i) == "_" else " ")
                             for i in range(128)})


def canonical(text: str) -> tuple[str, list[int] | None]:
    """`text` (NFC) in canonical form, and for each canonical character the index of its original
    (None when they are the same: ASCII text keeps its length)."""
    if text.isascii():
        return text.translate(_ASCII_FOLD), None
    chars: list[str] = []
    origin: list[int] = []
    for index, char in enumerate(text):
        folded = _fold(char)
        chars.append(folded)
        origin.extend([index] * len(folded))
    return "".join(chars), origin


class _FoldTable(dict):
    """str.translate table: each character's canonical form, computed the first time it is seen."""

    def __missing__(self, code: int) -> str:
        folded = self[code] = _fold(chr(code))
        return folded


_FOLD_TABLE = _FoldTable()
_DIGIT = re.compile(r"\d")


def folded(text: str) -> str:
    """`text` in canonical form, without the index map (searching needs no positions): one C pass."""
    return nfc(text).translate(_FOLD_TABLE)


def nfc(text: str) -> str:
    return text if text.isascii() else unicodedata.normalize("NFC", text)


def fold(text: str) -> str:
    """Canonical form of a needle: runs of spaces become one separator atom."""
    return re.sub(r" +", SEP, canonical(text)[0].strip())


# -- identity ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    """The identifying originals of one instance: (tag, VR, text) the engine removed or replaced."""

    values: tuple[tuple[int, str, str], ...]


class Variant(NamedTuple):
    """One spelling: canonical text with SEP / OPT_SEP / ZEROS atoms, its kind, how it is bounded."""

    text: str
    kind: str
    bound: str


@lru_cache(maxsize=1024)
def variants(identity: Identity, vocabulary: frozenset[str]) -> Matcher:
    """The matcher for every spelling of `identity` (cached: a study's instances share it)."""
    found: dict[str, Variant] = {}
    for tag, vr, text in identity.values:
        for variant in _of_value(tag, vr, text, vocabulary):
            found.setdefault(variant.text, variant)
    return _compile(frozenset(found.values()))


@lru_cache(maxsize=4096)
def _of_value(tag: int, vr: str, text: str, vocabulary: frozenset[str]) -> tuple[Variant, ...]:
    text = text.strip().strip("\x00").strip()
    if not text:
        return ()
    if vr == "PN":
        return tuple(_names(text, vocabulary))
    if vr in ("DA", "DT"):
        head = text[:8]
        return tuple(_dates(head)) if re.fullmatch(r"\d{8}", head) else ()
    return tuple(_texts(tag, text, vocabulary))


# -- person names -------------------------------------------------------------------------------------

def _names(value: str, vocabulary: frozenset[str]) -> Iterator[Variant]:
    for group in value.split("="):
        parts = [p for p in re.split(r"\^" if "^" in group else r"[ ,]+", group) if p.strip()]
        for spelling in _spellings(parts):
            yield from _name_variants(spelling, vocabulary)


def _spellings(parts: list[str]) -> Iterator[list[str]]:
    """The components as written, and transliterated (German, anyascii, Japanese romaji)."""
    yield parts
    german = [p.translate(GERMAN) for p in parts]
    if german != parts:
        yield german
    if any(_cjk(p) for p in parts):
        yield [_romaji(p) for p in parts]
    elif not all(p.isascii() for p in parts):
        yield [anyascii(p) for p in parts]


def _name_variants(parts: list[str], vocabulary: frozenset[str]) -> Iterator[Variant]:
    comps = [fold(p) for p in parts[:3]]
    comps = [c for c in comps if c]
    if not comps:
        return
    whole = SEP.join(comps)
    if _letters(whole) >= 3 and (len(comps) > 1 or whole.upper() not in vocabulary):
        yield Variant(whole, PERSON_NAME, NONE if _cjk(whole) else BOTH)
    if len(comps) >= 2:
        family, given = comps[0], comps[1]
        for a, b in ((family, given), (given, family)):
            for joined in (a + SEP + b, a + b):
                if _letters(joined) >= 6 and not _is_weak_name([a, b], vocabulary):
                    yield Variant(joined, PERSON_NAME, NONE if _cjk(joined) else BOTH)
        if not _cjk(family) and len(family) >= 3 and family.upper() not in vocabulary:
            initial = given[0]
            for joined in (initial + SEP + family, family + SEP + initial, initial + family):
                yield Variant(joined, PERSON_NAME, BOTH)
    for comp in comps:
        for word in comp.split(SEP):
            yield from _component(word, vocabulary)


def _component(word: str, vocabulary: frozenset[str]) -> Iterator[Variant]:
    if _cjk(word):
        if len(word) >= (2 if _ideographic(word) else 3):
            yield Variant(word, COMPONENT, NONE)
    elif len(word) >= 3 and _letters(word) >= 2 and word.upper() not in vocabulary:
        yield Variant(word, COMPONENT, NONE if len(word) >= 5 else BOTH)


def _is_weak_name(comps: list[str], vocabulary: frozenset[str]) -> bool:
    """Every component a dictionary word or placeholder ("Last^First"): the whole name is still one,
    but its reorderings and gluings would match ordinary text."""
    return len(comps) > 1 and all(c.replace(SEP, " ").upper() in vocabulary for c in comps)


def _romaji(text: str) -> str:
    """Kana (the phonetic group) read in Latin letters; ideographs have no reading of their own here
    (pykakasi would give one but is GPL): the phonetic group of a Japanese name carries the reading."""
    return "" if _ideographic(text) else anyascii(text)


# -- dates ----------------------------------------------------------------------------------------------

def _dates(head: str) -> Iterator[Variant]:
    """A date is matched by the fixed written-date parser (DATE_FORMS), then looked up: one variant."""
    try:
        datetime.datetime.strptime(head, "%Y%m%d")
    except ValueError:
        return
    if head != "19000101":  # the engine's own dummy
        yield Variant(head, DATE, DATE)


def _month_number() -> dict[str, int]:
    numbers = {}
    for full, short, extra in MONTHS.values():
        for names in (full.split(), short.split()):
            for index, name in enumerate(names):
                numbers[name] = index + 1
        for name in extra.split():
            numbers[name] = 3 if name.startswith("m") else 9
    return numbers


MONTH_NUMBER = _month_number()
_MONTH = "(?P<month>" + "|".join(sorted(MONTH_NUMBER, key=len, reverse=True)) + ")"
_DAY = r"(?P<day>\d{1,2})(?:st|nd|rd|th|er)?"
_YEAR = r"(?P<year>\d{4})"
#: Every written form of a date, on canonical text (separators are spaces): numeric in any order,
#: glued (also the head of a DT), with a month name in English, German, French or Spanish, and 年月日.
DATE_FORMS = [re.compile(p) for p in (
    r"(?<!\w)(?P<a>\d{4}) +(?P<b>\d{1,2}) +(?P<c>\d{1,2})(?!\w)",
    r"(?<!\w)(?P<a>\d{1,2}) +(?P<b>\d{1,2}) +(?P<c>\d{4})(?!\w)",
    r"(?<!\w)(?P<glued>\d{8})(?:\d{2,13})?(?!\w)",
    rf"(?<!\w){_DAY} +(?:de +)?{_MONTH}(?: +de)? +{_YEAR}(?!\w)",
    rf"(?<!\w){_MONTH} +{_DAY} +{_YEAR}(?!\w)",
    r"(?P<year>\d{4})年(?P<month>\d{1,2})月(?P<day>\d{1,2})日",
)]


def written_dates(match: re.Match[str]) -> set[str]:
    """The YYYYMMDD dates a written form may mean (day and month orders are ambiguous)."""
    groups = match.groupdict()
    if groups.get("glued"):
        glued = groups["glued"]
        return {glued, glued[4:] + glued[2:4] + glued[:2], glued[4:] + glued[:2] + glued[2:4]}
    if groups.get("a"):
        a, b, c = groups["a"], groups["b"], groups["c"]
        if len(a) == 4:
            return {_ymd(a, b, c)}
        return {_ymd(c, b, a), _ymd(c, a, b)}
    month = groups["month"]
    number = MONTH_NUMBER.get(month) or int(month)
    return {_ymd(groups["year"], str(number), groups["day"])}


def _ymd(year: str, month: str, day: str) -> str:
    return f"{year}{int(month):02d}{int(day):02d}"


# -- IDs, addresses, telephone numbers, other identifying text -------------------------------------------

def _texts(tag: int, text: str, vocabulary: frozenset[str]) -> Iterator[Variant]:
    whole = fold(text)
    if text.upper() not in vocabulary:
        for spelling in {whole, fold(text.translate(GERMAN)), fold(anyascii(text))}:
            if len(spelling) >= 4 and not _weak_text(spelling):
                yield Variant(spelling, "text", NONE if _cjk(spelling) else BOTH)
    digits = re.sub(r"\D", "", text)
    if tag in PHONE_TAGS and len(digits) >= 7:
        yield Variant(OPT_SEP.join(digits[-7:]), "text", RIGHT)
    elif len(digits.lstrip("0")) >= 5 and len(set(digits)) > 1 and len(digits) >= len(text) // 2:
        yield Variant(ZEROS + OPT_SEP.join(digits.lstrip("0")), "text", BOTH)
    if tag in ADDRESS_TAGS:
        for part in {p for spelling in {text, text.translate(GERMAN), anyascii(text)}
                     for p in re.split(r"[,;\n\r^]+", spelling)}:
            folded = fold(part)
            if len(folded) >= 4 and folded != whole and not _weak_text(folded):
                yield Variant(folded, "text", BOTH)
            for word in folded.split(SEP):
                if len(word) >= 4 and _letters(word) >= 4 and word.upper() not in vocabulary:
                    yield Variant(word, "text", BOTH)


def _weak_text(folded: str) -> bool:
    """Fewer than 2 letters and not 6+ digits that are not one digit repeated."""
    if _letters(folded) >= 2:
        return False
    digits = [c for c in folded if c.isdigit()]
    return not (len(digits) >= 6 and len(set(digits)) > 1)


def _letters(text: str) -> int:
    return sum(c.isalpha() for c in text)


def _cjk(text: str) -> bool:
    return any(0x3040 <= ord(c) <= 0x30FF or 0x3400 <= ord(c) <= 0x9FFF or 0xF900 <= ord(c) <= 0xFAFF
               or 0xAC00 <= ord(c) <= 0xD7AF for c in text)


def _ideographic(text: str) -> bool:
    return any(0x3400 <= ord(c) <= 0x9FFF or 0xF900 <= ord(c) <= 0xFAFF for c in text)


# -- the compiled matcher ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hit:
    """A match: the span in the original text and the kind of value (never the value itself)."""

    start: int
    end: int
    kind: str


class Matcher:
    """One compiled search for every variant of one identity."""

    def __init__(self, found: frozenset[Variant]) -> None:
        self._kinds = {_key(v.text): v.kind for v in found}
        self.dates = frozenset(v.text for v in found if v.kind == DATE)
        groups = []
        for bound, (before, after) in {BOTH: (r"(?<!\w)", r"(?!\w)"), RIGHT: ("", r"(?!\w)"),
                                       NONE: ("", "")}.items():
            words = [v.text for v in found if v.bound == bound]
            if words:
                groups.append(f"{before}{_trie(words)}{after}")
        self.pattern = re.compile("|".join(groups)) if groups else None

    def __bool__(self) -> bool:
        return self.pattern is not None or bool(self.dates)

    def hits(self, text: str) -> Iterator[Hit]:
        """Every match in `text`, with spans in `text`'s own indices."""
        if not text or not self:
            return
        folded, origin = canonical(nfc(text))
        for start, end, kind in self._spans(folded):
            if origin is None:
                yield Hit(start, end, kind)
            else:
                yield Hit(origin[start], origin[end - 1] + 1, kind)

    def _spans(self, folded: str) -> Iterator[tuple[int, int, str]]:
        if self.pattern is not None:
            for match in self.pattern.finditer(folded):
                yield match.start(), match.end(), self._kinds.get(_key(match.group()), "text")
        if self.dates and _DIGIT.search(folded):
            for form in DATE_FORMS:
                for match in form.finditer(folded):
                    if written_dates(match) & self.dates:
                        yield match.start(), match.end(), DATE

    def first(self, text: str, kinds: Iterable[str] | None = None) -> str | None:
        """The kind of the first match in `text` (only of `kinds`, when given), or None."""
        if not text or not self:
            return None
        allowed = None if kinds is None else frozenset(kinds)
        for _start, _end, kind in self._spans(folded(text)):
            if allowed is None or kind in allowed:
                return kind
        return None

    def remove(self, text: str, kinds: Iterable[str] | None = None) -> str:
        """`text` without any match (of `kinds`, when given): C keeps the rest, spaces tidied."""
        allowed = None if kinds is None else frozenset(kinds)
        spans = sorted((h for h in self.hits(text) if allowed is None or h.kind in allowed), key=lambda h: h.start)
        if not spans:
            return text
        text = nfc(text)
        out, last = [], 0
        for hit in spans:
            out.append(text[last:hit.start])
            last = max(last, hit.end)
        out.append(text[last:])
        return re.sub(r"\s+([,.;:])", r"\1", re.sub(r"\s{2,}", " ", "".join(out))).strip()


def _key(matched: str) -> str:
    """A matched text reduced the way its variant was written (for the kind lookup)."""
    return re.sub(r"[ _]+", SEP, matched.strip(" _"))


@lru_cache(maxsize=256)
def _compile(found: frozenset[Variant]) -> Matcher:
    kinds: dict[str, Variant] = {}
    for variant in found:  # the same text can't have two kinds: a name wins
        seen = kinds.get(variant.text)
        if seen is None or variant.kind in (PERSON_NAME, COMPONENT):
            kinds[variant.text] = variant
    return Matcher(frozenset(kinds.values()))


def _trie(words: Iterable[str]) -> str:
    """A regular expression matching any of `words`, as a trie (shared prefixes tried once)."""
    root: dict[str, dict] = {}
    for word in words:
        node = root
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}
    return _trie_regex(root)


def _trie_regex(node: dict[str, dict]) -> str:
    ends = "" in node
    branches = [ATOM_REGEX.get(char, re.escape(char)) + _trie_regex(child)
                for char, child in sorted(node.items()) if char]
    if not branches:
        return ""
    body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    if ends:
        return f"(?:{body})?"
    return body
