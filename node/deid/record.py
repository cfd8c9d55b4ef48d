"""What de-identifying one instance produced: originals and their pseudonyms.

The rule engine fills it; the mapping store records it; the pipeline logs only
the pseudonymous half. Original values here are PHI: never log this object.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DeidRecord:
    """Original ↔ pseudonym pairs for one instance, at every level of the hierarchy."""

    # patient
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    pseudo_patient_id: str = ""
    pseudo_patient_name: str = ""
    # study
    study_instance_uid: str = ""
    pseudo_study_instance_uid: str = ""
    accession_number: str = ""
    pseudo_accession_number: str = ""
    study_date: str = ""
    # series
    series_instance_uid: str = ""
    pseudo_series_instance_uid: str = ""
    modality: str = ""
    # instance
    sop_instance_uid: str = ""
    pseudo_sop_instance_uid: str = ""
    sop_class_uid: str = ""
    # every UID the engine remapped, original → pseudonym (includes the four above)
    uid_map: dict[str, str] = field(default_factory=dict)
    # PS3.15 options applied, in CID 7050 terms (e.g. "113100" Basic Profile first)
    method_codes: tuple[str, ...] = ()
    # (VR, original value) of identifying values the profile removed or replaced: the leak guard's needles
    removed_values: list[tuple[str, object]] = field(default_factory=list)
    # the same with their tags, (tag, VR, original value): the source of the spelling variants (variants.py)
    identity: list[tuple[int, str, object]] = field(default_factory=list)
    # text and dates kept on purpose (K by an option or the table, or a keep/set override): not leaks
    retained_values: set[str] = field(default_factory=set)
    # per-tag overrides applied after the profile, as "Keyword=action" (no values)
    overrides: tuple[str, ...] = ()

    def __repr__(self) -> str:  # the dataclass repr would print every original: pseudonyms only
        return f"DeidRecord(pseudo_sop_instance_uid={self.pseudo_sop_instance_uid!r}, originals hidden)"
