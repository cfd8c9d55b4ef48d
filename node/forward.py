"""Forwarding: C-STORE SCU workers per destination, store-and-forward from the spool.

Each worker (`parallel` per destination) claims a batch of due queue rows —
highest priority first, marked in flight so that workers never share a row —
opens one association proposing only the (SOP class, transfer syntax) pairs
the batch needs, plus an uncompressed fallback for compressed ones (at most
128 presentation contexts, the protocol's limit), and sends each spooled file
streamed from disk. An instance is decompressed only when the remote accepted
its SOP class but not its transfer syntax. The association stays open while
work keeps coming and is released after LINGER seconds idle.

Faults, as dcm4chee-arc's retry model has them: the remote down, refusing or
aborting the association or timing out is transient for the whole
destination: the rows go back to the queue and the worker waits with
exponential backoff and jitter, forever. 0xA7xx (out of resources) is
transient for that instance: it is retried with backoff, forever, without
counting, and the others go on. Any other failure status for one instance
counts against that instance alone; after
`max_failures` it is failed with the remote's status, copied to the
quarantine, and the instances behind it go on. A SOP class the remote
accepts in no syntax the node can produce fails at once. Every few instances
a worker checks for higher-priority (STAT) work and yields to it. A paused
destination keeps queueing and sends nothing. A spool file is deleted only
after every destination has it (or gave up on it).

What an operator sees: an outage is one warning (destination_down) and one info
(destination_up), the attempts in between debug; a C-ECHO probe every
PROBE_EVERY seconds ends a long backoff as soon as the remote answers; sent
instances are recorded at least every RECORD_EVERY seconds within a batch.
"""

from __future__ import annotations

import enum
import random
import ssl
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID
from pynetdicom import AE, evt

from node import codecs, log, metrics, net, tls
from node.background import Background
from node.config import Destination
from node.spool import Quarantine, Spool
from node.store import QueueRow, Store

#: Seconds an idle association stays open: instances that trickle in as a modality sends
#: them share one association instead of paying for an association each.
LINGER = 2.0

NO_CONTEXT = "no accepted presentation context for this SOP class and transfer syntax"
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
PREEMPT_EVERY = 8  # instances between checks for higher-priority work
MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255


class Sent(enum.Enum):
    """What one C-STORE attempt did to its queue row."""

    STORED = "stored"  # the remote answered a success or warning status
    HANDLED = "handled"  # not stored, and the row is already rescheduled or failed (this instance's problem)
    INTERRUPTED = "interrupted"  # no answer (association lost or timed out): the rest waits for the remote

#: While a destination is down, a C-ECHO every PROBE_EVERY seconds ends the backoff as soon as it
#: answers: the backlog moves within seconds of the remote's return, whatever the backoff reached.
PROBE_EVERY = 2.0
VERIFICATION = "1.2.840.10008.1.1"  # the Verification SOP Class (C-ECHO)
#: Sent instances are recorded (status, spool clean-up) at least this often within a batch, so
#: `status` follows the remote's confirmations instead of jumping once per batch.
RECORD_EVERY = 1.0

#: Statuses that mean the remote stored the instance (PS3.4 B.2-1: success and warnings).
STORED = {0x0000, 0x0001, 0xB000, 0xB006, 0xB007}


class Health:
    """Whether one destination is reachable, shared by its forwarder threads, so that an outage is
    one warning when it starts and one info when it ends, not a line per attempt."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self.attempts = 0  # failed attempts in the current outage
        self.interrupted: set[str] = set()  # instances in flight when an association was lost

    def failed(self) -> bool:
        """An attempt failed; True for the first failure of an outage."""
        with self._lock:
            self.attempts += 1
            if self._down_since is not None:
                return False
            self._down_since = time.monotonic()
            return True

    def recovered(self) -> float | None:
        """An association came up; the outage's length in seconds if this ends one, else None."""
        with self._lock:
            if self._down_since is None:
                return None
            down_for, self._down_since, self.attempts = time.monotonic() - self._down_since, None, 0
            return down_for


#: Health per destination name, per store: the forwarders of one node share one Store object.
_HEALTH: "weakref.WeakKeyDictionary[Store, dict[str, Health]]" = weakref.WeakKeyDictionary()
_HEALTH_LOCK = threading.Lock()


