"""STOW-RS ingest (PS3.18 10.5): multipart/related; type="application/dicom" into the C-STORE pipeline.

Each part goes through `Pipeline.receive`, exactly as a C-STORE data set: de-identify,
leak guard, spool, record and queue in one durable step. The answer (PS3.18 Table
10.5.3-1, application/dicom+json) lists the sender's own SOP Class and Instance UIDs in
Referenced SOP Sequence (stored) or Failed SOP Sequence (with the Failure Reason, the
DICOM status the node would answer to a C-STORE). 200 when every instance is stored,
202 when some failed, 409 when none was stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pydicom

from node.http.body import Part
from node.pipeline import CANNOT_UNDERSTAND, DATASET_MISMATCH, Pipeline

CALLING_AET = "DICOMWEB"  # stands for the sender in routes, quarantine records and the audit trail
MEDIA_TYPE = "application/dicom+json"

SOP_CLASS, SOP_INSTANCE = "00081150", "00081155"
FAILURE_REASON, REFERENCED, FAILED = "00081197", "00081199", "00081198"


@dataclass(frozen=True)
class Result:
    """One part's outcome, with the sender's UIDs (empty when the part could not be parsed)."""

    sop_class_uid: str
    sop_instance_uid: str
    status: int

    def item(self) -> dict[str, Any]:
        item: dict[str, Any] = {}
        if self.sop_class_uid:
            item[SOP_CLASS] = {"vr": "UI", "Value": [self.sop_class_uid]}
        if self.sop_instance_uid:
            item[SOP_INSTANCE] = {"vr": "UI", "Value": [self.sop_instance_uid]}
        if self.status:
            item[FAILURE_REASON] = {"vr": "US", "Value": [self.status]}
        return item


def sender_uids(part: Part) -> tuple[str, str, str]:
    """The SOP Class, SOP Instance and Study Instance UIDs as sent (for the answer only; never logged)."""
    try:
        ds = pydicom.dcmread(part.path, stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"])
        return str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", "")), str(ds.get("StudyInstanceUID", ""))
    except Exception:  # not DICOM: the pipeline refuses it too
        return "", "", ""


def ingest(pipeline: Pipeline, part: Part, study: str = "") -> Result:
    """One part through the C-STORE pipeline; with `study` (POST /studies/{study}), only that study's."""
    sop_class, sop_instance, study_uid = sender_uids(part)
    if part.content_type not in ("", "application/dicom"):
        return Result(sop_class, sop_instance, CANNOT_UNDERSTAND)
    if study and study_uid != study:  # PS3.18 10.5.1: an instance of another study is not stored
        return Result(sop_class, sop_instance, DATASET_MISMATCH)
    outcome = pipeline.receive(part.path, calling_aet=CALLING_AET, origin="stow")
    return Result(sop_class, sop_instance, outcome.status)


def response(results: list[Result]) -> tuple[int, dict[str, Any]]:
    """The HTTP status and the PS3.18 JSON body."""
    stored = [r.item() for r in results if r.status == 0]
    failed = [r.item() for r in results if r.status != 0]
    body: dict[str, Any] = {}
    if stored:
        body[REFERENCED] = {"vr": "SQ", "Value": stored}
    if failed:
        body[FAILED] = {"vr": "SQ", "Value": failed}
    status = 200 if not failed else 202 if stored else 409
    return status, body
