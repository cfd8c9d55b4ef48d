"""Forwarding: one C-STORE SCU worker per destination, store-and-forward from the spool.

Each worker takes a batch of due queue rows (highest priority first), opens
one association proposing only the (SOP class, transfer syntax) pairs the
batch needs (at most 128 presentation contexts, the protocol's limit), and
sends each spooled file streamed from disk. The association stays open while
work keeps coming (instances trickling in as a modality sends them reuse it;
a batch needing other contexts opens a new one) and is released after LINGER
seconds idle. A spool file is deleted
only after every destination has it. The remote being down, refusing the
association or aborting is transient: the batch waits with exponential
backoff and jitter and is retried, forever. A failure status for one
instance counts against that instance alone; after `max_failures` it is
marked failed with the remote's status, and the instances behind it go on.
"""

from __future__ import annotations

import queue
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt

from node import log
from node.config import Destination
from node.spool import Spool
from node.store import Store

# Send from the spooled file in PDU-sized chunks instead of decoding it into memory.
_config.STORE_SEND_CHUNKED_DATASET = True

#: Seconds an idle association stays open: instances that trickle in as a modality sends
#: them share one association instead of paying for an association each.
LINGER = 2.0

NO_CONTEXT = "no accepted presentation context for this SOP class and transfer syntax"
MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255

#: Statuses that mean the remote stored the instance (PS3.4 B.2-1: success and warnings).
STORED = {0x0000, 0x0001, 0xB000, 0xB006, 0xB007}


def _nodelay(event: Any) -> None:
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


#: P-DATA PDUs allowed to wait for the socket; pynetdicom's queue is unbounded, so a fast
#: disk filled memory with a whole large instance ahead of a slower network.
MAX_QUEUED_PDUS = 16


class _SendQueue(queue.Queue):  # type: ignore[type-arg]
    """pynetdicom's DUL send queue with back-pressure: put() waits while it is full and the link lives.

    Unbounded underneath (put never blocks inside the queue), so the DUL thread can never
    deadlock on it; a link that stops draining releases the wait after the network timeout.
    """

    def __init__(self, assoc: Any, timeout: float) -> None:
        super().__init__()
        self.assoc = assoc
        self.timeout = timeout

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        deadline = time.monotonic() + self.timeout
        while self.qsize() >= MAX_QUEUED_PDUS and self.assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.0005)
        super().put(item, block, timeout)


def _bound_send_queue(assoc: Any, timeout: float) -> None:
    """Swap in the bounded queue once the association is up (the old one is empty by then)."""
    dul = assoc.dul
    if dul.to_provider_queue.empty():
        dul.to_provider_queue = _SendQueue(assoc, timeout)


