"""One instance's way from received bytes to a durable, de-identified file.

decode → de-identify (PS3.15 Annex E) → spool (write, fsync, rename) → record
mappings and queue rows (one SQLite commit) → DICOM status. The SCP answers
Success only with the status this module returns, so Success always means the
anonymized instance and its queue rows are on disk. The same decode and
de-identify steps serve `telenode anonymize` for files.
"""

from __future__ import annotations

import errno
import os
import struct
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from node import log, metrics
from node.commit import GroupCommit
from node.config import PixelRule
from node.deid import DeidError, Deidentifier
from node.deid import ocr
from node.deid.guard import Guard
from node.deid.pixels import CLEAN_PIXEL_DATA, blank, burned_in_reason, matching_rule
from node.deid.record import DeidRecord
from node.routing import Decision, Router
from node.spool import Quarantine, Spool, atomic_write, copier
from node.store import Store

# Values never leave through warnings: pydicom's validation warnings quote element values.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

# C-STORE response statuses (PS3.4 Table GG.4-1 / B.2-1).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # refused: disk full, database unavailable; the sender may retry
DATASET_MISMATCH = 0xA900  # error: data set does not match SOP class (no SOP UIDs)
CANNOT_UNDERSTAND = 0xC210  # error: cannot parse the data set
CANNOT_DEIDENTIFY = 0xC220  # error: cannot de-identify with certainty; never forwarded
PROCESSING_FAILURE = 0xC000  # error: an unexpected failure inside the node; nothing kept

#: C-STORE Priority (0 MEDIUM, 1 HIGH, 2 LOW) → queue priority (higher goes first).
QUEUE_PRIORITY = {0: 0, 1: 1, 2: -1}

UNDEFINED_LENGTH = 0xFFFFFFFF

# Values larger than this stay in the file until written back (pixel data is never decoded).
DEFER_SIZE = 256 * 1024


@dataclass(frozen=True)
class Outcome:
    """The DICOM status for one instance, a comment for the sender, and the pseudonymous UID."""

    status: int
    comment: str = ""
    sop_instance_uid: str = ""
    quarantine_id: str = ""  # held in the quarantine instead of being queued

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


