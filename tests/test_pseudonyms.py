"""Keyed pseudonyms (design.md): deterministic under one key, different under another, valid for their VR."""

from __future__ import annotations

import os
import re
import stat

import pytest

from node.deid.pseudonyms import KeyFileError, Pseudonymizer, load_or_create_key, patient_key

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
UID = "1.2.826.0.1.3680043.2.1125.1.99"


def test_uid_is_2_25_of_the_first_128_bits_and_valid():
    """UIDs: `2.25.` + decimal of 128 bits (PS3.5 B.2), at most 64 characters, no leading zero."""
    uid = Pseudonymizer(KEY, "ORG").uid(UID)
    assert re.fullmatch(r"2\.25\.[1-9][0-9]*", uid) and len(uid) <= 64
    assert int(uid[5:]) < 2**128


def test_same_key_same_pseudonyms_other_key_other_pseudonyms():
    """Determinism and keying: the same original maps identically under one key, differently under another."""
    a, b, c = Pseudonymizer(KEY, "ORG"), Pseudonymizer(KEY, "ORG"), Pseudonymizer(OTHER_KEY, "ORG")
    pid = patient_key("MRN123", "HOSP", "", "", "")
    for kind in ("uid", "accession"):
        assert getattr(a, kind)(UID) == getattr(b, kind)(UID) != getattr(c, kind)(UID)
    assert a.patient_id(pid) == b.patient_id(pid) != c.patient_id(pid)
    assert a.date_offset_days(pid) == b.date_offset_days(pid)


def test_patient_id_format_and_issuer_matters():
    """PatientID is `{organization}-{token}` per issuer + ID: the same ID at another issuer is another patient."""
    p = Pseudonymizer(KEY, "ORG")
    here, there = p.patient_id(patient_key("42", "HOSP_A", "", "", "")), p.patient_id(patient_key("42", "HOSP_B", "", "", ""))
    assert re.fullmatch(r"ORG-[A-Z2-7]{12}", here)
    assert here != there


def test_patient_key_falls_back_to_name_and_birth_date_then_study():
    """No PatientID: the name and birth date identify the patient, then the study."""
    assert patient_key("", "", "Doe^John", "19700101", "1.2") == patient_key("", "", "DOE^JOHN", "19700101", "1.3")
    assert patient_key("", "", "", "", "1.2") != patient_key("", "", "", "", "1.3")


def test_accession_is_16_characters_and_purposes_do_not_collide():
    """AccessionNumber fits SH (16); the same string as a UID and as an accession gives unrelated pseudonyms."""
    p = Pseudonymizer(KEY, "ORG")
    assert len(p.accession("A1")) == 16
    assert p.accession("A1") not in p.uid("A1")


def test_date_offset_is_in_the_past_within_ten_years():
    """Modified dates shift back 1 to 3650 days per patient."""
    p = Pseudonymizer(KEY, "ORG")
    offsets = {p.date_offset_days(patient_key(str(i), "", "", "", "")) for i in range(200)}
    assert all(-3650 <= o <= -1 for o in offsets) and len(offsets) > 150


def test_key_created_0600_once_and_reused(tmp_path):
    """The key file is created 0600 on first use and read back unchanged afterwards."""
    path = tmp_path / "keys" / "pseudonym.key"
    first = load_or_create_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(first) == 32 and load_or_create_key(path) == first


def test_bad_key_file_is_refused_without_echoing_it(tmp_path):
    """A key file that isn't hex is refused; the message never quotes its content."""
    path = tmp_path / "pseudonym.key"
    path.write_text("my-secret-passphrase\n")
    with pytest.raises(KeyFileError) as caught:
        load_or_create_key(path)
    assert "my-secret" not in str(caught.value)


def test_repr_does_not_show_the_key():
    """A pseudonymizer printed in a traceback shows no key material."""
    assert KEY.hex() not in repr(Pseudonymizer(KEY, "ORG")) and str(KEY) not in repr(Pseudonymizer(KEY, "ORG"))


def test_key_file_readable_by_group_or_others_is_refused(tmp_path):
    """A pseudonym key that group or others can read is refused with `chmod 600` advice, not used."""
    path = tmp_path / "pseudonym.key"
    load_or_create_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600") as caught:
        load_or_create_key(path)
    assert path.read_text().strip() not in str(caught.value)


def test_key_created_by_racing_processes_is_one_key(tmp_path):
    """Several processes creating the key at once all end up with the same, whole key (atomic link)."""
    import multiprocessing

    path = tmp_path / "pseudonym.key"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        keys = pool.map(load_or_create_key, [path] * 8)
    assert len(set(keys)) == 1 and len(keys[0]) == 32
    assert [p.name for p in tmp_path.iterdir()] == ["pseudonym.key"]  # no temporary file left behind
