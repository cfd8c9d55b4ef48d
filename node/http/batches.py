"""batch-prepare: a study folder, de-identified into a staging folder with a manifest, maybe queued.

The folder is read only inside `[http] allowed_roots`, after symlinks and `..` are resolved;
a file whose real path leaves the roots (a symlink pointing out) is not read and counts as
failed. Each request is one batch: one thread de-identifies the files through the node's
pipeline (same pseudonyms and mapping store as C-STORE) into data_dir/staging/{BatchId},
keeping relative paths, then writes manifest.json (the contract's fields) last. Progress is
kept in memory and, once done, in data_dir/staging/{BatchId}.json for GET after a restart.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Sequence

from node import log
from node.deid.record import DeidRecord
from node.pipeline import Held, Pipeline, Rejected
from node.spool import atomic_write

MANIFEST_VERSION = "1.0"


class Outside(Exception):
    """The folder is outside allowed_roots (answered 403, whether or not it exists)."""


class Missing(Exception):
    """The folder is inside allowed_roots but is not there (answered 404)."""


def inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def resolve_folder(raw: str, roots: Sequence[Path]) -> Path:
    """The real path of a requested folder, checked against the roots before anything else is learnt."""
    real = Path(os.path.realpath(raw))
    if not os.path.isabs(raw) or not inside(real, roots):
        raise Outside()
    if not real.is_dir():
        raise Missing()
    return real


def files_under(folder: Path) -> list[Path]:
    """Every file below `folder`, sorted; symlinked folders are not entered (their files could be anywhere)."""
    found: list[Path] = []
    for top, dirs, names in os.walk(folder, followlinks=False):
        dirs.sort()
        found.extend(Path(top) / name for name in sorted(names))
    return found


@dataclass
class Request:
    """A validated batch-prepare request."""

    folder: Path
    priority: str  # "STAT" or "ROUTINE"
    queue_priority: int
    destinations: tuple[str, ...]


@dataclass
class Study:
    """One study of a batch, for the manifest."""

    cloud_study_id: str
    study_instance_uid: str
    files: list[str] = field(default_factory=list)


@dataclass
class Batch:
    """One batch's progress and result."""

    batch_id: str
    staging: Path
    total: int
    priority: str
    submitted_at: str
    processed: int = 0
    successful: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    studies: dict[str, Study] = field(default_factory=dict)

    @property
    def manifest_path(self) -> Path:
        return self.staging / "manifest.json"

    def result(self) -> dict[str, Any]:
        """The contract's batch-prepare answer."""
        return {"BatchId": self.batch_id, "Success": self.total > 0 and self.successful == self.total,
                "TotalFiles": self.total, "SuccessfulFiles": self.successful,
                "ManifestPath": str(self.manifest_path), "StagingDirectory": str(self.staging)}

    def progress(self) -> dict[str, Any]:
        """The contract's GET /api/batches/{BatchId} answer."""
        return {"BatchId": self.batch_id, "State": "done" if self.done.is_set() else "running",
                "TotalFiles": self.total, "ProcessedFiles": self.processed, "SuccessfulFiles": self.successful,
                "ManifestPath": str(self.manifest_path)}

    def add(self, record: DeidRecord, relative: str) -> None:
        uid = record.pseudo_study_instance_uid
        if uid not in self.studies:
            self.studies[uid] = Study(cloud_study_id(record), uid)
        self.studies[uid].files.append(relative)


def cloud_study_id(record: DeidRecord) -> str:
    """The study's pseudonymous AccessionNumber; without one, a 16-character token of the same form
    derived from the pseudonymous Study Instance UID (already keyed, so a plain digest reveals nothing)."""
    if record.pseudo_accession_number:
        return record.pseudo_accession_number
    digest = hashlib.sha256(f"study\x00{record.pseudo_study_instance_uid}".encode()).digest()
    return base64.b32encode(digest).decode("ascii")[:16]


