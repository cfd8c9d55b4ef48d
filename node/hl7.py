"""HL7 v2 reports on the return path: ORU^R01 over MLLP, re-identified, forwarded to the hospital RIS.

The reader's RIS sends report messages framed as MLLP (0x0B message 0x1C 0x0D)
to `[return.hl7] port`. Each ORU^R01 is parsed (python `hl7`), its pseudonyms
are found with the return path's resolver and put back: PID-3 gets the original
patient ID with the original issuer as assigning authority, PID-5 the original
name, PID-7 the original birth date (or the carried one shifted back under
Modified Dates), and every pseudonym in the other segments — OBR-2/3 and ORC-2/3
placer/filler numbers, OBX text, notes — its original, HL7-escaped. MSH is left
as the reader sent it.

The answer is an ACK: `AA` only once the re-identified message is on disk and
queued (one commit with its audit record, which names the control ID); `AE` with
the reason when no pseudonym is ours or they name two patients, or when it could
not be stored; `AR` for what is not an ORU^R01. A sender thread forwards queued
messages over MLLP to `forward_host:forward_port`, retrying with backoff until
the RIS acknowledges with AA/CA; after `max_failures` negative ACKs a message is
failed and kept under data_dir/return/hl7/failed. Logs carry control IDs and
pseudonyms, never an original.
"""

from __future__ import annotations

import hashlib
import random
import re
import socket
import socketserver
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

import hl7

from node import log
from node.config import HL7_QUEUE, HL7Return
from node.returnpath import (
    Identity,
    Refused,
    Reidentifier,
    Resolver,
    birth_date,
    identity,
)
from node.spool import atomic_write
from node.store.queue import QueueRow

START, END = b"\x0b", b"\x1c\x0d"
MAX_FRAME = 16 * 1024 * 1024  # bytes: a report, not a data set
IDLE_TIMEOUT = 600.0  # seconds a connection may sit between messages
_SAFE_KEY = re.compile(r"[^A-Za-z0-9._-]")

_log = log.get("hl7")


class NotAccepted(Exception):
    """A message that is not an ORU^R01 this node can take (answered AR)."""


# -- the message --------------------------------------------------------------------------------


class Delimiters:
    """The separators a message declares in MSH-1/MSH-2, and HL7 escaping with them."""

    def __init__(self, msh: str) -> None:
        if not msh.startswith("MSH") or len(msh) < 8:
            raise NotAccepted("not an HL7 v2 message (no MSH segment)")
        self.field, self.component, self.repetition, self.escape_char, self.sub = tuple(msh[3:8])

    def escape(self, text: str) -> str:
        e = self.escape_char
        text = text.replace(e, f"{e}E{e}")
        for char, code in ((self.field, "F"), (self.component, "S"), (self.repetition, "R"), (self.sub, "T")):
            text = text.replace(char, f"{e}{code}{e}")
        return text

    def unescape(self, text: str) -> str:
        e = self.escape_char
        for char, code in ((self.field, "F"), (self.component, "S"), (self.repetition, "R"), (self.sub, "T")):
            text = text.replace(f"{e}{code}{e}", char)
        return text.replace(f"{e}E{e}", e)


def segments(text: str) -> list[str]:
    return [s for s in re.split(r"\r\n|\r|\n", text) if s.strip()]


def header(text: str) -> tuple[str, str]:
    """(message type, control ID) of an ORU^R01, parsed with `hl7`; NotAccepted for anything else."""
    try:
        message = hl7.parse(text.replace("\n", "\r"))
        msh = message.segment("MSH")
        kind = [str(msh(9)(1)(1)), str(msh(9)(1)(2))]
        control_id = str(msh(10))
    except Exception:  # noqa: BLE001 - the library raises several kinds for malformed input
        raise NotAccepted("not a parseable HL7 v2 message") from None
    if kind != ["ORU", "R01"]:
        raise NotAccepted(f"only ORU^R01 is accepted, not {'^'.join(kind)}")
    return "^".join(kind), control_id


