"""The return path: results from the reader, re-identified and queued for the hospital.

An instance the teleradiology side sends to the return AE (an SR report, a key
object selection, a presentation state, a secondary capture) refers to the
pseudonymous patient and study. Here every value that is one of this node's
pseudonyms goes back to its original, found through the mapping store's
`lookup`: UIDs wherever they occur (evidence and referenced sequences, nested
items), PatientID and AccessionNumber, and pseudonyms inside text values. The
patient's originals (ID, issuer, name, birth date) and the study's (accession,
date) come from the mapping whether the instance carries them, carries them
empty or lacks them. With the Modified Dates option every date is shifted back
by the patient's offset (recomputed from the originals with the pseudonym key,
as the de-identifier computed it). UIDs the reader minted are not ours: they stay.

An instance with none of our pseudonyms, or with pseudonyms of two different
patients, is refused (0xC230, 0xC231) and never forwarded. A re-identified one
is spooled (fsync, rename) and queued for the [[return.destinations]] only, with
its audit record, in one commit, before Success is answered. Logs and audit
records name pseudonyms and reader-minted UIDs only, never an original.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileDataset
from pydicom.multival import MultiValue

from node import log
from node.config import HL7_QUEUE, ReturnPath, Settings
from node.deid.pseudonyms import Pseudonymizer, load_or_create_key, patient_key
from node.deid.rules import (
    _vr,  # the engine's VR without reading a deferred value: one definition
)
from node.keys import MappingKeyError
from node.pipeline import (
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    QUEUE_PRIORITY,
    SUCCESS,
    Outcome,
    Rejected,
    encode,
    is_out_of_space,
    read,
)
from node.spool import Quarantine, Spool
from node.store import Store

#: C-STORE failure statuses of the return AE ("Error: cannot understand" range, PS3.4 Table B.2-1).
NOT_OURS = 0xC230  # none of this node's pseudonyms: nothing to file it under
MIXED_PATIENTS = 0xC231  # pseudonyms of more than one patient: filing it would mix two patients

TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
DATE_VRS = frozenset({"DA", "DT"})
SKIPPED_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "UR"})
#: De-identification markers that no longer hold once the identity is back.
DEID_MARKERS = ("DeidentificationMethod", "DeidentificationMethodCodeSequence",
                "LongitudinalTemporalInformationModified")


class Refused(Exception):
    """A returning instance or message that cannot be re-identified; the message names no original."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Found:
    """One of our pseudonyms and what it stands for. `row` holds originals (PHI): never logged."""

    pseudonym: str
    level: str  # instance | series | study | patient | uid
    original: str = field(repr=False)
    patient: str  # the pseudonymous PatientID it belongs to; "" for a bare UID
    row: dict[str, Any] = field(repr=False, compare=False)


#: Lookup level → the column holding the original of the looked-up value itself.
_ORIGINAL_OF = {"instance": "sop_instance_uid", "series": "series_instance_uid", "uid": "original_uid"}


class Resolver:
    """Our pseudonyms in values and text, through the mapping store; one per instance or message."""

    def __init__(self, store: Store, organization: str) -> None:
        self.store = store
        self.found: dict[str, Found | None] = {}
        self.token = re.compile(
            rf"(?<![0-9A-Za-z.]){re.escape(organization)}-[A-Z2-7]{{12}}(?![0-9A-Za-z])"
            r"|(?<![0-9A-Za-z.])2\.25\.\d{1,39}(?![0-9A-Za-z])(?!\.[0-9])"  # a sentence's full stop may follow
            r"|(?<![0-9A-Za-z])[A-Z2-7]{16}(?![0-9A-Za-z])")

    def value(self, text: str) -> Found | None:
        """The mapping of a whole value (a UID, an ID, an accession), or None if it is not ours."""
        text = text.strip("\x00 ")
        if text not in self.found:
            self.found[text] = self._lookup(text) if text else None
        return self.found[text]

    def _lookup(self, text: str) -> Found | None:
        try:
            row = self.store.lookup(text)
        except MappingKeyError:
            raise Refused(PROCESSING_FAILURE, "cannot decrypt the mapping (mapping key)") from None
        if row is None:
            return None
        level = row["level"]
        column = _ORIGINAL_OF.get(level)
        if column is None and level == "study":
            column = "study_instance_uid" if text == row["pseudo_study_instance_uid"] else "accession_number"
        elif column is None:
            column = "patient_id"
        return Found(text, level, row[column] or "", row.get("pseudo_patient_id") or "", row)

    def scan(self, text: str) -> list[Found]:
        """Every pseudonym of ours that occurs in a text."""
        return [f for f in (self.value(m.group()) for m in self.token.finditer(text)) if f is not None]

    def replace(self, text: str, escape: Callable[[str], str] = str) -> str:
        """`text` with each of our pseudonyms replaced by its original (passed through `escape`)."""

        def swap(match: re.Match[str]) -> str:
            found = self.value(match.group())
            return escape(found.original) if found is not None and found.original else match.group()

        return self.token.sub(swap, text)

    def patient(self) -> Found:
        """The one patient every pseudonym found so far belongs to; Refused when none or several."""
        patients = {f.patient for f in self.found.values() if f is not None and f.patient}
        if len(patients) > 1:
            raise Refused(MIXED_PATIENTS, f"pseudonyms of {len(patients)} different patients")
        if not patients:
            raise Refused(NOT_OURS, "none of this node's patient or study pseudonyms")
        patient = patients.pop()
        return next(f for f in self.found.values() if f is not None and f.patient == patient)

    def used(self) -> list[dict[str, str]]:
        """The mappings used, for the audit record: pseudonym and level only."""
        return [{"pseudonym": f.pseudonym, "level": f.level} for f in self.found.values() if f is not None]

    def study(self, *values: str) -> Found | None:
        """The first of `values` that is one of our studies (by Study Instance UID or accession)."""
        for value in values:
            found = self.value(value)
            if found is not None and found.level in ("study", "series", "instance") and found.row.get(
                    "pseudo_study_instance_uid"):
                return found
        return None


