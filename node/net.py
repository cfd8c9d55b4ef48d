"""The one module that adapts pynetdicom (and the stdlib internals it relies on for networking).

Everything telenode does to pynetdicom beyond its public API lives here, so that
an upgrade has one file to read and tests/test_net.py to fail when pynetdicom
changes underneath:

- `configure()` (called at start by the supervisor and by each SCP worker through
  `scp.start`; `Forwarder.start` calls it too, idempotent): pynetdicom's process-wide
  switches (chunked receive/send, unrestricted storage, no per-PDU log handlers), our
  transfer syntax choice in its unrestricted negotiation, and its loggers at debug level.
- per association: its TCP socket, the called AE title of a request, the reason
  of an A-ASSOCIATE-RJ, a bounded send queue, and the guard against the
  reactor stealing a response (the stall of issue 11, see `guard_reactor`).
- the listening side: `listener`, the socket the supervisor opens and its workers
  share; our server class on it (a larger backlog) and `serve`, which does what
  `AE.start_server` does but with our server class.
- `use_incoming_dir`: where pynetdicom writes the data sets it receives
  (tempfile's module-level default, which it uses without a directory).
- event-driven reactors (`_dul_reactor`, `_association_reactor`): pynetdicom's two threads per
  association poll in 1 ms sleeps; ours sleep on the socket and a wake-up (issue 15).
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Sequence

import pynetdicom
import structlog
from pynetdicom import AE, _config, acse, dul as _dul
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

#: Presentation context result: transfer syntaxes not supported (PS3.8 9.3.3.2).
TRANSFER_SYNTAXES_NOT_SUPPORTED = 0x04

#: P-DATA PDUs allowed to wait for the socket; pynetdicom's queue is unbounded, so a fast
#: disk filled memory with a whole large instance ahead of a slower network.
MAX_QUEUED_PDUS = 16

_negotiate_unrestricted = acse.negotiate_unrestricted  # pynetdicom's own, before configure() replaces it
_storage_syntaxes: tuple[str, ...] = ()  # what the SCP accepts; empty: pynetdicom's own choice


def configure(storage_syntaxes: Sequence[str] = ()) -> None:
    """Switch pynetdicom to how telenode uses it; idempotent. The storage SCP passes the transfer
    syntaxes it accepts, in order of preference; the sending side (forwarders) passes none."""
    global _storage_syntaxes
    quiet_library_log()  # every time: log.configure() (re)installs its own bridge
    # pynetdicom's "standard" handlers format a description of every PDU and DIMSE message at
    # debug level whether or not anyone logs it (~1 ms of CPU per instance on each side, issue 15);
    # its debug lines are not collected (quiet_library_log), so the work was thrown away.
    _config.LOG_HANDLER_LEVEL = "none"
    # Sent files are streamed from disk in PDU-sized chunks instead of decoded into memory.
    _config.STORE_SEND_CHUNKED_DATASET = True
    acse.negotiate_unrestricted = negotiate  # pynetdicom's acse module calls it by this name
    wake_reactors()
    if storage_syntaxes:
        _storage_syntaxes = tuple(str(ts) for ts in storage_syntaxes)
        # Received data sets go straight to a temporary file instead of memory (large instances),
        # and storage classes pynetdicom does not know (private, newer) are accepted too.
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.UNRESTRICTED_STORAGE_SERVICE = True


class _DebugBridge(logging.Handler):
    """pynetdicom's lines as structlog debug lines ("library_message"); its info lines carry no
    dataset values (its debug lines can carry UIDs, so they are not collected)."""

    def emit(self, record: logging.LogRecord) -> None:
        structlog.get_logger(record.name).debug("library_message", library_level=record.levelname.lower(),
                                                message=record.getMessage())


def quiet_library_log() -> None:
    """pynetdicom logs every failed attempt at error ("Association Rejected", "Connection refused"):
    telenode reports destination state itself (one warning down, one info up), so the library's
    own lines go to debug."""
    library = logging.getLogger("pynetdicom")
    library.handlers = [_DebugBridge(level=logging.INFO)]
    library.setLevel(logging.INFO)
    library.propagate = False


def negotiate(rq_contexts: Any, ac_contexts: Any, roles: Any = None) -> Any:
    """Unrestricted storage negotiation that accepts a transfer syntax the node can store.

    pynetdicom's unrestricted service accepts the *first* proposed transfer
    syntax of every storage context, even one the node would then have to
    refuse instance by instance (JPEG XL, say), leaving the modality no
    fallback. Here each context gets the first proposed syntax in the
    configured storage syntaxes, or is rejected (0x04) so the sender can try another.
    """
    result, reply_roles = _negotiate_unrestricted(rq_contexts, ac_contexts, roles)
    if not _storage_syntaxes:
        return result, reply_roles
    proposed = {cx.context_id: list(cx.transfer_syntax) for cx in rq_contexts}
    for cx in result:
        if cx.result != 0x00:
            continue
        ours = [ts for ts in proposed.get(cx.context_id, []) if ts in _storage_syntaxes]
        if ours:
            cx.transfer_syntax = [ours[0]]
        else:
            cx.result = TRANSFER_SYNTAXES_NOT_SUPPORTED
    return result, reply_roles


# -- one association --------------------------------------------------------------------------------


def socket_of(assoc: Any) -> socket.socket | None:
    """The association's TCP (or TLS) socket, or None before it connected / after it closed."""
    return getattr(getattr(assoc.dul, "socket", None), "socket", None)


