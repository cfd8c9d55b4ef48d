"""Shared fixtures: real DCMTK peers, a telenode process on free loopback ports.

pynetdicom installs console scripts named storescu/storescp/echoscu that shadow
DCMTK's on PATH, so the DCMTK binaries are looked up by their --version banner.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest
from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, _config, evt

REPO = Path(__file__).resolve().parents[1]
# DCMTK peers without Nagle: otherwise every C-STORE waits out a ~40 ms delayed ACK.
PEER_ENV = dict(os.environ, TCP_NODELAY="1")


def dcmtk(tool: str) -> str:
    """Path of DCMTK's `tool` (not pynetdicom's namesake); skips the test if DCMTK is missing
    (fails it instead when TELENODE_REQUIRE_DCMTK=1, as in CI, which installs DCMTK)."""
    candidates = [f"/usr/bin/{tool}"] + [str(Path(d) / tool) for d in os.environ.get("PATH", "").split(os.pathsep)]
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            banner = subprocess.run([candidate, "--version"], capture_output=True, text=True).stdout
            if "dcmtk" in banner.lower():
                return candidate
    missing = f"DCMTK {tool} not found: apt-get install dcmtk"
    if os.environ.get("TELENODE_REQUIRE_DCMTK") == "1":
        pytest.fail(missing)
    pytest.skip(missing)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def listening(port: int) -> bool:
    """True once something accepts TCP connections on the loopback port."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def echo(port: int, calling: str = "ECHOSCU", called: str = "TELENODE") -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk("echoscu"), "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=PEER_ENV, timeout=30)


def storescu(port: int, files: list[Path], calling: str = "MODALITY", called: str = "TELENODE",
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk("storescu"), "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, env=PEER_ENV, timeout=120)


class StoreSCP:
    """DCMTK storescp as the remote teleradiology PACS, writing each instance under its SOP UID."""

    def __init__(self, folder: Path, port: int, ae_title: str = "TELERAD") -> None:
        self.folder, self.port, self.ae_title = folder, port, ae_title
        self.proc: subprocess.Popen | None = None

    def start(self) -> "StoreSCP":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "-aet", self.ae_title, "-od", str(self.folder), "-uf", "+xa", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=PEER_ENV)
        assert wait_for(lambda: echo(self.port, called=self.ae_title).returncode == 0, 15), "storescp did not start"
        return self

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class Node:
    """A `telenode serve` subprocess with its own config, data folder and ports."""

    def __init__(self, folder: Path, destinations: list[tuple[str, int]], allowed: list[str] | None = None,
                 options: list[str] | None = None) -> None:
        self.folder = folder
        self.port = free_port()
        self.config = folder / "telenode.toml"
        self.log = folder / "node.log"
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)
        lines = [
            "[node]", 'ae_title = "TELENODE"', 'host = "127.0.0.1"', f"port = {self.port}", 'data_dir = "var"',
            f"allowed_calling_aets = {allowed or []!r}".replace("'", '"'), 'log_format = "json"', "",
            "[anonymization]", f"profile_options = {options or []!r}".replace("'", '"'), 'organization = "TESTORG"',
            'key_file = "var/pseudonym.key"', "",
        ]
        for index, (ae_title, port) in enumerate(destinations):
            lines += ["[[destinations]]", f'name = "remote{index}"', f'ae_title = "{ae_title}"',
                      'host = "127.0.0.1"', f"port = {port}", "retry_delay = 0.3", "max_retry_delay = 1.0", ""]
        self.config.write_text("\n".join(lines))

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "node", *args[:1], "--config", str(self.config), *args[1:]],
                                capture_output=True, text=True, cwd=REPO, timeout=120)
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def start(self) -> "Node":
        handle = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "node", "serve", "--config", str(self.config)],
                                     stdout=handle, stderr=handle, cwd=REPO)
        up = wait_for(lambda: self.proc.poll() is not None or listening(self.port), 30)
        assert up and self.proc.poll() is None, f"telenode did not start:\n{self.log.read_text()}"
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(60)
        return self.proc.returncode if self.proc else 0


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def factory(destinations: list[tuple[str, int]], **kwargs) -> Node:
        node = Node(tmp_path / f"node{len(nodes)}", destinations, **kwargs)
        nodes.append(node)
        return node

    yield factory
    for node in nodes:
        node.kill()


