"""`telenode anonymize`: a progress bar with rate and ETA on a terminal, one JSON line when piped."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

from conftest import REPO, Node
from studies import make_study


def run_on_a_terminal(args: list[str]) -> str:
    """Run with stdout and stderr on a pseudo-terminal; return everything it wrote."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(args, stdout=follower, stderr=follower, cwd=REPO, env=dict(os.environ, COLUMNS="120"))
    os.close(follower)
    output = bytearray()
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output.extend(chunk)
    proc.wait(120)
    os.close(leader)
    return output.decode("utf-8", "replace")


def test_progress_bar_on_a_terminal_json_line_when_piped(tmp_path):
    node = Node(tmp_path / "node", [("NOWHERE", 1)])
    study = make_study(tmp_path / "in", instances=5, series=1)
    args = [sys.executable, "-m", "node", "anonymize", "--config", str(node.config), str(study.files[0].parent)]
    shown = run_on_a_terminal(args + ["--output", str(tmp_path / "out-tty")])
    assert "anonymizing" in shown and "5/5" in shown and "files/s" in shown, shown[-2000:]
    assert '{"anonymized": 5, "failed": 0}' in shown
    piped = subprocess.run(args + ["--output", str(tmp_path / "out-pipe")], capture_output=True, text=True,
                           cwd=REPO, timeout=120)
    assert piped.returncode == 0
    assert json.loads(piped.stdout.strip().splitlines()[-1]) == {"anonymized": 5, "failed": 0}
    assert "files/s" not in piped.stderr and "\x1b[" not in piped.stderr