@dataclass(frozen=True)
class Identity:
    """The originals to file a result under (PHI: never logged)."""

    patient_id: str
    issuer: str
    name: str
    birth_date: str
    shift_days: int  # days to add to every date of the result (0: dates were not modified)
    pseudo_patient_id: str

    def __repr__(self) -> str:
        return f"Identity(pseudo_patient_id={self.pseudo_patient_id!r})"


def identity(resolver: Resolver, pseudonyms: Pseudonymizer, modified_dates: bool) -> Identity:
    """The patient's originals, and the date shift back, from the one patient the pseudonyms name."""
    patient = resolver.patient().patient
    rows = [f.row for f in resolver.found.values() if f is not None and f.patient == patient]
    row = next((r for r in rows if r.get("study_instance_uid")), rows[0])  # the study: a key of last resort
    key = patient_key(row["patient_id"] or "", row["issuer_of_patient_id"] or "", row["patient_name"] or "",
                      row["patient_birth_date"] or "", row.get("study_instance_uid") or "")
    shift = -pseudonyms.date_offset_days(key) if modified_dates else 0
    return Identity(row["patient_id"] or "", row["issuer_of_patient_id"] or "", row["patient_name"] or "",
                    row["patient_birth_date"] or "", shift, row["pseudo_patient_id"])


def shift_date(value: str, days: int) -> str:
    """A DA value, or the date part of a DT value, moved by `days`; anything else unchanged."""
    text = value.strip()
    if not days or len(text) < 8:
        return value
    try:
        day = datetime.datetime.strptime(text[:8], "%Y%m%d").date() + datetime.timedelta(days=days)
    except ValueError:
        return value
    return day.strftime("%Y%m%d") + text[8:]


def birth_date(who: Identity, carried: str) -> str:
    """The original birth date; without one in the mapping, the carried one shifted back (modified
    dates) or nothing (a dummy or the reader's guess is not the patient's)."""
    if who.birth_date:
        return who.birth_date
    return shift_date(carried, who.shift_days) if carried.strip() and who.shift_days else ""


# -- DICOM ---------------------------------------------------------------------------------------


def _elements(ds: Dataset) -> Iterator[tuple[Dataset, int, str]]:
    """(dataset, tag, VR) of every element worth looking at, nested sequences included."""
    for tag in list(ds.keys()):
        vr = _vr(ds, tag)
        if vr in SKIPPED_VRS or tag & 0xFFFF == 0:
            continue
        if vr == "SQ":
            for item in ds[tag].value or ():
                yield from _elements(item)
        else:
            yield ds, tag, vr


def _values(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (MultiValue, list)) else [str(value)]


def _find(ds: Dataset, resolver: Resolver) -> None:
    """Look up every UID and every pseudonym-shaped token in text (the resolver remembers them)."""
    for item, tag, vr in _elements(ds):
        if vr == "UI":
            for value in _values(item[tag].value):
                resolver.value(value)
        elif vr in TEXT_VRS:
            for value in _values(item[tag].value):
                resolver.scan(value)


def _set(ds: Dataset, tag: int, values: list[str]) -> None:
    ds[tag].value = values if len(values) > 1 else (values[0] if values else None)


