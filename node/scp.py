"""Storage SCP: the AE that modalities and the hospital PACS send to.

Accepts every storage SOP class (pynetdicom's unrestricted storage service:
the standard ones and private or unknown ones), answers C-ECHO, refuses
calling AE titles that are not allowed at association time (A-ASSOCIATE-RJ,
not accept-then-fail), sets TCP_NODELAY on every accepted socket, and hands
each received data set — already on disk, never decoded in memory by
pynetdicom — to the pipeline, answering with the pipeline's status.

With [node.tls] a DICOM TLS listener (PS3.15 Annex B) runs beside the plain
one (or alone, on node.port): the handshake runs in the connection's own
thread under handshake_timeout, so a client that connects and stalls never
holds up the accept loop. The worker processes accept on listening sockets
the supervisor opened and they share (net.listener): a new association goes
to whichever worker is free to take it. Each association attempt leaves
one audit record (accepted, rejected, or refused at the TLS handshake).
"""

from __future__ import annotations

import errno
import shutil
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    UID,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import
from pynetdicom.transport import ThreadedAssociationServer

from node import log, net, tls
from node.config import TLS, Settings
from node.pipeline import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS, Pipeline, is_out_of_space
from node.settle import Received
from node.store import Store

#: Transfer syntaxes the node stores and forwards; pixel data is passed through, never decoded.
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

_log = log.get("scp")

def _peer(event: Any) -> dict[str, Any]:
    info = event.assoc.requestor
    return {"calling_aet": info.ae_title, "peer": f"{info.address}:{info.port}"}


def _is_tls(event: Any) -> bool:
    return net.is_tls(event.assoc)


def _called_aet(event: Any) -> str:
    return net.called_ae_title(event.assoc)


def _on_accepted(event: Any, store: Store) -> None:
    peer, secure = _peer(event), _is_tls(event)
    store.audit("association", **peer, called_aet=_called_aet(event), tls=secure, accepted=True, reason="")
    _log.info("association_accepted", **peer, tls=secure, contexts=len(event.assoc.accepted_contexts))


def _rejection(event: Any) -> str:
    allowed = [aet.strip() for aet in event.assoc.ae.require_calling_aet]
    if allowed and event.assoc.requestor.ae_title.strip() not in allowed:
        return "calling AE title not allowed"
    return "too many associations"


def _on_rejected(event: Any, store: Store) -> None:
    peer, secure, reason = _peer(event), _is_tls(event), _rejection(event)
    store.audit("association", **peer, called_aet=_called_aet(event), tls=secure, accepted=False, reason=reason)
    _log.warning("association_rejected", **peer, tls=secure, reason=reason)


def _on_released(event: Any) -> None:
    _log.info("association_released", **_peer(event))


def _on_aborted(event: Any) -> None:
    net.discard_partial(event.assoc)  # the original of a C-STORE cut short, at once
    if net.violation(event.assoc) is not None:  # the guard sent the A-ABORT and logged its one line
        return
    if event.assoc.requestor.primitive is None:  # a connection that never associated (a port probe)
        _log.debug("connection_closed", peer=_peer(event)["peer"])
    else:
        _log.warning("association_aborted", **_peer(event))


def _on_conn_close(event: Any) -> None:
    net.discard_partial(event.assoc)


def _status(code: int, comment: str = "") -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment[:64]
    return status


def make_store_handler(pipeline: Pipeline, data_dir: Path | None = None, min_free_bytes: int = 0,
                       received: Received | None = None) -> Any:
    """The EVT_C_STORE handler: the response leaves only after it returns, so durability is decided here.
    By default the instance is de-identified, spooled and queued first; with `received` (ack =
    "received") only the original is made durable, for the settler to de-identify."""

    def on_store(event: Any) -> Dataset:
        calling_aet = event.assoc.requestor.ae_title
        if data_dir is not None and min_free_bytes and shutil.disk_usage(data_dir).free < min_free_bytes:
            _log.error("instance_refused", calling_aet=calling_aet, status="0xA700",
                       reason="free space below node.min_free_mb")
            return _status(OUT_OF_RESOURCES, "out of resources: disk space low")
        if event.context.transfer_syntax not in TRANSFER_SYNTAXES:
            _log.warning("instance_refused", calling_aet=calling_aet, status="0xC210",
                         reason=f"unsupported transfer syntax {event.context.transfer_syntax}")
            return _status(CANNOT_UNDERSTAND, "transfer syntax not supported")
        if received is not None:
            return _keep(received, event.dataset_path, calling_aet, event.request.Priority or 0)
        outcome = pipeline.receive(event.dataset_path, calling_aet=calling_aet,
                                   priority=event.request.Priority or 0)
        return _status(outcome.status, outcome.comment)

    return on_store


