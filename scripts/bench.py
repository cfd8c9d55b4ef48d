#!/usr/bin/env python3
"""Benchmark: telenode end to end against DCMTK, a bare pynetdicom SCP and Orthanc.

Generates a deterministic synthetic corpus (a CT series of 512×512×16 bit images and an MR series
of 256×256×16 bit, with identifying attributes, private tags and nested sequences; one large
multi-frame instance), then measures, each repeated and reported as median (min–max):

* ceiling: DCMTK storescu → DCMTK storescp directly;
* Python receive ceiling: storescu → a bare pynetdicom Storage SCP that writes what it receives;
* telenode: storescu → telenode → storescp, until the last instance has arrived at the remote,
  with the default workers = "auto", with workers = 1, and with two storescu senders at once
  (each half of the corpus); peak RSS of the node's process tree;
* Orthanc (if installed) auto-forwarding to the same storescp from a Lua OnStoredInstance script:
  (a) forward only, (b) anonymize (REST) then forward;
* the large instance: DCMTK ceiling and telenode, with the node's peak RSS;
* per instance with one sender, from the node's log: time in the pipeline, and the rest of the time
  between two instances stored (receive, response, the sender's next request);
* in process, per CT header: parse, de-identify, leak guard, encode.

    python3 scripts/bench.py [--ct 500] [--mr 150] [--repeat 3] [--large-mib 1024] [--work-dir DIR]
                              [--keep-logs DIR] [--quick]

Needs DCMTK (apt-get install dcmtk) and, for the Orthanc rows, Orthanc (apt-get install orthanc;
its rows say "skipped" otherwise). Installs nothing. The work dir must be on a real disk, not
tmpfs: the node fsyncs. Prints one table and exits (1 if a row failed).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import bench_corpus  # noqa: E402
import bench_peers as peers  # noqa: E402
from bench_peers import BenchError, Orthanc, Peak, PyScp, Remote, Telenode  # noqa: E402

SKIPPED_ORTHANC = "skipped: orthanc not installed (apt-get install orthanc)"
WIDTH = 50  # of the label column


# --- environment -------------------------------------------------------------------------------------

def mount_of(path: Path) -> tuple[str, str, str]:
    """(device, file system type, mount point) holding `path`."""
    best = ("?", "?", "")
    path_str = str(path.resolve())
    with open("/proc/mounts") as handle:
        for line in handle:
            device, point, fstype = line.split()[:3]
            if (path_str == point or path_str.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[2]):
                best = (device, fstype, point)
    return best


def disk_kind(device: str) -> str:
    name = Path(device).name
    for candidate in (name, name.rstrip("0123456789"), name.rsplit("p", 1)[0]):
        flag = Path(f"/sys/block/{candidate}/queue/rotational")
        if flag.exists():
            return f"/sys rotational={flag.read_text().strip()}"
    return "rotational unknown"


def load_text() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def machine_line(work: Path) -> str:
    import pydicom
    import pynetdicom

    cpu = "?"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    device, fstype, _ = mount_of(work)
    banner = subprocess.run([peers.dcmtk("storescu"), "--version"], capture_output=True, text=True).stdout
    dcmtk_version = next((w.lstrip("v") for w in banner.split() if w.startswith("v3.")), "?")
    return (f"machine: {cpu}, {os.cpu_count()} cores; data dir {work} on {device} ({fstype}, {disk_kind(device)}); "
            f"Python {platform.python_version()}, pynetdicom {pynetdicom.__version__}, pydicom {pydicom.__version__}, "
            f"DCMTK {dcmtk_version}, Orthanc {peers.orthanc_version()}; {load_text()} at the end")


# --- one run of each path ------------------------------------------------------------------------

Result = tuple[float, Peak | None]  # seconds, (max MB, sum MB, processes, PSS MB) or None


def run_ceiling(run: Path, folders: list[Path], expected: int, marker: bool = False) -> Result:
    remote = Remote(run / "remote", marker=marker)
    try:
        seconds = peers.send(remote.port, peers.REMOTE_AET, folders, remote.count, expected, [remote.proc], run,
                             stall=600)
    finally:
        remote.stop()
    return seconds, None


def run_pyscp(run: Path, folders: list[Path], expected: int) -> Result:
    scp = PyScp(run / "received")
    try:
        seconds = peers.send(scp.port, "PYSCP", folders, scp.count, expected, [scp.proc], run)
    finally:
        peak = scp.stop()
    return seconds, peak


#: Per run folder ("telenode-0", …): the node's pace from its own log, before the folder goes.
PACES: dict[str, tuple[float, float]] = {}
SPANS: dict[str, float] = {}  # run folder → seconds the senders' associations lasted (node's log)


def run_telenode(run: Path, folders: list[Path], expected: int, workers: int | None = None,
                 marker: bool = False, ack: str = "") -> Result:
    remote = Remote(run / "remote", marker=marker)
    node = None
    try:
        node = Telenode(run, remote.port, workers, ack)
        seconds = peers.send(node.port, "TELENODE", folders, remote.count, expected, [node.proc, remote.proc], run,
                             stall=600)
    except BenchError as exc:
        log = run / "node.log"
        raise BenchError(f"{exc}{peers._tail(log)}") from None
    finally:
        peak = node.stop() if node else None
        remote.stop()
    found = pace(run / "node.log")
    if found:
        PACES[run.name] = found
    span = sender_span(run / "node.log")
    if span:
        SPANS[run.name] = span
    return seconds, peak


def _events(log: Path, names: tuple[str, ...]) -> list[tuple[str, dict]]:
    """(event, record) for the node's JSON log lines of the given events."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if not any(f'"{name}"' in line for name in names):
            continue
        try:
            event = json.loads(line)
            found.append((event["event"], event))
        except (ValueError, KeyError):
            continue
    return found


