"""Serving: one supervisor process, its SCP worker processes, and the forwarders.

`telenode serve` runs the supervisor (`run`). It does what must happen once —
load and check the keys, migrate the store, recover what a killed node left in
flight, clean the spool — then starts `[node] workers` worker processes, each a
Storage SCP with its own pipeline and its own store connection, all accepting on
the listening sockets the supervisor opened (the worker that is free takes the
next association: net.listener), and runs the forwarders itself. With
`[node] ack = "received"` one more child, the settler, de-identifies what the
workers acknowledged on receipt (settle.py). Receiving and de-identifying are
CPU-bound Python, so they get the cores; sending runs beside them instead of
sharing one interpreter lock.

SQLite (WAL, short transactions) is the only state the processes share; each
worker has one pipe to the supervisor, on which it says that it is ready (or why
it could not start) and, per instance, that it queued work for the forwarders.
Pipes need no semaphores (multiprocessing's spawn still starts its resource-tracker process, ~10 MB
of PSS that tracks nothing here). A worker dies
with its supervisor (PR_SET_PDEATHSIG), so a killed node never leaves a process
holding the port; a worker that dies alone is restarted. SIGTERM/SIGINT: workers
stop accepting and finish their C-STOREs, forwarders finish their instance, all
within stop_timeout, and the supervisor exits 0.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Sequence

from node import __version__, config, log, metrics, net, returnpath, settle
from node.forward import Forwarder
from node.retention import Retention
from node.spool import Quarantine, Spool
from node.store import Store

_SPAWN = multiprocessing.get_context("spawn")  # never fork a process that runs threads
RESTART_PAUSE = 1.0  # seconds between restarts of a worker that keeps dying


class SignalStop(threading.Event):
    """The stop request of a process, safe to make from a signal handler (`request`).

    A handler runs in the main thread between two bytecodes, possibly inside Event.set() or
    Event.wait(), which hold the Event's lock: a handler that called set() itself waited for that
    lock forever (seen: two SIGTERMs in a row, from `timeout` and from pkill, hung the supervisor).
    `request` only records the request; the next `is_set` or `wait` — in normal code, where the lock
    may be taken — turns it into a real set(), so threads waiting on the Event wake as usual."""

    STEP = 0.1  # seconds: how soon wait() notices a request made by a handler

    def __init__(self) -> None:
        super().__init__()
        self.requested = False

    def request(self, *_: Any) -> None:
        self.requested = True  # no lock, no allocation worth speaking of: nothing a handler must not do

    def is_set(self) -> bool:
        if self.requested and not super().is_set():
            self.set()
        return super().is_set()

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            remaining = self.STEP if deadline is None else min(self.STEP, deadline - time.monotonic())
            if remaining <= 0:
                return False
            super().wait(remaining)
        return True


def stop_on(signals: Sequence[int]) -> SignalStop:
    """A SignalStop requested by any of `signals`."""
    stop = SignalStop()
    for signum in signals:
        signal.signal(signum, stop.request)
    return stop


class StartError(Exception):
    """The node cannot start (port taken, worker failed); the message says why, without PHI."""


@dataclass(frozen=True)
class Parts:
    """What the supervisor builds once; the CLI provides it (keys, store, checks)."""

    settings: config.Settings
    store: Store
    # A module-level function (spawn pickles it by name): (settings, on_queued) → (pipeline, store),
    # called inside each worker process.
    open_worker: Callable[[config.Settings, Callable[[], None]], tuple[Any, Store]]


def run(parts: Parts, stop: threading.Event) -> None:
    """Serve until `stop` is set; raise StartError if the node cannot start."""
    settings, store = parts.settings, parts.store
    logger = log.get("node")
    net.configure()
    sockets = _listen(settings)
    recovered = store.recover()
    _settle_left(parts)
    spool = Spool(settings.spool_dir)
    spool.cleanup_tmp()
    quarantine = Quarantine(settings.quarantine_dir)
    forwarders: list[Any] = [Forwarder(d, store, spool, settings.ae_title, quarantine, worker)
                             for d in settings.destinations if d.kind == "dicom" for worker in range(d.parallel)]
    forwarders += _other_kinds(settings, store, spool, quarantine)
    returning = _return_path(settings, store, quarantine)
    if settings.http is not None:  # before any worker starts: they inherit the metrics folder
        metrics.enable(settings.data_dir)
        metrics.prime(tuple(d.name for d in settings.destinations))
    pool = _Workers(parts, sockets)
    gateway = None
    retention = Retention(store, settings.retention_sent_days, staging=settings.data_dir / "staging",
                          staging_days=settings.retention_staging_days)
    try:
        _start_return(returning)  # before the workers: once node.port answers, the return AE does too
        gateway = _gateway(parts, forwarders, pool)  # token file and port first: scripts read the token
        for sock in sockets.values():  # once node.port answers, the token file and the return AE exist
            sock.listen(net.BACKLOG)
        pool.start()
        if gateway is not None:
            gateway.start()
        for forwarder in forwarders:
            forwarder.start()
        store.audit("node_started", ae_title=settings.ae_title, port=settings.port, workers=settings.workers,
                    version=__version__)
        logger.info("node_started", version=__version__, port=settings.port, workers=settings.workers,
                    destinations=[d.name for d in settings.destinations], requeued_in_flight=recovered)
        for warning in settings.warnings:
            logger.warning("config_warning", message=warning)
        while not stop.is_set():
            if pool.poll(0.2):
                for forwarder in forwarders:
                    forwarder.wake()
            pool.restart_dead()
            retention.tick()
    finally:
        deadline = time.monotonic() + settings.stop_timeout
        if gateway is not None:
            gateway.stop()
        if returning is not None and returning.listeners is not None:
            _drain(returning.listeners, deadline)  # the reader's C-STOREs finish before the rest stops
        _stop(pool, forwarders, deadline)
        if returning is not None:
            returning.stop(deadline)
        for sock in sockets.values():
            sock.close()
    store.audit("node_stopped")
    logger.info("node_stopped")


def _settle_left(parts: Parts) -> None:
    """Originals a node with ack = "received" acknowledged and did not settle before it stopped,
    when the node now runs with ack = "deidentified" (no settler): settled here, before it listens."""
    received = settle.Received(parts.settings.received_dir)
    if parts.settings.ack == "received" or not received.count():
        return
    pipeline, store = parts.open_worker(parts.settings, lambda: None)
    try:
        done = settle.for_node(parts.settings, pipeline, store).settle_all()
    finally:
        store.close()
    log.get("node").info("received_settled", complete=done, waiting=received.count())


def _gateway(parts: Parts, forwarders: Sequence[Any], pool: "_Workers") -> Any:
    """The HTTP gateway ([http]) in this process, not started yet; None without [http]."""
    if parts.settings.http is None:
        return None
    from node.http.server import Gateway  # only nodes with [http] load starlette and uvicorn

    def wake() -> None:
        for forwarder in forwarders:
            forwarder.wake()

    return Gateway(parts.settings, parts.open_worker, wake, pool.healthy)  # GatewayError is a StartError


def _other_kinds(settings: config.Settings, store: Store, spool: Spool, quarantine: Quarantine) -> list[Any]:
    """Workers of the destinations of other kinds (DICOMweb, S3, Azure): the same queue, their batches."""
    others = [d for d in settings.destinations if d.kind != "dicom"]
    if not others:
        return []
    from node.batches import Batches
    from node.destinations.worker import workers

    batches = Batches(settings.database, settings.stable_seconds)
    return [worker for d in others for worker in workers(d, store, spool, batches, quarantine)]


def _listen(settings: config.Settings) -> dict[int, socket.socket]:
    """The node's sockets by port ([node] port, [node.tls] port), bound here once and shared by
    every worker, restarted ones included; a taken port is a start error. `run` has them listen
    just before the workers start."""
    ports = [] if settings.tls is not None and settings.tls.port == settings.port else [settings.port]
    ports += [settings.tls.port] if settings.tls is not None else []
    sockets: dict[int, socket.socket] = {}
    for port in ports:
        try:
            sockets[port] = net.listener(settings.host, port)
        except OSError as exc:
            for sock in sockets.values():
                sock.close()
            raise StartError(f"cannot listen on {settings.host}:{port}: {exc.strerror}") from None
    return sockets


def _probe_ports(settings: config.Settings) -> None:
    """The return path's listeners bind with SO_REUSEPORT, which would silently share a port with
    another telenode: bind each port once without it first, so a taken port is an error."""
    for sock in _listen(settings).values():
        sock.close()


def _return_path(settings: config.Settings, store: Store, quarantine: Quarantine) -> returnpath.Service | None:
    """[return]: its ports checked like the node's; None when the section is absent."""
    if settings.return_path is None:
        return None
    _probe_ports(returnpath.listener_settings(settings, settings.return_path))
    return returnpath.Service(settings, store, quarantine)


