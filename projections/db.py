"""The database the views live in: SQLite (a file beside the log) or PostgreSQL.

Views write portable SQL with `?` placeholders; on PostgreSQL they become `%s`.
Views and their tracked position always commit in one transaction. One process at a time
writes a runner's views (`claim`); other processes sharing the database follow the log
for their in-memory mirrors only (projections/runner.py).
"""

from __future__ import annotations

import sqlite3
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from eventstore import StoreConfig
from eventstore.breaker import POOL_RECONNECT_TIMEOUT_S, TCP_LIMITS, StoreBreaker


class ViewDatabase:
    def __init__(self, config: StoreConfig, breaker: StoreBreaker | None = None) -> None:
        """`breaker`: the log's (EventLog.breaker), so one outage is one state for both."""
        self.is_postgres = config.is_postgres
        self._breaker = breaker
        self._url = config.url
        self._local = threading.local()
        # Every live thread's SQLite connection, to close them all. A thread's connection is
        # closed and forgotten when the thread ends: HTTP reads run in trio's worker threads,
        # which end after 10 s idle, and keeping theirs leaked 2 fds and a page cache each.
        self._opened: dict[int, sqlite3.Connection] = {}
        self._claims: dict[str, Any] = {}  # runner name -> what holds the claim (connection or file)
        if self.is_postgres:
            from psycopg_pool import ConnectionPool

            # timeout: how long a query waits for a connection. 30 s (psycopg's default) kept
            # HTTP reads hanging through a database outage; 5 s, then 503 (gateways/http/app.py).
            self._pool = ConnectionPool(config.url, min_size=1, max_size=8, open=True, timeout=5.0,
                                        reconnect_timeout=POOL_RECONNECT_TIMEOUT_S, kwargs={"autocommit": False, **TCP_LIMITS})
            if breaker is not None:
                breaker.on_recovered(self._pool.check)
        else:
            self._path = str(Path(config.sqlite_path).with_name("views.sqlite"))

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.is_postgres else sql

    def _sqlite(self) -> sqlite3.Connection:
        held = getattr(self._local, "conn", None)
        if held is None:
            conn = sqlite3.connect(self._path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # The views can be rebuilt from the log, so they need not fsync every commit.
            conn.execute("PRAGMA synchronous=NORMAL")
            held = self._local.conn = _ThreadConnection(conn)
            self._opened[id(held)] = conn
            # When the thread ends, its threading.local lets go of `held`: close the connection.
            weakref.finalize(held, self._forget, id(held)).atexit = False
        return held.conn

    def _forget(self, key: int) -> None:
        conn = self._opened.pop(key, None)
        if conn is not None:
            conn.close()

    @contextmanager
    def _pg_connection(self) -> Iterator[Any]:
        """A pooled connection past the breaker: while the server is down, StoreUnavailable
        at once, not after the pool's 5 s wait."""
        with self._breaker.guard() if self._breaker is not None else nullcontext(), \
                self._pool.connection() as conn:
            yield conn  # the pool's context manager commits on success, rolls back on error

    @contextmanager
    def transaction(self) -> Iterator["Cursor"]:
        if self.is_postgres:
            with self._pg_connection() as conn, conn.cursor() as cur:
                yield Cursor(cur, self)
        else:
            conn = self._sqlite()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield Cursor(conn.cursor(), self)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self.is_postgres:
            with self._pg_connection() as conn:
                return list(conn.execute(self._sql(sql), params).fetchall())
        return self._sqlite().execute(sql, params).fetchall()

    # -- who writes the views ----------------------------------------------------------
    def claim(self, name: str) -> bool:
        """Try to become the process that writes runner `name`'s views in this database.
        Held until `release` or the end of the process (a PostgreSQL advisory lock on a
        connection of its own; on SQLite an exclusive `flock` on a file beside the views).
        True while held. Correctness does not rest on it: the runner also checks its
        position in every view transaction (compare-and-set)."""
        held = self._claims.get(name)
        if held is not None:
            if not (self.is_postgres and (held.closed or held.broken)):
                return True
            self._claims.pop(name)  # the connection died, and the lock with it
        if self.is_postgres:
            import psycopg

            try:
                conn = psycopg.connect(self._url, autocommit=True, connect_timeout=5)
                row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))",
                                   (f"parley.projections.{name}",)).fetchone()
            except psycopg.Error:
                return False
            if not row or not row[0]:
                conn.close()
                return False
            self._claims[name] = conn
            return True
        import fcntl

        f = open(f"{self._path}.{name}.owner", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        self._claims[name] = f
        return True

    def release(self, name: str) -> None:
        held = self._claims.pop(name, None)
        if held is not None:
            held.close()  # closing ends the advisory lock's session / the flock

    def close(self) -> None:
        for name in list(self._claims):
            self.release(name)
        if self.is_postgres:
            self._pool.close()
        else:
            for key in list(self._opened):
                self._forget(key)


class _ThreadConnection:
    """One thread's SQLite connection, in the thread's `threading.local` (sqlite3 connections
    take no weak references; this holder does, for the finalizer that closes it)."""

    __slots__ = ("conn", "__weakref__")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn


class Cursor:
    def __init__(self, cur: Any, db: ViewDatabase) -> None:
        self._cur = cur
        self._db = db

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._cur.execute(self._db._sql(sql), params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any:
        return self._cur.executemany(self._db._sql(sql), rows)

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return list(self._cur.fetchall())