def reidentify(text: str, reidentifier: Reidentifier) -> tuple[str, Resolver]:
    """The message with the originals back, and the resolver (mappings used). Raises Refused."""
    parts = segments(text)
    marks = Delimiters(parts[0])
    resolver = Resolver(reidentifier.store, reidentifier.pseudonyms.organization)
    for segment in parts[1:]:  # find every pseudonym first: refuse before changing anything
        resolver.scan(marks.unescape(segment))
    who = identity(resolver, reidentifier.pseudonyms, reidentifier.modified_dates)
    body = [_segment(segment, marks, resolver, who) for segment in parts[1:]]
    if not any(segment.split(marks.field)[0] == "PID" for segment in parts[1:]):
        body.insert(0, _segment(f"PID{marks.field}1", marks, resolver, who))  # the patient comes from the mapping
    return "\r".join([parts[0], *body]) + "\r", resolver


def _segment(segment: str, marks: Delimiters, resolver: Resolver, who: Identity) -> str:
    fields = segment.split(marks.field)
    out = [_field(f, marks, resolver) if index else f for index, f in enumerate(fields)]
    if fields[0] == "PID":
        out += [""] * (8 - len(out))
        out[3] = _pid3(fields[3] if len(fields) > 3 else "", marks, resolver, who)
        out[5] = _xpn(who.name, marks)
        out[7] = birth_date(who, marks.unescape(out[7].split(marks.component)[0]))
    return marks.field.join(out)


def _field(value: str, marks: Delimiters, resolver: Resolver) -> str:
    """Pseudonyms in one field replaced; tokens never span separators, so the raw field is searched."""
    return resolver.replace(value, marks.escape)


def _pid3(value: str, marks: Delimiters, resolver: Resolver, who: Identity) -> str:
    """Each identifier that is our pseudonym: the original ID, the original issuer as assigning authority.
    Without one, the original is put first: it comes from the mapping whatever the message carries."""
    repetitions = value.split(marks.repetition) if value else []
    replaced = False
    for index, repetition in enumerate(repetitions):
        components = repetition.split(marks.component)
        found = resolver.value(marks.unescape(components[0]))
        if found is not None and found.pseudonym == who.pseudo_patient_id:
            components += [""] * (4 - len(components))
            components[0], components[3] = marks.escape(who.patient_id), marks.escape(who.issuer)
            repetitions[index] = marks.component.join(components).rstrip(marks.component)
            replaced = True
    if not replaced:
        own = marks.component.join([marks.escape(who.patient_id), "", "", marks.escape(who.issuer)])
        repetitions = [own.rstrip(marks.component)] + [r for r in repetitions if r]
    return marks.repetition.join(repetitions)