def pace(log: Path) -> tuple[float, float] | None:
    """From the node's instance_stored lines: the median ms an instance spends in the pipeline (the
    node's own `ms`: parse, de-identify, guard, write, fsync, commit) and the median ms between two
    instances stored. With one sender the difference is everything else on the critical path:
    pynetdicom's receive, the response, and the sender's next request."""
    stored, spent = [], []
    for _, event in _events(log, ("instance_stored",)):
        try:
            stored.append(datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp())
            spent.append(float(event["ms"]))
        except (ValueError, KeyError):
            continue
    if len(stored) < 3:
        return None
    stored.sort()
    gaps = [(later - earlier) * 1000 for earlier, later in zip(stored, stored[1:])]
    return statistics.median(spent), statistics.median(gaps)


def sender_span(log: Path) -> float | None:
    """Seconds from the first storescu association accepted (calling AE SENDER…) to the last one
    released: how long the senders were busy, whatever the node still had to forward after."""
    times: dict[str, list[float]] = {"association_accepted": [], "association_released": []}
    for name, event in _events(log, tuple(times)):
        if str(event.get("calling_aet", "")).startswith("SENDER") and "timestamp" in event:
            times[name].append(datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp())
    if not times["association_accepted"] or not times["association_released"]:
        return None
    return max(times["association_released"]) - min(times["association_accepted"])


def run_orthanc(run: Path, folders: list[Path], expected: int, anonymize: bool) -> Result:
    remote = Remote(run / "remote")
    orthanc = None
    try:
        orthanc = Orthanc(run, remote.port, anonymize)
        seconds = peers.send(orthanc.port, "ORTHANC", folders, remote.count, expected, [orthanc.proc, remote.proc],
                             run)
    except BenchError as exc:
        raise BenchError(f"{exc}{peers._tail(run / 'orthanc.log')}") from None
    finally:
        peak = orthanc.stop() if orthanc else None
        remote.stop()
    return seconds, peak


# --- in process ----------------------------------------------------------------------------------

def steps(files: list[Path]) -> dict[str, list[float]]:
    """Per-instance milliseconds of parse, de-identify, leak guard and encode, in this process.
    Also checks the corpus: every instance de-identifies and passes the leak guard."""
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
        problem = guard.check(ds, record)
        t3 = time.perf_counter()
        if problem is not None:
            raise SystemExit(f"corpus problem: the leak guard refuses {path.name}: {problem}")
        ds.save_as(io.BytesIO(), enforce_file_format=True)
        t4 = time.perf_counter()
        for name, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[name].append(value * 1000)
    return times


# --- the table -----------------------------------------------------------------------------------

def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def rss_text(peaks: list[Peak]) -> str:
    if not peaks:
        return ""
    top = max(peaks, key=lambda p: p[1])
    if top[2] == 1:
        return f"{max(p[0] for p in peaks):.0f}"
    pss = max(p[3] for p in peaks)
    return f"max {max(p[0] for p in peaks):.0f} / sum {top[1]:.0f} / PSS {pss:.0f} ({top[2]} procs)"


