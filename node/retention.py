"""Retention: what the node no longer needs is deleted after `[retention]`'s days.

- `sent_days`: queue rows of delivered instances. The queue keeps one row per instance and
  destination; once sent, a row only feeds `status` counts, so without pruning the database grows
  with every instance ever received.
- `staging_days`: batch-prepare's staging folders (de-identified copies and their manifest) of
  batches that finished that long ago; a batch still running is never touched.

The mappings (needed to re-identify a report that comes back years later) and the audit trail are
never pruned. The supervisor calls `tick()` from its loop; pruning runs at start and then every
hour (more often for a fraction of a day, so short retentions hold roughly).
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path
from typing import Callable

from node import log
from node.store import Store

DAY = 86400.0
MAX_INTERVAL = 3600.0  # seconds between prunes


class Retention:
    """Prunes sent queue rows older than `sent_days` and finished staging folders older than
    `staging_days` (0: keeps them forever)."""

    def __init__(self, store: Store, sent_days: float, clock: Callable[[], float] = time.time, *,
                 staging: Path | None = None, staging_days: float = 0.0) -> None:
        self.store, self.keep, self.clock = store, sent_days * DAY, clock
        self.staging, self.keep_staging = staging, staging_days * DAY if staging is not None else 0.0
        shortest = min((k for k in (self.keep, self.keep_staging) if k), default=0.0)
        self.interval = min(MAX_INTERVAL, max(1.0, shortest / 4))
        self.next = 0.0  # the first tick prunes

    def tick(self) -> int:
        """Prune if due; returns the queue rows deleted. A failure is logged and retried next time."""
        now = self.clock()
        if not (self.keep or self.keep_staging) or now < self.next:
            return 0
        self.next = now + self.interval
        if self.keep_staging:
            self._prune_staging(now - self.keep_staging)
        if not self.keep:
            return 0
        try:
            count = self.store.prune_sent(now - self.keep)
        except sqlite3.Error as exc:  # busy or full: the node goes on, the next tick tries again
            log.get("retention").warning("retention_failed", reason=str(exc))
            return 0
        if count:
            log.get("retention").info("queue_pruned", rows=count, sent_days=self.keep / DAY)
        return count

    def _prune_staging(self, before: float) -> int:
        """Delete staging/{BatchId}/ and its result file for batches that finished before `before`.

        A batch is finished once its `{BatchId}.json` result is written; its age is that file's."""
        assert self.staging is not None
        removed = 0
        for result in sorted(self.staging.glob("*.json")) if self.staging.is_dir() else []:
            batch_id = result.stem
            try:
                if not batch_id.isalnum() or result.stat().st_mtime >= before:
                    continue
                shutil.rmtree(self.staging / batch_id, ignore_errors=True)
                result.unlink(missing_ok=True)
            except OSError as exc:  # the next tick tries again
                log.get("retention").warning("retention_failed", reason=f"staging: {exc.strerror}")
                continue
            removed += 1
        if removed:
            self.store.audit("staging_pruned", batches=removed, staging_days=self.keep_staging / DAY)
            log.get("retention").info("staging_pruned", batches=removed, staging_days=self.keep_staging / DAY)
        return removed