def is_tls(assoc: Any) -> bool:
    return isinstance(socket_of(assoc), ssl.SSLSocket)


def set_nodelay(event: Any) -> None:
    """EVT_CONN_OPEN handler: Nagle + delayed ACK adds ~40 ms to every C-STORE round trip, and
    pynetdicom never disables it."""
    sock = socket_of(event.assoc)
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def called_ae_title(assoc: Any) -> str:
    """The Called AE Title of the peer's A-ASSOCIATE-RQ (acceptor side)."""
    primitive = assoc.requestor.primitive
    return str(getattr(primitive, "called_ae_title", "") or "").strip()


def calling_ae_title(assoc: Any) -> str:
    """The Calling AE Title of the peer's A-ASSOCIATE-RQ (acceptor side, also before negotiation)."""
    primitive = assoc.requestor.primitive
    return str(getattr(primitive, "calling_ae_title", "") or "").strip()


def rejection(assoc: Any) -> str:
    """Why the remote rejected our A-ASSOCIATE-RQ, from its A-ASSOCIATE-RJ (result, source, reason;
    PS3.8 9.3.4): "association rejected: called AE title not recognised (permanent, service user)"."""
    rsp = getattr(assoc.acceptor, "primitive", None)
    if rsp is None or getattr(rsp, "result", None) not in (0x01, 0x02):
        return "association rejected"
    sources = {1: "service user", 2: "service provider (ACSE)", 3: "service provider (presentation)"}
    try:
        reason = str(rsp.reason_str)
    except (KeyError, TypeError, ValueError):  # an invalid source/diagnostic pair
        reason = f"reason {rsp.diagnostic}"
    kind = "permanent" if rsp.result == 0x01 else "transient"
    return f"association rejected: {reason} ({kind}, {sources.get(rsp.result_source, 'remote')})"


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
        # Woken by each get() (Queue.get notifies not_full), not by polling: a sleep-poll of 0.5 ms
        # woke the sender ~2000 times a second while a large instance went out (issue 15).
        with self.not_full:
            while self._qsize() >= MAX_QUEUED_PDUS and self.assoc.is_established:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.not_full.wait(min(remaining, 0.05))  # looks at the association again at least this often
        super().put(item, block, timeout)


def bound_send_queue(assoc: Any, timeout: float) -> None:
    """Swap in the bounded queue once the association is up (the old one is empty by then)."""
    dul = assoc.dul
    if dul.to_provider_queue.empty():
        dul.to_provider_queue = _SendQueue(assoc, timeout)


