"""Group commit (node/commit.py) over a real SQLite store: concurrent writers share transactions,
nobody returns before its write is committed, and one failing write does not fail its group."""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from node.commit import GroupCommit
from node.store import Store


@pytest.fixture()
def store(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    store.db.execute("CREATE TABLE t (n INTEGER PRIMARY KEY)")
    yield store
    store.close()


def _committed(path) -> set[int]:
    """What another connection sees: only committed rows."""
    with sqlite3.connect(path) as other:
        return {row[0] for row in other.execute("SELECT n FROM t")}


def test_concurrent_writes_share_transactions_and_are_committed_on_return(store):
    commits = GroupCommit(store.batch)
    seen_on_return: dict[int, bool] = {}

    def write(n: int) -> None:
        def insert() -> None:
            store.db.execute("INSERT INTO t VALUES (?)", [n])
            time.sleep(0.002)  # a write that takes a while, so that others queue behind it

        commits.run(insert)
        seen_on_return[n] = n in _committed(store.path)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(write, range(200)))
    assert _committed(store.path) == set(range(200))
    assert all(seen_on_return.values()), "a caller returned before its write was committed"
    assert commits.writes == 200
    assert commits.groups < 200, "no two writes ever shared a transaction"


def test_a_failing_write_fails_alone(store):
    commits = GroupCommit(store.batch)
    store.db.execute("INSERT INTO t VALUES (7)")  # 7 will collide
    results: dict[int, str] = {}
    gate = threading.Barrier(8)

    def write(n: int) -> None:
        gate.wait()
        try:
            commits.run(lambda: store.db.execute("INSERT INTO t VALUES (?)", [n]))
            results[n] = "ok"
        except sqlite3.IntegrityError:
            results[n] = "error"

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(4, 12)))
    assert results == {n: ("error" if n == 7 else "ok") for n in range(4, 12)}
    assert _committed(store.path) == set(range(4, 12))


def test_single_writer_commits_alone(store):
    commits = GroupCommit(store.batch)
    commits.run(lambda: store.db.execute("INSERT INTO t VALUES (1)"))
    assert _committed(store.path) == {1}
    assert (commits.groups, commits.writes) == (1, 1)
