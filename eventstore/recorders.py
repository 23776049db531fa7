"""eventsourcing's application recorders, with a per-transaction choice to flush to disk.

"Acknowledged means durable": a commit that precedes an acknowledgement (an MQTT PUBACK,
an HTTP 2xx) is flushed to disk before the commit returns. A commit that nobody is told
about (QoS 0 telemetry, a command's intent before it is published) is written but not
flushed; it survives a crash of the process, and the next flushed commit carries it to
disk too, because both databases flush their write-ahead log in order (SQLite's WAL file,
PostgreSQL's WAL). Only a power loss in between can lose it, and then no one was told.

`EventLog.append(events, sync=...)` hands `sync` to `insert_events` of these recorders,
which are plugged in with eventsourcing's `APPLICATION_RECORDER_TOPIC` setting.

On SQLite every write goes through one connection that the datastore keeps aside
(`SingleWriterDatastore`); readers share eventsourcing's pool. SQLite discards a
connection's page cache whenever another connection has written since its last
transaction, and the pool hands out its connections in turn, so with writes spread over
them no writer ever found its cache warm. Plugged in through `PERSISTENCE_MODULE`
(`SQLiteFactory`).

On SQLite, `synchronous` is FULL for a transaction that must be durable (the WAL is synced
at commit) and NORMAL otherwise. The recorder also knows how far the log is on disk, so
the projection runner can make sure of it before a view (a file of its own) records a
position: after a power loss a view must never be ahead of the log. When it is not,
one `fdatasync` of the WAL file brings it there (what FULL does at commit).
"""

from __future__ import annotations

import functools
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import structlog
from eventsourcing.persistence import (DatabaseError, DataError, IntegrityError, InterfaceError, InternalError,
                                       NotSupportedError, Notification, OperationalError, PersistenceError,
                                       ProgrammingError, StoredEvent)
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from eventsourcing.postgres import PostgresFactory as _EventsourcingPostgresFactory
from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteConnection, SQLiteDatastore
from eventsourcing.sqlite import SQLiteFactory as _EventsourcingSQLiteFactory
from psycopg.sql import SQL, Identifier

from eventstore.breaker import POOL_RECONNECT_TIMEOUT_S, TCP_LIMITS, StoreBreaker

# eventsourcing's insert without its retry decorator: PostgresRecorder.insert_events retries.
_insert_once = PostgresApplicationRecorder.insert_events.__wrapped__  # type: ignore[attr-defined]
log = structlog.get_logger(__name__)

_SQLITE_MODE = {True: "FULL", False: "NORMAL"}
# Set once on the connection that writes events (SingleWriterDatastore). Device streams
# interleave, so every transaction touches index pages all over the (stream, version)
# index, and each one goes to the WAL whole. Measured inserting 100k telemetry events,
# 250 per transaction:
# - a 64 MiB page cache (SQLite's default is 2 MiB), so the index stays in memory;
# - a checkpoint every 10,000 WAL pages instead of 1,000: each checkpoint copies the
#   pages back and syncs twice, and fewer of them took an insert from 18-19 to 12-14 µs;
# - the WAL file truncated back to 64 MiB after a checkpoint, so it does not stay large.
# Checkpoints sync the WAL before copying and the database after, also in NORMAL mode.
_WRITER_PRAGMAS = (
    "PRAGMA cache_size=-65536",
    "PRAGMA wal_autocheckpoint=10000",
    "PRAGMA journal_size_limit=67108864",
)


# How many WAL frames (pages) the writer fills before its checkpoint (wal_autocheckpoint
# above), and a little more: one pass of writes, after which SQLite writes the WAL again
# from its start.
WARM_WAL_FRAMES = 10_200