class Rejected(Exception):
    """An instance the node refuses; carries the DICOM status to answer."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


def read(path: str | os.PathLike[str]) -> FileDataset:
    """Parse a Part 10 file without decoding large values; raise Rejected if it can't be understood.

    pydicom accepts an element whose length claims more bytes than the file
    holds (it reads short or seeks past the end); such a data set is truncated
    or hostile, so it is refused here rather than written out shortened.
    """
    try:
        with open(path, "rb") as handle:
            ds = pydicom.dcmread(handle, defer_size=DEFER_SIZE)
            truncated = handle.tell() > os.fstat(handle.fileno()).st_size or _short_element(ds)
    except OSError:
        raise
    except Exception as exc:  # InvalidDicomError, EOFError, struct.error, ValueError, …: never a crash
        raise Rejected(CANNOT_UNDERSTAND, f"cannot parse data set ({type(exc).__name__})") from None
    if truncated:
        raise Rejected(CANNOT_UNDERSTAND, "element length exceeds the data received")
    if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
        raise Rejected(DATASET_MISMATCH, "data set has no SOP Class UID or SOP Instance UID")
    return ds


def _short_element(ds: FileDataset) -> bool:
    """True if a top-level element holds fewer bytes than its header declares."""
    for tag in ds.keys():
        raw = ds.get_item(tag, keep_deferred=True)  # never read a deferred value just to look at it
        if isinstance(raw, RawDataElement) and raw.value is not None and raw.length != UNDEFINED_LENGTH:
            if len(raw.value) < raw.length:
                return True
    return False


def deidentify(deidentifier: Deidentifier, ds: FileDataset, extra_codes: Sequence[dict[str, str]] = ()) -> DeidRecord:
    """Apply the profile in place; any doubt is a refusal, never a pass-through."""
    try:
        return deidentifier.apply(ds, extra_codes)
    except DeidError as exc:
        raise Rejected(CANNOT_DEIDENTIFY, f"cannot de-identify: {exc}"[:64]) from None
    except Exception as exc:  # a value pydicom cannot decode, a malformed sequence, …
        raise Rejected(CANNOT_DEIDENTIFY, f"cannot de-identify ({type(exc).__name__})") from None


def writer(ds: FileDataset) -> Callable[[BinaryIO], None]:
    """Write the de-identified dataset as Part 10, keeping its transfer syntax (pixels byte for byte).

    Deflated data sets are written as explicit VR little endian: most remote
    PACS do not accept deflate, and the pixel bytes are unchanged either way.
    Native pixel data that was never read (deferred) is copied from the
    received file in chunks after the header, so memory stays flat whatever
    the size of the instance.
    """
    pixels = _deferred_pixels(ds)  # before the syntax changes: offsets in a deflated file mean nothing
    ds.preamble = None  # 128 application bytes (e.g. a TIFF header) we cannot vouch for: written as zeros
    if ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    def write(handle: BinaryIO) -> None:
        if pixels is None:
            ds.save_as(handle, enforce_file_format=True)
            return
        del ds[PIXEL_DATA]
        try:
            ds.save_as(handle, enforce_file_format=True)
        finally:
            ds[PIXEL_DATA] = pixels
        handle.write(_element_header(pixels, ds.file_meta.TransferSyntaxUID))
        _copy_range(str(ds.filename), pixels.value_tell, pixels.length, handle)

    return write


PIXEL_DATA = 0x7FE00010
COPY_CHUNK = 1 << 20


def _deferred_pixels(ds: FileDataset) -> RawDataElement | None:
    """Pixel Data still in the received file, the last element, of defined length: streamable."""
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if not isinstance(raw, RawDataElement) or raw.value is not None or raw.length == UNDEFINED_LENGTH:
        return None
    if not isinstance(getattr(ds, "filename", None), str) or any(tag > PIXEL_DATA for tag in ds.keys()):
        return None
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_deflated or syntax.is_implicit_VR != raw.is_implicit_VR or syntax.is_little_endian != raw.is_little_endian:
        return None
    return raw


def _element_header(raw: RawDataElement, syntax: Any) -> bytes:
    """The Pixel Data element header in the output transfer syntax (OB/OW: 4-byte length)."""
    order = "<" if syntax.is_little_endian else ">"
    if syntax.is_implicit_VR:
        return struct.pack(f"{order}HHI", PIXEL_DATA >> 16, PIXEL_DATA & 0xFFFF, raw.length)
    vr = (raw.VR or "OW").encode("ascii")
    return struct.pack(f"{order}HH2sHI", PIXEL_DATA >> 16, PIXEL_DATA & 0xFFFF, vr, 0, raw.length)


def _copy_range(source: str, offset: int, length: int, target: BinaryIO) -> None:
    with open(source, "rb") as handle:
        handle.seek(offset)
        remaining = length
        while remaining:
            chunk = handle.read(min(COPY_CHUNK, remaining))
            if not chunk:
                raise EOFError("received file shorter than its pixel data")
            target.write(chunk)
            remaining -= len(chunk)


def is_out_of_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class Safeguards:
    """What is checked around the profile: burned-in text policy, pixel cleaning, the leak guard."""

    burned_in: str = "quarantine"  # reject | quarantine | pass
    clean_pixels: bool = False  # the Clean Pixel Data option is claimed
    pixel_rules: tuple[PixelRule, ...] = ()
    guard: Guard | None = field(default_factory=Guard)
    ocr_all_images: bool = False  # burned_in = "ocr": read every image, not only suspect ones


class Held(Exception):
    """An instance kept in quarantine instead of being forwarded."""

    def __init__(self, status: int, reason: str, quarantine_id: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.quarantine_id = quarantine_id


class Pipeline:
    """Receive one instance: de-identify, check, spool, record and queue it in one durable step."""

    def __init__(
        self,
        deidentifier: Deidentifier,
        store: Store,
        spool: Spool | None,
        destinations: Sequence[str],
        on_queued: Callable[[], None] = lambda: None,
        *,
        safeguards: Safeguards = Safeguards(),
        quarantine: Quarantine | None = None,
        router: Router | None = None,
    ) -> None:
        self.deidentifier = deidentifier
        self.store = store
        self.spool = spool
        self.destinations = tuple(destinations)
        self.on_queued = on_queued
        self.safeguards = safeguards
        self.quarantine = quarantine
        self.router = router
        self.log = log.get("pipeline")
        self._commits = GroupCommit(store.batch)

    def receive(self, source: str | os.PathLike[str], *, calling_aet: str, priority: int = 0,
                origin: str = "scp") -> Outcome:
        """Handle one received data set (a Part 10 file; C-STORE or STOW-RS); never raises."""
        started = time.perf_counter()
        outcome = self._receive(source, calling_aet=calling_aet, priority=priority)
        _measure(origin, started, "quarantined" if outcome.quarantine_id else "stored" if outcome.ok else "refused")
        return outcome

    def _receive(self, source: str | os.PathLike[str], *, calling_aet: str, priority: int = 0) -> Outcome:
        assert self.spool is not None, "receiving needs a spool"
        started = time.perf_counter()
        try:
            ds, record, decision = self._prepare(source, calling_aet, QUEUE_PRIORITY.get(priority, 0))
            size, target = self._spool(ds, record)
            self._commits.run(lambda: self.store.record_instance(
                record,
                calling_aet=calling_aet,
                path=str(target),
                size=size,
                transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                destinations=decision.destinations,
                priority=decision.priority,
            ))
        except Rejected as exc:
            self.log.warning("instance_refused", calling_aet=calling_aet, status=f"0x{exc.status:04X}",
                             reason=exc.comment)
            return Outcome(exc.status, exc.comment)
        except Held as exc:
            self.log.warning("instance_quarantined", calling_aet=calling_aet, status=f"0x{exc.status:04X}",
                             reason=exc.reason, quarantine_id=exc.quarantine_id)
            return Outcome(exc.status, exc.reason, quarantine_id=exc.quarantine_id)
        except (OSError, sqlite3.Error) as exc:
            reason = "disk full" if is_out_of_space(exc) else f"storage error ({type(exc).__name__})"
            self.log.error("instance_not_stored", calling_aet=calling_aet, status="0xA700", reason=reason)
            return Outcome(OUT_OF_RESOURCES, f"out of resources: {reason}")
        except Exception as exc:  # a bug must not answer 0xC211 with a traceback that may quote values
            self.log.error("instance_not_stored", calling_aet=calling_aet, status="0xC000",
                           reason=f"internal error ({type(exc).__name__})")
            return Outcome(PROCESSING_FAILURE, "internal error; instance not kept")
        self.on_queued()
        self.log.info(
            "instance_stored",
            calling_aet=calling_aet,
            sop_instance_uid=record.pseudo_sop_instance_uid,
            study_instance_uid=record.pseudo_study_instance_uid,
            patient_id=record.pseudo_patient_id,
            sop_class=getattr(ds.SOPClassUID, "keyword", "") or str(ds.SOPClassUID),
            destinations=list(decision.destinations),
            priority=decision.priority,
            routes=list(decision.routes),
            bytes=size,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return Outcome(SUCCESS, sop_instance_uid=record.pseudo_sop_instance_uid)

    def anonymize(self, source: Path, target: Path) -> DeidRecord:
        """De-identify one file offline into `target` and record its mappings; raise Rejected or Held."""
        ds, record, _ = self._prepare(source, "", 0)
        target.parent.mkdir(parents=True, exist_ok=True)
        encode(lambda write: atomic_write(target, write), ds)
        self.store.record_mapping(record, source="anonymize")
        return record

    def stage(self, source: Path, target: Path, *, destinations: Sequence[str] = (), priority: int = 0,
              origin: str = "http") -> DeidRecord:
        """De-identify one file into `target` (HTTP gateway) and record its mappings; with `destinations`,
        also spool and queue it there in one durable step, as a C-STORE would be. Raise Rejected or Held."""
        started = time.perf_counter()
        try:
            ds, record, _ = self._prepare(source, origin.upper(), priority)
            target.parent.mkdir(parents=True, exist_ok=True)
            size = encode(lambda write: atomic_write(target, write), ds)
            if destinations:
                self._queue_copy(target, size, ds, record, destinations, priority, origin.upper())
            else:
                self.store.record_mapping(record, source=origin)
        except Held:
            _measure(origin, started, "quarantined")
            raise
        except Exception:
            _measure(origin, started, "refused")
            raise
        _measure(origin, started, "stored")
        return record

    def _queue_copy(self, staged: Path, size: int, ds: FileDataset, record: DeidRecord, destinations: Sequence[str],
                    priority: int, calling_aet: str) -> None:
        """A copy in the spool (forwarders delete what they sent), queued for `destinations`."""
        assert self.spool is not None, "queueing needs a spool"
        target = self.spool.path_for(record.pseudo_sop_instance_uid)
        self.spool.write(target, copier(staged))
        self._commits.run(lambda: self.store.record_instance(
            record, calling_aet=calling_aet, path=str(target), size=size,
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID), destinations=destinations, priority=priority))
        self.on_queued()

    def _prepare(self, source: str | os.PathLike[str], calling_aet: str,
                 priority: int) -> tuple[FileDataset, DeidRecord, Decision]:
        """Parse, route, apply the burned-in policy, de-identify, and let the leak guard look at the result."""
        ds = read(source)
        if self.router is not None:
            decision = self.router.decide(ds, calling_aet, priority)  # on the original, before de-identification
        else:
            decision = Decision(self.destinations, priority)
        extra_codes = self._pixels(ds, source, calling_aet)
        try:
            record = deidentify(self.deidentifier, ds, extra_codes)
        except Rejected as exc:  # a valid data set the profile cannot be sure of: keep it for review
            self._hold(source, calling_aet, "deid_failed", exc.comment, exc.status)
            raise

        guard = self.safeguards.guard
        leak = guard.check(ds, record) if guard is not None else None
        if leak is not None:
            self._hold(source, calling_aet, "leak_guard", str(leak), CANNOT_DEIDENTIFY,
                       sop_instance_uid=record.pseudo_sop_instance_uid)
        return ds, record, decision

    def _pixels(self, ds: FileDataset, source: str | os.PathLike[str], calling_aet: str) -> list[dict[str, str]]:
        """Burned-in text: blank it with a matching pixel rule, or apply the policy. Returns extra method codes."""
        reason = burned_in_reason(ds)
        rule = matching_rule(ds, self.safeguards.pixel_rules) if self.safeguards.clean_pixels else None
        if rule is not None:
            try:
                blank(ds, rule.rectangles)
            except Exception as exc:  # cannot decode these pixels: we cannot claim they are clean
                reason = f"pixel cleaning failed ({type(exc).__name__})"
            else:
                return [CLEAN_PIXEL_DATA]
        if self.safeguards.burned_in == "ocr" and (reason is not None or self.safeguards.ocr_all_images):
            return self._ocr(ds, source, calling_aet)
        if reason is None:
            return []
        policy = self.safeguards.burned_in
        if policy == "reject":
            raise Rejected(CANNOT_DEIDENTIFY, f"burned-in annotation suspected: {reason}"[:64])
        if policy == "quarantine":
            self._hold(source, calling_aet, "burned_in", reason, SUCCESS)
        return []

    def _ocr(self, ds: FileDataset, source: str | os.PathLike[str], calling_aet: str) -> list[dict[str, str]]:
        """burned_in = "ocr": Tesseract reads the image; the instance's identity found there holds it
        (or, with clean_pixel_data, its regions are blanked); an image without it goes on."""
        found = ocr.verdict(ds, self.deidentifier.identity_of(ds), self.safeguards.clean_pixels)
        if found.hold is not None:
            self._hold(source, calling_aet, "burned_in", found.hold, SUCCESS)
        return list(found.codes)

    def _hold(self, source: str | os.PathLike[str], calling_aet: str, kind: str, reason: str, status: int,
              **detail: str) -> None:
        """Quarantine the original (it stays inside the hospital) and stop this instance here."""
        if self.quarantine is None:
            raise Rejected(CANNOT_DEIDENTIFY, f"{kind}: {reason}"[:64])
        qid = self.quarantine.put(source, {"kind": kind, "reason": reason, "calling_aet": calling_aet, **detail})
        self.store.audit("quarantined", quarantine_id=qid, kind=kind, reason=reason, calling_aet=calling_aet, **detail)
        raise Held(status, f"{kind}: {reason}"[:64], qid)

    def _spool(self, ds: FileDataset, record: DeidRecord) -> tuple[int, Path]:
        spool = self.spool
        assert spool is not None
        target = spool.path_for(record.pseudo_sop_instance_uid)
        return encode(lambda write: spool.write(target, write), ds), target


def _measure(origin: str, started: float, result: str) -> None:
    """Count one instance received and its result; time what was stored."""
    metrics.count("received", origin)
    metrics.count(result, origin)
    if result == "stored":
        metrics.observe(origin, time.perf_counter() - started)


def encode(save: Callable[[Callable[[BinaryIO], None]], int], ds: FileDataset) -> int:
    """Run `save` with the dataset's writer; an encoding failure is a refusal, a disk failure an OSError."""
    try:
        return save(writer(ds))
    except OSError:
        raise
    except Exception as exc:  # pydicom refused to encode a value: not understood, not forwarded
        raise Rejected(CANNOT_UNDERSTAND, f"cannot encode data set ({type(exc).__name__})") from None
