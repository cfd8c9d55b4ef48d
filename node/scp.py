"""Storage SCP: the AE that modalities and the hospital PACS send to.

Accepts every storage SOP class (pynetdicom's unrestricted storage service:
the standard ones and private or unknown ones), answers C-ECHO, refuses
calling AE titles that are not allowed at association time (A-ASSOCIATE-RJ,
not accept-then-fail), sets TCP_NODELAY on every accepted socket, and hands
each received data set — already on disk, never decoded in memory by
pynetdicom — to the pipeline, answering with the pipeline's status.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Any

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
from pynetdicom import AE, _config, acse, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from node import log
from node.config import Settings
from node.pipeline import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, Pipeline

# Received data sets go straight to a temporary file instead of memory (large instances),
# and storage classes pynetdicom does not know (private, newer than 3.0.4) are accepted too.
_config.STORE_RECV_CHUNKED_DATASET = True
_config.UNRESTRICTED_STORAGE_SERVICE = True

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

#: Presentation context result: transfer syntaxes not supported (PS3.8 9.3.3.2).
TRANSFER_SYNTAXES_NOT_SUPPORTED = 0x04

_negotiate_unrestricted = acse.negotiate_unrestricted


def negotiate(rq_contexts: Any, ac_contexts: Any, roles: Any = None) -> Any:
    """Unrestricted storage negotiation that accepts a transfer syntax the node can store.

    pynetdicom's unrestricted service accepts the *first* proposed transfer
    syntax of every storage context, even one the node would then have to
    refuse instance by instance (JPEG XL, say), leaving the modality no
    fallback. Here each context gets the first proposed syntax in
    TRANSFER_SYNTAXES, or is rejected (0x04) so the sender can try another.
    """
    result, reply_roles = _negotiate_unrestricted(rq_contexts, ac_contexts, roles)
    proposed = {cx.context_id: list(cx.transfer_syntax) for cx in rq_contexts}
    for cx in result:
        if cx.result != 0x00:
            continue
        ours = [ts for ts in proposed.get(cx.context_id, []) if ts in TRANSFER_SYNTAXES]
        if ours:
            cx.transfer_syntax = [ours[0]]
        else:
            cx.result = TRANSFER_SYNTAXES_NOT_SUPPORTED
    return result, reply_roles


acse.negotiate_unrestricted = negotiate  # pynetdicom's acse module calls it by this name


def _peer(event: Any) -> dict[str, Any]:
    info = event.assoc.requestor
    return {"calling_aet": info.ae_title, "peer": f"{info.address}:{info.port}"}


def _on_conn_open(event: Any) -> None:
    # Nagle + delayed ACK adds ~40 ms to every C-STORE round trip; pynetdicom never disables it.
    sock = event.assoc.dul.socket.socket
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _on_accepted(event: Any) -> None:
    _log.info("association_accepted", **_peer(event), contexts=len(event.assoc.accepted_contexts))


def _on_rejected(event: Any) -> None:
    _log.warning("association_rejected", **_peer(event), reason="calling AE title not allowed or too many associations")


def _on_released(event: Any) -> None:
    _log.info("association_released", **_peer(event))


def _on_aborted(event: Any) -> None:
    _log.warning("association_aborted", **_peer(event))


def _status(code: int, comment: str = "") -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment[:64]
    return status


def make_store_handler(pipeline: Pipeline, data_dir: Path | None = None, min_free_bytes: int = 0) -> Any:
    """The EVT_C_STORE handler: the response leaves only after it returns, so durability is decided here."""

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
        outcome = pipeline.receive(event.dataset_path, calling_aet=calling_aet,
                                   priority=event.request.Priority or 0)
        return _status(outcome.status, outcome.comment)

    return on_store


def build_ae(settings: Settings) -> AE:
    """An AE configured from [node]: title, limits, timeouts, PDU size, allowed calling AEs."""
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.maximum_pdu_size = settings.max_pdu
    ae.require_calling_aet = list(settings.allowed_calling_aets)
    ae.add_supported_context(Verification)
    return ae


def start(settings: Settings, pipeline: Pipeline) -> ThreadedAssociationServer:
    """Start listening on [node] host:port in background threads; returns the server."""
    ae = build_ae(settings)
    handlers = [
        (evt.EVT_CONN_OPEN, _on_conn_open),
        (evt.EVT_ACCEPTED, _on_accepted),
        (evt.EVT_REJECTED, _on_rejected),
        (evt.EVT_RELEASED, _on_released),
        (evt.EVT_ABORTED, _on_aborted),
        (evt.EVT_C_STORE, make_store_handler(pipeline, settings.data_dir, settings.min_free_mb * 1024 * 1024)),
    ]
    server = ae.start_server((settings.host, settings.port), block=False, evt_handlers=handlers)
    _log.info("listening", ae_title=settings.ae_title, host=settings.host, port=settings.port,
              allowed_calling_aets=list(settings.allowed_calling_aets) or "any")
    return server