def cpu_text(peaks: list[Peak], count: int) -> str:
    """Median CPU ms per image of the root process and of the rest of its tree."""
    if not peaks:
        return ""
    main = statistics.median(p.cpu_main for p in peaks) * 1000 / count
    rest = statistics.median(p.cpu_children for p in peaks) * 1000 / count
    return f"cpu ms/img: main {main:.1f}" + (f" + children {rest:.1f}" if rest else "")


KEEP_LOGS: Path | None = None  # --keep-logs: each run's logs are copied here before its folder goes


class Row:
    def __init__(self, label: str, action: Callable[[Path], Result] | None, skipped: str = "") -> None:
        self.label, self.action, self.skipped = label, action, skipped
        self.seconds: list[float] = []
        self.peaks: list[Peak] = []
        self.error = ""

    def run(self, folder: Path) -> None:
        if self.action is None or self.error:
            return
        os.sync()  # the previous run's writes must not land in this run's fsyncs
        try:
            seconds, peak = self.action(folder)
        except BenchError as exc:
            self.error = str(exc)
            print(f"{self.label}: FAILED: {exc}", file=sys.stderr)
        else:
            self.seconds.append(seconds)
            print(f"  {seconds:.2f} s", file=sys.stderr, flush=True)
            if peak:
                self.peaks.append(peak)
        finally:
            if KEEP_LOGS and folder.exists():
                for log in folder.rglob("*.log"):
                    target = KEEP_LOGS / folder.name / log.relative_to(folder)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(log, target)
            shutil.rmtree(folder, ignore_errors=True)

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    def line(self, count: int, megabytes: float) -> str:
        if self.skipped:
            return f"{self.label:{WIDTH}} {self.skipped}"
        if self.error or not self.seconds:
            return f"{self.label:{WIDTH}} FAILED: {self.error.splitlines()[0] if self.error else 'no run'}"
        med = self.median
        return (f"{self.label:{WIDTH}} {spread(self.seconds):>22} {count / med:9.1f} {megabytes / med:8.1f}   "
                f"{rss_text(self.peaks)}  {cpu_text(self.peaks, count)}")


def span_lines(rows: dict[str, Row], count: int) -> list[str]:
    """How soon the senders were done (the node's log; medians): with ack = "received" they are
    released before de-identification, so this is what a modality sees."""
    lines = ["the senders' view: first association accepted to last released (the node's log; medians):"]
    bare = rows["pyscp"].median
    for key in ("telenode", "two", "w1", "received"):
        found = [value for name, value in SPANS.items() if name.rsplit("-", 1)[0] == key]
        if not found:
            continue
        span = statistics.median(found)
        versus = f"   {bare / span:.2f}× the bare pynetdicom SCP" if bare else ""
        lines.append(f"  {rows[key].label:{WIDTH}} {span:6.2f} s {count / span:9.1f} images/s{versus}")
    return lines if len(lines) > 1 else []


def pace_lines(rows: dict[str, Row], count: int) -> list[str]:
    """Where one sender's time per instance goes, from the node's log (medians over the runs)."""
    lines = ["per instance, one sender (the node's log; medians), ms:"]
    for key in ("telenode", "w1"):
        found = [value for name, value in PACES.items() if name.rsplit("-", 1)[0] == key]
        if not found:
            continue
        inside = statistics.median(f[0] for f in found)
        between = statistics.median(f[1] for f in found)
        lines.append(f"  {rows[key].label:{WIDTH}} {between:6.2f} between instances = {inside:.2f} in the pipeline"
                     f" + {between - inside:.2f} receive, response and the sender's next request")
    bare = rows["pyscp"].median
    if bare:
        lines.append(f"  {rows['pyscp'].label:{WIDTH}} {bare * 1000 / count:6.2f} per instance in all")
    return lines if len(lines) > 1 else []


def ratio_line(label: str, numerator: Row, denominator: Row) -> str:
    for row in (numerator, denominator):
        if row.skipped:
            return f"{label:{WIDTH}} {row.skipped}"
        if row.median is None:
            return f"{label:{WIDTH}} n/a ({row.label} failed)"
    value = denominator.median / numerator.median  # throughput ratio = inverse time ratio
    return f"{label:{WIDTH}} {value:8.2f}   ({numerator.median / denominator.median:.2f}× the time)"


