"""Destinations of other kinds than C-STORE, behind one small interface, and the registry of kinds.

A kind sends a group of queued instances and answers per instance with a typed
`Result` — OK (stored there), FAIL (refused: counts against that instance), RETRY
(try that one again later, not counted) — or raises `Unavailable` for a
destination-wide problem (unreachable, TLS, HTTP 401/403, a missing bucket or
container, throttling): then nothing is counted and every instance stays pending
with the reason as the destination's last error, as when a C-STORE remote is
down. Kinds that hold objects also write each batch's manifest, last.

The queue, retry, pause, quarantine and priority machinery around a kind is the
store's, driven by `node.destinations.worker.Worker` like the C-STORE forwarder.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from node.batches import Item, Manifest
from node.config import Destination


class Status(enum.Enum):
    """What happened to one instance (CTP's OK / FAIL / RETRY)."""

    OK = "ok"
    FAIL = "fail"  # refused by the destination: counts against this instance (max_failures)
    RETRY = "retry"  # not stored, for a reason that is not the instance's fault: again later, not counted


@dataclass(frozen=True)
class Result:
    """One instance's outcome; `reason` says why (no PHI), `retry_after` asks for a delay (seconds)."""

    item: Item
    status: Status
    reason: str = ""
    retry_after: float | None = None


class Unavailable(Exception):
    """A destination-wide problem: nothing was counted; the message is the destination's last error."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class Kind(Protocol):
    """What every kind of destination offers the worker."""

    #: Whether the kind writes a manifest.json per batch (object stores) once its files are all there.
    manifests: bool

    def groups(self, items: Sequence[Item]) -> list[list[Item]]:
        """The claimed items split into what one request sends (in the order given)."""
        ...

    def send(self, items: Sequence[Item]) -> list[Result]:
        """Send one group; a result per item it could tell about. Raises Unavailable."""
        ...

    def put_manifest(self, manifest: Manifest) -> None:
        """Write a batch's manifest.json (object stores). Raises Unavailable."""
        ...

    def close(self) -> None:
        ...


KINDS: dict[str, Callable[[Destination], Kind]] = {}


def register(name: str) -> Callable[[Callable[[Destination], Kind]], Callable[[Destination], Kind]]:
    """Class decorator: the kind named `name` in `[[destinations]] kind` is built by this factory."""

    def add(factory: Callable[[Destination], Kind]) -> Callable[[Destination], Kind]:
        KINDS[name] = factory
        return factory

    return add


def kind_for(destination: Destination) -> Kind:
    """The kind that sends to this destination (imports the kinds on first use)."""
    from node.destinations import dicomweb, objectstore  # noqa: F401 - they register themselves

    return KINDS[destination.kind](destination)