def _start_return(returning: returnpath.Service | None) -> None:
    if returning is None:
        return
    try:
        returning.start()
    except OSError as exc:
        raise StartError(f"return path: cannot listen: {exc.strerror or exc}") from None


def _stop(pool: "_Workers", forwarders: Sequence[Any], deadline: float) -> None:

    """Workers finish their C-STOREs while forwarders finish their instance; both by the deadline."""
    log.get("node").info("node_stopping")
    for forwarder in forwarders:
        forwarder.request_stop()
    pool.stop(deadline)
    for forwarder in forwarders:
        forwarder.join(max(0.1, deadline - time.monotonic()))


class _Workers:
    """The SCP worker processes: start, listen to, restart, stop."""

    def __init__(self, parts: Parts, sockets: dict[int, socket.socket]) -> None:
        self.parts = parts
        self.sockets = sockets  # the listening sockets every worker inherits
        # the SCP workers, then with ack = "received" the settler (settle.py)
        count = parts.settings.workers + (parts.settings.ack == "received")
        self.processes: list[Any] = [None] * count
        self.pipes: list[Connection | None] = [None] * count
        self.ready = [False] * count
        self.failure: str | None = None
        self.log = log.get("node")
        self.last_restart = 0.0

    def start(self, timeout: float = 60.0) -> None:
        for index in range(len(self.processes)):
            self._spawn(index)
        deadline = time.monotonic() + timeout
        while not all(self.ready):
            self.poll(0.1)
            if self.failure:
                raise StartError(self.failure)
            if not any(p.is_alive() for p in self.processes):
                raise StartError("every worker process exited during start")
            if time.monotonic() > deadline:
                raise StartError(f"worker processes did not start within {timeout:.0f} s")

    def _spawn(self, index: int) -> None:
        reader, writer = _SPAWN.Pipe(duplex=False)
        settler = index >= self.parts.settings.workers
        process = _SPAWN.Process(
            target=_settler_main if settler else _worker_main,
            name="telenode-settler" if settler else f"telenode-worker-{index}", daemon=True,
            # the settler accepts nothing: it does not hold the listening sockets
            args=(index, self.parts.settings, self.parts.open_worker, writer, os.getpid(), {} if settler else self.sockets),
        )
        process.start()
        writer.close()  # the worker holds the only write end: end of file = the worker is gone
        self.processes[index], self.pipes[index], self.ready[index] = process, reader, False

    def poll(self, timeout: float) -> bool:
        """Read what the workers said within `timeout`; True if one queued work."""
        queued = False
        for pipe in wait([p for p in self.pipes if p is not None], timeout):
            index = self.pipes.index(pipe)  # type: ignore[arg-type]
            try:
                while pipe.poll():  # type: ignore[union-attr]
                    queued |= self._heard(index, pipe.recv_bytes())  # type: ignore[union-attr]
            except (EOFError, OSError):
                pipe.close()  # type: ignore[union-attr]
                self.pipes[index] = None
        return queued

    def _heard(self, index: int, message: bytes) -> bool:
        if message == QUEUED:
            return True
        if message == READY:
            self.ready[index] = True
        elif message.startswith(FAILED):
            self.failure = f"worker {index}: {message[len(FAILED):].decode('utf-8', 'replace')}"
            self.log.error("worker_failed", worker=index, reason=self.failure)
        return False

    def healthy(self) -> bool:
        """Every worker process alive and listening."""
        return all(self.ready) and all(p is not None and p.is_alive() for p in self.processes)

    def restart_dead(self) -> None:
        """A worker that died (a crash, the OOM killer) is replaced; its acknowledged work is durable."""
        for index, process in enumerate(self.processes):
            if process is None or process.is_alive():
                continue
            if time.monotonic() - self.last_restart < RESTART_PAUSE:
                return
            self.log.error("worker_died", worker=index, exit_code=process.exitcode)
            self.last_restart = time.monotonic()
            if self.pipes[index] is not None:
                self.pipes[index].close()  # type: ignore[union-attr]
            self._spawn(index)

    def stop(self, deadline: float) -> None:
        alive = [p for p in self.processes if p is not None and p.is_alive()]
        for process in alive:
            os.kill(process.pid, signal.SIGTERM)
        for process in alive:
            process.join(max(0.1, deadline - time.monotonic()))
        for process in alive:
            if process.is_alive():  # past stop_timeout: nothing unacknowledged is lost by this
                process.kill()
                process.join(5)
        for pipe in self.pipes:
            if pipe is not None:
                pipe.close()


