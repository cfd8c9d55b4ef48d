"""Mapping key rotation: a new key first in the ring, every original re-encrypted, old keys retired.

Crash-safe at every step: the ring file is replaced atomically and always holds
every key a committed row uses; running it again finishes an interrupted rotation
(under yet another key). The node keeps writing between the short transactions.
"""

from __future__ import annotations

from typing import Any

from node.keys import VERSION, Keyring, rotation_lock
from node.store.db import Database
from node.store.mappings import ENCRYPTED


class Rotation:
    """Which keys seal the stored originals, and moving them all to a new one."""

    def __init__(self, core: Database, ring: Keyring) -> None:
        self.core, self.ring = core, ring

    def __repr__(self) -> str:
        return f"Rotation({str(self.ring.path)!r})"

    def usage(self) -> dict[str, int]:
        """How many stored originals each mapping key id (hex) encrypts."""
        usage: dict[str, int] = {}
        with self.core.read():
            for table, (_, originals) in ENCRYPTED.items():
                for column in originals:
                    for kid, count in self.core.execute(
                            f"SELECT hex(substr({column}, 2, 4)), COUNT(*) FROM {table} "
                            f"WHERE typeof({column}) = 'blob' GROUP BY 1").fetchall():
                        usage[kid.lower()] = usage.get(kid.lower(), 0) + count
        return usage

    def rotate(self, batch: int = 500) -> dict[str, Any]:
        """New key, every original re-sealed `batch` rows per transaction, unused keys dropped."""
        with rotation_lock(self.ring.path):
            active = self.ring.add_key()
            moved = self._reencrypt(batch)
            with self.core.write():  # no writer can commit under an old key while the ring shrinks
                in_use = {int(kid, 16) for kid in self.usage()}
                retired = self.ring.retire(in_use)
        return {"active": f"{active:08x}", "reencrypted": moved, "retired": [f"{k:08x}" for k in retired]}

    def _reencrypt(self, batch: int) -> int:
        """Re-seal every original not under the active key; until none is left."""
        moved = 0
        while True:
            done = 0
            for table, (pk, originals) in ENCRYPTED.items():
                for column in originals:
                    done += self._reencrypt_batch(table, pk, column, batch)
            moved += done
            if done == 0:
                return moved

    def _reencrypt_batch(self, table: str, pk: str, column: str, batch: int) -> int:
        with self.core.write():
            self.ring.refresh(strict=True)
            header = bytes([VERSION]) + self.ring.active_id.to_bytes(4, "big")
            rows = self.core.execute(
                f"SELECT {pk}, {column} FROM {table} WHERE typeof({column}) = 'blob' AND substr({column}, 1, 5) != ? "
                f"LIMIT ?", [header, batch]).fetchall()
            for key, stored in rows:
                value = self.ring.unseal(table, column, key, stored)
                self.core.execute(f"UPDATE {table} SET {column} = ? WHERE {pk} = ?",
                                  [self.ring.seal(table, column, key, value), key])
        return len(rows)
