"""Packaging: the optional GPL JPEG decoder, the Dockerfile's install steps, the systemd unit."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Iterator

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels.decoders import JPEGLSLosslessDecoder

from conftest import REPO, Node, dcmtk, free_port, listening, wait_for
from node import codecs
from node.config import PixelRule
from node.deid import Deidentifier, Pseudonymizer
from node.pipeline import SUCCESS, Pipeline, Safeguards
from node.spool import Quarantine, Spool
from node.store import Store

PYLIBJPEG = ("pydicom.pixels.decoders.pylibjpeg", "_decode_frame")


@pytest.fixture
def without_libjpeg() -> Iterator[None]:
    """pydicom as it is without the `jpeg` extra: no plugin decodes JPEG-LS."""
    JPEGLSLosslessDecoder.remove_plugin("pylibjpeg")
    try:
        yield
    finally:
        JPEGLSLosslessDecoder.add_plugin("pylibjpeg", PYLIBJPEG)


def test_without_the_jpeg_extra_a_jpeg_ls_image_to_clean_is_held_with_the_reason(tmp_path, without_libjpeg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    source = tmp_path / "mr.dcm"
    ds.save_as(source)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    assert "telenode[jpeg]" in (codecs.missing(syntax) or "")
    with pytest.raises(codecs.NoDecoderInstalled):
        codecs.require(syntax)
    store = Store(tmp_path / "telenode.sqlite")
    quarantine = Quarantine(tmp_path / "quarantine")
    pipeline = Pipeline(Deidentifier(Pseudonymizer(b"k" * 32, "ORG")), store, Spool(tmp_path / "spool"), ["r"],
                        safeguards=Safeguards(clean_pixels=True, burned_in="quarantine",
                                              pixel_rules=(PixelRule(rectangles=((0, 0, 4, 4),), modality="MR"),)),
                        quarantine=quarantine)
    outcome = pipeline.receive(source, calling_aet="MODALITY")
    store.close()
    assert outcome.status == SUCCESS  # held, durably: nothing half-decoded was forwarded
    [entry] = quarantine.entries()
    assert entry.kind == "burned_in" and "NoDecoderInstalled" in entry.reason, entry


def test_without_the_jpeg_extra_a_jpeg_ls_instance_a_remote_needs_uncompressed_fails_with_the_reason(
        tmp_path, without_libjpeg, make_storescp):
    """The forwarder decodes for a remote that takes only uncompressed (DCMTK storescp without +xa);
    a missing decoder is this instance's failure, quarantined as send_failed, not a lost association
    retried forever."""
    from test_forward import Queue

    from node.config import Destination
    from node.deid.record import DeidRecord
    from node.forward import Forwarder
    from node.store import FAILED

    remote = make_storescp()
    remote.proc = subprocess.Popen([dcmtk("storescp"), "-aet", "REMOTE", "-od", str(remote.folder), str(remote.port)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    remote.folder.mkdir(parents=True, exist_ok=True)
    assert wait_for(lambda: listening(remote.port), 15)
    q = Queue(tmp_path / "node")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))  # no decoder without the extra
    uid = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    path = q.spool.path_for(uid)
    size = q.spool.write(path, lambda handle: ds.save_as(handle, enforce_file_format=True))
    record = DeidRecord(patient_id="P1", patient_name="P1", pseudo_patient_id="TESTORG-P1",
                        study_instance_uid="1.2.3", pseudo_study_instance_uid=str(ds.StudyInstanceUID),
                        series_instance_uid="1.2.3.4", pseudo_series_instance_uid=str(ds.SeriesInstanceUID),
                        modality="MR", sop_instance_uid="1.2.3.4.5", pseudo_sop_instance_uid=uid,
                        sop_class_uid=str(ds.SOPClassUID), method_codes=("113100",))
    q.store.record_instance(record, calling_aet="MODALITY", path=str(path), size=size,
                            transfer_syntax=str(ds.file_meta.TransferSyntaxUID), destinations=["remote"])
    quarantine = Quarantine(tmp_path / "quarantine")
    destination = Destination(name="remote", ae_title="REMOTE", host="127.0.0.1", port=remote.port,
                              max_failures=1, retry_delay=0.1, max_retry_delay=0.2)
    forwarder = Forwarder(destination, q.store, q.spool, "TELENODE", quarantine)
    forwarder.start()
    try:
        assert wait_for(lambda: q.count(FAILED) == 1, 30), q.store.status()
    finally:
        forwarder.stop(15)
        q.store.close()
    entries = quarantine.entries()
    assert len(entries) == 1 and entries[0].kind == "send_failed", entries
    assert "NoDecoderInstalled" in entries[0].reason, entries
    assert remote.files() == []


def test_decoders_without_gpl_cover_jpeg_baseline_and_jpeg_2000():
    for syntax in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.90",
                   "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1"):
        assert codecs.missing(syntax) is None, syntax


# -- the container image ------------------------------------------------------------------------------
# Docker cannot run on the development machine: these tests check the Dockerfile's instructions and run
# its install step and its commands (CMD, HEALTHCHECK) in a fresh virtual environment instead.

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (name, _) in enumerate(steps) if name == "FROM")
    return steps[last_from:]


def test_the_image_is_slim_non_root_with_a_volume_and_a_healthcheck():
    steps = final_stage()
    names = [name for name, _ in steps]
    assert all("slim" in arg for name, arg in instructions() if name == "FROM")
    [user] = [arg for name, arg in steps if name == "USER"]
    assert user not in ("root", "0")
    [volume] = [arg for name, arg in steps if name == "VOLUME"]
    assert "/var/lib/telenode" in volume
    [check] = [arg for name, arg in steps if name == "HEALTHCHECK"]
    assert "telenode" in check and "echo" in check
    assert names.index("USER") < names.index("ENTRYPOINT")
    text = DOCKERFILE.read_text().lower()
    assert "dcmtk" not in text.replace("no dcmtk inside", "").replace("dcmtk is only the tests' peer", "")
    config = REPO / "packaging" / "telenode.container.toml"
    from node import config as node_config

    settings = node_config.load(config)
    assert str(settings.data_dir) == "/var/lib/telenode" and settings.key_file.parent == settings.data_dir


def _install_step() -> str:
    [run] = [arg for name, arg in instructions() if name == "RUN" and "pip install" in arg]
    return run.replace("${EXTRAS}", "")


@pytest.mark.slow
def test_the_images_install_step_gives_a_working_node_without_gpl_code(tmp_path):
    """The build stage's COPY and RUN, replayed: only the copied files, a fresh venv, the same pip line."""
    context = tmp_path / "src"
    context.mkdir()
    for name, arg in instructions():
        if name == "COPY" and "--from" not in arg and "packaging" not in arg:
            *sources, _ = arg.split()
            for source in sources:
                src = REPO / source
                (shutil.copytree if src.is_dir() else shutil.copy2)(src, context / source)
    venv = tmp_path / "opt" / "telenode"
    step = _install_step().replace("/opt/telenode", str(venv)).replace("python -m venv", f"{sys.executable} -m venv")
    built = subprocess.run(["sh", "-c", step], cwd=context, capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    python = venv / "bin" / "python"
    licences = subprocess.run([str(python), "-c", LICENCES], capture_output=True, text=True, timeout=60)
    assert licences.returncode == 0, licences.stderr
    found = json.loads(licences.stdout)
    assert "telenode" in found and "pylibjpeg-libjpeg" not in found
    gpl = {name: text for name, text in found.items() if "GPL" in text.upper() and "LGPL" not in text.upper()}
    assert not gpl, gpl
    probe = subprocess.run([str(python), "-c", CODECS], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout) == {"jpeg_baseline": None, "jpeg_2000": None, "rle": None,
                                        "jpeg_lossless": "needs the extra"}
    # CMD and HEALTHCHECK: the venv's telenode serves, and `telenode echo` says so.
    node = Node(tmp_path / "node", [("TELERAD", free_port())])
    text = node.config.read_text().replace('log_format = "json"', 'log_format = "json"\nworkers = 1', 1)
    node.config.write_text(text)
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "TELENODE_CONFIG": str(node.config)}
    server = subprocess.Popen([str(venv / "bin" / "telenode"), "serve"], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: listening(node.port), 60)
        check = [arg for name, arg in final_stage() if name == "HEALTHCHECK"][0]
        command = json.loads(check.split("CMD", 1)[1].strip())
        healthy = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert json.loads(healthy.stdout)["healthy"] is True
    finally:
        server.terminate()
        assert server.wait(60) == 0
    unhealthy = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert unhealthy.returncode == 1