def _keep(received: Received, path: Path, calling_aet: str, priority: int) -> Dataset:
    """ack = "received": Success once the original is durable in data_dir/received."""
    try:
        received.keep(path, calling_aet, priority)
    except OSError as exc:
        reason = "disk full" if is_out_of_space(exc) else f"storage error ({type(exc).__name__})"
        _log.error("instance_not_stored", calling_aet=calling_aet, status="0xA700", reason=reason)
        return _status(OUT_OF_RESOURCES, f"out of resources: {reason}")
    _log.debug("instance_received", calling_aet=calling_aet)
    return _status(SUCCESS)


UNLIMITED = 1 << 30


def admission(settings: Settings) -> net.Admission:
    """[node] limits: workers × max_associations slots shared by the workers, the A-ASSOCIATE-RQ
    deadline, and the cap on not-yet-associated connections per peer address."""
    slots = net.Slots(settings.data_dir / "slots", settings.workers * settings.max_associations)
    return net.Admission(slots, settings.association_request_timeout, settings.acse_timeout,
                         settings.max_pending_per_address)


def _on_requested(event: Any, gate: net.Admission, store: Store) -> None:
    if gate.requested(event):
        return
    peer = {"calling_aet": net.calling_ae_title(event.assoc), "peer": _peer(event)["peer"]}
    reason = "too many associations"
    store.audit("association", **peer, called_aet=_called_aet(event), tls=_is_tls(event), accepted=False,
                reason=reason)
    _log.warning("association_rejected", **peer, tls=_is_tls(event), reason=reason)
    net.reject_busy(event.assoc)


def build_ae(settings: Settings) -> AE:
    """An AE configured from [node]: title, limits, timeouts, PDU size, allowed calling AEs."""
    ae = AE(ae_title=settings.ae_title)
    # The limit is net.Slots' (associations of all workers, taken at the A-ASSOCIATE-RQ); pynetdicom's
    # own would count every open socket of this worker, idle ones included.
    ae.maximum_associations = UNLIMITED
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.maximum_pdu_size = settings.max_pdu
    ae.require_calling_aet = list(settings.allowed_calling_aets)
    ae.add_supported_context(Verification)
    return ae


_Server = net.Server


class _TLSServer(_Server):
    """A DICOM TLS listener that does the handshake in each connection's own thread, within
    `handshake_timeout`, instead of in the accept loop as pynetdicom does (one stalled client
    would hold up every new association). Refused handshakes are reported to `on_refused`."""

    daemon_threads = True  # shutdown() does not wait for handshakes in progress
    tls_context: ssl.SSLContext
    handshake_timeout: float = 10.0
    handshakes: threading.BoundedSemaphore  # handshakes in progress at once; more are refused
    on_refused: Callable[[str, str], None] = staticmethod(lambda peer, reason: None)
    _closing = False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        peer = f"{client_address[0]}:{client_address[1]}"
        if not self.handshakes.acquire(blocking=False):  # a flood of connections must not mean a flood of threads
            request.close()
            self.on_refused(peer, "TLS: too many handshakes in progress")
            return
        try:
            secured = self._handshake(request, peer)
        finally:
            self.handshakes.release()
        if secured is not None:
            super().process_request_thread(secured, client_address)

    def _handshake(self, raw: socket.socket, peer: str) -> ssl.SSLSocket | None:
        """The TLS socket, or None when the client was refused (or only probed the port)."""
        deadline = time.monotonic() + self.handshake_timeout
        sock: socket.socket = raw
        try:
            raw.settimeout(self.handshake_timeout)
            if not raw.recv(1, socket.MSG_PEEK):  # connected and closed without a byte: a port probe
                raw.close()
                return None
            sock = self.tls_context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            # CPython's SSL handshake treats the timeout as a deadline for the whole operation, not
            # per read: a client trickling its ClientHello a byte at a time is cut off too (tested).
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            sock.do_handshake()
            sock.settimeout(None)
        except (OSError, ValueError) as exc:
            sock.close()
            self.on_refused(peer, tls.describe(exc))
            return None
        if self._closing:
            sock.close()
            return None
        _log_tls(sock, peer)
        return sock  # type: ignore[return-value]

    def shutdown(self) -> None:
        self._closing = True
        super().shutdown()


