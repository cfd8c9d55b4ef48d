"""Shared fixtures: real DCMTK peers, a telenode process on free loopback ports.

pynetdicom installs console scripts named storescu/storescp/echoscu that shadow
DCMTK's on PATH, so the DCMTK binaries are looked up by their --version banner.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
# DCMTK peers without Nagle: otherwise every C-STORE waits out a ~40 ms delayed ACK.
PEER_ENV = dict(os.environ, TCP_NODELAY="1")


def dcmtk(tool: str) -> str:
    """Path of DCMTK's `tool` (not pynetdicom's namesake); fails the test if DCMTK is missing."""
    candidates = [f"/usr/bin/{tool}"] + [str(Path(d) / tool) for d in os.environ.get("PATH", "").split(os.pathsep)]
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            banner = subprocess.run([candidate, "--version"], capture_output=True, text=True).stdout
            if "dcmtk" in banner.lower():
                return candidate
    pytest.fail(f"DCMTK {tool} not found: apt-get install dcmtk")


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


@pytest.fixture
def make_storescp(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    peers: list[StoreSCP] = []

    def factory(port: int | None = None, name: str = "remote") -> StoreSCP:
        peer = StoreSCP(tmp_path / f"{name}{len(peers)}", port or free_port())
        peers.append(peer)
        return peer

    yield factory
    for peer in peers:
        peer.stop()


@pytest.fixture(scope="session", autouse=True)
def _dcmtk_present() -> None:
    if shutil.which("dcmdump") is None and not os.path.exists("/usr/bin/dcmdump"):
        pytest.fail("DCMTK is not installed: apt-get install dcmtk")
