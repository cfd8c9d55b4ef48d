"""Read-only figures for the status page: destinations, recent studies by pseudonym, quarantine.

Only pseudonyms, counts, states and reasons are read, never an original: the studies
come from the pseudonym columns through a read-only connection of its own (the page
must not wait behind, or hold, the writers' lock).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.spool import Quarantine
from node.store import Store, empty_status

RECENT_STUDIES = 25


@dataclass(frozen=True)
class DestinationView:
    name: str
    state: str  # active | paused | error
    pending: int
    sending: int
    sent: int
    failed: int
    oldest_age_s: float | None
    last_error: str


@dataclass(frozen=True)
class StudyView:
    received: str
    accession: str  # pseudonymous
    study_uid: str  # pseudonymous
    modalities: str
    instances: int
    delivery: dict[str, str] = field(default_factory=dict)  # destination → delivered | pending | failed


@dataclass(frozen=True)
class QuarantineView:
    kind: str
    reason: str
    count: int


@dataclass(frozen=True)
class Snapshot:
    destinations: list[DestinationView]
    studies: list[StudyView]
    quarantine: list[QuarantineView]
    quarantined: int


def destinations(store: Store, names: tuple[str, ...]) -> list[DestinationView]:
    status = store.status()
    for name in names:
        status.setdefault(name, empty_status())
    return [DestinationView(name, _state(row), row["pending"], row["inflight"], row["sent"], row["failed"],
                            row["oldest_pending_age_s"], row["last_error"] or "")
            for name, row in sorted(status.items())]


def _state(row: dict[str, Any]) -> str:
    if row.get("paused"):
        return "paused"
    return "error" if row.get("last_error") and (row["pending"] or row["inflight"]) else "active"


_STUDIES = """
SELECT s.pseudo_study_instance_uid, s.pseudo_accession_number, s.received,
       GROUP_CONCAT(DISTINCT e.modality), COUNT(DISTINCT i.pseudo_sop_instance_uid)
FROM studies s LEFT JOIN series e USING (pseudo_study_instance_uid)
LEFT JOIN instances i USING (pseudo_series_instance_uid)
WHERE s.pseudo_study_instance_uid IN (SELECT pseudo_study_instance_uid FROM studies ORDER BY received DESC LIMIT ?)
GROUP BY s.pseudo_study_instance_uid ORDER BY s.received DESC
"""
_DELIVERY = """
SELECT q.destination, q.status, COUNT(*) FROM queue q
JOIN instances i USING (pseudo_sop_instance_uid) JOIN series e USING (pseudo_series_instance_uid)
WHERE e.pseudo_study_instance_uid = ? AND q.status != 'requeued' GROUP BY q.destination, q.status
"""


def studies(database: Path, limit: int = RECENT_STUDIES) -> list[StudyView]:
    """The most recently received studies, newest first, by pseudonym, with their delivery per destination."""
    if not database.exists():
        return []
    conn = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        rows = conn.execute(_STUDIES, [limit]).fetchall()
        return [StudyView(received or "", accession or "", uid, modalities or "", count,
                          _delivery(conn.execute(_DELIVERY, [uid]).fetchall()))
                for uid, accession, received, modalities, count in rows]
    finally:
        conn.close()


def _delivery(rows: list[tuple[str, str, int]]) -> dict[str, str]:
    states: dict[str, set[str]] = {}
    for destination, status, _ in rows:
        states.setdefault(destination, set()).add(status)
    return {name: "failed" if "failed" in seen else "pending" if seen & {"pending", "inflight"} else "delivered"
            for name, seen in sorted(states.items())}


def quarantine(folder: Path) -> tuple[list[QuarantineView], int]:
    """Held instances grouped by kind and reason (reasons name tags and rules, never values)."""
    entries = Quarantine(folder).entries() if folder.exists() else []
    groups: dict[tuple[str, str], int] = {}
    for entry in entries:
        key = (entry.kind or "other", entry.reason)
        groups[key] = groups.get(key, 0) + 1
    return [QuarantineView(kind, reason, count) for (kind, reason), count in sorted(groups.items())], len(entries)


def snapshot(store: Store, database: Path, quarantine_dir: Path, names: tuple[str, ...]) -> Snapshot:
    held, total = quarantine(quarantine_dir)
    try:
        recent = studies(database)
    except sqlite3.Error:  # busy or a schema this page does not know: the page still shows the rest
        recent = []
    return Snapshot(destinations(store, names), recent, held, total)
