"""End to end with the seeds' options, the burned-in policy and the leak guard, against DCMTK peers.

storescu → telenode → storescp over loopback; what arrives is read with
DCMTK's own dcmdump, as an administrator would look at it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pydicom

from conftest import dcmtk, storescu, wait_for
from studies import make_study

SEEDS = ["retain_safe_private", "retain_device_identity", "clean_descriptors", "clean_graphics"]
US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"


def dcmdump(path) -> str:
    return subprocess.run([dcmtk("dcmdump"), str(path)],
                          capture_output=True, text=True, check=True).stdout


def quarantine_entries(node) -> list[dict]:
    folder = node.folder / "var" / "quarantine"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.exists() else []


def test_seed_options_send_nothing_identifying_and_keep_what_they_retain(tmp_path, make_node, make_storescp):
    """Basic + Retain Safe Private + Retain Device Identity + Clean Descriptors + Clean Graphics (113111, 113109, 113105, 113103)."""
    study = make_study(tmp_path / "study", instances=3, series=1)
    remote = make_storescp().start()
    node = make_node([(remote.ae_title, remote.port)], options=SEEDS).start()
    assert storescu(node.port, study.files).returncode == 0
    assert wait_for(lambda: len(remote.files()) == 3), f"{len(remote.files())} of 3 arrived"

    retained = {study.phi["StationName"], study.phi["DeviceSerialNumber"]}  # device identity, on purpose
    for path in remote.files():
        dump = dcmdump(path).upper()
        raw = path.read_bytes().upper()
        for value in study.identifying_strings:
            if value in retained:
                continue
            assert value.upper() not in dump, f"{value!r} visible in dcmdump of {path.name}"
            assert value.upper().encode() not in raw, f"{value!r} in the bytes of {path.name}"
        ds = pydicom.dcmread(path)
        assert ds.StationName == study.phi["StationName"] and ds.DeviceSerialNumber == study.phi["DeviceSerialNumber"]
        # Clean Descriptors (C): the study description keeps its words, loses the patient's name.
        assert "CHEST" in ds.StudyDescription and "SMITHERSON" not in ds.StudyDescription.upper()
        # Retain Safe Private (C): GEMS_ACQU_01 (0019,xx23) is in Table E.3.10-1, the rest of the block is not.
        creators = {str(e.value) for e in ds if e.tag.is_private_creator}
        assert "GEMS_ACQU_01" in creators
        assert all(e.private_creator in {"GEMS_ACQU_01", "GEMS_SERS_01", "GEMS_PARM_01"}
                   for e in ds if e.tag.is_private and not e.tag.is_private_creator)
        codes = [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
        assert codes == ["113100", "113111", "113109", "113105", "113103"]
    assert node.stop() == 0


def test_ultrasound_is_quarantined_by_default_and_never_forwarded(tmp_path, make_node, make_storescp):
    """Burned-in policy "quarantine" (default): a US image is held (status Success, durable), not forwarded."""
    study = make_study(tmp_path / "study", instances=2, series=1)
    us = pydicom.dcmread(study.files[0])
    us.Modality, us.SOPClassUID = "US", US_IMAGE_STORAGE
    us.file_meta.MediaStorageSOPClassUID = US_IMAGE_STORAGE
    us.save_as(study.files[0], enforce_file_format=True)
    remote = make_storescp().start()
    node = make_node([(remote.ae_title, remote.port)]).start()
    assert storescu(node.port, study.files).returncode == 0
    assert wait_for(lambda: len(remote.files()) == 1)
    assert wait_for(lambda: len(quarantine_entries(node)) == 1)
    entry = quarantine_entries(node)[0]
    assert entry["kind"] == "burned_in"
    held = node.folder / "var" / "quarantine" / f"{entry['id']}.dcm"
    assert pydicom.dcmread(held).PatientID == study.phi["PatientID"]  # the original stays inside the hospital
    assert stat.S_IMODE(os.stat(held).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(held.parent).st_mode) == 0o700
    status = json.loads(node.cli("status", "--json", check=True).stdout)
    assert status["quarantine"] == 1 and status["destinations"]["remote0"]["sent"] == 1
    assert status["quarantine_by_kind"] == {"burned_in": 1}
    assert "burned_in 1" in node.cli("status", check=True).stdout
    assert node.stop() == 0


def test_leak_guard_refuses_a_name_in_an_attribute_the_profile_keeps(tmp_path, make_node, make_storescp):
    """A vendor wrote the patient's name into Convolution Kernel (not in Table E.1-1, so kept): 0xC220, quarantined.

    The engine now takes the identity out of untabled text itself (issue 10); a keep override on the
    attribute stands for whatever it could not find, so that the guard behind it has something to catch.
    """
    study = make_study(tmp_path / "study", instances=2, series=1)
    leaky = pydicom.dcmread(study.files[1])
    leaky.ConvolutionKernel = "SMITHERSON"
    leaky.save_as(study.files[1], enforce_file_format=True)
    remote = make_storescp().start()
    node = make_node([(remote.ae_title, remote.port)])
    node.config.write_text(node.config.read_text() + '\n[anonymization.overrides]\nConvolutionKernel = "keep"\n')
    node.start()
    sent = storescu(node.port, study.files)
    assert "0xc220" in (sent.stdout + sent.stderr).lower() or sent.returncode != 0
    assert wait_for(lambda: len(remote.files()) == 1)
    entries = quarantine_entries(node)
    assert len(entries) == 1 and entries[0]["kind"] == "leak_guard"
    assert "ConvolutionKernel" in entries[0]["reason"] and "SMITHERSON" not in json.dumps(entries).upper()
    assert node.stop() == 0
    log = node.log.read_text()
    assert "instance_quarantined" in log and "SMITHERSON" not in log.upper()