def manifest(batch: Batch) -> dict[str, Any]:
    """manifest.json: Version, BatchId, Priority, SubmittedAt, TotalStudies, TotalImages, Studies."""
    studies = [{"CloudStudyId": s.cloud_study_id, "StudyInstanceUID": s.study_instance_uid,
                "ImageCount": len(s.files), "Files": s.files} for s in batch.studies.values()]
    return {"Version": MANIFEST_VERSION, "BatchId": batch.batch_id, "Priority": batch.priority,
            "SubmittedAt": batch.submitted_at, "TotalStudies": len(studies),
            "TotalImages": sum(len(s.files) for s in batch.studies.values()), "Studies": studies}


def _write_json(path: Path, content: dict[str, Any]) -> None:
    data = json.dumps(content, indent=2).encode("utf-8")

    def write(handle: BinaryIO) -> None:
        handle.write(data)

    atomic_write(path, write)


class Batches:
    """Runs batch-prepare jobs, one thread each, and answers their progress."""

    def __init__(self, pipeline: Pipeline, staging_root: Path, roots: Sequence[Path]) -> None:
        self.pipeline = pipeline
        self.root = staging_root
        self.roots = tuple(roots)
        self.jobs: dict[str, Batch] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.log = log.get("http.batches")

    def start(self, request: Request) -> Batch:
        files = files_under(request.folder)
        batch_id = uuid.uuid4().hex
        staging = self.root / batch_id
        staging.mkdir(parents=True, mode=0o700)
        batch = Batch(batch_id, staging, len(files), request.priority,
                      datetime.now(timezone.utc).isoformat(timespec="seconds"))
        with self.lock:
            self.jobs[batch_id] = batch
        self.log.info("batch_started", batch_id=batch_id, files=len(files), destinations=list(request.destinations),
                      priority=request.priority)
        thread = threading.Thread(target=self._run, args=(batch, request, files), name=f"batch-{batch_id[:8]}",
                                  daemon=True)
        self.threads.append(thread)
        thread.start()
        return batch

    def stop(self, timeout: float) -> None:
        """The node stops: each running batch ends after its current file (no manifest: it is not done)."""
        self.stopping.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic()))

    def get(self, batch_id: str) -> dict[str, Any] | None:
        with self.lock:
            batch = self.jobs.get(batch_id)
        if batch is not None:
            return batch.progress()
        if not batch_id.isalnum():  # IDs are file names: nothing outside the staging root is read
            return None
        saved = self.root / f"{batch_id}.json"
        return json.loads(saved.read_text()) if saved.is_file() else None

    def _run(self, batch: Batch, request: Request, files: list[Path]) -> None:
        try:
            for index, source in enumerate(files):
                if self.stopping.is_set():
                    self.log.warning("batch_interrupted", batch_id=batch.batch_id, processed=batch.processed)
                    return
                self._one(batch, request, source, index)
                batch.processed += 1
            _write_json(batch.manifest_path, manifest(batch))  # last: a reader that sees it may read the batch
            _write_json(self.root / f"{batch.batch_id}.json", {**batch.progress(), "State": "done"})
        except Exception as exc:  # a full disk: the batch ends unsuccessful, the node goes on
            self.log.error("batch_failed", batch_id=batch.batch_id, reason=type(exc).__name__)
        finally:
            batch.done.set()
        self.log.info("batch_done", batch_id=batch.batch_id, files=batch.total, successful=batch.successful,
                      studies=len(batch.studies))

    def _one(self, batch: Batch, request: Request, source: Path, index: int) -> None:
        """One file; a failure is counted and logged by index (paths may name patients)."""
        relative = source.relative_to(request.folder)
        if not inside(Path(os.path.realpath(source)), self.roots):
            self.log.warning("batch_file_outside_roots", batch_id=batch.batch_id, index=index)
            return
        try:
            record = self.pipeline.stage(source, batch.staging / relative, destinations=request.destinations,
                                         priority=request.queue_priority, origin="http")
        except Rejected as exc:
            self.log.warning("batch_file_refused", batch_id=batch.batch_id, index=index, reason=exc.comment)
        except Held as exc:
            self.log.warning("batch_file_quarantined", batch_id=batch.batch_id, index=index,
                             quarantine_id=exc.quarantine_id)
        except OSError as exc:
            self.log.warning("batch_file_failed", batch_id=batch.batch_id, index=index,
                             reason=exc.strerror or type(exc).__name__)
        else:
            batch.successful += 1
            batch.add(record, relative.as_posix())
