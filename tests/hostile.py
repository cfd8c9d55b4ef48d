"""A raw-socket DICOM upper-layer client that misbehaves on purpose (PS3.8 PDUs built by hand).

No pynetdicom here: a hostile peer is not polite enough to use a library. Each helper writes or
reads whole PDUs; the tests decide what to break.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = range(1, 8)


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _uid(item_type: int, uid: str) -> bytes:
    return _item(item_type, uid.encode("ascii"))


def pdu(pdu_type: int, body: bytes, length: int | None = None) -> bytes:
    """A PDU; `length` lies about the body's length when given."""
    return struct.pack(">BBL", pdu_type, 0, len(body) if length is None else length) + body


def associate_rq(called: str, calling: str, contexts: list[tuple[int, str, list[str]]],
                 max_pdu: int = 16384) -> bytes:
    """A-ASSOCIATE-RQ proposing (context id, abstract syntax, transfer syntaxes)."""
    items = _uid(0x10, APPLICATION_CONTEXT)
    for context_id, abstract, syntaxes in contexts:
        sub = _uid(0x30, abstract) + b"".join(_uid(0x40, ts) for ts in syntaxes)
        items += _item(0x20, bytes([context_id, 0, 0, 0]) + sub)
    items += _item(0x50, _item(0x51, struct.pack(">L", max_pdu)))
    header = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + bytes(32)
    return pdu(A_ASSOCIATE_RQ, header + items)


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    """One presentation data value item: control bit 0 = command, bit 1 = last fragment."""
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def p_data(*pdvs: bytes) -> bytes:
    return pdu(P_DATA_TF, b"".join(pdvs))


@dataclass
class Reply:
    pdu_type: int
    body: bytes

    @property
    def abort_reason(self) -> tuple[int, int]:
        """(source, reason) of an A-ABORT (PS3.8 9.3.8)."""
        assert self.pdu_type == A_ABORT, self
        return self.body[2], self.body[3]

    def accepted(self) -> list[int]:
        """Context ids an A-ASSOCIATE-AC accepted (result 0)."""
        assert self.pdu_type == A_ASSOCIATE_AC, self
        ids, offset = [], 68
        while offset < len(self.body):
            item_type, _, length = struct.unpack(">BBH", self.body[offset:offset + 4])
            if item_type == 0x21 and self.body[offset + 6] == 0:
                ids.append(self.body[offset + 4])
            offset += 4 + length
        return ids


class Peer:
    """One TCP connection to the node."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0, source: str = "") -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> Reply | None:
        """The next PDU, or None when the node closed the connection."""
        header = self._exactly(6)
        if header is None:
            return None
        pdu_type, _, length = struct.unpack(">BBL", header)
        body = self._exactly(length)
        return None if body is None else Reply(pdu_type, body)

    def _exactly(self, count: int) -> bytes | None:
        data = b""
        while len(data) < count:
            try:
                chunk = self.sock.recv(count - len(data))
            except (ConnectionResetError, TimeoutError):
                return None
            if not chunk:
                return None
            data += chunk
        return data

    def associate(self, contexts: list[tuple[int, str, list[str]]] | None = None, called: str = "TELENODE",
                  calling: str = "HOSTILE") -> list[int]:
        self.send(associate_rq(called, calling, contexts or [(1, CT_IMAGE, [EXPLICIT_LE])]))
        reply = self.read()
        assert reply is not None and reply.pdu_type == A_ASSOCIATE_AC, reply
        return reply.accepted()

    def closed(self) -> bool:
        """Whether the node has closed the connection (reads until end of file)."""
        while True:
            try:
                if not self.sock.recv(65536):
                    return True
            except (ConnectionResetError, TimeoutError, OSError):
                return True

    def close(self) -> None:
        self.sock.close()


def c_store_command(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set, implicit VR little endian (PS3.7 9.3.1.1), data set present."""
    def element(group: int, elem: int, value: bytes) -> bytes:
        return struct.pack("<HHL", group, elem, len(value)) + value

    def text(uid: str) -> bytes:
        raw = uid.encode()
        return raw + b"\x00" * (len(raw) % 2)

    body = (element(0, 0x0002, text(sop_class)) + element(0, 0x0100, struct.pack("<H", 0x0001))
            + element(0, 0x0110, struct.pack("<H", message_id)) + element(0, 0x0700, struct.pack("<H", 0))
            + element(0, 0x0800, struct.pack("<H", 0x0102)) + element(0, 0x1000, text(sop_instance)))
    return element(0, 0x0000, struct.pack("<L", len(body))) + body
