"""DICOMweb STOW-RS (PS3.18 10.5): POST {url}/studies, multipart/related; type="application/dicom".

One request carries instances of one study, at most `max_request_mb` (an instance
larger than that goes alone); the body is streamed part by part from the spooled
files, so memory stays flat whatever the instance's size. The response's Referenced
SOP Sequence (0008,1199) and Failed SOP Sequence (0008,1198) give a result per
instance. Failures are classified as ../shared/design.md fixes them:

- 401/403, TLS and connection problems: destination-wide (Unavailable), nothing counted;
- 408, 429 and 5xx: transient, destination-wide, at least the Retry-After the server gave;
- 400, 409, 415 and a Failed SOP item: count against that instance (a request-level
  refusal of several instances is retried one instance per request, so that only the
  bad one is counted); Failure Reason 0xA7xx (out of resources) retries it uncounted.

Credentials: HTTP basic with the password read from the environment variable
`password_env`, or a bearer token read from a 0600 file at each request (so it can be
rotated); never logged. TLS is verified, against `[destinations.tls] ca_certificates`
when given (with a client certificate when one is configured).
"""

from __future__ import annotations

import email.utils
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import requests

from node.batches import Item, Manifest
from node.config import Destination
from node.destinations import Result, Status, Unavailable, register

REFERENCED, FAILED = "00081199", "00081198"  # Referenced / Failed SOP Sequence
SOP_INSTANCE, FAILURE_REASON = "00081155", "00081197"  # Referenced SOP Instance UID, Failure Reason
PER_INSTANCE = (400, 409, 415)
CHUNK = 1 << 20


@register("dicomweb")
class DicomWeb:
    """A STOW-RS client of one DICOMweb service (requests, one kept-alive session)."""

    manifests = False

    def __init__(self, destination: Destination) -> None:
        self.destination = destination
        self.endpoint = destination.url.rstrip("/") + "/studies"
        self.limit = destination.max_request_mb * 1024 * 1024
        self.session = requests.Session()
        tls = destination.tls
        # Given with each request: requests lets REQUESTS_CA_BUNDLE override a session's own setting.
        self.verify: str | bool = str(tls.ca_certificates) if tls and tls.ca_certificates else True
        if tls and tls.certificate and tls.private_key:
            self.session.cert = (str(tls.certificate), str(tls.private_key))

    def groups(self, items: Sequence[Item]) -> list[list[Item]]:
        """One study per request, in the claimed (priority) order, each request at most max_request_mb."""
        by_study: dict[str, list[list[Item]]] = {}
        for item in items:
            chunks = by_study.setdefault(item.study_instance_uid, [[]])
            if chunks[-1] and sum(i.size for i in chunks[-1]) + item.size > self.limit:
                chunks.append([])
            chunks[-1].append(item)
        return [chunk for chunks in by_study.values() for chunk in chunks]

    def send(self, items: Sequence[Item]) -> list[Result]:
        present = [item for item in items if item.path.exists()]
        missing = [Result(item, Status.FAIL, "spool file missing") for item in items if not item.path.exists()]
        if not present:
            return missing
        body = Multipart(present)
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={body.boundary}',
                   "Accept": "application/dicom+json", **self._auth()}
        try:
            response = self.session.post(self.endpoint, data=body, headers=headers, verify=self.verify,
                                         timeout=(self.destination.connect_timeout, self.destination.network_timeout))
        except requests.exceptions.SSLError as exc:
            raise Unavailable(f"TLS: {_reason(exc)}") from None
        except requests.exceptions.RequestException as exc:
            raise Unavailable(f"DICOMweb: {type(exc).__name__}: unreachable or no answer from {self.endpoint}") from None
        with response:
            return missing + self._results(present, response)

    def _results(self, items: Sequence[Item], response: requests.Response) -> list[Result]:
        code = response.status_code
        if code in (401, 403):
            raise Unavailable(f"DICOMweb: HTTP {code} from {self.endpoint}: credentials refused")
        if code in (408, 429) or code >= 500:
            raise Unavailable(f"DICOMweb: HTTP {code} from {self.endpoint}", _retry_after(response))
        stored, failed = _sequences(response)
        if code in PER_INSTANCE and not stored and not failed and len(items) > 1:
            return [result for item in items for result in self.send([item])]  # find the one refused
        results = []
        for item in items:
            uid = item.sop_instance_uid
            if uid in failed:
                reason = failed[uid]
                status = Status.RETRY if (reason >> 8) == 0xA7 else Status.FAIL
                results.append(Result(item, status, f"STOW-RS: failure reason 0x{reason:04X}"))
            elif uid in stored or code == 200:
                results.append(Result(item, Status.OK))
            elif code in PER_INSTANCE or 400 <= code < 500:
                results.append(Result(item, Status.FAIL, f"STOW-RS: HTTP {code}"))
            else:  # 202 that names neither: not stored as far as we can tell; again later, not counted
                results.append(Result(item, Status.RETRY, f"STOW-RS: HTTP {code} without a result for it"))
        return results

    def _auth(self) -> dict[str, str]:
        """The Authorization header: basic with the password from the environment, or the bearer token."""
        d = self.destination
        if d.username:
            password = os.environ.get(d.password_env)
            if password is None:
                raise Unavailable(f"DICOMweb: environment variable {d.password_env} (the password) is not set")
            return {"Authorization": requests.auth._basic_auth_str(d.username, password)}
        if d.bearer_token_file is not None:
            return {"Authorization": f"Bearer {_token(d.bearer_token_file)}"}
        return {}

    def put_manifest(self, manifest: Manifest) -> None:  # DICOMweb has no manifest
        return None

    def close(self) -> None:
        self.session.close()