QUEUED, READY, FAILED = b"q", b"ready", b"failed:"


def _die_with_parent(supervisor: int) -> None:
    """Linux: SIGKILL this worker when the supervisor dies, whatever killed it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != supervisor:  # it died before prctl took effect (not "== 1": it may be PID 1)
        os._exit(1)


def _child(name: str, settings: config.Settings, pipe: Connection,
           supervisor: int) -> tuple[SignalStop, Callable[[bytes], None]]:
    """What every child process does first: die with the supervisor, stop on SIGTERM, log as
    `name`; returns the stop request and how to tell the supervisor something."""
    _die_with_parent(supervisor)
    stop = stop_on([signal.SIGTERM])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the supervisor, which decides
    log.configure(settings.log_format, settings.log_level, process=name)
    lock = threading.Lock()  # C-STORE threads share the pipe

    def tell(message: bytes) -> None:
        with lock:
            try:
                pipe.send_bytes(message)
            except OSError:  # the supervisor is gone; PR_SET_PDEATHSIG ends this process
                pass

    return stop, tell


def _settler_main(index: int, settings: config.Settings, open_worker: Callable[..., tuple[Any, Store]],
                  pipe: Connection, supervisor: int, sockets: dict[int, socket.socket]) -> None:
    """ack = "received": the process that de-identifies what the SCP workers acknowledged on receipt."""
    stop, tell = _child("settler", settings, pipe, supervisor)
    try:
        pipeline, store = open_worker(settings, lambda: tell(QUEUED))
        settler = settle.for_node(settings, pipeline, store)
    except Exception as exc:  # noqa: BLE001 - reported to the supervisor, which exits with it
        tell(FAILED + _describe(exc).encode("utf-8", "replace"))
        return
    tell(READY)
    settler.run(stop)
    store.close()


def _worker_main(index: int, settings: config.Settings, open_worker: Callable[..., tuple[Any, Store]],
                 pipe: Connection, supervisor: int, sockets: dict[int, socket.socket]) -> None:
    """One SCP worker process until SIGTERM: receive, then de-identify, spool and record (by default)
    or keep the original for the settler (ack = "received")."""
    stop, tell = _child(f"worker-{index}", settings, pipe, supervisor)
    incoming = _incoming(settings, index)
    net.use_incoming_dir(incoming)  # where pynetdicom writes the data sets it receives
    try:
        pipeline, store = open_worker(settings, lambda: tell(QUEUED))
        from node import scp

        server = scp.start(settings, pipeline, sockets)
    except Exception as exc:  # noqa: BLE001 - reported to the supervisor, which exits with it
        tell(FAILED + _describe(exc).encode("utf-8", "replace"))
        return
    tell(READY)
    swept = time.monotonic()
    while not stop.wait(1.0):
        if time.monotonic() - swept > SWEEP_EVERY:
            _sweep(incoming, time.time() - max(settings.network_timeout, settings.dimse_timeout) - SWEEP_EVERY)
            swept = time.monotonic()
    _drain(server, time.monotonic() + settings.stop_timeout)
    store.close()


SWEEP_EVERY = 60.0  # seconds


def _incoming(settings: config.Settings, index: int) -> Path:
    """This worker's own folder for data sets being received, emptied at each (re)start: what a
    killed worker was receiving was never acknowledged, and it is an original (PHI)."""
    folder = settings.incoming_dir / f"worker-{index}"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    _sweep(folder, time.time())
    return folder


def _sweep(folder: Path, before: float) -> None:
    """Remove files last written before `before`: half-received data sets of dropped associations
    (pynetdicom removes a received file only after the handler ran)."""
    for entry in os.scandir(folder):
        try:
            if entry.is_file() and entry.stat().st_mtime < before:
                os.unlink(entry.path)
        except OSError:
            continue


def _describe(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _drain(server: Any, deadline: float) -> None:
    """No new associations; established ones finish their C-STOREs until the deadline."""
    server.shutdown()
    # Only established associations have C-STOREs in flight; a bare TCP connection (a load
    # balancer's health check) would otherwise hold the stop until its ACSE timeout.
    while any(a.is_established for a in server.ae.active_associations) and time.monotonic() < deadline:
        time.sleep(0.1)
    for assoc in server.ae.active_associations:
        assoc.abort()
