"""Destination state: paused by an operator, and the last destination-wide error (for `status`)."""

from __future__ import annotations

from typing import Any

from node.store.db import Database, now


class Destinations:
    """The `destinations` table."""

    def __init__(self, core: Database) -> None:
        self.core = core

    def __repr__(self) -> str:
        return f"Destinations({str(self.core.path)!r})"

    def _ensure(self, name: str) -> None:
        self.core.execute("INSERT OR IGNORE INTO destinations (name, paused, updated) VALUES (?, 0, ?)", [name, now()])

    def note_error(self, destination: str, error: str) -> None:
        """Remember a destination-wide problem (remote down, refusing associations), for `status`."""
        with self.core.write():
            self._ensure(destination)
            self.core.execute("UPDATE destinations SET last_error = ?, error_time = ?, updated = ? WHERE name = ?",
                              [error, now(), now(), destination])

    def clear_errors_of_rows(self, ids: list[int]) -> None:
        """The destinations of these queue rows delivered: their destination-wide error is over."""
        marks = ",".join("?" * len(ids))
        self.core.execute(f"UPDATE destinations SET last_error = NULL WHERE name IN "
                          f"(SELECT destination FROM queue WHERE id IN ({marks}))", ids)

    def set_paused(self, destination: str, paused: bool) -> None:
        """Pause or resume one destination's queue (instances keep being accepted and queued)."""
        with self.core.write():
            self._ensure(destination)
            self.core.execute("UPDATE destinations SET paused = ?, updated = ? WHERE name = ?",
                              [1 if paused else 0, now(), destination])

    def is_paused(self, destination: str) -> bool:
        with self.core.read():
            row = self.core.execute("SELECT paused FROM destinations WHERE name = ?", [destination]).fetchone()
        return bool(row and row[0])

    def states(self) -> list[tuple[str, Any, str | None]]:
        """(name, paused, last_error) of every destination the store knows."""
        with self.core.read():
            return self.core.execute("SELECT name, paused, last_error FROM destinations").fetchall()
