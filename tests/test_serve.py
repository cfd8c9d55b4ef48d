"""Serving with worker processes (node/serve.py), driven with real DCMTK peers: associations are
spread over the workers, every instance arrives once, a dead worker is replaced, a killed
supervisor takes its workers with it, and a taken port is an error rather than a shared one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import spawn
from pathlib import Path

from node import serve
from conftest import REPO, echo, free_port, storescu, wait_for
from studies import make_study


def _workers(node, count: int):
    text = node.config.read_text().replace("[node]\n", f"[node]\nworkers = {count}\n", 1)
    node.config.write_text(text)
    return node


def _children(pid: int) -> list[int]:
    """PIDs of the worker processes whose parent is `pid` (from /proc; not multiprocessing's
    resource tracker, which is a child too)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
                found.append(int(entry.name))
    return found


def _pids_with_parent(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def _log_lines(node) -> list[dict]:
    lines = []
    for raw in node.log.read_text().splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    return lines


def _ready(node, workers: int) -> bool:
    return any(line.get("event") == "node_started" for line in _log_lines(node))


def test_two_workers_share_the_port_and_every_instance_arrives_once(tmp_path, make_node, make_storescp):
    remote = make_storescp().start()
    node = _workers(make_node([(remote.ae_title, remote.port)]), 2).start()
    assert wait_for(lambda: _ready(node, 2), 60)
    assert len(_children(node.proc.pid)) >= 2
    studies = [make_study(tmp_path / f"study{i}", 3, 1, {"PatientID": f"P{i}"}).files for i in range(16)]
    with ThreadPoolExecutor(4) as pool:  # 16 associations, 4 at a time
        results = list(pool.map(lambda files: storescu(node.port, files), studies))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results if r.returncode]
    assert wait_for(lambda: len(remote.files()) == 48, 60), len(remote.files())
    stored = [line for line in _log_lines(node) if line.get("event") == "instance_stored"]
    assert len(stored) == 48
    # Both workers take associations: all 16 on one would mean one never accepted.
    assert {line.get("process") for line in stored} == {"worker-0", "worker-1"}
    assert node.stop() == 0


def _listening_inodes(pid: int, port: int) -> set[str]:
    """The socket inodes `pid` holds that listen on `port` (from /proc/net/tcp and /proc/<pid>/fd)."""
    listening = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:  # 0A: LISTEN
            listening.add(fields[9])
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in listening:
            held.add(target[8:-1])
    return held


def test_workers_accept_on_one_listening_socket_so_two_senders_get_two_workers(make_node):
    """With a socket per worker (SO_REUSEPORT) the kernel hashed each connection to a worker, busy
    or not: two modalities at once shared one worker (one interpreter) half the time, the other
    worker idle (bench: 3 runs of 4). Workers now accept on the one socket the supervisor opened,
    and a worker still busy with the last connection leaves the next to the other."""
    node = _workers(make_node([("TELERAD", free_port())]), 2).start()
    assert wait_for(lambda: _ready(node, 2), 60)
    workers = _children(node.proc.pid)
    assert len(workers) == 2
    [shared] = _listening_inodes(node.proc.pid, node.port)
    assert all(_listening_inodes(pid, node.port) == {shared} for pid in workers)

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    def hold() -> None:
        ae = AE(ae_title="PAIR")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="TELENODE")
        time.sleep(0.15)
        assoc.release()

    for _ in range(40):  # pairs of associations at once
        pair = [threading.Thread(target=hold) for _ in range(2)]
        for thread in pair:
            thread.start()
        for thread in pair:
            thread.join()
    accepted = [line["process"] for line in _log_lines(node)
                if line.get("event") == "association_accepted" and line.get("calling_aet") == "PAIR"]
    assert len(accepted) == 80
    together = sum(first == second for first, second in zip(accepted[::2], accepted[1::2]))
    # Hashed, about 20 of 40 pairs share a worker (15 or fewer in 8 % of runs); measured here: 2 in 20.
    assert together <= 15, f"{together} of 40 pairs of associations were served by one worker"
    assert node.stop() == 0


