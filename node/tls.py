"""DICOM TLS (PS3.15 Annex B secure transport): ssl.SSLContext objects built from a `config.TLS`.

`server_context` is the listener's (its own certificate, the CA that signs the clients it
accepts); `client_context` is one destination's (the CA that signs the remote, an optional
client certificate). `describe` turns an ssl failure into a short reason for logs, audit
records and the queue's last_error (never PHI: TLS failures carry names and reasons only).
A client context records the TLS failure of its last connect in `.last_failure`, because
pynetdicom swallows it and only reports "not established" (net.record_tls_failures).
"""

from __future__ import annotations

import re
import socket
import ssl

from node import net
from node.config import TLS

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_PREFIX = re.compile(r"^\[[A-Z0-9_]+: [A-Z0-9_]+\]\s*")
_SUFFIX = re.compile(r"\s*\(_ssl\.c:\d+\)$")


def _harden(context: ssl.SSLContext, min_version: str) -> None:
    context.minimum_version = VERSIONS[min_version]
    context.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)


def server_context(tls: TLS) -> ssl.SSLContext:
    """The listener's context: its certificate, TLS >= min_version, client certificates verified
    against ca_certificates (required unless require_client_cert is false)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context, tls.min_version)
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates is not None:
        context.load_verify_locations(cafile=str(tls.ca_certificates))
    if tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_OPTIONAL if tls.ca_certificates is not None else ssl.CERT_NONE
    return context


def client_context(tls: TLS) -> ssl.SSLContext:
    """A destination's context: the remote verified against ca_certificates (the system store when
    None) and, when verify_hostname, its certificate must name the host (or server_name)."""
    # With a cafile, create_default_context loads only it: the system store would otherwise also be
    # trusted, and any public CA's certificate for the name (or, without the name check, any) passes.
    cafile = str(tls.ca_certificates) if tls.ca_certificates is not None else None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    _harden(context, tls.min_version)
    context.check_hostname = tls.verify_hostname
    if tls.certificate is not None:
        context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    net.record_tls_failures(context, describe)
    return context


def server_hostname(tls: TLS, host: str) -> str:
    """The name sent as SNI and checked against the remote's certificate."""
    return tls.server_name or host


def describe(exc: BaseException) -> str:
    """'TLS: certificate verify failed: Hostname mismatch, …' — short, without OpenSSL's decorations."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"TLS: certificate verify failed: {exc.verify_message}"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "TLS: handshake timed out"
    if isinstance(exc, ssl.SSLError):
        text = _SUFFIX.sub("", _PREFIX.sub("", str(exc.args[1] if len(exc.args) > 1 else exc)))
        return f"TLS: {text or exc.reason or type(exc).__name__}"
    return f"TLS: {exc.strerror or type(exc).__name__}" if isinstance(exc, OSError) else f"TLS: {type(exc).__name__}"
