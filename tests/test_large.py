"""A large multi-frame instance goes through a real node intact and with flat memory (not timed).

DCMTK storescu → telenode → DCMTK storescp with one ≈ 256 MiB native multi-frame CT instance,
generated here frame by frame (never held in memory, hashed as it is written). The pixel data that
arrives must hash the same (read back by streaming), the identity must not arrive, and the peak RSS
(VmHWM) summed over the node's process tree, read from /proc while it runs and once more before it
is stopped, must stay under 300 MB: a process holding the instance would alone be above that.

The node runs with workers = 1 so that the tree (supervisor, one SCP worker, multiprocessing's
resource tracker) is the same on every machine; "auto" would add one ~80 MB worker per core.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from conftest import storescu, wait_for

FRAME_BYTES = 512 * 512 * 2
FRAMES = 512  # 256 MiB of pixel data
RSS_BOUND_MB = 300
CHUNK = 1 << 20


def write_large(path: Path) -> str:
    """A multi-frame 512×512×16 bit CT with FRAMES frames; returns the SHA-256 of its pixel data."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName, ds.PatientID = "LARGEPATIENT^ROSALIND", "MRN-LARGE-7731"
    ds.InstitutionName = "Large Instance General Hospital"
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = FRAMES
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    for tag in [t for t in ds.keys() if t >= 0x7FE00010]:
        del ds[tag]
    ds.save_as(path, enforce_file_format=True)
    base = memoryview(random.Random(7).randbytes(FRAME_BYTES + 65536))
    digest = hashlib.sha256()
    with open(path, "ab") as handle:  # (7FE0,0010) OW, explicit VR little endian
        handle.write(b"\xe0\x7f\x10\x00OW\x00\x00" + (FRAME_BYTES * FRAMES).to_bytes(4, "little"))
        for index in range(FRAMES):  # every frame different: a reordering would not hash the same
            offset = (index * 128) % 65536
            frame = base[offset:offset + FRAME_BYTES]
            digest.update(frame)
            handle.write(frame)
    return digest.hexdigest()


def pixel_hash(path: Path) -> tuple[str, int]:
    """SHA-256 and length of the Pixel Data value, streamed from the file (never loaded)."""
    ds = pydicom.dcmread(path, defer_size=4096)
    raw = ds.get_item(0x7FE00010, keep_deferred=True)
    digest, left = hashlib.sha256(), raw.length
    with open(path, "rb") as handle:
        handle.seek(raw.value_tell)
        while left:
            chunk = handle.read(min(CHUNK, left))
            assert chunk, "file ends inside the pixel data"
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest(), raw.length


def process_tree(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                todo += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
            except OSError:
                pass
    return pids


def vm_hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreePeak:
    """Peak VmHWM per process under `root`, sampled in a thread until `finish()`."""

    def __init__(self, root: int) -> None:
        self.root, self.peaks = root, {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        for pid in process_tree(self.root):
            self.peaks[pid] = max(self.peaks.get(pid, 0), vm_hwm_kb(pid))

    def _run(self) -> None:
        while not self.done.wait(0.2):
            self.sample()

    def finish(self) -> dict[int, int]:
        self.done.set()
        self.thread.join()
        self.sample()
        return self.peaks


def test_large_multiframe_instance_arrives_intact_with_flat_memory(tmp_path, make_node, make_storescp):
    source = tmp_path / "large" / "LARGE.dcm"
    source.parent.mkdir()
    sent_hash = write_large(source)
    remote = make_storescp().start()
    node = make_node([(remote.ae_title, remote.port)])
    text = node.config.read_text()
    if "workers" not in text:
        node.config.write_text(text.replace("[node]\n", "[node]\nworkers = 1\n", 1))
    node.start()
    peak = TreePeak(node.proc.pid)
    try:
        result = storescu(node.port, [source])
        assert result.returncode == 0, result.stderr

        def sent() -> bool:
            status = json.loads(node.cli("status", "--json", check=True).stdout)["destinations"]["remote0"]
            return status["sent"] == 1

        # storescp answers Success only after writing the file, so "sent" means it is complete.
        assert wait_for(sent, 60, 0.25), node.cli("status", "--json").stdout
    finally:
        peaks = peak.finish()  # before the node stops: VmHWM goes with the process
    node.stop()

    files = remote.files()
    assert len(files) == 1
    received_hash, length = pixel_hash(files[0])
    assert length == FRAME_BYTES * FRAMES
    assert received_hash == sent_hash
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert "LARGEPATIENT" not in str(header.get("PatientName", ""))
    assert header.get("PatientID") != "MRN-LARGE-7731"
    assert int(header.NumberOfFrames) == FRAMES

    total_mb = sum(peaks.values()) / 1024
    detail = {pid: f"{kb / 1024:.0f} MB" for pid, kb in peaks.items()}
    assert len(peaks) >= 2, f"no worker process seen under the node: {detail}"
    assert total_mb < RSS_BOUND_MB, f"peak RSS over the node's process tree {total_mb:.0f} MB: {detail}"
