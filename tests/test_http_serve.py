"""The gateway's life with `telenode serve`: HTTPS when configured, a taken port is a one-line start error."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys

import httpx
import pytest

from conftest import REPO, Node, wait_for
from http_node import make_http_node  # noqa: F401 (a fixture)

pytestmark = pytest.mark.dcmtk


def self_signed(folder) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = folder / "http.crt", folder / "http.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return str(cert), str(key)


def test_https_when_certificate_and_key_are_set(make_http_node, tmp_path):
    cert, key = self_signed(tmp_path)
    node = make_http_node([("NOWHERE", 1)], extra=f'certificate = "{cert}"\nprivate_key = "{key}"').start()
    answer = httpx.get(f"https://127.0.0.1:{node.http_port}/healthz", verify=ssl.create_default_context(cafile=cert),
                       timeout=10)
    assert answer.status_code == 200 and answer.json() == {"status": "ok"}
    with pytest.raises(httpx.HTTPError):  # no plain HTTP on the TLS port
        httpx.get(f"http://127.0.0.1:{node.http_port}/healthz", timeout=5)
    with node.client() as api:
        assert api.post("/api/batch-prepare", json={}).status_code == 400  # the token works over TLS
    assert node.stop() == 0


def test_http_port_in_use_is_a_one_line_start_error(make_http_node):
    node = make_http_node([("NOWHERE", 1)])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", node.http_port))
        taken.listen()
        result = subprocess.run([sys.executable, "-m", "node", "serve", "--config", str(node.config)],
                                capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(errors) == 1 and f"127.0.0.1:{node.http_port}" in errors[0] and "http" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_token_file_exists_once_the_dicom_port_listens(make_http_node):
    node = make_http_node([("NOWHERE", 1)])
    Node.start(node)  # returns as soon as the DICOM port accepts connections
    assert (node.folder / "var" / "http.token").is_file()
    assert node.stop() == 0


def _workers(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and b"spawn_main" in open(f"/proc/{entry}/cmdline", "rb").read():
                found.append(int(entry))  # a worker, not multiprocessing's resource tracker
    return found


def test_healthz_503_while_a_dead_worker_is_replaced(make_http_node):
    node = make_http_node([("NOWHERE", 1)]).start()
    workers = _workers(node.proc.pid)
    assert workers, "no worker processes"
    os.kill(workers[0], signal.SIGKILL)
    seen = []
    wait_for(lambda: seen.append(httpx.get(f"{node.url}/healthz", timeout=5).status_code) or 503 in seen, 30, 0.02)
    assert 503 in seen, seen
    assert wait_for(lambda: httpx.get(f"{node.url}/healthz", timeout=5).status_code == 200, 60)