def guard_reactor(assoc: Any) -> None:
    """Requestor side: a response the association's reactor thread takes goes back to the queue.

    pynetdicom pauses its reactor before send_c_store() with a flag handshake that has a
    window: the reactor sets `_is_paused`, passes its still-open checkpoint, and is
    descheduled; the sender sees the flag, sends, and the remote's C-STORE-RSP arrives;
    the reactor then takes it ("Received unexpected C-STORE service message") and drops it,
    and send_c_store() waits out its DIMSE timeout for a response that already came, so the
    instance the remote stored is resent (issue 11's 61 s stall and duplicate). The reactor
    of an SCU serves no requests of ours, so a response it dequeues is handed back to the
    queue, where the blocked send_c_store() receives it.
    """
    serve_request = assoc._serve_request

    def _serve_or_return(msg: Any, context_id: int) -> None:
        if msg is not None and not msg.is_valid_request:
            assoc.dimse.msg_queue.put((context_id, msg))
            time.sleep(0.001)  # let the waiting sender take it before the reactor looks again
            return
        serve_request(msg, context_id)

    assoc._serve_request = _serve_or_return


class _RecordingSocket(ssl.SSLSocket):
    """Keeps the reason of a failed TLS handshake on its context (pynetdicom only logs it)."""

    describe: Any = staticmethod(str)

    def connect(self, address: Any) -> None:
        self.context.last_failure = None  # type: ignore[attr-defined]
        super().connect(address)

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except (ssl.SSLError, TimeoutError) as exc:
            self.context.last_failure = self.describe(exc)  # type: ignore[attr-defined]
            raise


def record_tls_failures(context: ssl.SSLContext, describe: Any) -> None:
    """A destination's client context: the reason its last handshake failed, described by
    `describe`, is kept in `context.last_failure` (None after a connect that got through)."""
    context.sslsocket_class = type("RecordingSocket", (_RecordingSocket,), {"describe": staticmethod(describe)})
    context.last_failure = None  # type: ignore[attr-defined]


# -- the listening side -----------------------------------------------------------------------------


# socketserver's default backlog of 5 drops SYNs when a PACS opens a burst of associations
# (clients then wait out a retransmission timeout, 1 s and more).
BACKLOG = 128