def _log_tls(sock: ssl.SSLSocket, peer: str) -> None:
    cert = sock.getpeercert() or {}
    subject = {str(item[0]): item[1] for rdn in cert.get("subject", ()) for item in rdn}
    _log.info("tls_established", peer=peer, version=sock.version(), cipher=(sock.cipher() or ("",))[0],
              client_cn=subject.get("commonName", ""))


def _refusal_reporter(store: Store) -> Callable[[str, str], None]:
    def on_refused(peer: str, reason: str) -> None:
        _log.warning("tls_refused", peer=peer, reason=reason)
        store.audit("association", calling_aet="", called_aet="", peer=peer, tls=True, accepted=False,
                    reason=reason)

    return on_refused


class Listeners:
    """The node's listening servers (plain and/or TLS), all on one AE: `shutdown()` stops them all,
    `ae.active_associations` lists the associations of all of them."""

    def __init__(self, ae: AE, servers: list[ThreadedAssociationServer]) -> None:
        self.ae = ae
        self.servers = servers

    def shutdown(self) -> None:
        for server in self.servers:
            server.shutdown()


_serve = net.serve


def _serve_tls(ae: AE, settings: Settings, config: TLS, handlers: list, store: Store,
               sock: socket.socket | None) -> Any:
    try:  # before binding: a certificate that does not match its key fails the start
        context = tls.server_context(config)
    except ssl.SSLError as exc:
        raise OSError(errno.EINVAL, f"node.tls: cannot use the certificate or key ({tls.describe(exc)})") from None
    return _serve(ae, (settings.host, config.port), handlers, _TLSServer, sock, tls_context=context,
                  handshake_timeout=config.handshake_timeout, on_refused=_refusal_reporter(store),
                  handshakes=threading.BoundedSemaphore(max(8, settings.max_associations)))


def start(settings: Settings, pipeline: Pipeline, sockets: Mapping[int, socket.socket] | None = None) -> Listeners:
    """Start the plain and/or TLS listeners of [node] / [node.tls] in background threads, on the
    listening sockets by port that the supervisor opened (`sockets`), else binding their own."""
    sockets = sockets or {}
    net.configure(TRANSFER_SYNTAXES)
    ae = build_ae(settings)
    store = pipeline.store
    gate = admission(settings)
    handlers = [
        (evt.EVT_CONN_OPEN, net.set_nodelay),
        (evt.EVT_CONN_OPEN, net.guard_pdus),
        (evt.EVT_CONN_OPEN, gate.opened),
        (evt.EVT_REQUESTED, _on_requested, [gate, store]),
        (evt.EVT_CONN_CLOSE, _on_conn_close),
        (evt.EVT_ACCEPTED, _on_accepted, [store]),
        (evt.EVT_REJECTED, _on_rejected, [store]),
        (evt.EVT_RELEASED, _on_released),
        (evt.EVT_ABORTED, _on_aborted),
        *[(event, gate.ended) for event in (evt.EVT_CONN_CLOSE, evt.EVT_REJECTED, evt.EVT_RELEASED,
                                            evt.EVT_ABORTED)],
        (evt.EVT_C_STORE, make_store_handler(pipeline, settings.data_dir, settings.min_free_mb * 1024 * 1024,
                                             Received(settings.received_dir) if settings.ack == "received" else None)),
    ]
    plain = settings.tls is None or settings.tls.port != settings.port  # tls.port == port: TLS only
    servers: list[Any] = []
    try:
        if plain:
            servers.append(_serve(ae, (settings.host, settings.port), handlers, _Server, sockets.get(settings.port)))
        if settings.tls is not None:
            servers.append(_serve_tls(ae, settings, settings.tls, handlers, store, sockets.get(settings.tls.port)))
    except Exception:  # the TLS port is taken, say: don't leave the plain listener running
        Listeners(ae, servers).shutdown()
        raise
    _log.info("listening", ae_title=settings.ae_title, host=settings.host, port=settings.port if plain else None,
              tls_port=settings.tls.port if settings.tls else None,
              allowed_calling_aets=list(settings.allowed_calling_aets) or "any")
    return Listeners(ae, servers)