def test_a_dead_worker_is_replaced_and_the_node_keeps_serving(tmp_path, make_node, make_storescp):
    remote = make_storescp().start()
    node = _workers(make_node([(remote.ae_title, remote.port)]), 1).start()
    assert wait_for(lambda: _ready(node, 1), 60)
    [worker] = _children(node.proc.pid)
    os.kill(worker, signal.SIGKILL)
    assert wait_for(lambda: any(line.get("event") == "worker_died" for line in _log_lines(node)), 20)
    assert wait_for(lambda: echo(node.port).returncode == 0, 60)
    files = make_study(tmp_path / "study", 2, 1).files
    assert storescu(node.port, files).returncode == 0
    assert wait_for(lambda: len(remote.files()) == 2, 30)
    assert node.stop() == 0


def _bindable(port: int) -> bool:
    """Bind as a restarted node does (SO_REUSEADDR, like `serve`'s port probe): the readiness
    C-ECHOs leave server-side TIME_WAIT entries, which are not a held port, but a plain bind
    refuses them. A process still listening makes this fail whatever the option."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_killing_the_supervisor_takes_its_workers_along(make_node):
    node = _workers(make_node([("TELERAD", free_port())]), 2).start()
    assert wait_for(lambda: _ready(node, 2), 60)
    workers = _children(node.proc.pid)
    assert len(workers) >= 2
    node.kill()
    assert wait_for(lambda: not any(_alive(pid) for pid in workers), 10), "orphaned worker processes"
    # A killed multi-threaded worker shows as a zombie as soon as its main thread is gone, but its
    # sockets close only when the last thread has exited: on a loaded machine that lags (CI saw it).
    # A worker that keeps listening still fails this after the wait.
    assert wait_for(lambda: _bindable(node.port), 10), "the port is still held: a restarted node could not listen"


def test_sigterm_stops_workers_and_exits_zero(make_node):
    node = _workers(make_node([("TELERAD", free_port())]), 2).start()
    assert wait_for(lambda: _ready(node, 2), 60)
    workers = _children(node.proc.pid)
    assert node.stop() == 0
    assert not any(_alive(pid) for pid in workers)
    assert any(line.get("event") == "node_stopped" for line in _log_lines(node))



def test_sigterm_in_quick_succession_still_stops_the_node(make_node):
    """`timeout`, systemd and an operator's pkill may each send SIGTERM: a second signal arriving while
    the first handler was inside Event.set() hung the supervisor for good (seen by hand)."""
    node = _workers(make_node([("TELERAD", free_port())]), 2).start()
    assert wait_for(lambda: _ready(node, 2), 60)
    workers = _children(node.proc.pid)
    until = time.monotonic() + 0.5  # a stream of signals: some land while a handler is running
    while time.monotonic() < until and node.proc.poll() is None:
        os.kill(node.proc.pid, signal.SIGTERM)
    assert node.proc.wait(60) == 0
    assert not any(_alive(pid) for pid in workers)
    assert any(line.get("event") == "node_stopped" for line in _log_lines(node))


def test_a_stop_request_from_a_signal_handler_takes_no_lock():
    """A handler interrupts the main thread anywhere, also inside Event.set() or wait() with the Event's
    lock held: the request must not take that lock (threading.Event.set() would wait for it forever)."""
    stop = serve.SignalStop()
    done = threading.Event()

    def interrupted_inside_the_event() -> None:
        with stop._cond:  # the lock Event.set() and Event.wait() hold
            stop.request()
        done.set()

    threading.Thread(target=interrupted_inside_the_event, daemon=True).start()
    assert done.wait(5), "the request waited for the Event's lock"
    assert stop.is_set()


def test_a_stop_request_wakes_a_waiting_thread():
    stop = serve.SignalStop()
    woke = threading.Event()
    threading.Thread(target=lambda: stop.wait() and woke.set(), daemon=True).start()
    assert not stop.wait(0.3)  # nothing requested: waits out its timeout
    stop.request()
    assert woke.wait(2)


def test_a_taken_port_is_an_error_not_a_shared_port(make_node):
    first = make_node([("TELERAD", free_port())]).start()
    second = make_node([("TELERAD", free_port())])
    text = second.config.read_text().replace(f"port = {second.port}\n", f"port = {first.port}\n", 1)
    second.config.write_text(text)
    result = subprocess.run([sys.executable, "-m", "node", "serve", "--config", str(second.config)],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{first.port}" in result.stderr
    assert echo(first.port).returncode == 0
    time.sleep(0.1)
    assert first.stop() == 0


def test_a_worker_that_cannot_start_stops_the_node_with_its_reason(make_node):
    """A certificate file that is not a certificate passes config validation (it is readable) but
    fails in the worker: the node exits 1 naming the problem, and leaves no process behind."""
    node = _workers(make_node([("TELERAD", free_port())]), 2)
    (node.folder / "node.pem").write_text("not a certificate")
    (node.folder / "node.key").write_text("not a key")
    text = node.config.read_text().replace("[anonymization]", f"[node.tls]\nport = {free_port()}\n"
                                           'certificate = "node.pem"\nprivate_key = "node.key"\n'
                                           "require_client_cert = false\n\n[anonymization]", 1)
    node.config.write_text(text)
    result = subprocess.run([sys.executable, "-m", "node", "serve", "--config", str(node.config)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "worker" in result.stderr and "certificate" in result.stderr.lower(), result.stderr
    assert _bindable(node.port), "the port is still held"


def test_the_node_runs_as_pid_1_as_in_a_container(make_node, make_storescp, tmp_path):
    """`telenode serve` as a container's entry point is PID 1: its workers must still start and serve
    (a worker that took "my parent is PID 1" for "my supervisor died" would exit at once)."""
    probe = subprocess.run(["unshare", "-fp", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        import pytest

        pytest.skip("no PID namespaces here (unshare -fp)")
    remote = make_storescp().start()
    node = _workers(make_node([(remote.ae_title, remote.port)]), 2)
    handle = open(node.log, "ab")
    node.proc = subprocess.Popen(["unshare", "-fp", "--mount-proc", sys.executable, "-m", "node", "serve",
                                  "--config", str(node.config)], stdout=handle, stderr=handle, cwd=REPO)
    assert wait_for(lambda: _ready(node, 2), 60), node.log.read_text()
    files = make_study(tmp_path / "study", 2, 1).files
    assert storescu(node.port, files).returncode == 0
    assert wait_for(lambda: len(remote.files()) == 2, 30)
    [supervisor] = _pids_with_parent(node.proc.pid)  # unshare forwards no signal: tell PID 1 itself
    os.kill(supervisor, signal.SIGTERM)
    assert node.proc.wait(60) == 0  # unshare -f exits with its child's status


def test_each_worker_receives_into_its_own_folder_emptied_when_it_starts(make_node):
    """A worker killed mid-transfer leaves a half-received original (PHI) in its incoming folder;
    the worker that replaces it starts by removing it."""
    node = _workers(make_node([("TELERAD", free_port())]), 1)
    folder = node.folder / "var" / "incoming" / "worker-0"
    folder.mkdir(parents=True)
    (folder / "tmpkilled.dcm").write_bytes(b"half an original")
    node.start()
    assert wait_for(lambda: _ready(node, 1), 60)
    assert list(folder.iterdir()) == []
    [worker] = _children(node.proc.pid)
    (folder / "tmpkilled2.dcm").write_bytes(b"half an original")
    os.kill(worker, signal.SIGKILL)
    assert wait_for(lambda: len(_children(node.proc.pid)) == 1 and worker not in _children(node.proc.pid), 30)
    assert wait_for(lambda: list(folder.iterdir()) == [], 30)
    assert node.stop() == 0



_IMPORTS_OF_A_WORKER = ("import sys, node, pydicom.pixels, pydicom.data.download as download; "
                        "print(sys.modules.get('requests', 'absent') is None, download.HAVE_REQUESTS)")


def test_a_worker_process_leaves_requests_unloaded():
    """serve spawns its workers with multiprocessing's marker on the command line: there pydicom must not
    load `requests` (~6 MB a worker, issue 15's memory target) and must know that it did not; any other
    process (the supervisor sends over DICOMweb) keeps it."""
    assert "--multiprocessing-fork" in spawn.get_command_line()  # how a spawned worker starts
    worker = subprocess.run([sys.executable, "-c", _IMPORTS_OF_A_WORKER, "--multiprocessing-fork"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    other = subprocess.run([sys.executable, "-c", _IMPORTS_OF_A_WORKER], capture_output=True, text=True,
                           cwd=REPO, timeout=60)
    assert worker.stdout.split() == ["True", "False"], worker.stderr
    assert other.stdout.split() == ["False", "True"], other.stderr
