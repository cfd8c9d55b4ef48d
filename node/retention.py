"""Retention: queue rows of delivered instances are deleted `[retention] sent_days` after delivery.

The queue keeps one row per instance and destination; once sent, a row only
feeds `status` counts, so without pruning the database grows with every
instance ever received. The mappings (needed to re-identify a report that comes
back years later) and the audit trail are never pruned. The supervisor calls
`tick()` from its loop; pruning runs at start and then every hour (more often
when sent_days is a fraction of a day, so short retentions hold roughly).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Callable

from node import log
from node.store import Store

DAY = 86400.0
MAX_INTERVAL = 3600.0  # seconds between prunes


class Retention:
    """Prunes sent queue rows older than `sent_days` (0: keeps them forever)."""

    def __init__(self, store: Store, sent_days: float, clock: Callable[[], float] = time.time) -> None:
        self.store, self.keep, self.clock = store, sent_days * DAY, clock
        self.interval = min(MAX_INTERVAL, max(1.0, self.keep / 4))
        self.next = 0.0  # the first tick prunes

    def tick(self) -> int:
        """Prune if due; returns the rows deleted. A failure is logged and retried next time."""
        now = self.clock()
        if not self.keep or now < self.next:
            return 0
        self.next = now + self.interval
        try:
            count = self.store.prune_sent(now - self.keep)
        except sqlite3.Error as exc:  # busy or full: the node goes on, the next tick tries again
            log.get("retention").warning("retention_failed", reason=str(exc))
            return 0
        if count:
            log.get("retention").info("queue_pruned", rows=count, sent_days=self.keep / DAY)
        return count
