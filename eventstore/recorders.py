"""eventsourcing's application recorders, with a per-transaction choice to flush to disk.

"Acknowledged means durable": a commit that precedes an acknowledgement (an MQTT PUBACK,
an HTTP 2xx) is flushed to disk before the commit returns. A commit that nobody is told
about (QoS 0 telemetry, a command's intent before it is published) is written but not
flushed; it survives a crash of the process, and the next flushed commit carries it to
disk too, because both databases flush their write-ahead log in order (SQLite's WAL file,
PostgreSQL's WAL). Only a power loss in between can lose it, and then no one was told.

`EventLog.append(events, sync=...)` hands `sync` to `insert_events` of these recorders,
which are plugged in with eventsourcing's `APPLICATION_RECORDER_TOPIC` setting. Traced in
a running server on 2 cores: an SQLite commit takes 0.31 ms p50 flushed and 0.13 ms not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.sqlite import SQLiteApplicationRecorder

_SQLITE_MODE = {True: "FULL", False: "NORMAL"}
# Set once on each connection that writes events. Device streams interleave, so every
# transaction touches index pages all over the (stream, version) index, and each one goes
# to the WAL whole. Measured inserting 100k telemetry events, 250 per transaction:
# - a 64 MiB page cache (SQLite's default is 2 MiB), so the index stays in memory;
# - a checkpoint every 10,000 WAL pages instead of 1,000: each checkpoint copies the
#   pages back and syncs twice, and fewer of them took an insert from 18-19 to 12-14 µs;
# - the WAL file truncated back to 64 MiB after a checkpoint, so it does not stay large.
_WRITER_PRAGMAS = (
    "PRAGMA cache_size=-65536",
    "PRAGMA wal_autocheckpoint=10000",
    "PRAGMA journal_size_limit=67108864",
)


class SQLiteRecorder(SQLiteApplicationRecorder):
    """WAL mode; `synchronous` is set per transaction (FULL flushes the WAL at commit)."""

    def insert_events(self, stored_events: Sequence[StoredEvent], *, sync: bool = True,
                      **kwargs: Any) -> Sequence[int] | None:
        with self.datastore.get_connection(commit=True) as conn:
            # A connection-level setting that cannot change inside a transaction: set it on
            # the writer connection just before this one begins.
            mode = _SQLITE_MODE[sync]
            if not hasattr(conn, "parley_synchronous"):
                for pragma in _WRITER_PRAGMAS:
                    conn.cursor().execute(pragma)
            if getattr(conn, "parley_synchronous", None) != mode:
                conn.cursor().execute(f"PRAGMA synchronous={mode}")
                conn.parley_synchronous = mode  # type: ignore[attr-defined]
            with conn.transaction(commit=True) as c:
                return self._insert_events(c, stored_events, **kwargs)


class PostgresRecorder(PostgresApplicationRecorder):
    """`synchronous_commit` off for this transaction only, when nobody waits on it."""

    def _insert_events(self, curs: Any, stored_events: Sequence[StoredEvent], *, sync: bool = True,
                       **kwargs: Any) -> None:
        # eventsourcing calls this first inside the insert transaction.
        if not sync:
            curs.execute("SET LOCAL synchronous_commit TO OFF")
        super()._insert_events(curs, stored_events, **kwargs)
