#!/usr/bin/env python3
"""Generate node/deid/ps315.json, the rule table, from PS3.15 Annex E as data.

Reads ../shared/ps3.15/confidentiality_profile_attributes.json (Table E.1-1,
2026d) and safe_private_attributes.json (Table E.3.10-1) and writes one JSON
file the rule engine loads once per process. Nothing in the table is picked
by hand: every row becomes a rule, option columns are renamed to the config's
snake_case option names, mask rows keep their mask form.

    python3 scripts/gen_ps315.py [--source DIR] [--output FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = ROOT.parent / "shared" / "ps3.15"
DEFAULT_OUTPUT = ROOT / "node" / "deid" / "ps315.json"

#: Table E.1-1 column → (profile_options name, CID 7050 code, code meaning).
OPTIONS = {
    "rtnSafePrivOpt": ("retain_safe_private", "113111", "Retain Safe Private Option"),
    "rtnUIDsOpt": ("retain_uids", "113110", "Retain UIDs Option"),
    "rtnDevIdOpt": ("retain_device_identity", "113109", "Retain Device Identity Option"),
    "rtnInstIdOpt": ("retain_institution_identity", "113112", "Retain Institution Identity Option"),
    "rtnPatCharsOpt": ("retain_patient_characteristics", "113108", "Retain Patient Characteristics Option"),
    "rtnLongFullDatesOpt": ("retain_long_full_dates", "113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "rtnLongModifDatesOpt": ("retain_long_modified_dates", "113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "cleanDescOpt": ("clean_descriptors", "113105", "Clean Descriptors Option"),
    "cleanStructContOpt": ("clean_structured_content", "113104", "Clean Structured Content Option"),
    "cleanGraphOpt": ("clean_graphics", "113103", "Clean Graphics Option"),
}
BASIC = {"code": "113100", "meaning": "Basic Application Confidentiality Profile"}
ACTIONS = {"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}

#: Mask rows of Table E.1-1, written as (group & mask, element & mask) in the output.
MASKS = {
    "(50XX,XXXX)": {"group_mask": "FF00", "group": "5000", "element_mask": "0000", "element": "0000"},
    "(60XX,3000)": {"group_mask": "FF00", "group": "6000", "element_mask": "FFFF", "element": "3000"},
    "(60XX,4000)": {"group_mask": "FF00", "group": "6000", "element_mask": "FFFF", "element": "4000"},
}
PRIVATE_ROW = "(GGGG,EEEE) WHERE GGGG IS ODD"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rule(row: dict) -> dict:
    action = row["basicProfile"]
    if action not in ACTIONS:
        raise SystemExit(f"unknown action {action!r} for {row['tag']}")
    options = {}
    for column, (name, _, _) in OPTIONS.items():
        if column in row:
            if row[column] not in ACTIONS:
                raise SystemExit(f"unknown option action {row[column]!r} for {row['tag']}")
            options[name] = row[column]
    return {"name": row["name"], "basic": action, "options": options, "retired": row["retired"]}


def build(source: Path) -> dict:
    table_path = source / "confidentiality_profile_attributes.json"
    safe_path = source / "safe_private_attributes.json"
    rows = json.loads(table_path.read_text())
    tags, masks, private = {}, [], None
    for row in rows:
        tag = row["tag"].upper()
        if tag == PRIVATE_ROW:
            private = rule(row)
        elif tag in MASKS:
            masks.append({**MASKS[tag], "tag": tag, **rule(row)})
        else:
            key = tag[1:5] + tag[6:10]
            int(key, 16)  # every other row is a plain tag
            tags[key] = rule(row)
    if private is None or len(masks) != len(MASKS) or len(tags) + len(masks) + 1 != len(rows):
        raise SystemExit("Table E.1-1 rows not all accounted for")
    safe = sorted(
        {(r["private_creator"].strip(), r["tag"][1:5].upper(), r["tag"][8:10].upper()) for r in json.loads(safe_path.read_text())["rows"]}
    )
    return {
        "generated_by": "scripts/gen_ps315.py",
        "standard": "DICOM PS3.15 2026d, Annex E, Tables E.1-1 and E.3.10-1 (c) NEMA",
        "sources": {
            table_path.name: sha256(table_path),
            safe_path.name: sha256(safe_path),
        },
        "basic_profile": BASIC,
        "options": {name: {"code": code, "meaning": meaning} for name, code, meaning in OPTIONS.values()},
        "tags": dict(sorted(tags.items())),
        "masks": masks,
        "private": private,
        # (private creator, group, element low byte): Table E.3.10-1, never matched by block
        "safe_private": [list(row) for row in safe],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    data = build(args.source)
    args.output.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    print(f"{args.output}: {len(data['tags'])} tags, {len(data['masks'])} masks, private rule, "
          f"{len(data['safe_private'])} safe private attributes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
