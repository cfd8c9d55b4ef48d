"""The benchmark's processes: DCMTK peers, the bare pynetdicom SCP, telenode, Orthanc.

Every process is started in its own session (process group) and registered, so that
`cleanup()` — called from a `finally` — ends it and whatever it started, also after Ctrl-C or an
exception. Each listener gets its own free loopback port and is waited for by polling the port.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, TCP_NODELAY="1")  # DCMTK: no Nagle, or each C-STORE waits out a delayed ACK
ORTHANC = "/usr/sbin/Orthanc"
REMOTE_AET = "TELERAD"

_started: list[subprocess.Popen] = []


class BenchError(Exception):
    """A run failed (a peer died, nothing arrives); the message says where to look."""


def dcmtk(tool: str) -> str:
    """DCMTK's `tool`, not pynetdicom's namesake console script."""
    for candidate in (f"/usr/bin/{tool}", shutil.which(tool) or ""):
        if candidate and os.access(candidate, os.X_OK):
            banner = subprocess.run([candidate, "--version"], capture_output=True, text=True).stdout
            if "dcmtk" in banner.lower():
                return candidate
    raise SystemExit(f"DCMTK {tool} not found: apt-get install dcmtk")


def orthanc_installed() -> bool:
    return os.access(ORTHANC, os.X_OK)


def spawn(args: Sequence[str], log: Path | None = None, **kwargs) -> subprocess.Popen:
    """Start a process in a new session (its own process group), registered for cleanup."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)
    finally:
        if log:
            out.close()
    _started.append(proc)
    return proc


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 60.0) -> None:
    """Signal the process, wait up to `grace`, then kill what is left of its process group."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children left in the group (workers, helpers)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass
    if proc in _started:
        _started.remove(proc)


def cleanup() -> None:
    """End every process this benchmark started, and their process groups."""
    for proc in list(_started):
        stop(proc, signal.SIGTERM, grace=5.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def echo(port: int, called: str) -> bool:
    return subprocess.run([dcmtk("echoscu"), "-aec", called, "127.0.0.1", str(port)], env=ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30).returncode == 0


def wait_ready(proc: subprocess.Popen, ports: Sequence[int], called: str | None, what: str, log: Path | None,
               timeout: float = 60.0) -> None:
    """Poll until every port accepts connections (and answers C-ECHO to `called`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} during start{_tail(log)}")
        if all(listening(p) for p in ports) and (called is None or echo(ports[0], called)):
            return
        time.sleep(0.05)
    raise BenchError(f"{what} did not start within {timeout:.0f} s{_tail(log)}")


def _tail(log: Path | None, lines: int = 15) -> str:
    if not log or not log.exists():
        return ""
    return "\n--- " + str(log) + "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# --- memory: VmHWM over a process tree -------------------------------------------------------------

def children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            return _children_by_scan(pid)
    return found


def _children_by_scan(pid: int) -> list[int]:
    """Fallback without CONFIG_PROC_CHILDREN: the PPid field of every process."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def tree(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += children(pid)
    return pids


def vm_hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kb(pid: int) -> int:
    """Proportional set size: shared pages (libraries, …) divided among the processes sharing them,
    so that a sum over processes counts each page once."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far (/proc/PID/stat, fields 14 and 15)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Peak(NamedTuple):
    """A process tree's memory peaks and CPU use over one run."""

    max_mb: float  # max VmHWM of one process
    sum_mb: float  # sum of VmHWM over the tree
    processes: int
    pss_mb: float  # peak PSS sum over the tree
    cpu_main: float  # CPU seconds of the root process (telenode: supervisor and forwarders)
    cpu_children: float  # CPU seconds of every other process of the tree (telenode: SCP workers)


