"""Health check: does the node's listener answer a DICOM association? (`telenode echo`)

Used by the container's HEALTHCHECK and by monitoring. It opens an association to
the node's own plain listener (loopback when the node listens on every interface)
and sends a C-ECHO. A node whose allow list refuses the check's calling AE title
still answered with an A-ASSOCIATE-RJ: its listener works, so that counts as
healthy too. No answer (nothing listening, a hung process) is unhealthy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import Settings

CALLING_AET = "TELENODE_HC"


@dataclass(frozen=True)
class Health:
    """The answer: healthy or not, and what the node said."""

    healthy: bool
    detail: str


def target(settings: Settings) -> tuple[str, int]:
    """Where the node's plain listener is reached from this host."""
    host = settings.host
    if host in ("0.0.0.0", "", "::"):
        host = "::1" if host == "::" else "127.0.0.1"
    port = settings.port
    if settings.tls and settings.tls.port == settings.port:
        raise ValueError("TLS-only node: the health check speaks plain DICOM (check the port with a TLS client)")
    return host, port


def echo(settings: Settings, timeout: float = 10.0) -> Health:
    """One association and one C-ECHO to the node."""
    host, port = target(settings)
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # its lines are not the check's answer
    ae = AE(ae_title=CALLING_AET)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=settings.ae_title)
    try:
        if assoc.is_established:
            status = assoc.send_c_echo()
            code = int(status.Status) if status and "Status" in status else None
            return Health(code == 0, f"C-ECHO status 0x{code:04X}" if code is not None else "no C-ECHO response")
        if assoc.is_rejected:
            return Health(True, "association rejected (the listener answered; the allow list refuses the check)")
        return Health(False, f"no answer from {host}:{port}")
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
