"""Group commit: the durable writes of concurrent C-STOREs share one SQLite transaction.

Each received instance ends with one store write (mappings + queue rows) that must
be on disk before the modality is answered Success. With several associations at
once, each write waiting for its own commit (and its own fsync of the WAL) queues
them behind each other; here the first writer to arrive becomes the leader and
commits everything that is waiting in one transaction, while the others wait for
that commit. No caller returns before its write is committed, and a failing write
is retried alone so that it cannot take the rest of its group down with it.
"""

from __future__ import annotations

import threading
from typing import Callable, ContextManager


class _Job:
    __slots__ = ("write", "done", "error", "lead")

    def __init__(self, write: Callable[[], None]) -> None:
        self.write = write
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.lead = False  # woken to commit the next group rather than because its write is done


class GroupCommit:
    """Run `write` callables in shared transactions opened by `transaction()` (e.g. Store.batch)."""

    def __init__(self, transaction: Callable[[], ContextManager[None]], max_group: int = 64) -> None:
        self._transaction = transaction
        self._max_group = max_group
        self._lock = threading.Lock()
        self._waiting: list[_Job] = []
        self._leading = False
        self.groups = 0  # committed transactions, for tests and figures
        self.writes = 0

    def run(self, write: Callable[[], None]) -> None:
        """Return once `write` is committed; raise what it raised if it failed."""
        job = _Job(write)
        with self._lock:
            self._waiting.append(job)
            lead = not self._leading
            self._leading = True
        if not lead:
            job.done.wait()
            if not job.lead:
                return self._result(job)
            job.done.clear()  # promoted: commit the group waiting now (which includes this job)
        self._lead()
        return self._result(job)

    def _lead(self) -> None:
        with self._lock:
            group, self._waiting = self._waiting[: self._max_group], self._waiting[self._max_group:]
        self._commit(group)
        with self._lock:
            if self._waiting:  # arrived during the commit: hand the lead to one of them
                successor = self._waiting[0]
                successor.lead = True
                successor.done.set()
            else:
                self._leading = False
        for job in group:
            job.lead = False
            job.done.set()

    def _commit(self, group: list[_Job]) -> None:
        try:
            with self._transaction():
                for job in group:
                    job.write()
        except BaseException:  # noqa: BLE001 - one bad write: redo each alone, keep the others
            for job in group:
                try:
                    with self._transaction():
                        job.write()
                except BaseException as exc:  # noqa: BLE001 - handed to the job's own caller
                    job.error = exc
        self.groups += 1
        self.writes += len(group)

    @staticmethod
    def _result(job: _Job) -> None:
        if job.error is not None:
            raise job.error