def listener(host: str, port: int) -> socket.socket:
    """A socket bound to the port, that worker processes inherit and accept on together once the
    caller has called `listen(BACKLOG)` on it (see `Server`). Binding first makes a taken port a
    start error before anything else starts; connections are refused until it listens.

    Not SO_REUSEPORT: with a socket per worker the kernel hashes each connection to one of
    them whatever they are doing, and two modalities land on the same busy worker half the
    time. On one shared socket, every worker waits to accept, and the one whose interpreter
    is free takes the connection first. Non-blocking: a worker that lost the race gets
    EAGAIN instead of waiting in accept() for the next connection.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of a previous run
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Server(ThreadedAssociationServer):
    """pynetdicom's threaded server on a listening socket the worker inherited (`adopted`), or
    one it binds itself with SO_REUSEPORT (the return path, tests)."""

    request_queue_size = BACKLOG
    adopted: socket.socket | None = None  # set on a subclass by `serve`

    def server_bind(self) -> None:
        assert self.socket is not None  # socketserver creates it before binding
        if self.adopted is not None:
            self.socket.close()
            self.socket = self.adopted
            self.socket.setblocking(False)  # this process's socket object: no timeout, EAGAIN if another took it
            self.server_address = self.socket.getsockname()
            return
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def server_activate(self) -> None:
        if self.adopted is None:  # an adopted socket is listening already
            super().server_activate()

    def server_close(self) -> None:
        if self.adopted is None:
            super().server_close()
        elif self.socket is not None:  # this process's descriptor only: shutdown() would stop every worker's
            self.socket.close()


def serve(ae: AE, address: tuple[str, int], handlers: list, server_class: type, sock: socket.socket | None = None,
          **attributes: Any) -> Any:
    """ae.start_server(block=False), but with our server class (start_server takes none), on the
    inherited listening socket `sock` if there is one."""
    if sock is not None:
        server_class = type(server_class.__name__, (server_class,), {"adopted": sock})
    server = ae.make_server(address, evt_handlers=handlers, server_class=server_class)
    for name, value in attributes.items():  # before the first connection can arrive
        setattr(server, name, value)
    thread = threading.Thread(target=make_target(server.serve_forever), name=f"AcceptorServer@{address[1]}",
                              daemon=True)
    thread.start()
    ae._servers.append(server)  # what AE.start_server does: server.shutdown() removes it again
    return server


def use_incoming_dir(folder: Path) -> None:
    """pynetdicom writes each received data set with tempfile's default directory: point it at
    the worker's own incoming folder (0700, on the data_dir's file system)."""
    tempfile.tempdir = str(folder)



# -- hostile input: the PDU guard (issue 16) --------------------------------------------------------

#: Largest PDU other than P-DATA-TF accepted: an A-ASSOCIATE-RQ with 128 presentation contexts and
#: a user identity is far below it.
MAX_CONTROL_PDU = 1 << 20
#: A-ABORT reasons of the service provider (source 2), PS3.8 9.3.8 table 9-26.
UNRECOGNIZED_PDU, UNEXPECTED_PDU, UNEXPECTED_PDU_PARAMETER, INVALID_PDU_PARAMETER = 0x01, 0x02, 0x05, 0x06
_A_ABORT_HEADER = b"\x07\x00\x00\x00\x00\x04"
_violations: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


def violation(assoc: Any) -> str | None:
    """The protocol violation the PDU guard aborted this association for, if any."""
    return _violations.get(assoc)


class _PDUGuard:
    """Checks every PDU a peer sends before pynetdicom reads or decodes it, and turns a violation
    into an A-ABORT (source: service provider, with its PS3.8 reason) sent at once:

    - a P-DATA-TF longer than the maximum PDU length we announced (PS3.8 9.3.8), or any other
      PDU longer than MAX_CONTROL_PDU: aborted on its header, its body never read (memory stays
      flat whatever length a peer announces; pynetdicom would buffer all of it);
    - an unknown PDU type, or a PDU the association's state does not expect;
    - a PDV for a presentation context that was not accepted, a malformed PDV, or DIMSE fragments
      out of order (data before its command, a command inside a data set).

    pynetdicom then sees an A-ABORT from the peer (fed to it in place of the offending PDU) and
    ends the association through its own state machine: nothing is left half-open.
    """

    def __init__(self, assoc: Any, max_pdu: int) -> None:
        self.assoc, self.max_pdu = assoc, max_pdu
        self.header_next = True
        self.feed = b""  # the A-ABORT body pynetdicom reads after our substituted header
        self.fragment = "idle"  # DIMSE fragments: idle, command, after_command, data
        self.context_id: int | None = None
        sock = assoc.dul.socket
        self._recv, self._decode = sock.recv, assoc.dul._decode_pdu
        sock.recv = self.recv  # AssociationSocket.recv: the DUL reads header, then body, with it
        assoc.dul._decode_pdu = self.decode

    def recv(self, nr_bytes: int) -> bytearray:
        if self.feed:
            data, self.feed = self.feed[:nr_bytes], self.feed[nr_bytes:]
            return bytearray(data)
        if not self.header_next:
            self.header_next = True
            return self._recv(nr_bytes)
        data = self._recv(nr_bytes)
        if nr_bytes != 6 or len(data) != 6:
            return data
        pdu_type, _, length = struct.unpack(">BBL", data)
        found = self._check_header(pdu_type, length)
        if found is None:
            self.header_next = False
            return data
        self.feed = self._abort(*found)[6:]
        return bytearray(_A_ABORT_HEADER)

    def _check_header(self, pdu_type: int, length: int) -> tuple[int, str] | None:
        state = self.assoc.dul.state_machine.current_state
        if not 0x01 <= pdu_type <= 0x07:
            return UNRECOGNIZED_PDU, f"unrecognised PDU type 0x{pdu_type:02X}"
        if pdu_type == 0x04 and self.max_pdu and length > self.max_pdu:
            return INVALID_PDU_PARAMETER, f"P-DATA-TF of {length} bytes, above the announced maximum {self.max_pdu}"
        if pdu_type != 0x04 and length > MAX_CONTROL_PDU:
            return INVALID_PDU_PARAMETER, f"PDU type 0x{pdu_type:02X} of {length} bytes"
        if (state == "Sta2" and pdu_type not in (0x01, 0x07)) or (state == "Sta6" and pdu_type in (1, 2, 3)):
            return UNEXPECTED_PDU, f"unexpected PDU type 0x{pdu_type:02X} in state {state}"
        return None

    def decode(self, bytestream: bytearray) -> tuple[Any, str]:
        if bytestream[:1] == b"\x04" and self.assoc.dul.state_machine.current_state == "Sta6":
            found = self._check_pdvs(bytes(bytestream[6:]))
            if found is not None:
                return self._decode(bytearray(self._abort(*found)))  # an A-ABORT: Evt16
        return self._decode(bytestream)

    def _check_pdvs(self, body: bytes) -> tuple[int, str] | None:
        accepted = {cx.context_id for cx in self.assoc.accepted_contexts}
        offset = 0
        while offset < len(body):
            if len(body) - offset < 6:
                return INVALID_PDU_PARAMETER, "malformed PDV item"
            (length,) = struct.unpack(">L", body[offset:offset + 4])
            context_id, control = body[offset + 4], body[offset + 5]
            if length < 2 or offset + 4 + length > len(body) or control & 0xFC:
                return INVALID_PDU_PARAMETER, "malformed PDV item"
            if context_id not in accepted:
                return INVALID_PDU_PARAMETER, f"PDV for presentation context {context_id}, which was not accepted"
            found = self._check_order(context_id, control)
            if found is not None:
                return found
            offset += 4 + length
        return None

    def _check_order(self, context_id: int, control: int) -> tuple[int, str] | None:
        is_command, is_last = bool(control & 1), bool(control & 2)
        in_message = self.fragment in ("command", "data") or (not is_command and self.fragment == "after_command")
        if in_message and context_id != self.context_id:
            return UNEXPECTED_PDU_PARAMETER, "presentation context changed inside a DIMSE message"
        if is_command and self.fragment == "data":
            return UNEXPECTED_PDU_PARAMETER, "command fragment inside a data set"
        if not is_command and self.fragment in ("idle", "command"):
            return UNEXPECTED_PDU_PARAMETER, "data fragment before its command"
        self.context_id = context_id
        if is_command:
            self.fragment = "after_command" if is_last else "command"
        else:
            self.fragment = "idle" if is_last else "data"
        return None

    def _abort(self, reason: int, text: str) -> bytes:
        """Send the A-ABORT to the peer, stop reading, and return its bytes for pynetdicom."""
        pdu = _A_ABORT_HEADER + bytes([0x00, 0x00, 0x02, reason])
        _violations[self.assoc] = text
        requestor = self.assoc.requestor
        structlog.get_logger("telenode.scp").warning(
            "protocol_violation", peer=f"{requestor.address}:{requestor.port}",
            calling_aet=str(requestor.ae_title or "").strip(), reason=text, action=f"A-ABORT (reason {reason})")
        raw = socket_of(self.assoc)
        if raw is not None:
            try:
                raw.settimeout(2.0)  # a peer that does not read must not hold this thread
                raw.sendall(pdu)
                raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return pdu


def guard_pdus(event: Any) -> None:
    """EVT_CONN_OPEN handler (acceptor): check every PDU of this connection (see _PDUGuard)."""
    _PDUGuard(event.assoc, event.assoc.ae.maximum_pdu_size)


def discard_partial(assoc: Any) -> None:
    """Delete the data set file of a C-STORE the peer did not finish (PHI: an original). pynetdicom
    removes it only after the C-STORE handler ran, so an aborted transfer would leave it behind."""
    message = getattr(assoc.dimse, "message", None)
    handle = getattr(message, "_data_set_file", None)
    path = getattr(message, "_data_set_path", None)
    if handle is not None:
        try:
            handle.close()
        except OSError:
            pass
    if path is not None:
        Path(path).unlink(missing_ok=True)


# -- admission: idle connections and the association limit (issue 16) -----------------------------


class Slots:
    """At most `limit` associations at once across every worker process of one node: one lock file
    per slot under `folder`, held with flock while an association lives (the kernel frees the
    slots of a worker that dies). A burst is served up to the limit whichever worker the kernel
    hands each connection to."""

    def __init__(self, folder: Path, limit: int) -> None:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._files = [os.open(folder / f"{index}", os.O_RDWR | os.O_CREAT, 0o600) for index in range(limit)]
        self._held: set[int] = set()
        self._lock = threading.Lock()

    def take(self) -> int | None:
        """A free slot (held until `give`), or None when every slot is in use."""
        with self._lock:
            for index, handle in enumerate(self._files):
                if index in self._held:
                    continue
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # another worker's association
                self._held.add(index)
                return index
        return None

    def give(self, index: int) -> None:
        with self._lock:
            if index in self._held:
                fcntl.flock(self._files[index], fcntl.LOCK_UN)
                self._held.discard(index)

    def in_use(self) -> int:
        """Slots held by this process."""
        with self._lock:
            return len(self._held)


class Admission:
    """The listening side's limits, on connections as they come (EVT_CONN_OPEN, EVT_REQUESTED,
    and every way a connection ends):

    - a connection must send its A-ASSOCIATE-RQ within `request_timeout` seconds (pynetdicom waits
      the whole ACSE timeout, 30 s by default);
    - at most `max_pending` connections per peer address that have not sent it yet: a further one
      closes that address's oldest (a modality that connects and associates at once is never the
      oldest; a flood of idle sockets only evicts itself);
    - association slots (`Slots`) are taken when the A-ASSOCIATE-RQ arrives, not at the TCP
      connect, so idle sockets hold none.
    """

    def __init__(self, slots: Slots, request_timeout: float, acse_timeout: float, max_pending: int) -> None:
        self.slots, self.request_timeout, self.acse_timeout = slots, request_timeout, acse_timeout
        self.max_pending = max_pending
        self._pending: dict[str, list[Any]] = {}
        self._holding: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def opened(self, event: Any) -> None:
        """EVT_CONN_OPEN: start the A-ASSOCIATE-RQ deadline; evict the address's oldest if over the cap."""
        assoc = event.assoc
        assoc.acse_timeout = self.request_timeout  # how long the acceptor waits for the request
        assoc.dul.artim_timer.timeout = self.request_timeout  # and the DUL before it closes the socket
        address = str(assoc.requestor.address)
        with self._lock:
            waiting = self._pending.setdefault(address, [])
            waiting[:] = [a for a in waiting if a.is_alive()]  # ended without an event we saw
            waiting.append(assoc)
            evicted = waiting.pop(0) if len(waiting) > self.max_pending else None
        if evicted is not None:
            structlog.get_logger("telenode.scp").debug("connection_evicted", peer=address,
                                                       reason="too many connections without an association")
            _hang_up(evicted)

    def requested(self, event: Any) -> bool:
        """EVT_REQUESTED: the request came in time; False when no association slot is free."""
        assoc = event.assoc
        assoc.acse_timeout = self.acse_timeout
        assoc.dul.artim_timer.timeout = self.acse_timeout
        self._not_pending(assoc)
        self._reclaim()
        slot = self.slots.take()
        if slot is None:
            return False
        with self._lock:
            self._holding[assoc] = slot
        return True

    def ended(self, event: Any) -> None:
        """Any end of a connection (closed, released, aborted, rejected): free what it held."""
        assoc = event.assoc
        self._not_pending(assoc)
        with self._lock:
            slot = self._holding.pop(assoc, None)
        if slot is not None:
            self.slots.give(slot)

    def _reclaim(self) -> None:
        """Slots of associations whose thread has ended without an event we saw (a safety net)."""
        with self._lock:
            gone = [(a, slot) for a, slot in self._holding.items() if not a.is_alive()]
            for assoc, _ in gone:
                del self._holding[assoc]
        for _, slot in gone:
            self.slots.give(slot)

    def _not_pending(self, assoc: Any) -> None:
        with self._lock:
            waiting = self._pending.get(str(assoc.requestor.address), [])
            if assoc in waiting:
                waiting.remove(assoc)
            if not waiting:
                self._pending.pop(str(assoc.requestor.address), None)

    def pending(self) -> int:
        with self._lock:
            return sum(len(w) for w in self._pending.values())