class TreePeak:
    """Peak RSS (VmHWM) of every process under `root`, sampled every `interval` s in a thread
    (processes that exit early are counted too) and once more by `finish()` before the stop;
    also the largest PSS sum over the tree seen by a sample (the tree's memory, shared pages once)."""

    def __init__(self, root: int, interval: float = 0.25) -> None:
        self.root, self.interval = root, interval
        self.peaks: dict[int, int] = {}
        self.cpu: dict[int, float] = {}  # last CPU seconds seen per process
        self.pss_peak = 0
        self.cpu_start = {pid: cpu_seconds(pid) for pid in tree(root)}  # start-up is not the run's cost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        pss = 0
        for pid in tree(self.root):
            hwm = vm_hwm_kb(pid)
            if hwm > self.peaks.get(pid, 0):
                self.peaks[pid] = hwm
            pss += pss_kb(pid)
            self.cpu[pid] = max(self.cpu.get(pid, 0.0), cpu_seconds(pid))
        self.pss_peak = max(self.pss_peak, pss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def finish(self) -> Peak:
        """Memory peaks and CPU seconds of the tree, from the start until now."""
        self._stop.set()
        self._thread.join()
        self.sample()
        values = list(self.peaks.values()) or [0]
        main = self.cpu.get(self.root, 0.0) - self.cpu_start.get(self.root, 0.0)
        rest = sum(v - self.cpu_start.get(pid, 0.0) for pid, v in self.cpu.items() if pid != self.root)
        return Peak(max(values) / 1024, sum(values) / 1024, len(self.peaks), self.pss_peak / 1024, main, rest)


# --- the remote: DCMTK storescp ------------------------------------------------------------------

class Remote:
    """DCMTK storescp standing in for the remote PACS, writing each instance under its SOP UID.

    Arrivals are counted with os.scandir (cheap: one directory read per poll). storescp writes a
    file once the data set is complete, so a file = an arrival; with `marker`, storescp instead
    writes as it receives (+B, no copy in memory: the large instance) and touches a marker file
    after each instance is complete (--exec-on-reception: one fork per instance, fine for one)."""

    def __init__(self, folder: Path, marker: bool = False) -> None:
        self.folder, self.port = folder, free_port()
        self.done = folder.parent / (folder.name + ".done")
        folder.mkdir(parents=True)
        args = [dcmtk("storescp"), "-aet", REMOTE_AET, "-od", str(folder), "-uf"]
        if marker:
            args += ["+B", "-xcr", f"touch {self.done}"]
        self.log = folder.parent / (folder.name + ".storescp.log")
        self.proc = spawn(args + [str(self.port)], log=self.log, env=ENV)
        wait_ready(self.proc, [self.port], REMOTE_AET, "storescp", self.log)
        self.marker = marker

    def count(self) -> int:
        if self.marker:
            return int(self.done.exists())
        with os.scandir(self.folder) as entries:
            return sum(1 for _ in entries)

    def stop(self) -> None:
        stop(self.proc, grace=10)


# --- senders and the timed transfer --------------------------------------------------------------

def send(port: int, called: str, folders: Sequence[Path], arrived: Callable[[], int], expected: int,
         watch: Sequence[subprocess.Popen], logs: Path, stall: float = 120.0) -> float:
    """Start one storescu per folder at once; seconds until `arrived()` reaches `expected`.

    Fails if a watched process (the peers) dies, or nothing more arrives for `stall` seconds after
    every sender has finished."""
    started = time.perf_counter()
    senders = [spawn([dcmtk("storescu"), "-aet", f"SENDER{i}", "-aec", called, "+sd", "+r",
                      "127.0.0.1", str(port), str(folder)], log=logs / f"storescu{i}.log", env=ENV)
               for i, folder in enumerate(folders)]
    last, changed = -1, time.monotonic()
    try:
        while True:
            count = arrived()
            if count >= expected:
                elapsed = time.perf_counter() - started
                break
            now = time.monotonic()
            if count != last:
                last, changed = count, now
            for proc in watch:
                if proc.poll() is not None:
                    raise BenchError(f"{proc.args[0]} exited ({proc.returncode}) after {count}/{expected} arrived")
            if all(s.poll() is not None for s in senders) and now - changed > stall:
                codes = [s.returncode for s in senders]
                raise BenchError(f"{count}/{expected} arrived, nothing more for {stall:.0f} s; storescu exit "
                                 f"{codes}; see {logs}")
            time.sleep(0.02)
        for proc in senders:
            proc.wait(60)
    finally:
        for proc in senders:
            stop(proc, grace=5)
    return elapsed


# --- the peers under test --------------------------------------------------------------------------

class PyScp:
    """scripts/bench_pyscp.py: a bare pynetdicom Storage SCP writing what it receives."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        folder.mkdir(parents=True)
        self.log = folder.parent / "pyscp.log"
        self.proc = spawn([sys.executable, str(REPO / "scripts" / "bench_pyscp.py"), str(self.port), str(folder)],
                          log=self.log)
        wait_ready(self.proc, [self.port], "PYSCP", "bare pynetdicom SCP", self.log)
        self.peak = TreePeak(self.proc.pid)

    def count(self) -> int:
        with os.scandir(self.folder) as entries:
            return sum(1 for _ in entries)

    def stop(self) -> Peak:
        peak = self.peak.finish()
        stop(self.proc, grace=10)
        return peak


class Telenode:
    """`python -m node serve` with its own config and data dir (default workers and ack unless given)."""

    def __init__(self, run: Path, remote_port: int, workers: int | None = None, ack: str = "") -> None:
        self.port = free_port()
        run.mkdir(parents=True, exist_ok=True)
        config = run / "telenode.toml"
        config.write_text("\n".join([
            "[node]", 'ae_title = "TELENODE"', 'host = "127.0.0.1"', f"port = {self.port}", 'data_dir = "var"',
            'log_format = "json"', *([f"workers = {workers}"] if workers else []),
            *([f'ack = "{ack}"'] if ack else []), "",
            "[anonymization]", 'key_file = "var/pseudonym.key"', "",
            "[[destinations]]", 'name = "remote"', f'ae_title = "{REMOTE_AET}"', 'host = "127.0.0.1"',
            f"port = {remote_port}", ""]))
        self.log = run / "node.log"
        self.proc = spawn([sys.executable, "-m", "node", "serve", "--config", str(config)], log=self.log, cwd=REPO)
        wait_ready(self.proc, [self.port], "TELENODE", "telenode", self.log)
        self.peak = TreePeak(self.proc.pid)

    def stop(self) -> Peak:
        """Read the peak RSS of the tree (before stopping), then SIGTERM and wait."""
        peak = self.peak.finish()
        stop(self.proc, grace=60)
        return peak


ORTHANC_FORWARD = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  SendToModality(instanceId, 'remote')
end
"""

# Orthanc anonymizes one instance at a time with fresh random UIDs; to keep a study one study
# (as telenode does) the Lua state maps each original study/series/patient to one pseudonym.
ORTHANC_ANONYMIZE = """
local pseudonyms = {}
local counter = 0
local function pseudonym(kind, value)
  local key = kind .. '|' .. (value or '')
  if pseudonyms[key] == nil then
    counter = counter + 1
    if kind == 'uid' then
      pseudonyms[key] = '2.25.' .. tostring(987654321000 + counter)
    else
      pseudonyms[key] = 'ANON' .. tostring(counter)
    end
  end
  return pseudonyms[key]
end

function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin ~= nil and origin['RequestOrigin'] == 'Lua' then
    return  -- the anonymized copy stored below
  end
  local replace = {
    PatientID = pseudonym('patient', tags['PatientID']),
    PatientName = pseudonym('patient', tags['PatientID']),
    StudyInstanceUID = pseudonym('uid', tags['StudyInstanceUID']),
    SeriesInstanceUID = pseudonym('uid', tags['SeriesInstanceUID']),
  }
  local command = { Force = true, Replace = replace }
  local anonymized = RestApiPost('/instances/' .. instanceId .. '/anonymize', DumpJson(command, true))
  local stored = ParseJson(RestApiPost('/instances/', anonymized))
  SendToModality(stored['ID'], 'remote')
end
"""


def orthanc_version() -> str:
    if not orthanc_installed():
        return "not installed"
    out = subprocess.run([ORTHANC, "--version"], capture_output=True, text=True).stdout.split()
    return out[1] if len(out) > 1 else "?"


class Orthanc:
    """Orthanc from its binary with its own JSON config and Lua auto-forwarding script."""

    def __init__(self, run: Path, remote_port: int, anonymize: bool) -> None:
        run.mkdir(parents=True, exist_ok=True)
        self.port, self.http = free_port(), free_port()
        script = run / "forward.lua"
        script.write_text(ORTHANC_ANONYMIZE if anonymize else ORTHANC_FORWARD)
        config = {
            "Name": "telenode-bench",
            "StorageDirectory": str(run / "storage"),
            "IndexDirectory": str(run / "index"),
            "DicomAet": "ORTHANC",
            "DicomPort": self.port,
            "HttpPort": self.http,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {"remote": [REMOTE_AET, "127.0.0.1", remote_port]},
            "LuaScripts": [str(script)],
            "Plugins": [],
            "StorageCompression": False,
        }
        path = run / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        self.log = run / "orthanc.log"
        self.proc = spawn([ORTHANC, str(path)], log=self.log, cwd=run, env=ENV)
        wait_ready(self.proc, [self.port, self.http], "ORTHANC", "Orthanc", self.log)
        self.peak = TreePeak(self.proc.pid)

    def stop(self) -> Peak:
        peak = self.peak.finish()
        stop(self.proc, grace=30)
        return peak
