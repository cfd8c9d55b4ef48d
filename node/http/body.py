"""Request bodies onto disk: a single file, or the parts of a multipart body, streamed and size-limited.

Uploads are originals (PHI): they go to data_dir/incoming/http (0700), each part in its
own 0600 file, never wholly into memory, and the caller removes them when done.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header


class TooLarge(Exception):
    """The body is larger than [http] max_request_mb."""


class BadBody(Exception):
    """The body is not what the endpoint takes; the message is safe to answer (no values)."""


@dataclass
class Part:
    """One uploaded file: where it is on disk and its part headers (names in lower case)."""

    path: Path
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def content_type(self) -> str:
        return parse_options_header(self.headers.get("content-type", ""))[0].decode("latin-1").lower()

    @property
    def field_name(self) -> str:
        options = parse_options_header(self.headers.get("content-disposition", ""))[1]
        return options.get(b"name", b"").decode("utf-8", "replace")


def media_type(header: str) -> tuple[str, dict[str, str]]:
    """`multipart/related; type="application/dicom"; boundary=x` → ("multipart/related", {...})."""
    kind, options = parse_options_header(header or "")
    return kind.decode("latin-1").lower(), {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in options.items()}


def _new_file(folder: Path) -> tuple[BinaryIO, Path]:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, name = tempfile.mkstemp(dir=folder, suffix=".dcm")  # 0600
    return os.fdopen(fd, "wb"), Path(name)


async def _limited(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > limit:
            raise TooLarge()
        yield chunk


JSON_LIMIT = 1024 * 1024  # a batch-prepare request is a few hundred bytes


async def read_json(stream: AsyncIterator[bytes], limit: int = JSON_LIMIT) -> Any:
    """A small JSON body, read in memory up to `limit` bytes."""
    data = bytearray()
    async for chunk in _limited(stream, limit):
        data.extend(chunk)
    try:
        return json.loads(data)
    except ValueError:
        raise BadBody("body must be JSON") from None


async def save_body(stream: AsyncIterator[bytes], folder: Path, limit: int) -> Part:
    """The whole body as one file (Content-Type application/dicom)."""
    handle, path = _new_file(folder)
    try:
        with handle:
            async for chunk in _limited(stream, limit):
                handle.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return Part(path, {"content-type": "application/dicom"})


class _Collector:
    """python-multipart callbacks that write each part to its own file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.parts: list[Part] = []
        self.handle: BinaryIO | None = None
        self.headers: dict[str, str] = {}
        self.name = bytearray()
        self.value = bytearray()

    def callbacks(self) -> Any:  # python-multipart's MultipartCallbacks (a TypedDict)
        return {
            "on_part_begin": self.begin, "on_part_data": self.data, "on_part_end": self.end,
            "on_header_field": lambda d, s, e: self.name.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self.value.extend(d[s:e]),
            "on_header_end": self.header_end,
        }

    def begin(self) -> None:
        self.headers = {}
        self.handle, path = _new_file(self.folder)
        self.parts.append(Part(path, self.headers))

    def header_end(self) -> None:
        self.headers[self.name.decode("latin-1").strip().lower()] = self.value.decode("latin-1").strip()
        self.name.clear()
        self.value.clear()

    def data(self, data: bytes, start: int, end: int) -> None:
        assert self.handle is not None
        self.handle.write(data[start:end])

    def end(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def discard(self) -> None:
        self.end()
        remove(self.parts)


async def save_parts(stream: AsyncIterator[bytes], boundary: str, folder: Path, limit: int) -> list[Part]:
    """Every part of a multipart body (form-data or related), each in its own file."""
    if not boundary:
        raise BadBody("multipart body without a boundary")
    collector = _Collector(folder)
    parser = MultipartParser(boundary, collector.callbacks())
    try:
        async for chunk in _limited(stream, limit):
            parser.write(chunk)
        parser.finalize()
    except TooLarge:
        collector.discard()
        raise
    except Exception:  # a malformed body: python-multipart's messages may quote bytes of it
        collector.discard()
        raise BadBody("malformed multipart body") from None
    collector.end()
    return collector.parts


def remove(parts: list[Part]) -> None:
    for part in parts:
        part.path.unlink(missing_ok=True)
