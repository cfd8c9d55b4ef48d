"""The worker loop for destinations of other kinds: the store's queue, retry, pause and quarantine.

One thread per worker (`parallel` per destination), with the C-STORE forwarder's
contract (start, wake, request_stop, join) and the same machinery of the store:
it claims due rows highest priority first, hands them to the kind group by group
(checking between groups for STAT work to yield to and for a stop), and records
each result: OK → sent (the spool file goes when no destination needs it), FAIL →
counted, failed and quarantined after `max_failures`, RETRY → again after a delay,
not counted. `Unavailable` → the rest back to the queue, the reason as the
destination's last error, exponential backoff with jitter (at least what the
server asked for in Retry-After), forever. A paused destination sends nothing.

Batches: before claiming, queued rows join their study's batch (node/batches.py).
Worker 0 of each destination also closes batches: once a complete batch's every
instance is settled there, an object store gets its manifest.json, last.

Kill safety: an item's upload is marked started before it begins, so after a kill
the kind looks for the object before writing it again; a row is marked sent only
after the destination confirmed it. Nothing acknowledged is lost, no object doubled.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

from node import log
from node.background import Background
from node.batches import Batches, Item
from node.config import Destination
from node.destinations import Kind, Result, Status, Unavailable, kind_for
from node.spool import Quarantine, Spool
from node.store import Store

IDLE_WAIT = 5.0  # seconds between looks at the queue when nothing wakes the worker
PREEMPT_EVERY = 8  # instances between checks for higher-priority (STAT) work, as the C-STORE forwarder


class Worker(Background):
    """Sends one destination's queue through its kind (a destination with `parallel = N` has N)."""

    def __init__(self, destination: Destination, store: Store, spool: Spool, batches: Batches,
                 quarantine: Quarantine | None = None, worker: int = 0, kind: Kind | None = None) -> None:
        self.destination = destination
        self.store = store
        self.spool = spool
        self.batches = batches
        self.quarantine = quarantine
        self.index = worker
        self.kind = kind if kind is not None else kind_for(destination)
        self.log = log.get("destination").bind(destination=destination.name, kind=destination.kind, worker=worker)
        super().__init__(f"{destination.kind}-{destination.name}-{worker}")
        self._backoff = 0  # consecutive destination-wide failures
        self._claimed: list[int] = []  # queue ids of the batch being sent

    # -- loop -----------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception as exc:  # never let the worker die: the queue would stall silently
                self.log.error("destination_worker_error", error=type(exc).__name__)
                wait = self._delay()
                self.store.release(self._claimed, wait)  # rows still in flight go back (sent ones stay sent)
                self._stop.wait(wait)
        try:
            self.kind.close()
        except Exception:  # closing a client that is already broken: nothing to keep
            pass

    def _step(self) -> None:
        if self.store.is_paused(self.destination.name):
            self._wake.wait(1.0)
            self._wake.clear()
            return
        self.batches.assign([self.destination.name])
        if self.index == 0 and not self._close_batches():
            return
        rows = self.store.claim_batch(self.destination.name, self.destination.batch_size)
        self._claimed = [r.id for r in rows]
        if not rows:
            self._idle()
            return
        items = self.batches.items(rows)
        self.store.release([r.id for r in rows if r.id not in {i.queue_id for i in items}])
        wait = self._send(items)
        if wait is None:
            self._backoff = 0
        else:
            self._stop.wait(wait)

    def _idle(self) -> None:
        """Wait for work, for the next due retry, or (worker 0) for the next batch to become complete."""
        times = [self.store.next_due(self.destination.name)]
        if self.index == 0:
            times.append(self.batches.next_completion())
        due = [t for t in times if t is not None]
        wait = IDLE_WAIT if not due else min(IDLE_WAIT, max(0.05, min(due) - time.time()))
        self._wake.wait(wait)
        self._wake.clear()

    def _delay(self, at_least: float | None = None) -> float:
        """Exponential backoff with ±20% jitter, capped at max_retry_delay; at least what the server asked."""
        d = self.destination
        self._backoff += 1
        delay = min(d.retry_delay * d.retry_multiplier ** (self._backoff - 1), d.max_retry_delay)
        return max(delay * random.uniform(0.8, 1.2), at_least or 0.0)

    def _retry_delay(self, tries: int, at_least: float | None = None) -> float:
        d = self.destination
        delay = min(d.retry_delay * d.retry_multiplier ** tries, d.max_retry_delay) * random.uniform(0.8, 1.2)
        return max(delay, at_least or 0.0)

    # -- sending --------------------------------------------------------------------------------

    def _send(self, items: list[Item]) -> float | None:
        """Send the claimed items group by group. None: go on at once; else the seconds to wait."""
        groups = self.kind.groups(items)
        self.batches.mark_started(items)  # one commit for the claim, before any byte leaves
        since_check = 0
        for index, group in enumerate(groups):
            rest = [item for later in groups[index:] for item in later]
            if self._stop.is_set() or (since_check >= PREEMPT_EVERY and self._preempted(group[0])):
                self.store.release([item.queue_id for item in rest])
                return None
            since_check = 0 if since_check >= PREEMPT_EVERY else since_check + len(group)
            try:
                results = self.kind.send(group)
            except Unavailable as exc:
                return self._postpone(rest, exc.reason, exc.retry_after)
            self._record(group, results)
        return None

    def _preempted(self, item: Item) -> bool:
        if self.store.higher_priority_waiting(self.destination.name, item.priority):
            self.log.info("batch_preempted", reason="higher-priority instances waiting")
            return True
        return False

    def _postpone(self, items: Sequence[Item], reason: str, retry_after: float | None = None) -> float:
        """A destination-wide problem: back to the queue, wait with backoff, count nothing."""
        wait = self._note(reason, retry_after, pending=len(items))
        self.store.release([item.queue_id for item in items], wait)
        return wait

    def _record(self, group: Sequence[Item], results: Sequence[Result]) -> None:
        """Apply a group's results; an item the kind said nothing about goes back to the queue."""
        told = {result.item.queue_id for result in results}
        self.store.release([item.queue_id for item in group if item.queue_id not in told])
        sent = [r.item for r in results if r.status is Status.OK]
        with self.store.batch():  # one commit for the rows sent and their audit record
            done = self.store.mark_sent([item.queue_id for item in sent])
            if sent:
                self.store.audit("forwarded", destination=self.destination.name, kind=self.destination.kind,
                                 count=len(sent), sop_instance_uids=[item.sop_instance_uid for item in sent],
                                 batch_ids=sorted({item.batch_id for item in sent}))
        for path in done:
            self.spool.remove(path)
        if sent:
            self.log.info("batch_sent", instances=len(sent), batches=sorted({item.batch_id for item in sent}))
        for result in results:
            if result.status is Status.FAIL:
                self._refused(result)
            elif result.status is Status.RETRY:
                self._again(result)

    def _again(self, result: Result) -> None:
        delay = self._retry_delay(result.item.attempts, result.retry_after)
        self.store.mark_retry(result.item.queue_id, result.reason, delay, failure=False)
        self.store.note_error(self.destination.name, result.reason)
        self.log.warning("instance_retry", sop_instance_uid=result.item.sop_instance_uid, reason=result.reason,
                         retry_in_s=round(delay, 1))

    def _refused(self, result: Result) -> None:
        item = result.item
        if item.failures + 1 >= self.destination.max_failures:
            self._fail(item, result.reason)
            return
        self.store.mark_retry(item.queue_id, result.reason, self._retry_delay(item.failures), failure=True)
        self.log.warning("instance_refused_by_remote", sop_instance_uid=item.sop_instance_uid, reason=result.reason,
                         failures=item.failures + 1)

    def _fail(self, item: Item, reason: str) -> None:
        """Permanent: the row is failed, the anonymized file copied to the quarantine with the reason."""
        quarantine_id = None
        if self.quarantine is not None and item.path.exists():
            quarantine_id = self.quarantine.put(item.path, {
                "kind": "send_failed", "reason": reason, "destination": self.destination.name,
                "sop_instance_uid": item.sop_instance_uid, "sop_class_uid": item.sop_class_uid,
                "transfer_syntax": item.transfer_syntax, "priority": item.priority, "queue_id": item.queue_id,
                "batch_id": item.batch_id,
            })
        for path in self.store.mark_failed(item.queue_id, reason):
            self.spool.remove(path)
        self.store.audit("send_failed", destination=self.destination.name, reason=reason,
                         sop_instance_uid=item.sop_instance_uid, quarantine_id=quarantine_id)
        self.log.error("instance_failed", sop_instance_uid=item.sop_instance_uid, reason=reason,
                       quarantine_id=quarantine_id)

    # -- batches --------------------------------------------------------------------------------

    def _close_batches(self) -> bool:
        """Finish the settled batches (object stores: manifest.json last). False: the destination is
        unavailable and the worker has waited; the caller starts over."""
        for batch in self.batches.settled(self.destination.name):
            if self._stop.is_set():
                return False
            if self.kind.manifests and batch.sent:
                try:
                    self._write_manifest(batch.batch_id)
                except Unavailable as exc:
                    self._stop.wait(self._note(exc.reason, exc.retry_after))
                    return False
            self.batches.finish(batch.batch_id, self.destination.name)
            self.log.info("batch_done", batch_id=batch.batch_id, sent=batch.sent, failed=batch.failed)
        return True

    def _write_manifest(self, batch_id: str) -> None:
        manifest = self.batches.manifest(batch_id, self.destination.name)
        self.batches.manifest_started(batch_id, self.destination.name)
        self.kind.put_manifest(manifest)
        self.store.audit("manifest_written", destination=self.destination.name, batch_id=batch_id)

    def _note(self, reason: str, retry_after: float | None, pending: int = 0) -> float:
        """The destination's last error and the backoff before trying it again."""
        wait = self._delay(retry_after)
        self.store.note_error(self.destination.name, reason)
        self.log.warning("destination_unavailable", reason=reason, pending=pending, retry_in_s=round(wait, 1))
        return wait


def workers(destination: Destination, store: Store, spool: Spool, batches: Batches,
            quarantine: Quarantine | None) -> list[Worker]:
    """The `parallel` workers of one destination of another kind (one kind client each)."""
    return [Worker(destination, store, spool, batches, quarantine, index) for index in range(destination.parallel)]