LICENCES = """
import json
from importlib.metadata import distributions
found = {}
for dist in distributions():
    meta = dist.metadata
    text = " ".join([meta.get("License") or "", meta.get("License-Expression") or "",
                     *[c for c in meta.get_all("Classifier") or [] if c.startswith("License")]])
    found[meta["Name"].lower()] = text[:300]
print(json.dumps(found))
"""

CODECS = """
import json
from node import codecs
answer = {name: codecs.missing(uid) for name, uid in (("jpeg_baseline", "1.2.840.10008.1.2.4.50"),
          ("jpeg_2000", "1.2.840.10008.1.2.4.90"), ("rle", "1.2.840.10008.1.2.5"))}
answer["jpeg_lossless"] = "needs the extra" if "telenode[jpeg]" in (codecs.missing("1.2.840.10008.1.2.4.70") or "") else "?"
print(json.dumps(answer))
"""


# -- the systemd unit ---------------------------------------------------------------------------------

UNIT = REPO / "packaging" / "telenode.service"


def test_the_unit_is_hardened_and_writes_only_the_data_dir():
    settings = dict(line.split("=", 1) for line in UNIT.read_text().splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["ProtectSystem"] == "strict" and settings["PrivateTmp"] == "true"
    assert settings["NoNewPrivileges"] == "true" and settings["ReadWritePaths"] == "/var/lib/telenode"
    assert settings["User"] != "root"
    container = (REPO / "packaging" / "telenode.container.toml").read_text()
    assert 'data_dir = "/var/lib/telenode"' in container  # the same data_dir in both packagings


def _can_verify() -> bool:
    return (shutil.which("systemd-analyze") is not None and shutil.which("unshare") is not None
            and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0)


@pytest.mark.skipif(not _can_verify(), reason="needs systemd-analyze and a mount namespace (root)")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    """verify also checks that ExecStart exists: a private /opt holds a stand-in for the venv's telenode."""
    [start] = [line.split("=", 1)[1] for line in UNIT.read_text().splitlines() if line.startswith("ExecStart=")]
    binary = shlex.split(start)[0]
    unit = tmp_path / "telenode.service"
    shutil.copy2(UNIT, unit)
    script = (f"mount -t tmpfs none /opt && mkdir -p {Path(binary).parent} && printf '#!/bin/sh\\n' > {binary} "
              f"&& chmod +x {binary} && systemd-analyze verify {unit}")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
