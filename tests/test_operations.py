"""Running it like a production service: one node per data_dir, one-line start-up errors, read
commands that never create a data_dir, backup of a running node, retention of the sent queue."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PEER_ENV, REPO, Node, dcmtk, free_port, listening, storescu, wait_for
from node import config
from node.retention import Retention
from node.store import Store
from studies import make_study

NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]


def one_worker(node: Node, extra: str = "") -> Node:
    """One SCP worker (the default, one per core, only slows these tests down) and extra config."""
    text = node.config.read_text().replace('log_format = "json"', 'log_format = "json"\nworkers = 1', 1)
    node.config.write_text(text + extra)
    return node


def run(node: Node, *args: str, prefix: tuple[str, ...] = (), timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "node", *args[:1], "--config", str(node.config),
                           *args[1:]], capture_output=True, text=True, cwd=REPO, timeout=timeout)


def one_line(result: subprocess.CompletedProcess) -> str:
    """The command failed with exactly one line on stderr and no traceback."""
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


# -- one node per data_dir ------------------------------------------------------------------------


def test_a_second_serve_on_the_same_data_dir_exits_2_naming_it_and_the_holder(make_node):
    first = one_worker(make_node([("TELERAD", free_port())])).start()
    second = make_node([("TELERAD", free_port())])  # another port, but first's data_dir
    second.config.write_text(second.config.read_text().replace('data_dir = "var"',
                                                               f'data_dir = "{first.folder / "var"}"'))
    result = run(second, "serve", timeout=60)
    assert result.returncode == 2
    line = one_line(result)
    assert str(first.folder / "var") in line and f"PID {first.proc.pid}" in line, line
    assert not listening(second.port)
    # the first node goes on, and the commands that read work beside it
    assert listening(first.port)
    assert run(first, "status", "--json").returncode == 0
    assert run(first, "audit", "verify").returncode == 0
    assert first.stop() == 0


def test_the_lock_goes_with_the_process_even_when_killed(make_node):
    node = one_worker(make_node([("TELERAD", free_port())])).start()
    node.kill()  # SIGKILL: no clean-up ran, the lock file stays
    assert (node.folder / "var" / "telenode.lock").exists()
    assert wait_for(lambda: not listening(node.port), 30)  # its worker follows it (PR_SET_PDEATHSIG)
    node.start()  # the kernel dropped the flock with the process
    assert node.stop() == 0


# -- start-up errors: one line, non-zero, no traceback ---------------------------------------------


def test_a_data_dir_that_is_a_file(make_node):
    node = make_node([("TELERAD", free_port())])
    (node.folder / "var").write_text("not a folder")
    result = run(node, "serve")
    assert result.returncode == 2
    line = one_line(result)
    assert "node.data_dir" in line and "is not a folder" in line and str(node.folder / "var") in line


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux) to drop root's DAC override")
def test_a_data_dir_the_node_may_not_write(make_node):
    node = make_node([("TELERAD", free_port())])
    (node.folder / "var").mkdir(mode=0o500)
    prefix = tuple(NO_DAC) if os.geteuid() == 0 else ()
    result = run(node, "serve", prefix=prefix)
    assert result.returncode == 2
    line = one_line(result)
    assert str(node.folder / "var") in line and "Permission denied" in line and "write access" in line, line


def _can_remount() -> bool:
    return os.geteuid() == 0 and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_remount(), reason="needs root and mount namespaces for a read-only bind mount")
def test_a_data_dir_on_a_read_only_file_system(make_node):
    node = make_node([("TELERAD", free_port())])
    data = node.folder / "var"
    data.mkdir()
    script = (f"mount --bind {data} {data} && mount -o remount,ro,bind {data} && "
              f"exec {sys.executable} -m node serve --config {node.config}")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, cwd=REPO,
                            timeout=60)
    assert result.returncode == 2
    line = one_line(result)
    assert str(data) in line and "Read-only file system" in line, line


def test_a_database_that_cannot_be_opened(make_node):
    node = make_node([("TELERAD", free_port())])
    (node.folder / "var").mkdir()
    (node.folder / "var" / "telenode.sqlite").write_bytes(b"this is not an SQLite database, it is 40 bytes" * 3)
    for command in ("serve", "status"):
        result = run(node, command)
        assert result.returncode == 1
        line = one_line(result)
        assert str(node.folder / "var" / "telenode.sqlite") in line and "backup" in line, line


def test_a_key_file_the_group_may_read(make_node):
    node = make_node([("TELERAD", free_port())])
    (node.folder / "var").mkdir()
    key = node.folder / "var" / "pseudonym.key"
    key.write_text("00" * 32)
    key.chmod(0o644)
    result = run(node, "serve")
    assert result.returncode == 2
    line = one_line(result)
    assert str(key) in line and "chmod 600" in line, line


def test_a_taken_port_is_one_line(make_node):
    with __import__("socket").socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        node = make_node([("TELERAD", free_port())])
        node.config.write_text(node.config.read_text().replace(f"port = {node.port}\n",
                                                               f"port = {holder.getsockname()[1]}\n", 1))
        result = run(node, "serve")
    assert result.returncode == 1
    assert "cannot listen on 127.0.0.1" in one_line(result)


@pytest.mark.parametrize("command, status", [(("status",), 0), (("status", "--json"), 0),
                                             (("reidentify", "TESTORG-ABC"), 1)])
def test_status_and_reidentify_on_an_unused_data_dir_answer_empty_or_unknown_and_create_nothing(
        make_node, command, status):
    """status shows empty queues (a monitoring script keeps working) and reidentify says unknown
    (exit 1, as the contract says for any unknown value); both say no node has used the data_dir."""
    node = make_node([("TELERAD", free_port())])
    result = run(node, *command)
    assert result.returncode == status, result.stderr
    assert "no node has used data_dir" in result.stderr and str(node.folder / "var") in result.stderr
    if "--json" in command:
        answer = json.loads(result.stdout)
        assert answer["destinations"]["remote0"]["pending"] == 0 and answer["quarantine"] == 0
    assert not (node.folder / "var").exists()


@pytest.mark.parametrize("command", [("audit", "verify"), ("audit", "show"), ("keys", "status"),
                                     ("pause", "remote0"), ("backup", "--output", "copy.sqlite"),
                                     ("quarantine", "show", "20261201T000000-abcd"), ("quarantine", "retry", "--all"),
                                     ("quarantine", "export", "20261201T000000-abcd", "--output", "x.dcm")])
def test_commands_that_read_never_create_a_data_dir(make_node, command):
    node = make_node([("TELERAD", free_port())])
    result = run(node, *command)
    assert result.returncode == 4
    line = one_line(result)
    assert "no node has used data_dir" in line and str(node.folder / "var") in line, line
    assert not (node.folder / "var").exists()
    assert not (node.folder / "copy.sqlite").exists()


# -- backup and restore ------------------------------------------------------------------------------


def _pseudonyms(database: Path) -> list[str]:
    with sqlite3.connect(database) as db:
        return [row[0] for row in db.execute("SELECT pseudo_patient_id FROM patients ORDER BY 1")]


@pytest.mark.dcmtk
def test_a_backup_of_a_running_node_restores_and_reidentifies(make_node, make_storescp, tmp_path):
    remote = make_storescp().start()
    node = one_worker(make_node([(remote.ae_title, remote.port)])).start()
    first = make_study(tmp_path / "first", instances=4, series=1, phi={"PatientID": "MRN-FIRST-1"})
    assert storescu(node.port, first.files).returncode == 0
    second = make_study(tmp_path / "second", instances=30, series=2, phi={"PatientID": "MRN-SECOND-2"})
    sender = subprocess.Popen([dcmtk("storescu"), "-aet", "CT01", "-aec", "TELENODE", "127.0.0.1", str(node.port),
                               *map(str, second.files)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=PEER_ENV)
    copy = tmp_path / "backups" / "telenode.sqlite"
    copy.parent.mkdir()
    made = run(node, "backup", "--output", str(copy), "--operator", "backup-job")  # while the second study arrives
    assert made.returncode == 0, made.stderr
    summary = json.loads(made.stdout)
    assert summary["backup"] == str(copy) and summary["bytes"] == copy.stat().st_size
    assert str(node.folder / "var" / "mapping.key") in summary["not_included"]
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert run(node, "backup", "--output", str(copy)).returncode == 1  # never overwrites
    assert sender.wait(120) == 0
    assert node.stop() == 0

    # Restore on another "machine": the copy and both key files, nothing else.
    restored = Node(tmp_path / "restored", [("TELERAD", free_port())])
    (restored.folder / "var").mkdir()
    shutil.copy2(copy, restored.folder / "var" / "telenode.sqlite")
    for key in ("pseudonym.key", "mapping.key"):
        shutil.copy2(node.folder / "var" / key, restored.folder / "var" / key)
    assert run(restored, "audit", "verify").returncode == 0
    pseudonyms = _pseudonyms(restored.folder / "var" / "telenode.sqlite")
    assert pseudonyms, "the backup holds the first study's patient"
    answers = [run(restored, "reidentify", p, "--operator", "dr.who", "--reason", "restore test")
               for p in pseudonyms]
    assert all(a.returncode == 0 for a in answers), [a.stderr for a in answers]
    originals = {json.loads(a.stdout)["patient_id"] for a in answers}
    assert "MRN-FIRST-1" in originals
    # The restored node runs and keeps the same pseudonyms (the pseudonym key came along).
    restored.start()
    assert storescu(restored.port, first.files[:1]).returncode == 0
    assert _pseudonyms(restored.folder / "var" / "telenode.sqlite") == pseudonyms
    assert restored.stop() == 0


# -- retention ---------------------------------------------------------------------------------------


def test_retention_prunes_old_sent_rows_only(tmp_path):
    store = Store(tmp_path / "telenode.sqlite")
    row = {"pseudo_sop_instance_uid": "2.25.1", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
           "transfer_syntax": "1.2.840.10008.1.2.1", "path": "/spool/x.dcm", "size": 10}
    for uid in ("2.25.1", "2.25.2", "2.25.3"):
        store.requeue("telerad", {**row, "pseudo_sop_instance_uid": uid})
    claimed = store.claim_batch("telerad", 2)
    store.mark_sent([r.id for r in claimed])  # two sent now, one still pending
    now = time.time()
    clock = [now]
    retention = Retention(store, sent_days=30, clock=lambda: clock[0])
    assert retention.tick() == 0  # sent just now: kept
    clock[0] = now + 31 * 86400
    assert retention.tick() == 2
    assert store.status()["telerad"]["sent"] == 0 and store.status()["telerad"]["pending"] == 1
    assert retention.tick() == 0  # not due again within the interval
    [record] = store.audit_records("queue_pruned")
    assert record["rows"] == 2
    assert store.verify_audit().intact
    assert Retention(store, sent_days=0, clock=lambda: now + 10**9).tick() == 0  # 0: kept forever
    store.close()



def _staged(root, batch_id: str, finished_at: float | None) -> None:
    """A batch-prepare staging folder; `finished_at` None: still running (no result file yet)."""
    (root / batch_id / "s1").mkdir(parents=True)
    (root / batch_id / "s1" / "a.dcm").write_bytes(b"de-identified")
    (root / batch_id / "manifest.json").write_text("{}")
    if finished_at is not None:
        result = root / f"{batch_id}.json"
        result.write_text("{}")
        os.utime(result, (finished_at, finished_at))


def test_retention_removes_staging_of_batches_finished_long_ago_only(tmp_path):
    store = Store(tmp_path / "telenode.sqlite")
    staging = tmp_path / "staging"
    now = time.time()
    _staged(staging, "old1", now - 8 * 86400)
    _staged(staging, "recent1", now - 1 * 86400)
    _staged(staging, "running1", None)
    retention = Retention(store, sent_days=0, clock=lambda: now, staging=staging, staging_days=7)
    assert retention.tick() == 0  # queue rows: none pruned (sent_days = 0)
    assert sorted(p.name for p in staging.iterdir()) == ["recent1", "recent1.json", "running1"]
    [record] = store.audit_records("staging_pruned")
    assert record["batches"] == 1
    assert store.verify_audit().intact
    kept = Retention(store, sent_days=0, clock=lambda: now + 10**9, staging=staging, staging_days=0)
    kept.tick()  # 0: staging kept forever
    assert (staging / "recent1").is_dir() and (staging / "running1").is_dir()
    store.close()


def test_retention_staging_days_is_a_config_key(tmp_path):
    path = tmp_path / "telenode.toml"
    path.write_text('[node]\nae_title = "TELENODE"\nport = 11112\ndata_dir = "var"\n\n'
                    '[anonymization]\nkey_file = "var/k.key"\n\n[retention]\nstaging_days = 14\n\n'
                    '[[destinations]]\nname = "r"\nae_title = "R"\nhost = "127.0.0.1"\nport = 104\n')
    assert config.load(path).retention_staging_days == 14.0
    path.write_text(path.read_text().replace("staging_days = 14", "staging_days = -1"))
    with pytest.raises(config.ConfigError, match="staging_days"):
        config.load(path)


@pytest.mark.dcmtk
def test_a_serving_node_prunes_what_it_sent_and_can_still_reidentify(make_node, make_storescp, tmp_path):
    remote = make_storescp().start()
    node = one_worker(make_node([(remote.ae_title, remote.port)]), "\n[retention]\nsent_days = 0.00005\n")
    node.start()  # 4.3 s retention, checked every second
    study = make_study(tmp_path / "study", instances=3, series=1, phi={"PatientID": "MRN-RETAINED"})
    assert storescu(node.port, study.files).returncode == 0
    assert wait_for(lambda: len(remote.files()) == 3, 30)

    def sent() -> int:
        return json.loads(run(node, "status", "--json").stdout)["destinations"]["remote0"]["sent"]

    assert wait_for(lambda: sent() == 0, 60, interval=1.0)
    [pseudonym] = _pseudonyms(node.folder / "var" / "telenode.sqlite")
    answer = run(node, "reidentify", pseudonym, "--reason", "after retention")
    assert answer.returncode == 0 and json.loads(answer.stdout)["patient_id"] == "MRN-RETAINED"
    assert node.stop() == 0
