"""ViewDatabase on SQLite: one connection per thread, closed when the thread ends."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest

from eventstore import StoreConfig
from projections.db import ViewDatabase


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts fds in /proc")
def test_connections_of_ended_threads_are_closed(tmp_path: Path) -> None:
    # HTTP reads run in trio's worker threads, which end after 10 s idle; every later
    # burst starts new ones. Their connections used to stay open (2 fds and a page cache
    # each), one more per thread that ever read a view, for the life of the process.
    db = ViewDatabase(StoreConfig.resolve(tmp_path, None))
    try:
        assert db.query("SELECT 1") == [(1,)]
        before = open_fds()
        for _ in range(50):
            t = threading.Thread(target=db.query, args=("SELECT 1",))
            t.start()
            t.join()
        assert len(db._opened) == 1  # only this (living) thread's
        assert open_fds() <= before
    finally:
        db.close()


def test_close_closes_the_connections_of_living_threads(tmp_path: Path) -> None:
    db = ViewDatabase(StoreConfig.resolve(tmp_path, None))
    opened, done = threading.Event(), threading.Event()
    conns: list[sqlite3.Connection] = []

    def reader() -> None:
        db.query("SELECT 1")
        conns.append(db._sqlite())
        opened.set()
        done.wait(10)

    t = threading.Thread(target=reader)
    t.start()
    try:
        assert opened.wait(10)
        db.query("SELECT 1")
        conns.append(db._sqlite())
        db.close()
        for conn in conns:
            with pytest.raises(sqlite3.ProgrammingError):  # closed
                conn.execute("SELECT 1")
        assert not db._opened
    finally:
        done.set()
        t.join()
