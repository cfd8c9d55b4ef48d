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
    server.container("telerad").create_container()
    return 'kind = "azure"\ncontainer = "telerad"\nconnection_string_env = "BENCH_AZURE"\n'


def node_for(folder: Path, kind: str, server: Any, stable: float) -> Node:
    node = Node(folder, [])
    node.config.write_text(node.config.read_text() + f'[[destinations]]\nname = "cloud"\n{destination(kind, server)}'
                           f"\n[studies]\nstable_seconds = {stable}\n")
    return node


def state(node: Node) -> dict:
    return json.loads(node.cli("status", "--json", check=True).stdout)


def run(kind: str, server: Any, files: list[Path], work: Path, stable: float) -> dict[str, float]:
    total = sum(f.stat().st_size for f in files)
    node = node_for(work / f"{kind}-paused", kind, server, stable).start()
    try:
        node.cli("pause", "cloud", check=True)
        assert storescu(node.port, files).returncode == 0
        assert wait_for(lambda: state(node)["destinations"]["cloud"]["pending"] == len(files), 120)
        started = time.monotonic()
        node.cli("resume", "cloud", check=True)
        assert wait_for(lambda: state(node)["destinations"]["cloud"]["sent"] == len(files), 600, 0.05)
        delivered = time.monotonic() - started
        manifest = float("nan")
        if kind != "dicomweb":
            assert wait_for(lambda: state(node)["batches"]["cloud"]["done"] == 1, 120, 0.05)
            manifest = time.monotonic() - started
    finally:
        node.stop()
    node = node_for(work / f"{kind}-e2e", kind, server, stable).start()
    try:
        started = time.monotonic()
        assert storescu(node.port, files).returncode == 0
        assert wait_for(lambda: state(node)["destinations"]["cloud"]["sent"] == len(files), 600, 0.05)
        end_to_end = time.monotonic() - started
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