class Reidentifier:
    """Puts the originals back into a returning data set; one per process, thread-safe."""

    def __init__(self, store: Store, pseudonyms: Pseudonymizer, modified_dates: bool) -> None:
        self.store = store
        self.pseudonyms = pseudonyms
        self.modified_dates = modified_dates

    def apply(self, ds: Dataset) -> Resolver:
        """Re-identify `ds` in place; returns the resolver (the mappings used). Raises Refused."""
        resolver = Resolver(self.store, self.pseudonyms.organization)
        _find(ds, resolver)  # every pseudonym first: refuse before changing anything
        who = identity(resolver, self.pseudonyms, self.modified_dates)
        study = resolver.study(str(ds.get("StudyInstanceUID", "")), str(ds.get("AccessionNumber", "")))
        for item, tag, vr in _elements(ds):
            self._restore(item, tag, vr, resolver, who)
        self._patient(ds, who)
        if study is not None:
            self._study(ds, study)
        self._unmark(ds)
        return resolver

    def _restore(self, ds: Dataset, tag: int, vr: str, resolver: Resolver, who: Identity) -> None:
        values = _values(ds[tag].value)
        if not values:
            return
        if vr == "UI":
            _set(ds, tag, [(f.original if (f := resolver.value(v)) is not None and f.original else v) for v in values])
        elif vr == "PN":  # a name field holding the pseudonymous name gets the original name
            _set(ds, tag, [who.name if (f := resolver.value(v)) is not None and f.level == "patient" else
                           resolver.replace(v) for v in values])
        elif vr in TEXT_VRS:
            _set(ds, tag, [resolver.replace(v) for v in values])
        elif vr in DATE_VRS and who.shift_days:
            _set(ds, tag, [shift_date(v, who.shift_days) for v in values])

    @staticmethod
    def _patient(ds: Dataset, who: Identity) -> None:
        """Patient module from the mapping, whether the instance carries it, carries it empty or lacks it."""
        ds.PatientID = who.patient_id
        ds.PatientName = who.name
        ds.PatientBirthDate = birth_date(who, str(ds.get("PatientBirthDate") or ""))
        if who.issuer:
            ds.IssuerOfPatientID = who.issuer
        elif "IssuerOfPatientID" in ds:  # the reader's own issuer would misfile the original ID
            del ds.IssuerOfPatientID

    @staticmethod
    def _study(ds: Dataset, study: Found) -> None:
        row = study.row
        if row.get("accession_number"):
            ds.AccessionNumber = row["accession_number"]
        if row.get("study_date"):
            ds.StudyDate = row["study_date"]

    @staticmethod
    def _unmark(ds: Dataset) -> None:
        for keyword in DEID_MARKERS:
            if keyword in ds:
                delattr(ds, keyword)
        if "PatientIdentityRemoved" in ds:
            ds.PatientIdentityRemoved = "NO"
        if isinstance(ds, FileDataset) and getattr(ds, "file_meta", None) is not None:
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


class Receiver:
    """The return AE's C-STORE: re-identify, spool, queue for the return destinations, audit; durable
    before Success. Duck-types Pipeline for node/scp.py (`receive`, `store`)."""

    def __init__(self, reidentifier: Reidentifier, store: Store, spool: Spool, destinations: tuple[str, ...],
                 on_queued: Callable[[], None] = lambda: None) -> None:
        self.reidentifier = reidentifier
        self.store = store
        self.spool = spool
        self.destinations = destinations
        self.on_queued = on_queued
        self.log = log.get("return")

    def receive(self, source: str | Path, *, calling_aet: str, priority: int = 0) -> Outcome:
        """Handle one returning data set (a Part 10 file); never raises."""
        received = ""
        try:
            ds = read(source)
            received = str(ds.SOPInstanceUID)  # as received: a pseudonym or reader-minted, never an original
            resolver = self.reidentifier.apply(ds)
            self._keep(ds, received, resolver, calling_aet, QUEUE_PRIORITY.get(priority, 0))
        except (Rejected, Refused) as exc:
            status, reason = exc.status, getattr(exc, "comment", "") or str(exc)
            self.log.warning("return_refused", calling_aet=calling_aet, sop_instance_uid=received,
                             status=f"0x{status:04X}", reason=reason)
            self._audit_refusal(calling_aet, received, status, reason)
            return Outcome(status, reason[:64])
        except (OSError, sqlite3.Error) as exc:
            reason = "disk full" if is_out_of_space(exc) else f"storage error ({type(exc).__name__})"
            self.log.error("return_not_stored", calling_aet=calling_aet, sop_instance_uid=received, reason=reason)
            return Outcome(OUT_OF_RESOURCES, f"out of resources: {reason}")
        except Exception as exc:  # noqa: BLE001 - a bug must not answer with a traceback that may quote values
            self.log.error("return_not_stored", calling_aet=calling_aet, sop_instance_uid=received,
                           reason=f"internal error ({type(exc).__name__})")
            return Outcome(PROCESSING_FAILURE, "internal error; result not kept")
        self.on_queued()
        self.log.info("return_queued", calling_aet=calling_aet, sop_instance_uid=received,
                      patient_id=_pseudo_patient(resolver),
                      mappings=len(resolver.used()), destinations=list(self.destinations))
        return Outcome(SUCCESS, sop_instance_uid=received)

    def _keep(self, ds: FileDataset, received: str, resolver: Resolver, calling_aet: str, priority: int) -> None:
        """Spool the re-identified file, then queue it and its audit record in one commit."""
        target = self.spool.path_for(received)
        existed = target.exists()
        size = encode(lambda write: self.spool.write(target, write), ds)
        try:
            with self.store.batch():
                self.store.enqueue(self.destinations, key=received, sop_class_uid=str(ds.SOPClassUID),
                                   transfer_syntax=str(ds.file_meta.TransferSyntaxUID), path=str(target), size=size,
                                   priority=priority)
                self.store.audit("return_reidentified", calling_aet=calling_aet, sop_instance_uid=received,
                                 patient_id=_pseudo_patient(resolver), mappings=resolver.used(),
                                 destinations=list(self.destinations))
        except BaseException:
            if not existed:  # a re-identified file no queue row points at: PHI with no purpose
                self.spool.remove(target)
            raise

    def _audit_refusal(self, calling_aet: str, received: str, status: int, reason: str) -> None:
        try:
            self.store.audit("return_refused", calling_aet=calling_aet, sop_instance_uid=received,
                             status=f"0x{status:04X}", reason=reason)
        except sqlite3.Error:
            pass  # the refusal stands; the log line above records it