def _xpn(name: str, marks: Delimiters) -> str:
    """A DICOM PN (family^given^middle^prefix^suffix) as an HL7 XPN (family^given^middle^suffix^prefix)."""
    parts = (name.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = parts
    return marks.component.join(marks.escape(p) for p in (family, given, middle, suffix, prefix)).rstrip(
        marks.component)


def ack(received: str, code: str, control_id: str, reason: str = "") -> str:
    """An ACK for `received` (its MSH read leniently; defaults when it has none)."""
    try:
        marks = Delimiters(segments(received)[0])
        msh = segments(received)[0].split(marks.field)
    except (NotAccepted, IndexError):
        marks, msh = Delimiters("MSH|^~\\&"), []
    msh += [""] * (12 - len(msh))  # msh[n] is MSH-(n+1): MSH-1 is the separator itself
    f = marks.field
    now = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    head = f.join(["MSH", msh[1] or "^~\\&", msh[4], msh[5], msh[2], msh[3], now, "",
                   f"ACK{marks.component}R01{marks.component}ACK", f"ACK{int(time.time() * 1000)}", msh[10] or "P",
                   msh[11] or "2.5"])
    text = f.join(["MSA", code, marks.escape(control_id)] + ([marks.escape(reason[:80])] if reason else []))
    return f"{head}\r{text}\r"


def ack_code(answer: bytes) -> str:
    """MSA-1 of an ACK (AA, AE, AR, CA, CE, CR), or "" when there is none."""
    for segment in segments(answer.decode("latin-1")):
        if segment.startswith("MSA") and len(segment) > 4:
            return segment.split(segment[3])[1].strip()
    return ""


# -- MLLP ----------------------------------------------------------------------------------------


def read_frame(sock: socket.socket, buffer: bytearray) -> bytes | None:
    """The next MLLP payload from `sock` (`buffer` keeps what follows it); None at end of stream."""
    while True:
        end = buffer.find(END)
        if end >= 0:
            start = buffer.find(START)
            payload = bytes(buffer[start + 1:end]) if 0 <= start < end else bytes(buffer[:end])
            del buffer[:end + 2]
            return payload
        if len(buffer) > MAX_FRAME:
            raise ValueError("MLLP frame larger than 16 MiB")
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk


def frame(text: str, encoding: str) -> bytes:
    return START + text.encode(encoding, "replace") + END


def decode(payload: bytes) -> tuple[str, str]:
    """The message text and the encoding to answer and forward it in (UTF-8, else Latin-1)."""
    try:
        return payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return payload.decode("latin-1"), "latin-1"


# -- the service -----------------------------------------------------------------------------------


class Service:
    """The MLLP listener and the sender to the RIS, on the supervisor's store."""

    def __init__(self, config: HL7Return, reidentifier: Reidentifier, folder: Path) -> None:
        self.config = config
        self.reidentifier = reidentifier
        self.store = reidentifier.store
        self.folder = folder
        for sub in (folder, folder / "failed"):
            sub.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.sender = Sender(config, self.store, folder / "failed")
        self.server: Any = None

    def start(self) -> None:
        """Bind the listener (OSError if the port is taken) and start it and the sender."""
        self.server = _Server((self.config.host, self.config.port), _Handler)
        self.server.service = self
        threading.Thread(target=self.server.serve_forever, name=f"hl7@{self.config.port}", daemon=True).start()
        self.sender.start()
        _log.info("hl7_listening", host=self.config.host, port=self.config.port,
                  forward_to=f"{self.config.forward_host}:{self.config.forward_port}")

    def stop(self, deadline: float) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        self.sender.stop(max(0.1, deadline - time.monotonic()))

    def handle(self, payload: bytes, peer: str) -> bytes:
        """One received message → the ACK to send back; never raises."""
        text, encoding = decode(payload)
        control_id = ""
        try:
            _, control_id = header(text)
            out, resolver = reidentify(text, self.reidentifier)
            self._keep(out, encoding, payload, control_id, resolver, peer)
        except NotAccepted as exc:
            return self._refuse(text, encoding, "AR", control_id, str(exc), peer)
        except Refused as exc:
            return self._refuse(text, encoding, "AE", control_id, exc.reason, peer)
        except (OSError, sqlite3.Error) as exc:
            _log.error("hl7_not_stored", control_id=control_id, reason=type(exc).__name__)
            return frame(ack(text, "AE", control_id, "not stored (storage error); send again"), encoding)
        except Exception as exc:  # noqa: BLE001 - a bug must not answer with values from the message
            _log.error("hl7_not_stored", control_id=control_id, reason=f"internal error ({type(exc).__name__})")
            return frame(ack(text, "AE", control_id, "internal error; not stored"), encoding)
        self.sender.wake()
        _log.info("hl7_queued", control_id=control_id, peer=peer, patient_id=_patient(resolver),
                  mappings=len(resolver.used()))
        return frame(ack(text, "AA", control_id), encoding)

    def _keep(self, out: str, encoding: str, payload: bytes, control_id: str, resolver: Resolver,
              peer: str) -> None:
        """Durable before AA: the re-identified message on disk, its queue row and audit record in one commit."""
        key = f"{_SAFE_KEY.sub('_', control_id)[:40]}.{hashlib.sha256(payload).hexdigest()[:12]}"
        target = self.folder / f"{key}.hl7"
        data = out.encode(encoding, "replace")

        def write(handle: BinaryIO) -> None:
            handle.write(data)

        size = atomic_write(target, write)
        with self.store.batch():
            self.store.enqueue([HL7_QUEUE], key=key, sop_class_uid="ORU^R01", transfer_syntax=encoding,
                               path=str(target), size=size)
            self.store.audit("hl7_reidentified", control_id=control_id, peer=peer, patient_id=_patient(resolver),
                             mappings=resolver.used())

    def _refuse(self, text: str, encoding: str, code: str, control_id: str, reason: str, peer: str) -> bytes:
        _log.warning("hl7_refused", control_id=control_id, peer=peer, ack=code, reason=reason)
        try:
            self.store.audit("hl7_refused", control_id=control_id, peer=peer, ack=code, reason=reason)
        except sqlite3.Error:
            pass  # the refusal stands; the log line records it
        return frame(ack(text, code, control_id, reason), encoding)


def _patient(resolver: Resolver) -> str:
    return next((f.patient for f in resolver.found.values() if f is not None and f.patient), "")


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 64
    service: Service


class _Handler(socketserver.BaseRequestHandler):
    """One MLLP connection: any number of messages, each answered before the next is read."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(IDLE_TIMEOUT)
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        buffer = bytearray()
        try:
            while (payload := read_frame(sock, buffer)) is not None:
                sock.sendall(self.server.service.handle(payload, peer))  # type: ignore[attr-defined]
        except (OSError, ValueError) as exc:
            _log.warning("hl7_connection_closed", peer=peer, reason=type(exc).__name__)


# -- forwarding to the RIS ---------------------------------------------------------------------------


class Sender:
    """Sends queued messages over MLLP to the RIS, one at a time, in order; retries with backoff."""

    def __init__(self, config: HL7Return, store: Any, failed: Path) -> None:
        self.config, self.store, self.failed = config, store, failed
        self.log = log.get("hl7").bind(destination=HL7_QUEUE)
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="hl7-sender", daemon=True)
        self._backoff = 0

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self._step()
            except Exception as exc:  # noqa: BLE001 - never let the sender die: the queue would stall silently
                self.log.error("hl7_sender_error", error=type(exc).__name__)
                wait = self._delay()
            if wait:
                self._wake.wait(wait)
                self._wake.clear()

    def _step(self) -> float:
        if self.store.is_paused(HL7_QUEUE):  # `telenode pause return.hl7`: keep accepting, send nothing
            return 1.0
        rows = self.store.claim_batch(HL7_QUEUE, 1)
        if not rows:
            due = self.store.next_due(HL7_QUEUE)
            return 5.0 if due is None else min(5.0, max(0.05, due - time.time()))
        row = rows[0]
        try:
            answer = self._exchange(Path(row.path).read_bytes())
        except OSError as exc:  # RIS down, refusing, or too slow: the whole queue waits, nothing counted
            wait = self._delay()
            self.store.release([row.id], wait)
            self.store.note_error(HL7_QUEUE, f"RIS unreachable ({type(exc).__name__})")
            self.log.warning("ris_unavailable", reason=type(exc).__name__, retry_in_s=round(wait, 1))
            return wait
        self._backoff = 0
        self._answered(row, ack_code(answer))
        return 0.0

    def _exchange(self, data: bytes) -> bytes:
        with socket.create_connection((self.config.forward_host, self.config.forward_port),
                                      timeout=self.config.timeout) as sock:
            sock.sendall(START + data + END)
            answer = read_frame(sock, bytearray())
        if answer is None:
            raise ConnectionResetError("RIS closed the connection without an ACK")
        return answer

    def _answered(self, row: QueueRow, code: str) -> None:
        key = row.pseudo_sop_instance_uid
        if code in ("AA", "CA"):
            with self.store.batch():
                done = self.store.mark_sent([row.id])
                self.store.audit("hl7_forwarded", destination=HL7_QUEUE, message=key)
            for path in done:
                Path(path).unlink(missing_ok=True)
            self.log.info("hl7_forwarded", message=key)
            return
        reason = f"RIS answered {code or 'no MSA'}"
        if row.failures + 1 >= self.config.max_failures:
            for path in self.store.mark_failed(row.id, reason):  # kept for an operator, not deleted
                Path(path).replace(self.failed / Path(path).name)
            self.store.audit("hl7_send_failed", destination=HL7_QUEUE, message=key, reason=reason)
            self.log.error("hl7_failed", message=key, reason=reason)
        else:
            self.store.mark_retry(row.id, reason, self._retry_delay(row.failures), failure=True)
            self.log.warning("hl7_refused_by_ris", message=key, reason=reason, failures=row.failures + 1)

    def _retry_delay(self, tries: int) -> float:
        c = self.config
        return min(c.retry_delay * 2 ** tries, c.max_retry_delay) * random.uniform(0.8, 1.2)

    def _delay(self) -> float:
        self._backoff += 1
        return self._retry_delay(self._backoff - 1)

