"""Throughput to each destination kind on local servers: DICOMweb (Orthanc), S3 (moto), Azure (Azurite).

For each kind: a telenode with that one destination, paused, receives the benchmark's CT
series from DCMTK storescu; then the destination is resumed and the time until every
instance is sent there is measured (the kind's delivery rate, apart from reception), and
until the batch's manifest is written (object stores; after `[studies] stable_seconds`).
A second run, not paused, times storescu's start to the last instance delivered.

    python3 scripts/bench_cloud.py [--ct 150] [--work-dir DIR]

Needs DCMTK, Orthanc with its DICOMweb plugin, moto[server] and Azurite (as the tests do).
Local servers on loopback: no network latency, no throttling; see README "Cloud destinations".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]

from bench_corpus import ct_series  # noqa: E402
from conftest import Node, storescu, wait_for  # noqa: E402
from servers import AZURITE_KEY, Azurite, MotoS3, Orthanc, credentials  # noqa: E402


def destination(kind: str, server: Any) -> str:
    if kind == "dicomweb":
        os.environ["BENCH_STOW_PASSWORD"] = server.password
        return (f'kind = "dicomweb"\nurl = "{server.url}"\nusername = "{server.user}"\n'
                'password_env = "BENCH_STOW_PASSWORD"\n')
    if kind == "s3":
        os.environ.update(credentials())
        server.client().create_bucket(Bucket="telerad")
        return f'kind = "s3"\nbucket = "telerad"\nendpoint_url = "{server.url}"\nregion = "us-east-1"\n'
    os.environ["BENCH_AZURE"] = server.connection_string(AZURITE_KEY)
    if not server.container("telerad").exists():
        server.container("telerad").create_container()
    return 'kind = "azure"\ncontainer = "telerad"\nconnection_string_env = "BENCH_AZURE"\n'


def node_for(folder: Path, kind: str, server: Any, stable: float) -> Node:
    node = Node(folder, [])
    node.config.write_text(node.config.read_text() + f'[[destinations]]\nname = "cloud"\n{destination(kind, server)}'
                           f"\n[studies]\nstable_seconds = {stable}\n")
    return node


def count(node: Node, sql: str) -> int:
    """Read the node's database directly: polling `telenode status` would start a Python per look
    and take the CPU the node is being measured on."""
    import sqlite3

    database = node.folder / "var" / "telenode.sqlite"
    if not database.exists():
        return 0
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30) as conn:
        try:
            return conn.execute(sql).fetchone()[0]
        except sqlite3.OperationalError:  # tables not created yet
            return 0


def queued(node: Node, status: str) -> int:
    return count(node, f"SELECT COUNT(*) FROM queue WHERE destination = 'cloud' AND status = '{status}'")


def batches_done(node: Node) -> int:
    return count(node, "SELECT COUNT(*) FROM batch_states WHERE destination = 'cloud' AND done IS NOT NULL")


def last(node: Node, event: str) -> float:
    """Epoch seconds of the node's last log line of this event (the node's own clock, no polling delay)."""
    from datetime import datetime

    times = [json.loads(line)["timestamp"] for line in node.log.read_text().splitlines()
             if line.startswith("{") and f'"event": "{event}"' in line]
    return datetime.fromisoformat(max(times).replace("Z", "+00:00")).timestamp()


def run(kind: str, server: Any, files: list[Path], work: Path, stable: float) -> dict[str, float]:
    total = sum(f.stat().st_size for f in files)
    node = node_for(work / f"{kind}-paused", kind, server, stable).start()
    try:
        node.cli("pause", "cloud", check=True)
        assert storescu(node.port, files).returncode == 0
        assert wait_for(lambda: queued(node, "pending") == len(files), 120)
        node.cli("resume", "cloud", check=True)
        started = time.time()  # the worker sees the resume within a second (it looks once a second)
        assert wait_for(lambda: queued(node, "sent") == len(files), 600, 0.05)
        delivered = last(node, "batch_sent") - started
        manifest = float("nan")
        if kind != "dicomweb":
            assert wait_for(lambda: batches_done(node) == 1, 120, 0.05)
            manifest = last(node, "batch_done") - started
    finally:
        node.stop()
    node = node_for(work / f"{kind}-e2e", kind, server, stable).start()
    try:
        started = time.time()
        assert storescu(node.port, files).returncode == 0
        assert wait_for(lambda: queued(node, "sent") == len(files), 600, 0.05)
        end_to_end = last(node, "batch_sent") - started
    finally:
        node.stop()
    return {"images": len(files), "mb": total / 1e6, "deliver_s": delivered, "manifest_s": manifest,
            "end_to_end_s": end_to_end}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=int, default=150, help="CT images (512x512, about 0.5 MB each)")
    parser.add_argument("--stable", type=float, default=2.0, help="[studies] stable_seconds")
    parser.add_argument("--work-dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-cloud-", dir=args.work_dir))
    files = ct_series(work / "corpus", args.ct)
    print(f"{'kind':<9} {'images':>6} {'MB':>6}  {'deliver s':>9} {'img/s':>6} {'MB/s':>6}  {'manifest s':>10}  "
          f"{'storescu→sent s':>15} {'img/s':>6}")
    for kind, make in (("dicomweb", Orthanc), ("s3", MotoS3), ("azure", Azurite)):
        server = make(work / f"{kind}-server").start()
        try:
            r = run(kind, server, files, work, args.stable)
        finally:
            server.stop()
        print(f"{kind:<9} {r['images']:>6} {r['mb']:>6.1f}  {r['deliver_s']:>9.2f} {r['images'] / r['deliver_s']:>6.1f} "
              f"{r['mb'] / r['deliver_s']:>6.1f}  {r['manifest_s']:>10.2f}  {r['end_to_end_s']:>15.2f} "
              f"{r['images'] / r['end_to_end_s']:>6.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
