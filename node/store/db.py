"""The database core: one SQLite connection, its lock, transactions, and the migrations run on open.

One database file (WAL, synchronous=FULL, so a commit is on disk when it
returns) written through sqlite-utils. One connection is shared by the SCP's
threads and the forwarders under a re-entrant lock; the parts of the store
(mappings, queue, destinations, audit trail, key rotation) do their work inside
`write()` (lock + BEGIN IMMEDIATE … COMMIT) or `read()` (lock only). Several
`write()` blocks nest into one transaction: the outermost one commits (group
commit). Parts that must act after a commit or a rollback (the audit trail's
external copies) register with `on_commit` / `on_rollback`.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import sqlite_utils

Hook = Callable[[], None]


def now() -> float:
    return time.time()


def iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class Database:
    """The connection of one store, shared by threads: transactions, hooks, close."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Open (create 0600) the database at `path`; its folder is created if missing."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        if fresh:
            os.chmod(self.path, 0o600)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        self.db = sqlite_utils.Database(conn)
        self.lock = threading.RLock()
        self._on_commit: list[Hook] = []
        self._on_rollback: list[Hook] = []

    def __repr__(self) -> str:
        return f"Database({str(self.path)!r})"

    def execute(self, sql: str, parameters: Any = None) -> sqlite3.Cursor:
        return self.db.execute(sql, parameters) if parameters is not None else self.db.execute(sql)

    @property
    def in_transaction(self) -> bool:
        return self.db.conn.in_transaction

    def on_commit(self, hook: Hook) -> None:
        """Call `hook` after each outermost COMMIT returned."""
        self._on_commit.append(hook)

    def on_rollback(self, hook: Hook) -> None:
        """Call `hook` after each outermost ROLLBACK."""
        self._on_rollback.append(hook)

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        """Lock + one write transaction (joins the one already open on this connection)."""
        with self.lock, Transaction(self.db.conn, self._committed, self._rolled_back):
            yield

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        """Lock only: reads see a consistent connection state, no transaction is opened."""
        with self.lock:
            yield

    def _committed(self) -> None:
        for hook in self._on_commit:
            hook()

    def _rolled_back(self) -> None:
        for hook in self._on_rollback:
            hook()

    def close(self) -> None:
        with self.lock:
            self.db.conn.close()


class Transaction:
    """BEGIN IMMEDIATE … COMMIT (ROLLBACK on error) on an autocommit connection; re-entrant.
    The outermost one calls `on_commit` after COMMIT returned, `on_rollback` after ROLLBACK."""

    def __init__(self, conn: sqlite3.Connection, on_commit: Hook | None = None,
                 on_rollback: Hook | None = None) -> None:
        self.conn = conn
        self.outer = False
        self.on_commit, self.on_rollback = on_commit, on_rollback

    def __enter__(self) -> None:
        self.outer = not self.conn.in_transaction
        if self.outer:
            self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: Any, *_: Any) -> None:
        if not self.outer:
            return
        if kind:
            try:
                if self.conn.in_transaction:  # SQLite already rolled back on SQLITE_FULL, IOERR, NOMEM
                    self.conn.execute("ROLLBACK")
            finally:
                if self.on_rollback:
                    self.on_rollback()
            return
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            if self.on_rollback:
                self.on_rollback()
            raise
        if self.on_commit:
            self.on_commit()