def _hang_up(assoc: Any) -> None:
    """Close a connection from another thread: its DUL sees the transport close and ends."""
    raw = socket_of(assoc)
    if raw is not None:
        try:
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def reject_busy(assoc: Any) -> None:
    """From EVT_REQUESTED: A-ASSOCIATE-RJ rejected-transient, service provider (presentation),
    local-limit-exceeded (PS3.8 9.3.4), then end the association as pynetdicom's own limit does."""
    assoc.acse.send_reject(0x02, 0x03, 0x02)
    assoc.kill()


# -- event-driven reactors (issue 15) ---------------------------------------------------------------
#
# pynetdicom runs two threads per association, and both poll: the DUL thread sleeps 1 ms whenever
# nothing is queued, the association thread sleeps 1 ms before every look at its queues. Each
# idle association costs ~10 % of a core, and every hand-over between the two threads (a PDU
# read, a DIMSE message complete, a response queued) waits up to 1 ms for the next poll, several
# times per C-STORE on each side. Here the same loops (pynetdicom 3.0's, otherwise line for line)
# sleep until there is something to do: the DUL thread on its socket and a wake-up pipe written by
# send_pdu(), the association thread on an Event the DUL thread sets after each state-machine
# action. Both still look around every TICK seconds, so timers, kill() and a dead peer are
# noticed as before.