def warm_wal(db_path: str, frames: int = WARM_WAL_FRAMES) -> bool:
    """Give the log's WAL file the size it reaches before its first checkpoint, so that
    commits write over pages of the file instead of growing it. An fdatasync that grows
    a file must also flush its size (an ext4 journal commit): a one-event durable commit
    took 0.30-0.36 ms on a fresh WAL and 0.21-0.22 ms on one written before. SQLite writes
    the WAL again from its start once a checkpoint has copied all of it back, and keeps
    its size (up to journal_size_limit), so only the first pass after the WAL file was
    created, at each start of the server, grows it: this does that pass at once.

    Frames come from rewriting a scratch table of one row per page (different bytes each
    time: SQLite does not write a page whose content is unchanged), then dropping it; a
    RESTART checkpoint copies the few distinct pages back and makes the next writer begin
    at the start of the WAL. About 0.1 s and 40 MiB of writes, not flushed. Returns False
    if it did nothing (the WAL is that large already, or the disk has less than four times
    that free) or another connection kept the WAL from restarting."""
    try:
        size = os.path.getsize(db_path + "-wal")
    except FileNotFoundError:
        size = 0
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=1.0)
    try:
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        wanted = frames * (page + 24)
        if size >= wanted or conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            return False
        if shutil.disk_usage(os.path.dirname(db_path)).free < 4 * wanted:
            return False  # a nearly full disk: leave the space to the events themselves
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint=0")  # else it restarts the WAL midway
        rows = 25  # pages of the scratch table (left free in the database file afterwards)
        pads = (b"\x00" * (page - 200), b"\x01" * (page - 200))  # one row fills a page
        conn.execute("CREATE TABLE IF NOT EXISTS parley_wal_warmup (id INTEGER PRIMARY KEY, pad BLOB)")
        conn.execute("BEGIN")
        conn.executemany("INSERT OR REPLACE INTO parley_wal_warmup VALUES (?, ?)",
                         [(i, pads[0]) for i in range(rows)])
        conn.execute("COMMIT")
        for n in range(frames // rows):
            conn.execute("BEGIN")
            conn.execute("UPDATE parley_wal_warmup SET pad = ?", (pads[(n + 1) % 2],))
            conn.execute("COMMIT")
        conn.execute("DROP TABLE parley_wal_warmup")
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        return not busy
    except sqlite3.OperationalError:  # locked by another process: it will grow the WAL itself
        return False
    finally:
        conn.close()


class SingleWriterDatastore(SQLiteDatastore):
    """eventsourcing's SQLite datastore with one connection for all writes.

    SQLite runs one write transaction at a time anyway; what a single writer connection
    adds is a page cache that stays valid from one commit to the next (the index pages of
    streams written a moment ago). Appending at 1M events with a reader loading streams
    meanwhile: 31-33.6 against 33.3-34.8 µs per event, transaction p50 4.8-5.2 against
    5.3-5.8 ms (four paired runs). It also keeps the 64 MiB cache on one connection
    instead of on each of the pool's. In-memory databases keep the pool's reader/writer
    exclusion."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._writer_lock = threading.Lock()
        self._writer: SQLiteConnection | None = None

    @contextmanager
    def get_connection(self, *, commit: bool) -> Iterator[SQLiteConnection]:
        if not commit or self.pool.is_sqlite_memory_mode:
            with super().get_connection(commit=commit) as conn:
                yield conn
            return
        with self._writer_lock:
            if self._writer is None or self._writer.closed:
                self._writer = self.pool._create_connection()  # noqa: SLF001 - the pool's own factory
                for pragma in _WRITER_PRAGMAS:
                    self._writer.cursor().execute(pragma)
            yield self._writer

    def close(self) -> None:
        with self._writer_lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        super().close()


class SQLiteFactory(_EventsourcingSQLiteFactory):
    """eventsourcing's SQLite factory with a `SingleWriterDatastore`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        made = self.datastore  # its pool opens connections only when asked: nothing to undo
        self.datastore = SingleWriterDatastore(
            db_name=made.pool.db_name, lock_timeout=made.pool.lock_timeout,
            single_row_tracking=made.single_row_tracking, originator_id_type=made.originator_id_type)
        made.close()


# sqlite3's errors and eventsourcing's names for them (its SQLiteTransaction does the same),
# most specific first: the journal and the breaker tell failures apart by these classes.
_PERSISTENCE_ERRORS = (
    (sqlite3.InterfaceError, InterfaceError), (sqlite3.DataError, DataError),
    (sqlite3.OperationalError, OperationalError), (sqlite3.IntegrityError, IntegrityError),
    (sqlite3.InternalError, InternalError), (sqlite3.ProgrammingError, ProgrammingError),
    (sqlite3.NotSupportedError, NotSupportedError), (sqlite3.DatabaseError, DatabaseError),
)


def _persistence_error(exc: sqlite3.Error) -> PersistenceError:
    for raw, ours in _PERSISTENCE_ERRORS:
        if isinstance(exc, raw):
            return ours(exc)
    return PersistenceError(exc)


@functools.cache
def _insert_rows(table: str, rows: int) -> str:
    return f"INSERT INTO {table} VALUES " + ",".join(["(?,?,?,?)"] * rows)


class SQLiteRecorder(SQLiteApplicationRecorder):
    """WAL mode; `synchronous` is set per transaction (FULL flushes the WAL at commit)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._db_path = self.datastore.pool.db_name
        self._positions = threading.Lock()
        self._committed = 0  # highest notification id committed by this process
        # Highest notification id known to be on disk. 0 at start: what an earlier process
        # wrote may still sit in the page cache, so the first make_durable syncs.
        self._durable = 0

    def insert_events(self, stored_events: Sequence[StoredEvent], *, sync: bool = True,
                      **kwargs: Any) -> Sequence[int] | None:
        with self.datastore.get_connection(commit=True) as conn:
            ids = self._insert_written(conn, stored_events, sync)
        if ids:
            with self._positions:
                self._committed = max(self._committed, ids[-1])
                if sync:  # the WAL is on disk up to this commit, and so are all before it
                    self._durable = max(self._durable, ids[-1])
        return ids

    def _insert_written(self, conn: SQLiteConnection, stored_events: Sequence[StoredEvent],
                        sync: bool) -> Sequence[int]:
        """One transaction on the connection's sqlite3 object itself. eventsourcing's
        transaction and cursor wrappers around it cost a commit 0.04-0.08 ms, and a command
        waits on two commits (bench/notes.md); their one service, naming sqlite3's errors
        in eventsourcing's classes, is kept."""
        raw = conn._sqlite_conn
        try:
            # A connection-level setting that cannot change inside a transaction: set it
            # on the writer connection just before this one begins.
            mode = _SQLITE_MODE[sync]
            if getattr(conn, "parley_synchronous", None) != mode:
                raw.execute(f"PRAGMA synchronous={mode}")
                conn.parley_synchronous = mode  # type: ignore[attr-defined]
            c = raw.cursor()
            c.execute("BEGIN")
            try:
                ids = self._insert_events(c, stored_events)
                raw.commit()
            except BaseException:
                raw.rollback()
                raise
            finally:
                c.close()
        except sqlite3.Error as exc:
            raise _persistence_error(exc) from exc
        return ids

    # Rows per INSERT statement, largest first: a few distinct statements, which sqlite3
    # prepares once and caches. 128 rows are 512 parameters, under the 999 that SQLite
    # before 3.32 allows.
    INSERT_CHUNKS = (128, 32, 8, 2, 1)

    def _insert_events(self, c: Any, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int]:
        # eventsourcing executes one INSERT per event to read each one's rowid (its
        # notification id). Here a statement inserts up to 128 rows, one sqlite3 step
        # instead of one per row as with executemany: ingest's journal thread 11.5 against
        # 12.0-12.5 µs per message (docs/architecture.md, "The log"). The rows take consecutive
        # rowids: SQLite gives a new row the largest rowid + 1 (until that would pass
        # 2**63 - 1), in the order of VALUES, and nobody else inserts while this
        # transaction holds the write lock, which it takes with its first row. (Reading
        # MAX(rowid) first would start the transaction as a reader; another process
        # committing before the first row would then fail it at once with
        # SQLITE_BUSY_SNAPSHOT.)
        if not stored_events:
            return []
        params = [p for s in stored_events for p in (
            s.originator_id.hex if isinstance(s.originator_id, UUID) else s.originator_id,
            s.originator_version, s.topic, s.state)]
        i, n = 0, len(stored_events)
        for size in self.INSERT_CHUNKS:
            while n - i >= size:
                c.execute(_insert_rows(self.events_table_name, size), params[4 * i:4 * (i + size)])
                i += size
        last = c.lastrowid
        if last >= 2**63 - 1:  # SQLite picks random rowids from here on: never in practice
            raise PersistenceError("the event log has run out of rowids")
        return range(last - len(stored_events) + 1, last + 1)

    def select_stream_notifications(self, originator_id: UUID, *, gt: int, limit: int) -> list[Notification]:
        """One stream's events after version `gt`, each with its global position (the rowid;
        eventsourcing's select_events leaves it out). For `parley replay`."""
        with self.datastore.transaction(commit=False) as c:
            c.execute(f"SELECT rowid, originator_id, originator_version, topic, state FROM {self.events_table_name}"
                      " WHERE originator_id=? AND originator_version>? ORDER BY originator_version LIMIT ?",
                      (originator_id.hex, gt, limit))
            return [Notification(id=row["rowid"], originator_id=self.convert_originator_id(row["originator_id"]),
                                 originator_version=row["originator_version"], topic=row["topic"],
                                 state=row["state"]) for row in c.fetchall()]

    def sync(self, position: int = 0) -> None:
        """Flush the WAL, and with it every transaction committed so far (by this process,
        and up to `position`, which the caller read from the log), to disk."""
        with self._positions:
            target = max(self._committed, position)
        try:
            fd = os.open(self._db_path + "-wal", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            # No WAL: the last connection closed and checkpointed it into the database.
            fd = os.open(self._db_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        with self._positions:
            self._durable = max(self._durable, target)

    def make_durable(self, position: int) -> None:
        """Return once the log is on disk up to `position` (committed by this process)."""
        if position > self._durable:
            self.sync(position)


class GuardedPostgresDatastore(PostgresDatastore):
    """eventsourcing's datastore, whose connections pass the breaker first (StoreBreaker):
    while the server is down, a use fails at once instead of after eventsourcing's retries,
    and a connection-class failure makes the breaker look."""

    breaker: StoreBreaker

    @contextmanager
    def get_connection(self) -> Iterator[Any]:
        with self.breaker.guard(), super().get_connection() as conn:
            yield conn


class PostgresFactory(_EventsourcingPostgresFactory):
    """eventsourcing's PostgreSQL factory with a `GuardedPostgresDatastore`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # eventsourcing builds its datastore inline, from a dozen settings; the guarded one
        # only adds methods, so the built instance takes its class rather than be rebuilt.
        self.datastore.__class__ = GuardedPostgresDatastore
        ds: Any = self.datastore
        kw = ds.pool.kwargs
        ds.breaker = StoreBreaker({k: kw[k] for k in ("dbname", "host", "port", "user", "password")},
                                  f"{kw['host']}:{kw['port']}/{kw['dbname']}")
        ds.breaker.on_recovered(ds.pool.check)  # drop the connections that died with the server
        ds.pool.reconnect_timeout = POOL_RECONNECT_TIMEOUT_S
        kw.update(TCP_LIMITS)  # the pool opens its connections later, with these


class PostgresRecorder(PostgresApplicationRecorder):
    """`synchronous_commit` off for this transaction only, when nobody waits on it; events
    inserted from four plain arrays instead of one array of a composite type."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # eventsourcing builds a Python object of its composite type per event, and psycopg
        # dumps an array of those in Python: 23 µs of CPU per event in the journal thread.
        # Arrays of uuid, bigint, text and bytea are dumped in C: 14 µs (docs/benchmarks.md).
        self._insert_from_arrays = SQL(
            "INSERT INTO {schema}.{table} (originator_id, originator_version, topic, state)"
            " SELECT * FROM unnest(%s::{id_type}[], %s::bigint[], %s::text[], %s::bytea[])"
            " RETURNING notification_id"
        ).format(schema=Identifier(self.datastore.schema), table=Identifier(self.events_table_name),
                 id_type=Identifier(self.datastore.originator_id_type))
        self._chunked = threading.local()  # the ids of a transaction inserted in chunks

    # eventsourcing's own retry of an insert: a connection-class error, 10 attempts 0.2 s apart.
    INSERT_ATTEMPTS = 10
    INSERT_RETRY_WAIT_S = 0.2

    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        """eventsourcing's insert, retried as eventsourcing retries it, plus what its retry
        lacks: a connection lost while the COMMIT was under way leaves the commit in doubt.
        It may have landed; the retry then fails on the very events it wrote (a unique
        violation), and the caller took that for another process's write: it reloaded and
        stored its message again, or answered a command that had succeeded with an error.
        Here, a unique violation after a lost connection first looks whether the rows at
        those versions are these events, byte for byte: then the commit did land, and its
        positions are returned."""
        attempt = 1
        while True:
            try:
                try:
                    return _insert_once(self, stored_events, **kwargs)
                except IntegrityError:
                    # After a lost connection (attempt > 1); the look may lose its connection too.
                    landed = self._landed(stored_events) if attempt > 1 else None
                    if landed is None:
                        raise
                    log.warning("store.commit_in_doubt_landed", events=len(stored_events), attempt=attempt)
                    return landed
            except (InterfaceError, OperationalError):
                if attempt == self.INSERT_ATTEMPTS:
                    raise
                attempt += 1
                time.sleep(self.INSERT_RETRY_WAIT_S)

    def _landed(self, stored_events: Sequence[StoredEvent]) -> list[int] | None:
        """The positions of `stored_events` if the log holds exactly them (same stream,
        version, type and bytes), else None. A transaction lands whole or not at all."""
        statement = SQL(
            "SELECT e.notification_id, e.topic, e.state FROM unnest(%s::{id_type}[], %s::bigint[])"
            " WITH ORDINALITY AS k(originator_id, originator_version, n)"
            " LEFT JOIN {schema}.{table} e USING (originator_id, originator_version) ORDER BY k.n"
        ).format(schema=Identifier(self.datastore.schema), table=Identifier(self.events_table_name),
                 id_type=Identifier(self.datastore.originator_id_type))
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(statement, ([e.originator_id for e in stored_events],
                                     [e.originator_version for e in stored_events]))
            rows = curs.fetchall()
        if len(rows) != len(stored_events) or any(
                row["notification_id"] is None or row["topic"] != e.topic or bytes(row["state"]) != e.state
                for row, e in zip(rows, stored_events)):
            return None
        return [row["notification_id"] for row in rows]

    def select_stream_notifications(self, originator_id: UUID, *, gt: int, limit: int) -> list[Notification]:
        """One stream's events after version `gt`, each with its global position."""
        statement = SQL(
            "SELECT notification_id, originator_id, originator_version, topic, state FROM {schema}.{table}"
            " WHERE originator_id = %s AND originator_version > %s ORDER BY originator_version LIMIT %s"
        ).format(schema=Identifier(self.datastore.schema), table=Identifier(self.events_table_name))
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(statement, (originator_id, gt, limit))
            return [Notification(id=row["notification_id"], originator_id=row["originator_id"],
                                 originator_version=row["originator_version"], topic=row["topic"],
                                 state=bytes(row["state"])) for row in curs.fetchall()]

    def make_durable(self, position: int) -> None:
        """Nothing to do: the views share the log's WAL, which PostgreSQL flushes in order,
        so a durable view commit implies every log commit before it."""

    # At most this many bytes of event state per INSERT. eventsourcing writes in psycopg's
    # pipeline mode, where one statement of 7 MB or more (40 device reports of 200 KB, all
    # within the MQTT limits) hung for good, holding the table lock: nothing more was
    # stored for any device (psycopg 3.3; 5 MB passed). Bigger transactions are split into
    # statements of this size, each flushed before the next is sent.
    INSERT_CHUNK_BYTES = 1024 * 1024

    def _insert_stored_events(self, curs: Any, stored_events: Sequence[StoredEvent], **kwargs: Any) -> None:
        # What eventsourcing's version does, in its order: lock the table (so notification
        # ids commit in order), NOTIFY followers, insert; unnest keeps the arrays' order,
        # so the returned ids follow the events.
        # Ids a failed chunked insert of this thread left (its connection dropped between the
        # chunks and the fetch; a reviewer's test handed them to the next commit) are stale.
        self._chunked.ids = None
        self._lock_table(curs)
        self._notify_channel(curs)
        chunks = list(_chunks(stored_events, self.INSERT_CHUNK_BYTES))
        if len(chunks) == 1:  # the usual case: one statement, ids fetched by eventsourcing
            self._insert_chunk(curs, stored_events)
            return
        ids: list[int] = []
        for chunk in chunks:
            self._insert_chunk(curs, chunk)
            # Fetching the ids syncs the pipeline: this chunk is sent and done before the next.
            ids.extend(row["notification_id"] for row in curs.fetchall())
        self._chunked.ids = ids  # for _fetch_ids_after_insert_events, on this thread

    def _insert_chunk(self, curs: Any, stored_events: Sequence[StoredEvent]) -> None:
        curs.execute(self._insert_from_arrays, (
            [e.originator_id for e in stored_events],
            [e.originator_version for e in stored_events],
            [e.topic for e in stored_events],
            [e.state for e in stored_events],
        ))

    def _fetch_ids_after_insert_events(self, curs: Any, stored_events: Sequence[StoredEvent],
                                       **kwargs: Any) -> Sequence[int] | None:
        ids = getattr(self._chunked, "ids", None)
        if ids is not None:
            self._chunked.ids = None
            return ids
        return super()._fetch_ids_after_insert_events(curs, stored_events, **kwargs)

    def _insert_events(self, curs: Any, stored_events: Sequence[StoredEvent], *, sync: bool = True,
                       **kwargs: Any) -> None:
        # eventsourcing calls this first inside the insert transaction.
        if not sync:
            curs.execute("SET LOCAL synchronous_commit TO OFF")
        super()._insert_events(curs, stored_events, **kwargs)


def _chunks(events: Sequence[StoredEvent], max_bytes: int) -> Iterator[Sequence[StoredEvent]]:
    """`events` in runs of at most `max_bytes` of state (one event alone may be more)."""
    start, size = 0, 0
    for i, e in enumerate(events):
        if size and size + len(e.state) > max_bytes:
            yield events[start:i]
            start, size = i, 0
        size += len(e.state)
    yield events[start:]
