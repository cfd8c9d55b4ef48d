#!/usr/bin/env python3
"""Benchmark: telenode end to end against the DCMTK ceiling, and the per-instance cost of its steps.

Generates a deterministic synthetic CT series (512×512×16 bit, identifying
attributes, GE private groups, nested sequences), then measures, each run
repeated and reported as median (min–max):

* ceiling: DCMTK storescu → DCMTK storescp directly;
* telenode: storescu → telenode → storescp, timed until the last instance has
  arrived at the remote; peak RSS of the telenode process;
* in-process costs per instance: parse, de-identify, leak guard, encode;
* memory: peak RSS of telenode while proxying one large multi-frame instance.

    python3 scripts/bench.py [--instances 500] [--repeat 3] [--large-mb 1024] [--quick]

Prints one table and exits. DCMTK must be installed (apt-get install dcmtk).
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ENV = dict(os.environ, TCP_NODELAY="1")


def dcmtk(tool: str) -> str:
    for candidate in (f"/usr/bin/{tool}", shutil.which(tool) or ""):
        if candidate and os.access(candidate, os.X_OK):
            banner = subprocess.run([candidate, "--version"], capture_output=True, text=True).stdout
            if "dcmtk" in banner.lower():
                return candidate
    raise SystemExit(f"DCMTK {tool} not found: apt-get install dcmtk")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait(condition, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(0.01)


def large_instance(folder: Path, megabytes: int) -> Path:
    """One multi-frame 512×512×16 bit instance of about `megabytes` MB, written frame by frame."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    frames = max(1, megabytes * 1_000_000 // (512 * 512 * 2))
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = frames
    ds.PatientName, ds.PatientID = "LARGE^PATIENT", "MRN-LARGE-1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["bench-large"])
    for tag in [t for t in ds.keys() if t >= 0x7FE00010]:  # Pixel Data is appended last, below
        del ds[tag]
    path = folder / "LARGE.dcm"
    ds.save_as(path, enforce_file_format=True)
    frame = bytes(range(256)) * (512 * 512 * 2 // 256)
    with open(path, "ab") as handle:  # Pixel Data (7FE0,0010) OW, appended without holding it in memory
        handle.write(b"\xe0\x7f\x10\x00OW\x00\x00" + (len(frame) * frames).to_bytes(4, "little"))
        for _ in range(frames):
            handle.write(frame)
    return path


def corpus(folder: Path, count: int) -> list[Path]:
    """`count` CT instances of 512×512×16 bit in one study, seeded so every run is identical."""
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    template.Rows = template.Columns = 512
    template.PatientName, template.PatientID = "BENCHMARK^PATIENT^Q", "MRN-000123456"
    template.AccessionNumber, template.InstitutionName = "ACC0001234", "Benchmark General Hospital"
    template.ReferringPhysicianName, template.StudyDescription = "REFERRER^DOCTOR", "CT CHEST BENCHMARK"
    request = Dataset()
    request.AccessionNumber = template.AccessionNumber
    request.RequestedProcedureID = "RP0001"
    template.RequestAttributesSequence = Sequence([request])
    study = generate_uid(entropy_srcs=["bench-study"])
    series = generate_uid(entropy_srcs=["bench-series"])
    pixels = bytes(range(256)) * (512 * 512 * 2 // 256)
    files = []
    for index in range(count):
        ds = copy.deepcopy(template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[f"bench-{index}"])
        ds.InstanceNumber = index + 1
        ds.PixelData = pixels
        path = folder / f"CT{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


class Remote:
    """DCMTK storescp writing into a folder; counts what arrived."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        folder.mkdir(parents=True)
        self.proc = subprocess.Popen([dcmtk("storescp"), "-aet", "TELERAD", "-od", str(folder), str(self.port)],
                                     env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)

    def count(self) -> int:
        return sum(1 for _ in self.folder.iterdir())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def send(port: int, called: str, folder: Path) -> None:
    subprocess.run([dcmtk("storescu"), "-aec", called, "+sd", "127.0.0.1", str(port), str(folder)],
                   env=ENV, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def ceiling(work: Path, data: Path, count: int) -> float:
    remote = Remote(work / "ceiling")
    started = time.perf_counter()
    send(remote.port, "TELERAD", data)
    wait(lambda: remote.count() >= count)
    elapsed = time.perf_counter() - started
    remote.stop()
    return elapsed


def peak_rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def telenode(work: Path, data: Path, count: int) -> tuple[float, int]:
    remote = Remote(work / "remote")
    port = free_port()
    config = work / "telenode.toml"
    config.write_text(f"""[node]
port = {port}
host = "127.0.0.1"
data_dir = "var"
log_format = "json"
log_level = "warning"
[anonymization]
key_file = "var/pseudonym.key"
[[destinations]]
name = "remote"
ae_title = "TELERAD"
host = "127.0.0.1"
port = {remote.port}
""")
    node = subprocess.Popen([sys.executable, "-m", "node", "serve", "--config", str(config)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=open(work / "node.log", "wb"))

    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait(listening, 30)
    started = time.perf_counter()
    send(port, "TELENODE", data)
    wait(lambda: remote.count() >= count)
    elapsed = time.perf_counter() - started
    rss = peak_rss_kb(node.pid)
    node.send_signal(signal.SIGTERM)
    node.wait(60)
    remote.stop()
    return elapsed, rss


def steps(files: list[Path]) -> dict[str, list[float]]:
    """Per-instance milliseconds of parse, de-identify, leak guard and encode, in this process."""
    from node.deid import Deidentifier, Pseudonymizer
    from node.deid.guard import Guard
    from node.pipeline import read

    deid, guard = Deidentifier(Pseudonymizer(b"k" * 32, "ORG")), Guard()
    times: dict[str, list[float]] = {"parse": [], "de-identify": [], "leak guard": [], "encode": []}
    for path in files:
        t0 = time.perf_counter()
        ds = read(path)
        t1 = time.perf_counter()
        record = deid.apply(ds)
        t2 = time.perf_counter()
        assert guard.check(ds, record) is None
        t3 = time.perf_counter()
        ds.save_as(io.BytesIO(), enforce_file_format=True)
        t4 = time.perf_counter()
        for name, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            value_ms = value * 1000
            times[name].append(value_ms)
    return times


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):8.2f} ({min(values):.2f}–{max(values):.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--large-mb", type=int, default=1024, help="size of the large instance (0: skip)")
    parser.add_argument("--quick", action="store_true", help="100 instances, 1 run, 128 MB large instance")
    args = parser.parse_args(argv)
    count, repeat = (100, 1) if args.quick else (args.instances, args.repeat)
    large_mb = min(args.large_mb, 128) if args.quick else args.large_mb
    with tempfile.TemporaryDirectory(prefix="telenode-bench-") as tmp:
        root = Path(tmp)
        data = root / "data"
        files = corpus(data, count)
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        ceil, node, rss = [], [], []
        for run in range(repeat):
            ceil.append(ceiling(root / f"c{run}", data, count))
            elapsed, peak = telenode(root / f"t{run}", data, count)
            node.append(elapsed)
            rss.append(peak / 1024)
        per_step = steps(files[: min(count, 200)])
        large = None
        if large_mb:
            big = large_instance(root / "large", large_mb)
            seconds, peak = telenode(root / "large-run", big.parent, 1)
            large = (big.stat().st_size / 1e6, seconds, peak / 1024)
    print(f"corpus: {count} CT instances, 512x512x16 bit, {megabytes:.0f} MB; {repeat} run(s); median (min–max)")
    print(f"{'':32} {'seconds':>22} {'images/s':>10} {'MB/s':>8}")
    for name, values in (("DCMTK storescu → storescp", ceil), ("storescu → telenode → storescp", node)):
        med = statistics.median(values)
        print(f"{name:32} {summary(values):>22} {count / med:10.0f} {megabytes / med:8.1f}")
    print(f"{'telenode / ceiling (time)':32} {statistics.median(node) / statistics.median(ceil):8.2f}x")
    print(f"{'telenode peak RSS (MB)':32} {summary(rss)}")
    for name, values in per_step.items():
        print(f"{'per instance: ' + name + ' (ms)':32} {summary(values)}")
    if large:
        size, seconds, peak = large
        print(f"{'large instance':32} {size:.0f} MB in {seconds:.1f} s, telenode peak RSS {peak:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
