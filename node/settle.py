"""ack = "received": originals kept durably on receipt, de-identified afterwards.

With `[node] ack = "received"` the SCP answers Success as soon as the instance *as received* is
on disk (`Received.keep`: fsync, rename into `data_dir/received`, fsync of the folder), and the
settler process takes the instances from there, oldest first, through the same pipeline a C-STORE
takes by default (`Settler`). The sender no longer waits for de-identification, so one association
sends as fast as the node can receive, while de-identification runs on another core.

The trade-off, documented in the README: what the pipeline would have refused with a DICOM status
(not understood, cannot be de-identified with certainty) was already answered Success, so it is
quarantined instead — never forwarded — and the sender is not told. Originals (PHI) wait in
`received/` (0700, files 0600) until they are settled; the queue rows of an instance settled just
before a kill may be written twice, which sends it once more (at least once, never lost).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from node import log
from node.config import Settings
from node.pipeline import OUT_OF_RESOURCES, Pipeline
from node.spool import Quarantine, fsync_dir
from node.store import Store

POLL = 0.05  # seconds between looks at an empty folder: an empty scandir costs microseconds
FULL_PAUSE = 2.0  # seconds before the next try after the disk or the database was unavailable
SUFFIX = ".dcm"
# Instances settled at once. Each spends ~3 of its ~13 ms waiting for fsyncs and the SQLite commit;
# concurrent ones overlap those waits with another's Python and share one commit (GroupCommit).
# Measured on 600 CT, one sender, 4 alternating runs: medians 46 images/s with 1, 54 with 3.
THREADS = 3


@dataclass(frozen=True)
class Arrival:
    """One original acknowledged on receipt and not de-identified yet."""

    path: Path
    calling_aet: str
    priority: int  # the C-STORE Priority as received (0 MEDIUM, 1 HIGH, 2 LOW)


class Received:
    """`data_dir/received`: the originals waiting for de-identification, named so that their names
    sort in order of arrival and carry what the pipeline needs besides the file."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._serial = itertools.count()
        self._lock = threading.Lock()

    def keep(self, source: str | os.PathLike[str], calling_aet: str, priority: int) -> Path:
        """Make the received file `source` durable here (it is moved, not copied); return its path."""
        fd = os.open(source, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        with self._lock:
            serial = next(self._serial)
        name = f"{time.time_ns():020d}-{os.getpid()}-{serial}-{priority}-{calling_aet.encode().hex()}{SUFFIX}"
        target = self.root / name
        os.rename(source, target)  # same file system: data_dir/incoming
        fsync_dir(self.root)
        return target

    def waiting(self) -> list[Arrival]:
        """Every original not settled yet, oldest first."""
        return sorted(self._arrivals(), key=lambda a: a.path.name)

    def count(self) -> int:
        return sum(1 for _ in self._arrivals())

    def _arrivals(self) -> Iterator[Arrival]:
        for entry in os.scandir(self.root):
            parts = entry.name[: -len(SUFFIX)].split("-")
            if not entry.name.endswith(SUFFIX) or len(parts) != 5:
                continue
            try:
                yield Arrival(Path(entry.path), bytes.fromhex(parts[4]).decode(), int(parts[3]))
            except ValueError:
                continue  # not a name keep() wrote


def for_node(settings: Settings, pipeline: Pipeline, store: Store) -> Settler:
    """The settler of the node `settings` describes, with the pipeline and store of its process."""
    return Settler(pipeline, Received(settings.received_dir), Quarantine(settings.quarantine_dir), store)


def waiting(root: str | os.PathLike[str]) -> int:
    """How many originals wait in the folder `root` (0 if there is none; nothing is created)."""
    return Received(root).count() if Path(root).is_dir() else 0


class Settler:
    """De-identifies the waiting originals through the pipeline, oldest first, a few at once. An instance the
    pipeline refuses is quarantined, since its sender already has Success; one that hit a full
    disk or an unavailable database stays and is tried again."""

    def __init__(self, pipeline: Pipeline, received: Received, quarantine: Quarantine, store: Store) -> None:
        self.pipeline = pipeline
        self.received = received
        self.quarantine = quarantine
        self.store = store
        self.log = log.get("settle")

    def run(self, stop: threading.Event, threads: int = THREADS) -> None:
        """Settle until `stop` is set, `threads` instances at a time; those in hand are finished first."""
        with ThreadPoolExecutor(threads, thread_name_prefix="settle") as pool:
            while not stop.is_set():
                waiting = self.received.waiting()
                if not waiting:
                    stop.wait(POLL)
                # every result is waited for: none of these may still be in hand at the next listing
                elif not all(list(pool.map(lambda arrival: stop.is_set() or self.settle(arrival), waiting))):
                    stop.wait(FULL_PAUSE)

    def settle_all(self, stop: threading.Event | None = None) -> bool:
        """Settle what waits now; False when one had to stay (disk full, database unavailable)."""
        for arrival in self.received.waiting():
            if stop is not None and stop.is_set():
                return True
            if not self.settle(arrival):
                return False
        return True

    def settle(self, arrival: Arrival) -> bool:
        """One original: queued or quarantined, then removed from the folder; False if it must stay.
        One settler process runs (serve.py) and `run` hands each original to one thread, so none is
        taken twice."""
        outcome = self.pipeline.receive(arrival.path, calling_aet=arrival.calling_aet, priority=arrival.priority)
        if outcome.status == OUT_OF_RESOURCES:
            return False
        try:
            if not outcome.ok and not outcome.quarantine_id:
                self._hold(arrival, outcome.status, outcome.comment)
            arrival.path.unlink()
        except OSError as exc:  # the quarantine could not be written: the original waits
            self.log.error("settle_failed", calling_aet=arrival.calling_aet, error=type(exc).__name__)
            return False
        return True

    def _hold(self, arrival: Arrival, status: int, comment: str) -> None:
        """What the default mode would have refused with `status`: kept in the quarantine, never sent."""
        reason = {"kind": "refused", "reason": comment, "status": f"0x{status:04X}",
                  "calling_aet": arrival.calling_aet}
        qid = self.quarantine.put(arrival.path, reason)
        self.store.audit("quarantined", quarantine_id=qid, **reason)
        self.log.warning("instance_quarantined", quarantine_id=qid, **reason)