#: The longest either reactor sleeps without being woken (ARTIM and idle timers, kill()).
TICK = 0.01
_PATCHED_SERIES = "3.0."  # the loops below are pynetdicom 3.0's; another series keeps its own


class _Wake:
    """A pipe a DUL thread sleeps on beside its socket; poke() from any thread wakes it."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._lock = threading.Lock()  # poke() never writes to a closed (and reused) descriptor
        self._closed = False

    def poke(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._write, b"\0")
            except BlockingIOError:  # already full of pokes: awake anyway
                pass

    def wait(self, link: Any, timeout: float) -> None:
        """Until the peer sent something, poke() was called, or `timeout` passed."""
        raw = getattr(link, "socket", None) if getattr(link, "_is_connected", False) else None
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return  # decrypted bytes already buffered: select() would not see them
        try:
            readable, _, _ = select.select([self._read] if raw is None else [raw, self._read], [], [], timeout)
        except (OSError, ValueError):  # the socket closed under us: let the loop find out, as pynetdicom would
            time.sleep(0.001)
            return
        if self._read in readable:
            try:
                while os.read(self._read, 512):
                    pass
            except BlockingIOError:
                pass

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._read)
                os.close(self._write)


def _reactor_event(assoc: Any) -> threading.Event:
    """The Event an association's reactor sleeps on (created by its DUL thread before the reactor runs)."""
    event = getattr(assoc, "_telenode_woken", None)
    if event is None:
        event = assoc._telenode_woken = threading.Event()
    return event  # type: ignore[no-any-return]