def ratio(numerator: Row, denominator: Row) -> float | None:
    """Throughput ratio numerator / denominator from the medians, None when either did not run."""
    if numerator.median is None or denominator.median is None:
        return None
    return denominator.median / numerator.median


def target_line(label: str, value: float | None, goal: float, unit: str = "×", below: bool = False) -> str:
    """One of issue 15's targets: the measured value, the goal, and met / not met."""
    if value is None:
        return f"  {label:{WIDTH - 2}} {'n/a':>8}   target {'<' if below else '≥'} {goal:g}{unit}: not measured"
    met = value < goal if below else value >= goal
    return (f"  {label:{WIDTH - 2}} {value:8.2f}{unit}  target {'<' if below else '≥'} {goal:g}{unit}: "
            f"{'met' if met else 'NOT met'}")


def targets(rows: dict[str, Row], large_rows: dict[str, Row]) -> list[str]:
    """Issue 15's targets (one sender, CT+MR corpus, de-identification and fsync-before-Success on)."""
    large = large_rows.get("telenode")
    pss = max((p[3] for p in large.peaks), default=None) if large else None
    lines = ["targets (issue 15):"]
    for key, mode in (("telenode", 'default ack = "deidentified"'), ("received", 'ack = "received"')):
        lines += [
            f"  {mode}:",
            target_line("  telenode / Orthanc (b) anonymize+forward", ratio(rows[key], rows["orthanc_b"]), 1.3),
            target_line("  telenode / Orthanc (a) forward only", ratio(rows[key], rows["orthanc_a"]), 0.8),
            target_line("  telenode / bare pynetdicom SCP", ratio(rows[key], rows["pyscp"]), 0.5),
        ]
    return lines + [
        target_line("two senders / one sender (telenode)", ratio(rows["two"], rows["telenode"]), 1.2),
        target_line("large instance: PSS of the node's tree", pss, 200, " MB", below=True),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=int, default=500, help="CT images (512×512×16 bit)")
    parser.add_argument("--mr", type=int, default=150, help="MR images (256×256×16 bit)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--large-mib", type=int, default=1024, help="pixel data of the large instance (0: skip)")
    parser.add_argument("--work-dir", default=tempfile.gettempdir(), help="where the corpus and every peer's "
                        "data go; must not be tmpfs (default: %(default)s)")
    parser.add_argument("--keep-logs", metavar="DIR", help="copy every run's logs (node, storescp, storescu, "
                        "Orthanc) into DIR")
    parser.add_argument("--quick", action="store_true", help="60 CT + 20 MR, 1 run, 64 MiB large instance")
    args = parser.parse_args(argv)
    if args.quick:
        args.ct, args.mr, args.repeat, args.large_mib = min(args.ct, 60), min(args.mr, 20), 1, min(args.large_mib, 64)
    work = Path(args.work_dir)
    global KEEP_LOGS
    KEEP_LOGS = Path(args.keep_logs).resolve() if args.keep_logs else None
    device, fstype, _ = mount_of(work)
    if fstype in ("tmpfs", "ramfs"):
        raise SystemExit(f"{work} is on {fstype}: pass --work-dir on a real disk (the node fsyncs)")
    peers.dcmtk("storescu"), peers.dcmtk("storescp"), peers.dcmtk("echoscu")
    have_orthanc = peers.orthanc_installed()
    count = args.ct + args.mr

    def interrupted(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    load_at_start = load_text()
    root = Path(tempfile.mkdtemp(prefix="telenode-bench-", dir=work))
    try:
        data = root / "corpus"
        ct = bench_corpus.ct_series(data / "ct", args.ct)
        mr = bench_corpus.mr_series(data / "mr", args.mr)
        files = ct + mr
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        halves = [root / "half0", root / "half1"]  # two senders: alternate files, hard links
        for index, path in enumerate(files):
            target = halves[index % 2] / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
        per_step = steps(ct[:200])  # also fails fast if the corpus would be refused
        auto = os.cpu_count() or 1
        rows = {
            "ceiling": Row("DCMTK storescu → storescp (ceiling)", lambda r: run_ceiling(r, [data], count)),
            "pyscp": Row("storescu → bare pynetdicom SCP", lambda r: run_pyscp(r, [data], count)),
            "telenode": Row(f"storescu → telenode → storescp (auto: {auto})", lambda r: run_telenode(r, [data], count)),
            "two": Row("2 storescu → telenode → storescp", lambda r: run_telenode(r, halves, count)),
            "w1": Row("storescu → telenode (workers = 1) → storescp",
                      lambda r: run_telenode(r, [data], count, workers=1)),
            "received": Row('storescu → telenode (ack = "received") → storescp',
                            lambda r: run_telenode(r, [data], count, ack="received")),
            "orthanc_a": Row("storescu → Orthanc (a) forward → storescp",
                             lambda r: run_orthanc(r, [data], count, anonymize=False),
                             "" if have_orthanc else SKIPPED_ORTHANC),
            "orthanc_b": Row("storescu → Orthanc (b) anonymize+forward",
                             lambda r: run_orthanc(r, [data], count, anonymize=True),
                             "" if have_orthanc else SKIPPED_ORTHANC),
        }
        large_rows: dict[str, Row] = {}
        large_mb, frames = 0.0, 0
        if args.large_mib:
            big, frames = bench_corpus.large_instance(root / "large", args.large_mib)
            large_mb = big.stat().st_size / 1e6
            large_rows = {
                "ceiling": Row("DCMTK storescu → storescp (ceiling)",
                               lambda r: run_ceiling(r, [big.parent], 1, marker=True)),
                "telenode": Row(f"storescu → telenode → storescp (auto: {auto})",
                                lambda r: run_telenode(r, [big.parent], 1, marker=True)),
            }
        for run in range(args.repeat):
            for key, row in rows.items():
                print(f"run {run + 1}/{args.repeat}: {row.label}", file=sys.stderr, flush=True)
                row.run(root / f"{key}-{run}")
            for key, row in large_rows.items():
                print(f"run {run + 1}/{args.repeat}: large: {row.label}", file=sys.stderr, flush=True)
                row.run(root / f"large-{key}-{run}")
        machine = machine_line(root)
    finally:
        peers.cleanup()
        shutil.rmtree(root, ignore_errors=True)

    print(machine)
    print(f"{load_at_start} at the start (2 cores: other work on the machine slows every row)")
    print(f"corpus: {args.ct} CT 512x512x16 bit + {args.mr} MR 256x256x16 bit = {count} instances, "
          f"{megabytes:.0f} MB; {args.repeat} run(s) each; median (min–max)")
    print(f"{'':{WIDTH}} {'seconds':>22} {'images/s':>9} {'MB/s':>8}   peak memory MB: VmHWM, PSS of the tree; "
          f"CPU ms per image (telenode: main = supervisor + forwarder, children = SCP workers and the settler)")
    for row in rows.values():
        print(row.line(count, megabytes))
    print("ratios of throughput (images/s), from the medians:")
    print(ratio_line("  telenode / DCMTK ceiling", rows["telenode"], rows["ceiling"]))
    print(ratio_line("  telenode / pynetdicom SCP", rows["telenode"], rows["pyscp"]))
    print(ratio_line("  telenode / Orthanc (a) forward", rows["telenode"], rows["orthanc_a"]))
    print(ratio_line("  telenode / Orthanc (b) anonymize+forward", rows["telenode"], rows["orthanc_b"]))
    print(ratio_line("  two senders / one sender (telenode)", rows["two"], rows["telenode"]))
    print(ratio_line("  workers auto / workers = 1 (telenode)", rows["telenode"], rows["w1"]))
    print(ratio_line('  ack = "received" / default (telenode)', rows["received"], rows["telenode"]))
    if large_rows:
        print(f"large instance: {large_mb:.0f} MB, {frames} frames 512x512x16 bit, native; "
              f"peak RSS target < 200 MB")
        for row in large_rows.values():
            print(row.line(1, large_mb))
    else:
        print("large instance: skipped (--large-mib 0)")
    for line in targets(rows, large_rows):
        print(line)
    for line in pace_lines(rows, count):
        print(line)
    for line in span_lines(rows, count):
        print(line)
    print(f"in process, per CT header ({len(per_step['parse'])} instances), ms:")
    for name, values in per_step.items():
        print(f"  {name:{WIDTH - 2}} {spread(values):>22}")
    failed = [r for r in [*rows.values(), *large_rows.values()] if r.error]
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; every process started was stopped", file=sys.stderr)
        sys.exit(130)
