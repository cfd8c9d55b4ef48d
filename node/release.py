"""Releasing held instances from the quarantine (`telenode quarantine retry`).

A failed send (`send_failed`: the anonymized instance a destination refused for
good) is copied back to the spool and queued again for that destination, the
failed row becoming `requeued`. A held original (burned-in, leak guard,
de-identification failure) goes through the pipeline again with today's
configuration (a new pixel rule, another burned-in policy) and is released only
if it now passes; otherwise it stays held. Every attempt is audited; an entry
leaves the quarantine only once released.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Iterable, Mapping

from node.pipeline import Pipeline
from node.spool import Quarantine, QuarantineEntry, Spool, copier
from node.store import Store


@dataclass(frozen=True)
class Released:
    """The outcome for one quarantine id."""

    quarantine_id: str
    released: bool
    why: str = ""  # when still held: the reason (no PHI)


class Releaser:
    """Releases entries of one quarantine into one store, spool and pipeline."""

    def __init__(self, quarantine: Quarantine, store: Store, spool: Spool, pipeline: Pipeline,
                 destinations: Collection[str], return_spools: Mapping[str, Spool] | None = None) -> None:
        self.quarantine, self.store, self.spool, self.pipeline = quarantine, store, spool, pipeline
        self.destinations = set(destinations)
        self.return_spools = dict(return_spools or {})  # return destination -> the spool of re-identified results

    def release_all(self, ids: Iterable[str], operator: str) -> list[Released]:
        return [self.release(qid, operator) for qid in ids]

    def release(self, qid: str, operator: str) -> Released:
        """Release one entry (audited); it leaves the quarantine only if released."""
        entry = self.quarantine.get(qid)
        if entry is None:
            return Released(qid, False, "not in quarantine")
        ok, why = self._release(entry)
        self.store.audit("quarantine_retry", quarantine_id=qid, kind=entry.kind, released=ok,
                         operator=operator)
        if ok:
            self.quarantine.remove(qid)
        return Released(qid, ok, why)

    def _release(self, entry: QuarantineEntry) -> tuple[bool, str]:
        source = self.quarantine.file(entry.id)
        if entry.kind == "send_failed":
            destination = entry.destination
            if destination not in self.destinations and destination not in self.return_spools:
                return False, f"destination {destination!r} is no longer configured"
            spool = self.return_spools.get(destination, self.spool)
            target = spool.path_for(entry.sop_instance_uid)
            size = spool.write(target, copier(source))
            self.store.requeue(destination, {**entry.as_dict(), "path": str(target), "size": size,
                                             "pseudo_sop_instance_uid": entry.sop_instance_uid})
            return True, ""
        outcome = self.pipeline.receive(source, calling_aet=entry.calling_aet)
        return outcome.ok, outcome.comment