def _poke(dul: Any) -> None:
    wake = getattr(dul, "_telenode_wake", None)
    if wake is not None:
        wake.poke()


def _dul_reactor(self: Any) -> None:
    """DULServiceProvider.run_reactor, sleeping on the socket and the wake-up pipe."""
    wake = self._telenode_wake = _Wake()
    woken = _reactor_event(self.assoc)
    self._idle_timer.start()
    sleep = False
    try:
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True
            if sleep:
                wake.wait(self.socket, TICK)
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:  # noqa: BLE001 - pynetdicom's own handling, unchanged
                _abort_on_error(self, exc)
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            self.state_machine.do_action(event)
            woken.set()  # a message, release or abort may be waiting for the association's reactor
            sleep = False
    finally:
        wake.close()
        woken.set()


def _abort_on_error(dul: Any, exc: Exception) -> None:
    """What pynetdicom's DUL does when its loop raises: log, A-ABORT, stop both reactors."""
    _dul.LOGGER.error("Exception in DUL.run(), aborting association")
    _dul.LOGGER.exception(exc)
    abort_pdu = A_ABORT_RQ()
    abort_pdu.source = 0x02
    abort_pdu.reason_diagnostic = 0x00
    dul.socket.send(abort_pdu.encode())
    dul.assoc.is_aborted = True
    dul.assoc.is_established = False
    dul.assoc._kill = True
    dul._kill_thread = True