def _pseudo_patient(resolver: Resolver) -> str:
    return next((f.patient for f in resolver.found.values() if f is not None and f.patient), "")


def listener_settings(settings: Settings, ret: ReturnPath) -> Settings:
    """The node's settings as the return AE sees them: its own title, host, port, allow list and TLS."""
    return dataclasses.replace(settings, ae_title=ret.ae_title, host=ret.host, port=ret.port,
                               allowed_calling_aets=ret.allowed_calling_aets, tls=ret.tls)


def spool_dir(settings: Settings) -> Path:
    """Re-identified results waiting for the hospital (PHI): data_dir/return/spool, 0700."""
    return settings.data_dir / "return" / "spool"


class Service:
    """The return path of a running node: the return AE, its forwarders and the optional HL7 listener.
    Runs in the supervisor process, beside the outbound forwarders, on the supervisor's store."""

    def __init__(self, settings: Settings, store: Store, quarantine: Quarantine) -> None:
        from node.forward import (
            Forwarder,  # the same store-and-forward machinery as the outbound path
        )

        ret = settings.return_path
        assert ret is not None
        self.settings, self.config = settings, ret
        pseudonyms = Pseudonymizer(load_or_create_key(settings.key_file), settings.organization)
        self.reidentifier = Reidentifier(store, pseudonyms, "retain_long_modified_dates" in settings.profile_options)
        self.spool = Spool(spool_dir(settings))
        self.spool.cleanup_tmp()
        self.forwarders = [Forwarder(d, store, self.spool, ret.ae_title, quarantine, worker)
                           for d in ret.destinations for worker in range(d.parallel)]
        self.receiver = Receiver(self.reidentifier, store, self.spool, tuple(d.name for d in ret.destinations),
                                 self.wake)
        self.listeners: Any = None
        self.hl7: Any = None
        if ret.hl7 is not None:
            from node import hl7

            self.hl7 = hl7.Service(ret.hl7, self.reidentifier, settings.data_dir / "return" / "hl7")

    def wake(self) -> None:
        for forwarder in self.forwarders:
            forwarder.wake()

    def start(self) -> None:
        """Listen on the return AE (and the HL7 port); raises OSError when a port cannot be used."""
        from node import (
            scp,  # switches pynetdicom to chunked, unrestricted storage (as the workers do)
        )

        for forwarder in self.forwarders:
            forwarder.start()
        self.listeners = scp.start(listener_settings(self.settings, self.config), self.receiver)  # type: ignore[arg-type]
        if self.hl7 is not None:
            self.hl7.start()

    def stop(self, deadline: float) -> None:
        """Forwarders and the HL7 side finish what they are sending, by the deadline."""
        if self.hl7 is not None:
            self.hl7.stop(deadline)
        for forwarder in self.forwarders:
            forwarder.request_stop()
        for forwarder in self.forwarders:
            forwarder.join(max(0.1, deadline - time.monotonic()))

    def queues(self) -> list[str]:
        """The queue names this path fills (its destinations, and the RIS when HL7 is on)."""
        return [d.name for d in self.config.destinations] + ([HL7_QUEUE] if self.hl7 is not None else [])