class Multipart:
    """A multipart/related body read from the spooled files as it is sent; its length is known
    up front (Content-Length, no chunked encoding that some servers refuse)."""

    def __init__(self, items: Sequence[Item]) -> None:
        self.boundary = secrets.token_hex(16)
        self.items = list(items)
        self.head = f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
        self.between = b"\r\n"
        self.tail = f"--{self.boundary}--\r\n".encode("ascii")
        self.length = sum(len(self.head) + item.size + len(self.between) for item in self.items) + len(self.tail)
        self._chunks = self._generate()
        self._buffer, self._offset = b"", 0

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[bytes]:
        return self._generate()

    def _generate(self) -> Iterator[bytes]:
        for item in self.items:
            yield self.head
            with open(item.path, "rb") as handle:
                while chunk := handle.read(CHUNK):
                    yield chunk
            yield self.between
        yield self.tail

    def read(self, size: int = -1) -> bytes:
        """File-like reading (what urllib3 does with a body that has read()): at most `size` bytes."""
        if size is None or size < 0:
            return self._buffer[self._offset:] + b"".join(self._chunks)
        while self._offset >= len(self._buffer):
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._buffer, self._offset = chunk, 0
        data = self._buffer[self._offset:self._offset + size]
        self._offset += len(data)
        return data


def _sequences(response: requests.Response) -> tuple[set[str], dict[str, int]]:
    """The SOP Instance UIDs the server stored, and those it refused with their Failure Reason."""
    try:
        document: Any = response.json()
    except ValueError:
        return set(), {}
    if isinstance(document, list):
        document = document[0] if document else {}
    if not isinstance(document, dict):
        return set(), {}

    def entries(tag: str) -> list[dict[str, Any]]:
        value = document.get(tag, {}).get("Value", [])
        return [entry for entry in value if isinstance(entry, dict)]

    def first(entry: dict[str, Any], tag: str) -> Any:
        values = entry.get(tag, {}).get("Value", [])
        return values[0] if values else None

    stored = {str(first(e, SOP_INSTANCE)) for e in entries(REFERENCED) if first(e, SOP_INSTANCE)}
    failed = {str(first(e, SOP_INSTANCE)): int(first(e, FAILURE_REASON) or 0x0110)
              for e in entries(FAILED) if first(e, SOP_INSTANCE)}
    return stored, failed


def _retry_after(response: requests.Response) -> float | None:
    """Retry-After as seconds or an HTTP date (RFC 9110 10.2.3); None when absent or unreadable."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _token(path: Path) -> str:
    """The bearer token, refused unless only its owner can read the file."""
    try:
        if path.stat().st_mode & 0o077:
            raise Unavailable(f"DICOMweb: bearer token file {path} is readable by group or others (chmod 600)")
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise Unavailable(f"DICOMweb: cannot read bearer token file {path} ({exc.strerror})") from None


def _reason(exc: BaseException) -> str:
    """The TLS verification problem, without the adapter's nesting: "certificate verify failed: …"."""
    text = str(exc)
    for marker in ("certificate verify failed", "wrong version number", "handshake failure", "hostname mismatch"):
        if marker in text:
            return text[text.index(marker):].split(" (_ssl.c")[0].rstrip(")'\"")[:200]
    return text.splitlines()[0][:200] if text else type(exc).__name__