def _health(store: Store, name: str) -> Health:
    with _HEALTH_LOCK:
        return _HEALTH.setdefault(store, {}).setdefault(name, Health())


class Forwarder(Background):
    """One worker thread for one destination (a destination with `parallel = N` has N of them)."""

    def __init__(self, destination: Destination, store: Store, spool: Spool, ae_title: str,
                 quarantine: Quarantine | None = None, worker: int = 0) -> None:
        self.destination = destination
        self.store = store
        self.spool = spool
        self.quarantine = quarantine
        self.ae_title = ae_title
        self.log = log.get("forward").bind(destination=destination.name, worker=worker)
        super().__init__(f"forward-{destination.name}-{worker}")
        self._backoff = 0  # consecutive transient failures
        self._health = _health(store, destination.name)
        self._assoc: Any = None  # kept open while instances keep coming (see LINGER)
        self._proposed: set[tuple[str, str]] = set()
        # Sent rows not yet recorded: recorded with the next claim, in its transaction (one commit per
        # step instead of two), or at once when the worker is about to wait (see _flush).
        self._sent_ids: list[int] = []
        self._sent_uids: list[str] = []
        self._tls: ssl.SSLContext | None = None
        self._tls_error = ""  # the client context could not be built (unreadable certificate or key)
        if destination.tls is not None:
            try:
                self._tls = tls.client_context(destination.tls)
            except (ssl.SSLError, OSError) as exc:
                self._tls_error = f"{tls.describe(exc)} (loading the destination's TLS files)"

    def start(self) -> None:
        net.configure()  # chunked sending from the spool (idempotent; serve calls it first)
        super().start()

    # -- loop -----------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception as exc:  # never let the worker die: the queue would stall silently
                self.log.error("forwarder_error", error=type(exc).__name__)
                self._close_quietly()
                self._flush_quietly()
                self._stop.wait(self._delay())
        self._flush_quietly()
        self._close_quietly()

    def _flush_quietly(self) -> None:
        try:
            self._flush()
        except Exception as exc:  # the rows stay in flight: sent again after a restart, never lost
            self.log.error("forwarder_error", error=type(exc).__name__)

    def _close_quietly(self) -> None:
        try:
            self._close()
        except Exception:  # already aborted or the socket is gone: nothing left to release
            self._assoc, self._proposed = None, set()

    def _step(self) -> None:
        if self.store.is_paused(self.destination.name):
            self._flush()
            self._close()
            self._wake.wait(1.0)
            self._wake.clear()
            return
        batch = self._flush(claim=True)
        if not batch:
            self._idle()
            return
        wait = self._send(batch)
        if wait is None:
            self._backoff = 0
        else:
            self._flush()
            self._close_quietly()
            self._wait_or_probe(wait)

    def _wait_or_probe(self, wait: float) -> None:
        """Back off for `wait` seconds, but stop waiting as soon as a C-ECHO to the remote succeeds."""
        deadline = time.monotonic() + wait
        while True:
            step = min(PROBE_EVERY, deadline - time.monotonic())
            if step <= 0 or self._stop.wait(step):
                return
            if deadline - time.monotonic() > 0.5 and self._echo():
                self.log.debug("destination_answers", probe="C-ECHO")
                return

    def _echo(self) -> bool:
        """One C-ECHO association to the destination; True when it answered Success."""
        d = self.destination
        ae = AE(ae_title=self.ae_title)
        ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = min(d.connect_timeout, 5.0)
        ae.add_requested_context(VERIFICATION)
        tls_args = (self._tls, tls.server_hostname(d.tls, d.host)) if self._tls is not None and d.tls else None
        try:
            assoc = ae.associate(d.host, d.port, ae_title=d.ae_title, tls_args=tls_args)
        except (OSError, RuntimeError, ValueError):
            return False
        if not assoc.is_established:
            return False
        try:
            status = assoc.send_c_echo()
            return isinstance(status, Dataset) and status.get("Status") == 0x0000
        finally:
            if assoc.is_established:
                assoc.release()

    def _idle(self) -> None:
        """Wait for work; an association left open is released after LINGER seconds without any."""
        next_due = self.store.next_due(self.destination.name)
        wait = 5.0 if next_due is None else min(5.0, max(0.05, next_due - time.time()))
        if self._assoc is not None:
            wait = min(wait, LINGER)
        woken = self._wake.wait(wait)
        self._wake.clear()
        if not woken and self._assoc is not None:
            self._close()

    def _delay(self) -> float:
        """Exponential backoff with ±20% jitter, capped at max_retry_delay."""
        d = self.destination
        self._backoff += 1
        delay = min(d.retry_delay * d.retry_multiplier ** (self._backoff - 1), d.max_retry_delay)
        return delay * random.uniform(0.8, 1.2)

    # -- the association ------------------------------------------------------------------------

    def _plan(self, batch: list[QueueRow]) -> tuple[list[tuple[str, str]], list[QueueRow]]:
        """The contexts the batch needs (its own syntaxes, plus the uncompressed ones as fallbacks per
        SOP class, each its own context so the remote's choice never forces a conversion), at most
        128, and the rows they cover."""
        contexts: list[tuple[str, str]] = []
        rows, later = [], []
        for row in batch:
            needed = [(row.sop_class_uid, row.transfer_syntax)]
            needed += [(row.sop_class_uid, syntax) for syntax in UNCOMPRESSED if syntax != row.transfer_syntax]
            new = [pair for pair in needed if pair not in contexts]
            if len(contexts) + len(new) > MAX_CONTEXTS:
                later.append(row)
                continue
            contexts += new
            rows.append(row)
        self.store.release([r.id for r in later])  # next batch
        return contexts, rows

    def _open(self, contexts: list[tuple[str, str]]) -> Any:
        """An association proposing exactly `contexts`; the open one is reused if it proposed them all."""
        if self._reusable(contexts):
            return self._assoc
        self._close()
        d = self.destination
        ae = AE(ae_title=self.ae_title)
        ae.connection_timeout = d.connect_timeout
        ae.acse_timeout = d.acse_timeout
        ae.dimse_timeout = d.dimse_timeout
        ae.network_timeout = d.network_timeout
        ae.maximum_pdu_size = d.max_pdu
        for sop_class, syntax in contexts:
            ae.add_requested_context(sop_class, syntax)
        tls_args = (self._tls, tls.server_hostname(d.tls, d.host)) if self._tls is not None and d.tls else None
        assoc = ae.associate(d.host, d.port, ae_title=d.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, net.set_nodelay)],
                             tls_args=tls_args)
        if assoc.is_established:
            self._came_back()
            self._assoc, self._proposed = assoc, set(contexts)
            net.bound_send_queue(assoc, d.network_timeout)
            net.guard_reactor(assoc)
        return assoc

    def _came_back(self) -> None:
        down_for = self._health.recovered()
        if down_for is not None:
            self.log.info("destination_up", down_for_s=round(down_for, 1))

    def _reusable(self, contexts: list[tuple[str, str]]) -> bool:
        return self._assoc is not None and self._assoc.is_established and set(contexts) <= self._proposed

    def _close(self) -> None:
        if self._assoc is not None:
            if self._assoc.is_established:
                self._assoc.release()
            self._assoc, self._proposed = None, set()

    def _send(self, batch: list[QueueRow]) -> float | None:
        """Send one batch over one (possibly reused) association. Returns None when the worker may go
        on at once, or the seconds to wait (the remote is unreachable or out of resources)."""
        contexts, rows = self._plan(batch)
        if self._tls_error:
            return self._postpone(rows, self._tls_error)
        reused = self._reusable(contexts)
        assoc = self._open(contexts)
        if not assoc.is_established and assoc.rejected_contexts and not assoc.accepted_contexts:
            # The remote is up but accepts none of these SOP class / transfer syntax pairs.
            for row in rows:
                self._fail(row, NO_CONTEXT)
            return None
        if not assoc.is_established:
            return self._postpone(rows, self._not_established(assoc))
        sent = 0
        last_record = time.monotonic()
        wait: float | None = None
        for index, row in enumerate(rows):
            if self._stop.is_set() or self._preempted(index, row):
                self.store.release([r.id for r in rows[index:]])
                break
            outcome = self._store_one(assoc, row)
            if outcome is Sent.STORED:
                sent += 1
                self._sent_ids.append(row.id)
                self._sent_uids.append(row.pseudo_sop_instance_uid)
                if time.monotonic() - last_record >= RECORD_EVERY:  # status follows the remote
                    self._flush()
                    last_record = time.monotonic()
            elif outcome is Sent.INTERRUPTED:
                self._health.interrupted.add(row.pseudo_sop_instance_uid)
                if reused and not sent:
                    # The remote dropped an association we kept open (idle timeout): reconnect now.
                    self.store.release([r.id for r in rows[index:]])
                    self._close_quietly()
                    return None
                wait = self._postpone(rows[index:], "association lost while sending")
                break
        if sent:
            self.log.info("batch_sent", instances=sent, contexts=len(contexts), reused=reused,
                          tls=self._tls is not None)
        return wait

    def _flush(self, claim: bool = False) -> list[QueueRow]:
        """Mark the rows sent so far sent, with their audit record, and with `claim` take the next
        batch, all in one commit; then drop spool files no one needs. Returns the claimed rows.

        Recording a batch of one and claiming the next were two commits (two WAL fsyncs) per
        instance when instances trickle in one by one, as they do behind a sender.
        """
        ids, uids = self._sent_ids, self._sent_uids
        if not ids:
            return self.store.claim_batch(self.destination.name, self.destination.batch_size) if claim else []
        with self.store.batch():
            done = self.store.mark_sent(ids)
            self.store.audit("forwarded", destination=self.destination.name, count=len(ids),
                             sop_instance_uids=uids, tls=self._tls is not None)
            batch = self.store.claim_batch(self.destination.name, self.destination.batch_size) if claim else []
        self._sent_ids, self._sent_uids = [], []
        for path in done:
            self.spool.remove(path)
        metrics.count("forwarded", self.destination.name, len(ids))
        return batch

    def _not_established(self, assoc: Any) -> str:
        """Why the association did not come up; a TLS failure names the certificate problem."""
        if assoc.is_rejected:
            return net.rejection(assoc)
        return getattr(self._tls, "last_failure", None) or "remote unreachable or aborted"

    def _postpone(self, rows: list[QueueRow], reason: str) -> float:
        """A transient, destination-wide problem: back to the queue, wait with backoff, count nothing."""
        wait = self._delay()
        # Due at once: the worker's own backoff (which a C-ECHO probe can end early) spaces the attempts.
        self.store.release([r.id for r in rows])
        self.store.note_error(self.destination.name, reason)
        if self._health.failed():  # the one warning of this outage ("tls_failed" when TLS is the reason)
            d = self.destination
            event = "tls_failed" if reason.startswith("TLS") else "destination_down"
            self.log.warning(event, reason=reason, host=d.host, port=d.port, pending=len(rows),
                             retry_in_s=round(wait, 1))
        else:
            self.log.debug("destination_unavailable", reason=reason, pending=len(rows), retry_in_s=round(wait, 1),
                           attempts=self._health.attempts)
        return wait

    def _preempted(self, index: int, row: QueueRow) -> bool:
        """Every few instances: is STAT work waiting behind this (lower-priority) batch?"""
        if index == 0 or index % PREEMPT_EVERY:
            return False
        if self.store.higher_priority_waiting(self.destination.name, row.priority):
            self.log.info("batch_preempted", reason="higher-priority instances waiting")
            return True
        return False

    # -- one instance ---------------------------------------------------------------------------

    def _store_one(self, assoc: Any, row: QueueRow) -> Sent:
        """C-STORE one spooled file and say what became of its row."""
        path = Path(row.path)
        uid = row.pseudo_sop_instance_uid
        if not path.exists():  # cannot happen unless someone deleted the spool: say so, don't spin
            self._fail(row, "spool file missing")
            return Sent.HANDLED
        priority = 2 if row.priority < 0 else min(row.priority, 1)
        syntax = _accepted_syntax(assoc, row.sop_class_uid, row.transfer_syntax)
        if syntax is None:
            self._fail(row, f"remote accepts this SOP class in neither {row.transfer_syntax} nor uncompressed")
            return Sent.HANDLED
        source: Path | Dataset = path
        if syntax != row.transfer_syntax:
            try:  # decoded before the send: a missing decoder is this instance's failure, not a lost association
                source = _uncompressed(path)
            except Exception as exc:  # unreadable, or no decoder installed (codecs.NoDecoderInstalled)
                self._fail(row, f"cannot read or decompress the spooled instance ({type(exc).__name__})")
                return Sent.HANDLED
            self.log.info("transcoded", sop_instance_uid=uid, from_syntax=row.transfer_syntax, to_syntax=syntax)
        try:
            status = assoc.send_c_store(source, priority=priority)
        except (OSError, RuntimeError) as exc:
            self.log.info("send_interrupted", sop_instance_uid=uid, error=type(exc).__name__)
            return Sent.INTERRUPTED
        except Exception as exc:  # the spooled file is unreadable
            self._fail(row, f"cannot read the spooled instance ({type(exc).__name__})")
            return Sent.HANDLED
        if not isinstance(status, Dataset) or "Status" not in status:
            self.log.info("send_interrupted", sop_instance_uid=uid, error="no response (timeout or abort)")
            return Sent.INTERRUPTED
        code = int(status.Status)
        if code in STORED:
            resent = uid in self._health.interrupted  # the remote may have stored it the first time
            self._health.interrupted.discard(uid)
            self.log.info("instance_sent", sop_instance_uid=uid, status=f"0x{code:04X}", bytes=row.size,
                          **({"resent": True} if resent else {}))
            return Sent.STORED
        comment = str(status.get("ErrorComment", "") or "").strip()
        reason = f"status 0x{code:04X}" + (f": {comment}" if comment else "")
        if code >> 8 == 0xA7:  # out of resources: try this one again later, forever, without counting it
            delay = self._retry_delay(row.attempts)
            self.store.mark_retry(row.id, reason, delay, failure=False)
            self.store.note_error(self.destination.name, reason)
            self.log.warning("remote_out_of_resources", sop_instance_uid=uid, status=f"0x{code:04X}",
                             retry_in_s=round(delay, 1))
            return Sent.HANDLED
        return self._refused(row, reason)

    def _retry_delay(self, tries: int) -> float:
        d = self.destination
        return min(d.retry_delay * d.retry_multiplier ** tries, d.max_retry_delay) * random.uniform(0.8, 1.2)

    def _refused(self, row: QueueRow, reason: str) -> Sent:
        d = self.destination
        if row.failures + 1 >= d.max_failures:
            self._fail(row, reason)
        else:
            self.store.mark_retry(row.id, reason, self._retry_delay(row.failures), failure=True)
            self.log.warning("instance_refused_by_remote", sop_instance_uid=row.pseudo_sop_instance_uid,
                             reason=reason, failures=row.failures + 1)
        return Sent.HANDLED

    def _fail(self, row: QueueRow, reason: str) -> None:
        """Permanent: the row is failed, the anonymized file copied to the quarantine with the reason."""
        quarantine_id = None
        if self.quarantine is not None and Path(row.path).exists():
            quarantine_id = self.quarantine.put(row.path, {
                "kind": "send_failed", "reason": reason, "destination": self.destination.name,
                "sop_instance_uid": row.pseudo_sop_instance_uid, "sop_class_uid": row.sop_class_uid,
                "transfer_syntax": row.transfer_syntax, "priority": row.priority, "queue_id": row.id,
            })
        self._health.interrupted.discard(row.pseudo_sop_instance_uid)
        for path in self.store.mark_failed(row.id, reason):
            self.spool.remove(path)
        metrics.count("failed", self.destination.name)
        self.store.audit("send_failed", destination=self.destination.name, reason=reason,
                         sop_instance_uid=row.pseudo_sop_instance_uid, quarantine_id=quarantine_id)
        self.log.error("instance_failed", sop_instance_uid=row.pseudo_sop_instance_uid, reason=reason,
                       quarantine_id=quarantine_id)


def _accepted_syntax(assoc: Any, sop_class: str, syntax: str) -> str | None:
    """The syntax to send in: the instance's own if accepted, else an accepted uncompressed one."""
    accepted = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class}
    if syntax in accepted:
        return syntax
    if UID(syntax).is_little_endian or UID(syntax).is_compressed:  # big endian native is not converted
        for candidate in UNCOMPRESSED:
            if candidate in accepted:
                return candidate
    return None


def _uncompressed(path: Path) -> Dataset:
    """The spooled instance decoded to native pixels (pydicom + pylibjpeg); pynetdicom re-encodes it
    for whichever uncompressed context was accepted. Only for remotes that need it."""
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        codecs.require(ds.file_meta.TransferSyntaxUID)  # names the missing decoder (the GPL one is optional)
        ds.decompress(generate_instance_uid=False)  # pydicom would otherwise mint a new SOP Instance UID
    return ds