def _association_reactor(self: Any) -> None:
    """Association._run_reactor, sleeping on the Event its DUL thread sets instead of 1 ms steps.

    While it sleeps it counts as paused (`_is_paused`): a sender (send_c_store and the like) that
    closes the checkpoint may go ahead at once instead of waiting for the next poll.

    pynetdicom's pause handshake has a window: the reactor passes the checkpoint, a sender closes
    it and sees `_is_paused` still true, and the reactor then takes the sender's response off the
    queue (issue 11's stall; `guard_reactor`). Looking at the checkpoint again after leaving the
    paused state closes it: a sender that came through the window is let go first."""
    woken = _reactor_event(self)
    self._is_paused = False
    while not self._kill:
        self._is_paused = True
        woken.wait(TICK)
        woken.clear()  # cleared before looking: a set() from now on is seen by the next wait
        self._reactor_checkpoint.wait()
        self._is_paused = False
        if not self._reactor_checkpoint.is_set():  # a sender closed it after we passed: its turn
            continue
        if _one_round(self):
            return


def _one_round(assoc: Any) -> bool:
    """One look of pynetdicom's reactor at its queues and timers; True when the association ended."""
    context_id, msg = assoc.dimse.get_msg(block=False)
    if msg:
        assoc._serve_request(msg, context_id)
    if assoc.is_established and assoc.acse.is_release_requested():
        assoc.acse.send_release(is_response=True)
        _association_log().info("Association Released")
        assoc.is_released = True
        assoc.is_established = False
        pynetdicom.evt.trigger(assoc, pynetdicom.evt.EVT_RELEASED, {})
        assoc.kill()
        return True
    if assoc.acse.is_aborted():
        text = "Association Aborted" + (" (A-P-ABORT)" if assoc.acse.is_aborted("a-p-abort") else "")
        _association_log().info(text)
        assoc.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for subscribers
        assoc.is_aborted = True
        assoc.is_established = False
        pynetdicom.evt.trigger(assoc, pynetdicom.evt.EVT_ABORTED, {})
        assoc.kill()
        return True
    if not assoc.dul.is_alive():
        assoc.kill()
        return True
    if assoc.dul.idle_timer_expired():
        _association_log().error("Network timeout reached")
        if assoc.network_timeout_response == "A-RELEASE":
            assoc._is_paused = True
            assoc._reactor_checkpoint.wait()
            assoc.release()
            assoc._is_paused = False
        else:
            assoc.abort()
        assoc.kill()
        return True
    return False


def _association_log() -> logging.Logger:
    return logging.getLogger("pynetdicom.association")


_original: dict[str, Callable[..., Any]] = {  # pynetdicom's own, for the wrappers and for tests/test_net.py to compare against
    "run_reactor": DULServiceProvider.run_reactor,
    "_run_reactor": Association._run_reactor,
    "send_pdu": DULServiceProvider.send_pdu,
    "kill_dul": DULServiceProvider.kill_dul,
    "stop_dul": DULServiceProvider.stop_dul,
    "kill": Association.kill,
}


def _send_pdu(self: Any, primitive: Any) -> None:
    _original["send_pdu"](self, primitive)
    _poke(self)


def _kill_dul(self: Any) -> None:
    _original["kill_dul"](self)
    _poke(self)


def _stop_dul(self: Any) -> bool:
    if self.state_machine.current_state == "Sta1":  # pynetdicom then waits for the thread: wake it first
        self._kill_thread = True
        _poke(self)
    return bool(_original["stop_dul"](self))


def _kill(self: Any) -> None:
    self._kill = True
    _reactor_event(self).set()
    _original["kill"](self)


def wake_reactors() -> None:
    """Install the event-driven reactors (idempotent; only over the pynetdicom series they copy)."""
    if not pynetdicom.__version__.startswith(_PATCHED_SERIES):
        return
    DULServiceProvider.run_reactor = _dul_reactor  # type: ignore[method-assign]
    DULServiceProvider.send_pdu = _send_pdu  # type: ignore[method-assign]
    DULServiceProvider.kill_dul = _kill_dul  # type: ignore[method-assign]
    DULServiceProvider.stop_dul = _stop_dul  # type: ignore[method-assign]
    Association._run_reactor = _association_reactor  # type: ignore[method-assign]
    Association.kill = _kill  # type: ignore[method-assign]
