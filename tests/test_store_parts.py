"""The store's shape: one database core, parts around it, migrations as an ordered list, and no
original value in any repr."""

from __future__ import annotations

from node.deid.record import DeidRecord
from node.store import SCHEMA_VERSION, Store
from node.store.schema import MIGRATIONS

ORIGINALS = {"patient_id": "MRN-REPR-1", "patient_name": "Doe^Jane", "patient_birth_date": "19500101",
             "accession_number": "ACC-REPR-9", "study_instance_uid": "1.2.3.999", "sop_instance_uid": "1.2.3.999.1"}


def test_migrations_are_ordered_and_the_last_is_the_schema_written():
    versions = [m.version for m in MIGRATIONS]
    assert versions == list(range(1, len(versions) + 1))
    assert SCHEMA_VERSION == versions[-1]


def test_no_repr_shows_an_original(tmp_path):
    record = DeidRecord(**ORIGINALS, pseudo_patient_id="ORG-AAAA", pseudo_study_instance_uid="2.25.1",
                        pseudo_series_instance_uid="2.25.2", pseudo_sop_instance_uid="2.25.3",
                        uid_map={"1.2.3.999": "2.25.1"})
    store = Store(tmp_path / "telenode.sqlite")
    store.record_mapping(record, source="test")
    found = store.lookup("2.25.3")
    assert found is not None and found["patient_id"] == "MRN-REPR-1"  # recorded, and re-identifiable
    shown = " ".join(repr(x) for x in (record, store, store.ring, store.core, store.trail, store.mappings,
                                       store.queue, store.destinations, store.rotation))
    store.close()
    assert not [value for value in ORIGINALS.values() if value in shown], shown