def stopped_after(make: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """A fixture body: a factory around `make` whose products are all stopped after the test."""
    made: list[Any] = []

    def factory(*args: Any, **kwargs: Any) -> Any:
        made.append(make(*args, **kwargs))
        return made[-1]

    yield factory
    for thing in made:
        thing.stop()


@pytest.fixture
def make_storescp(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    count = itertools.count()
    yield from stopped_after(lambda port=None, name="remote": StoreSCP(tmp_path / f"{name}{next(count)}",
                                                                       port or free_port()))


@dataclass(frozen=True)
class Arrival:
    """One C-STORE a StorageSCP received."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    priority: int
    status: int
    pixel_data: bytes | None


class StorageSCP:
    """The shared in-process pynetdicom Storage SCP playing the remote: records every C-STORE in order.

    `respond(uid, times seen before)` chooses each status (0x0000 by default; a Dataset for a status
    with a comment; None aborts the association). With `unrestricted`, pynetdicom's unrestricted
    storage service accepts any SOP class (the `unrestricted` fixture switches it on); otherwise every
    standard storage SOP class, or only `contexts` when given, in any transfer syntax.
    """

    def __init__(self, port: int | None = None, ae_title: str = "TELERAD",
                 respond: Callable[[str, int], Any] | None = None, contexts: Sequence[str] = (),
                 unrestricted: bool = False, require_called_aet: bool = False) -> None:
        self.port = port or free_port()
        self.ae_title = ae_title
        self.respond = respond or (lambda uid, seen: 0x0000)
        self.contexts, self.unrestricted, self.require_called_aet = contexts, unrestricted, require_called_aet
        self.arrivals: list[Arrival] = []
        self.lock = threading.RLock()  # tests may hold it while reading `received`
        self.server: Any = None

    def _on_store(self, event: Any) -> Any:
        uid = str(event.request.AffectedSOPInstanceUID)
        ds = event.dataset  # decoded: the file's data set must arrive intact
        assert ds.SOPInstanceUID == uid
        with self.lock:
            seen = sum(1 for a in self.arrivals if a.sop_instance_uid == uid)
        answer = self.respond(uid, seen)
        if answer is None:  # abort the association instead of answering
            event.assoc.abort()
            return 0xA700
        status = int(answer.Status if isinstance(answer, Dataset) else answer)
        with self.lock:
            self.arrivals.append(Arrival(uid, str(event.context.abstract_syntax), str(event.context.transfer_syntax),
                                         int(event.request.Priority), status, ds.get("PixelData")))
        return answer

    def start(self) -> "StorageSCP":
        ae = AE(ae_title=self.ae_title)
        if self.contexts:
            for sop_class in self.contexts:
                ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        elif not self.unrestricted:
            for context in AllStoragePresentationContexts:
                ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.require_called_aet = self.require_called_aet
        ae.network_timeout = 10
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def uids(self, status: int | None = 0x0000) -> list[str]:
        """SOP Instance UIDs received (answered `status`; None: all), in order, duplicates included."""
        with self.lock:
            return [a.sop_instance_uid for a in self.arrivals if status is None or a.status == status]

    @property
    def received(self) -> list[tuple[str, int, int]]:
        """(SOP Instance UID, DIMSE priority, status answered) of every C-STORE, in order."""
        with self.lock:
            return [(a.sop_instance_uid, a.priority, a.status) for a in self.arrivals]

    def times(self, uid: str) -> int:
        """How many C-STOREs of this instance arrived (answered or not)."""
        with self.lock:
            return sum(1 for a in self.arrivals if a.sop_instance_uid == uid)


@pytest.fixture
def make_scp() -> Iterator[Callable[..., StorageSCP]]:
    """StorageSCP factory; every SCP it made is stopped after the test."""
    yield from stopped_after(StorageSCP)


@pytest.fixture
def unrestricted() -> Iterator[None]:
    """pynetdicom's unrestricted storage service for StorageSCP(unrestricted=True): any SOP class."""
    previous = _config.UNRESTRICTED_STORAGE_SERVICE
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    yield
    _config.UNRESTRICTED_STORAGE_SERVICE = previous


#: Fixtures that start real processes or servers: a test using one is `slow` (out of `-m "not slow"`).
SLOW_FIXTURES = {"make_node", "make_storescp", "make_scp", "peers", "harness", "tls_storescp", "pki"}
#: Modules whose tests drive peers or processes without those fixtures.
SLOW_MODULES = {"test_e2e", "test_e2e_options", "test_e2e_syntaxes", "test_large", "test_serve", "test_tls",
                "test_faults", "test_forward", "test_operations", "test_cli", "test_security"}
#: Tests elsewhere that run `python -m node` (a second or more each).
SLOW_NAMES = ("test_serve_exits_",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark slow tests, so that `pytest -m "not slow"` is the inner loop (under a minute)."""
    for item in items:
        module = item.module.__name__ if isinstance(item, pytest.Function) else ""
        if (module in SLOW_MODULES or item.name.startswith(SLOW_NAMES)
                or SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.slow)