class Forwarder:
    """The worker thread for one destination."""

    def __init__(self, destination: Destination, store: Store, spool: Spool, ae_title: str) -> None:
        self.destination = destination
        self.store = store
        self.spool = spool
        self.ae_title = ae_title
        self.log = log.get("forward").bind(destination=destination.name)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"forward-{destination.name}", daemon=True)
        self._backoff = 0  # consecutive transient failures
        self._assoc: Any = None  # kept open while instances keep coming (see LINGER)
        self._proposed: set[tuple[str, str]] = set()

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """New work was queued."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the instance in flight, then stop (the rest stays queued for the next start)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    # -- loop -----------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception as exc:  # never let the worker die: the queue would stall silently
                self.log.error("forwarder_error", error=type(exc).__name__)
                self._close_quietly()
                self._stop.wait(self._delay())
        self._close_quietly()

    def _close_quietly(self) -> None:
        try:
            self._close()
        except Exception:  # already aborted or the socket is gone: nothing left to release
            self._assoc, self._proposed = None, set()

    def _step(self) -> None:
        batch = self.store.claim_batch(self.destination.name, self.destination.batch_size)
        if not batch:
            self._idle()
        elif self._send(batch):
            self._backoff = 0
        else:
            self._close()
            self._stop.wait(self._delay())

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

    def _contexts(self, batch: list[dict[str, Any]]) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
        """The distinct contexts of the batch (≤ 128) and the rows they cover."""
        contexts: list[tuple[str, str]] = []
        rows = []
        for row in batch:
            pair = (row["sop_class_uid"], row["transfer_syntax"])
            if pair not in contexts:
                if len(contexts) == MAX_CONTEXTS:
                    continue  # the rest go in the next batch
                contexts.append(pair)
            rows.append(row)
        return contexts, rows

    def _open(self, contexts: list[tuple[str, str]]) -> Any:
        """An association proposing exactly `contexts`; the open one is reused if it proposed them all."""
        if self._assoc is not None and self._assoc.is_established and set(contexts) <= self._proposed:
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
        assoc = ae.associate(d.host, d.port, ae_title=d.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
        if assoc.is_established:
            self._assoc, self._proposed = assoc, set(contexts)
            _bound_send_queue(assoc, d.network_timeout)
        return assoc

    def _close(self) -> None:
        if self._assoc is not None:
            if self._assoc.is_established:
                self._assoc.release()
            self._assoc, self._proposed = None, set()

    def _send(self, batch: list[dict[str, Any]]) -> bool:
        """Send one batch over one (possibly reused) association; False if the remote could not be reached."""
        contexts, rows = self._contexts(batch)
        reused = self._assoc is not None and self._assoc.is_established and set(contexts) <= self._proposed
        assoc = self._open(contexts)
        if not assoc.is_established and assoc.rejected_contexts and not assoc.accepted_contexts:
            # The remote is up but accepts none of these SOP class / transfer syntax pairs:
            # a refusal of these instances, counted against each, not an outage.
            for row in rows:
                self._refused(row, NO_CONTEXT)
            return True
        if not assoc.is_established:
            reason = "association rejected" if assoc.is_rejected else "remote unreachable or aborted"
            self.log.warning("destination_unavailable", reason=reason, pending=len(batch))
            self.store.note_error(self.destination.name, reason)
            return False
        sent: list[int] = []
        reachable = True
        try:
            for row in rows:
                if self._stop.is_set():
                    break
                outcome = self._store_one(assoc, row)
                if outcome == "sent":
                    sent.append(row["id"])
                elif outcome == "transient":
                    reachable = False
                    break
        finally:
            for path in self.store.mark_sent(sent):
                self.spool.remove(path)
        if sent:
            self.log.info("batch_sent", instances=len(sent), contexts=len(contexts), reused=reused)
        if not reachable and reused and not sent:
            # The remote dropped an association we kept open (idle timeout): reconnect now, no backoff.
            self._close()
            return True
        return reachable

    def _store_one(self, assoc: Any, row: dict[str, Any]) -> str:
        """C-STORE one spooled file: 'sent', 'refused' (counted against it) or 'transient'."""
        path = Path(row["path"])
        if not path.exists():  # cannot happen unless someone deleted the spool: say so, don't spin
            self.store.mark_failed(row["id"], "spool file missing")
            self.log.error("instance_failed", sop_instance_uid=row["pseudo_sop_instance_uid"], reason="spool file missing")
            return "refused"
        try:
            status = assoc.send_c_store(path, priority=2 if row["priority"] < 0 else min(row["priority"], 1))
        except ValueError:  # the remote accepted no context for this SOP class / transfer syntax
            return self._refused(row, NO_CONTEXT)
        except (OSError, RuntimeError) as exc:
            self.log.warning("send_interrupted", sop_instance_uid=row["pseudo_sop_instance_uid"], error=type(exc).__name__)
            return "transient"
        except Exception as exc:  # the spooled file itself is unreadable (corrupt, no file meta)
            self.store.mark_failed(row["id"], f"spool file unreadable ({type(exc).__name__})")
            self.log.error("instance_failed", sop_instance_uid=row["pseudo_sop_instance_uid"],
                           reason=f"spool file unreadable ({type(exc).__name__})")
            return "refused"
        if not isinstance(status, Dataset) or "Status" not in status:
            self.log.warning("send_interrupted", sop_instance_uid=row["pseudo_sop_instance_uid"],
                             error="no response (timeout or abort)")
            return "transient"
        code = int(status.Status)
        if code in STORED:
            self.log.info("instance_sent", sop_instance_uid=row["pseudo_sop_instance_uid"],
                          status=f"0x{code:04X}", bytes=row["size"])
            return "sent"
        comment = str(status.get("ErrorComment", "") or "").strip()
        return self._refused(row, f"status 0x{code:04X}" + (f": {comment}" if comment else ""))

    def _refused(self, row: dict[str, Any], reason: str) -> str:
        d = self.destination
        if row["failures"] + 1 >= d.max_failures:
            self.store.mark_failed(row["id"], reason)
            self.log.error("instance_failed", sop_instance_uid=row["pseudo_sop_instance_uid"], reason=reason,
                           failures=row["failures"] + 1)
        else:
            delay = min(d.retry_delay * d.retry_multiplier ** row["failures"], d.max_retry_delay)
            self.store.mark_retry(row["id"], reason, delay, failure=True)
            self.log.warning("instance_refused_by_remote", sop_instance_uid=row["pseudo_sop_instance_uid"],
                             reason=reason, failures=row["failures"] + 1)
        return "refused"
