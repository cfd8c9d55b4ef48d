"""The spool: atomic, durable, private files for anonymized instances, on a real filesystem."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from node.spool import Spool, atomic_write

UID = "2.25.123456789012345678901234567890"


class Boom(Exception):
    """Raised by a writer halfway through."""


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir()] if folder.exists() else []


def test_atomic_write_full_content_and_mode(tmp_path):
    """atomic_write leaves the complete content at the target, mode 0600, returns its size, nothing in tmp."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    target = tmp_path / "out.dcm"
    payload = os.urandom(3 * 1024 * 1024 + 17)

    def write(handle):
        for start in range(0, len(payload), 65536):
            handle.write(payload[start:start + 65536])

    size = atomic_write(target, write, tmp)
    assert size == len(payload)
    assert target.read_bytes() == payload
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert leftovers(tmp) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.dcm", "tmp"]


def test_atomic_write_default_tmp_beside_target(tmp_path):
    """Without a tmp folder the partial file lives beside the target and is gone afterwards."""
    target = tmp_path / "x.dcm"
    assert atomic_write(target, lambda h: h.write(b"DICM")) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["x.dcm"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_atomic_write_replaces_existing(tmp_path):
    """Writing over an existing target replaces it whole with the new content."""
    target = tmp_path / "x.dcm"
    target.write_bytes(b"old content that is longer than the new one")
    atomic_write(target, lambda h: h.write(b"new"), tmp_path)
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["x.dcm"]


def test_atomic_write_failure_leaves_nothing(tmp_path):
    """A writer raising midway propagates; no target appears and no partial file is left in tmp."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    target = tmp_path / "out.dcm"
    seen = []

    def write(handle):
        handle.write(b"x" * 100_000)
        handle.flush()
        seen.extend(p for p in tmp.iterdir())  # the partial file exists while writing
        raise Boom("disk on fire")

    with pytest.raises(Boom, match="disk on fire"):
        atomic_write(target, write, tmp)
    assert len(seen) == 1 and seen[0].name.endswith(".tmp")
    assert not target.exists()
    assert leftovers(tmp) == []
    assert [p.name for p in tmp_path.iterdir()] == ["tmp"]


def test_atomic_write_failure_keeps_previous_target(tmp_path):
    """A failed rewrite leaves the previous complete file untouched."""
    target = tmp_path / "x.dcm"
    target.write_bytes(b"previous")

    def write(handle):
        handle.write(b"partial")
        raise KeyboardInterrupt  # BaseException too: e.g. a signal mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write, tmp_path)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["x.dcm"]


def test_spool_root_and_fan_folders_are_private(tmp_path):
    """The spool root (created with parents) is 0700, and its 256 fan folders exist, owner-only."""
    root = tmp_path / "a" / "b" / "spool"
    Spool(root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    fans = sorted(p.name for p in root.iterdir())
    assert fans == [f"{n:02x}" for n in range(256)]
    assert all(stat.S_IMODE((root / f).stat().st_mode) & 0o077 == 0 for f in fans)


def _partials(spool: Spool) -> list:
    return list(spool.root.glob("*/.*.tmp"))


def test_spool_root_permissions_tightened_on_existing_folder(tmp_path):
    """An existing world-readable folder used as spool root is tightened to 0700."""
    root = tmp_path / "spool"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    Spool(root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


def test_path_for_is_deterministic_and_fans_out(tmp_path):
    """path_for depends only on the UID: <root>/<first 2 hex of sha1(uid)>/<uid>.dcm, across instances."""
    spool = Spool(tmp_path / "spool")
    path = spool.path_for(UID)
    assert path == spool.path_for(UID) == Spool(tmp_path / "spool").path_for(UID)
    assert path.name == f"{UID}.dcm"
    assert path.parent.parent == spool.root
    assert path.parent.name == hashlib.sha1(UID.encode()).hexdigest()[:2]
    folders = {spool.path_for(f"2.25.{n}").parent.name for n in range(2000)}
    assert all(len(f) == 2 and all(c in "0123456789abcdef" for c in f) for f in folders)
    assert len(folders) > 200  # 2000 UIDs spread over (nearly) all 256 folders
    assert spool.path_for("2.25.1") != spool.path_for("2.25.2")


def test_spool_write_creates_private_fan_folder(tmp_path):
    """Spool.write writes the file 0600 in its private fan folder and leaves no partial file."""
    spool = Spool(tmp_path / "spool")
    target = spool.path_for(UID)
    size = spool.write(target, lambda h: h.write(b"\0" * 128 + b"DICM"))
    assert size == 132
    assert target.read_bytes() == b"\0" * 128 + b"DICM"
    assert stat.S_IMODE(target.parent.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert _partials(spool) == []


def test_spool_write_failure_leaves_nothing(tmp_path):
    """A failing writer through Spool.write leaves neither the target nor a partial file."""
    spool = Spool(tmp_path / "spool")
    target = spool.path_for(UID)

    def write(handle):
        handle.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        spool.write(target, write)
    assert not target.exists()
    assert _partials(spool) == []


def test_remove_is_idempotent(tmp_path):
    """remove deletes a spooled file, and removing it again is not an error."""
    spool = Spool(tmp_path / "spool")
    target = spool.path_for(UID)
    spool.write(target, lambda h: h.write(b"x"))
    spool.remove(target)
    assert not target.exists()
    spool.remove(str(target))


def test_cleanup_tmp_removes_leftovers(tmp_path):
    """cleanup_tmp removes partial files a crash left beside their targets (and in the .tmp folder of
    earlier versions) and counts them; complete files stay."""
    spool = Spool(tmp_path / "spool")
    kept = spool.path_for(UID)
    spool.write(kept, lambda h: h.write(b"complete"))
    (kept.parent / f".{UID}.dcm.deadbeef.tmp").write_bytes(b"partial")
    (kept.parent / f".{UID}.dcm.cafebabe.tmp").write_bytes(b"partial")
    legacy = spool.root / ".tmp"
    legacy.mkdir()
    (legacy / "other.tmp").write_bytes(b"partial")
    assert spool.cleanup_tmp() == 3
    assert _partials(spool) == [] and list(legacy.iterdir()) == []
    assert kept.read_bytes() == b"complete"
    assert spool.cleanup_tmp() == 0


def test_reopened_spool_keeps_files(tmp_path):
    """A new Spool on the same root finds the files written by the previous one."""
    first = Spool(tmp_path / "spool")
    first.write(first.path_for(UID), lambda h: h.write(b"kept"))
    second = Spool(tmp_path / "spool")
    assert second.path_for(UID).read_bytes() == b"kept"
