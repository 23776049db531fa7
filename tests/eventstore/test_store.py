"""The log: msgpack round trips, group commit, conflicts, reading by stream and position,
snapshots and upcasting; run on SQLite and (by subclassing) on PostgreSQL."""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime, timezone
from typing import Any
from uuid import uuid4

import pytest
from eventsourcing.domain import Aggregate, Snapshot, event
from eventsourcing.persistence import RecordConflictError

from eventstore import EventLog, Journal, StoreConfig, StoreUnavailable, stream_id
from eventstore.transcoder import MsgpackTranscoder
from tests.support import stall_appends


class Counter(Aggregate):
    @event("Started")
    def __init__(self, name: str) -> None:
        self.name = name
        self.total = 0
        self.notes: list[Any] = []

    @event("Added")
    def add(self, amount: int, note: Any = None) -> None:
        self.total += amount
        if note is not None:
            self.notes.append(note)


def test_msgpack_round_trips_uuid_datetime_and_nesting():
    t = MsgpackTranscoder()
    value = {"id": uuid4(), "at": datetime(2026, 5, 11, 10, 0, tzinfo=timezone.utc),
             "nested": {"list": [1, 2.5, "x", None, True], "bytes": b"\x00\x01"}}
    assert t.decode(t.encode(value)) == value


def test_msgpack_datetimes_naive_aware_and_from_older_logs():
    import msgpack
    from datetime import timedelta

    t = MsgpackTranscoder()
    naive = datetime(2026, 5, 11, 10, 0, 0, 123456)
    berlin = datetime(2026, 5, 11, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    out = t.decode(t.encode({"naive": naive, "aware": berlin}))
    assert out["naive"] == naive.replace(tzinfo=timezone.utc)  # naive is taken as UTC
    assert out["aware"] == berlin and out["aware"].utcoffset() == timedelta(0)  # same instant, as UTC
    # Logs written before Timestamp encoding stored datetimes as ISO text in extension 2.
    old = msgpack.packb({"at": msgpack.ExtType(2, b"2026-05-11T10:00:00+00:00")}, use_bin_type=True)
    assert t.decode(old) == {"at": datetime(2026, 5, 11, 10, 0, tzinfo=timezone.utc)}


def test_stream_ids_are_deterministic():
    assert stream_id("device", "p", "d") == stream_id("device", "p", "d")
    assert stream_id("device", "p", "d") != stream_id("device", "p", "e")


class TestEventLog:
    @pytest.fixture
    def store(self, tmp_path) -> StoreConfig:
        return StoreConfig.resolve(tmp_path, None)

    @pytest.fixture
    def log(self, store):
        log = EventLog(store)
        yield log
        log.close()

    @pytest.fixture
    def journal(self, log):
        journal = Journal(log)
        yield journal
        journal.close()

    def test_commit_returns_positions_and_load_rebuilds(self, log, journal):
        c = Counter(name="a")
        c.add(2)
        c.add(3, note={"why": "because"})
        positions = journal.commit(c.collect_events())
        assert positions == sorted(positions) and len(positions) == 3
        loaded = log.load(c.id)
        assert (loaded.total, loaded.notes, loaded.version) == (5, [{"why": "because"}], 3)
        assert log.max_position() == positions[-1]

    def test_one_append_of_interleaved_streams_returns_each_events_position(self, log):
        """The positions `append` returns belong to the events in the order given (on
        PostgreSQL they come back from one INSERT of four arrays; on SQLite 305 events are
        inserted 128, 128, 32, 8, 8 and 1 rows at a time)."""
        counters = [Counter(name=f"c{i}") for i in range(5)]
        for round_ in range(60):
            for i, c in enumerate(counters):
                c.add(round_ * 10 + i, note={"n": round_})
        events = [e for pair in zip(*(c.collect_events() for c in counters)) for e in pair]
        positions = log.append(events, sync=False)
        assert len(positions) == len(events) and positions == sorted(positions)
        by_position = {le.position: le for le in log.read_all(0, limit=1000)}
        for position, event in zip(positions, events):
            le = by_position[position]
            assert (le.stream_id, le.version) == (event.originator_id, event.originator_version)
            assert type(le.event) is type(event) and vars(le.event) == vars(event)

    def test_positions_stay_right_across_appends_and_a_rolled_back_one(self, log):
        """On SQLite the positions of one append come from its last row's rowid, counted
        back; a rolled-back append between two others must not shift them."""
        from eventsourcing.persistence import RecordConflictError

        a, b = Counter(name="a"), Counter(name="b")
        for i in range(3):
            a.add(i)
        a_events = a.collect_events()
        first = log.append(a_events, sync=False)
        b.add(1)
        with pytest.raises(RecordConflictError):  # a's versions are taken: b's rows roll back too
            log.append(b.collect_events() + a_events[:1], sync=False)
        b = Counter(name="b2")
        b.add(7)
        second = log.append(b.collect_events(), sync=False)
        assert len(first) == 4 and len(second) == 2 and first + second == sorted(first + second)
        logged = {le.position: (le.stream_id, le.version) for le in log.read_all(0)}
        events = [(a.id, v) for v in range(1, 5)] + [(b.id, 1), (b.id, 2)]
        assert [logged[p] for p in first + second] == events
        assert sorted(logged) == first + second  # nothing else was left in the log

    def test_load_many_makes_each_aggregate_as_load_does(self, log):
        """Streams with and without a snapshot, with and without events after it, and one
        that does not exist: two queries for all of them, the same aggregates as `load`."""
        counters = [Counter(name=f"m{i}") for i in range(6)]
        for i, c in enumerate(counters):
            for n in range(i * 3):
                c.add(n, note={"n": n})
            log.append(c.collect_events(), sync=False)
            if i % 2:
                log.put_snapshot(Snapshot.take(c))
            for n in range(i % 3):
                c.add(100 + n)
            log.append(c.collect_events(), sync=False)
        missing = uuid4()
        many = log.load_many([c.id for c in counters] + [missing, counters[0].id])
        assert set(many) == {c.id for c in counters} | {missing} and many[missing] is None
        for c in counters:
            one = log.load(c.id)
            assert type(many[c.id]) is Counter and vars(many[c.id]) == vars(one)
            assert (one.version, one.total) == (c.version, c.total)
        assert log.load_many([]) == {}

    def test_read_by_stream_and_by_global_position(self, log, journal):
        a, b = Counter(name="a"), Counter(name="b")
        a.add(1)
        b.add(2)
        journal.commit(a.collect_events() + b.collect_events())
        assert [e.originator_version for e in log.read_stream(a.id)] == [1, 2]
        assert [e.originator_version for e in log.read_stream(a.id, gt=1)] == [2]
        everything = log.read_all(0)
        assert [le.position for le in everything] == sorted(le.position for le in everything)
        assert {le.stream_id for le in everything} == {a.id, b.id}
        tail = log.read_all(everything[1].position)
        assert [le.position for le in tail] == [le.position for le in everything[2:]]
        # One stream with each event's global position (parley replay): the same as read_all's.
        of_a = [(le.position, le.version, type(le.event)) for le in everything if le.stream_id == a.id]
        assert [(le.position, le.version, type(le.event)) for le in log.read_stream_logged(a.id)] == of_a
        assert [le.version for le in log.read_stream_logged(a.id, gt=1, limit=5)] == [2]
        assert log.read_stream_logged(a.id, gt=0, limit=1)[0].event.name == "a"

    def test_group_commit_batches_concurrent_writers(self, log, journal):
        counters = [Counter(name=str(i)) for i in range(200)]
        for c in counters:
            c.add(1)
        futures = [journal.submit(c.collect_events()) for c in counters]
        assert all(len(f.future.result(10)) == 2 for f in futures)
        assert journal.batches < 200  # at least some callers shared a transaction
        assert log.max_position() == 400

    def test_conflict_fails_only_the_conflicting_caller(self, log, journal):
        c = Counter(name="x")
        journal.commit(c.collect_events())
        stale, fresh = log.load(c.id), log.load(c.id)
        stale.add(1)
        fresh.add(2)
        journal.commit(fresh.collect_events())
        other = Counter(name="y")
        bad = journal.submit(stale.collect_events())
        good = journal.submit(other.collect_events())
        with pytest.raises(RecordConflictError):
            bad.future.result(10)
        assert len(good.future.result(10)) == 1
        assert log.load(c.id).total == 2

    def test_snapshot_then_tail(self, log, journal):
        c = Counter(name="s")
        for _ in range(50):
            c.add(1)
        journal.commit(c.collect_events())
        log.put_snapshot(Snapshot.take(c))
        assert log.snapshot_version(c.id) == 51
        c.add(10)
        journal.commit(c.collect_events())
        loaded = log.load(c.id)
        assert (loaded.total, loaded.version) == (60, 52)
        assert log.load(c.id, version=20).total == 19

    def test_a_new_snapshot_replaces_the_older_ones_of_its_stream(self, log, journal):
        c, other = Counter(name="a"), Counter(name="b")
        taken = []
        for _ in range(3):
            for _ in range(10):
                c.add(1)
            other.add(1)
            journal.commit(c.collect_events() + other.collect_events())
            log.put_snapshots([Snapshot.take(c), Snapshot.take(other)])
            taken.append(c.version)
        snapshots = log._app.snapshots
        assert [s.originator_version for s in snapshots.get(c.id)] == [taken[-1]]
        assert [s.originator_version for s in snapshots.get(other.id)] == [other.version]
        assert (log.load(c.id).total, log.load(c.id).version) == (30, 31)
        assert log.load(c.id, version=taken[0]).total == 10  # an older state: from the events

    def test_commit_listeners_hear_positions(self, log, journal):
        heard: list[int] = []
        done = threading.Event()
        log.on_commit(lambda p: (heard.append(p), done.set()))
        journal.commit(Counter(name="n").collect_events())
        assert done.wait(5) and heard and max(heard) in (1, -1)


    def test_an_idle_journal_commits_on_the_callers_thread(self, log, journal):
        writers: list[str] = []
        log.on_committed_events(lambda events: writers.append(threading.current_thread().name))
        done = threading.Thread(target=lambda: journal.commit(Counter(name="i").collect_events()), name="caller")
        done.start()
        done.join(10)
        queued = journal.submit(Counter(name="q").collect_events())  # submit always queues
        queued.future.result(10)
        assert writers == ["caller", "journal-writer"]

    def test_a_commit_whose_caller_gave_up_is_never_written_later(self, log, journal, monkeypatch):
        """The store is stuck (a lock held, a database down): a caller whose commit times out
        moves on (reloads, answers 503, retries). Written later, its events would land
        behind others committed since, and be told to nobody."""
        from eventstore.journal import JournalTimeout

        stuck, release = stall_appends(monkeypatch, log)
        blocker = journal.submit(Counter(name="first").collect_events())  # holds the writer
        assert stuck.wait(5)
        late = Counter(name="late")
        with pytest.raises(JournalTimeout):
            journal.commit(late.collect_events(), timeout=0.2)
        release.set()
        blocker.future.result(10)
        journal.commit(Counter(name="after").collect_events())  # the writer moves on
        assert [type(e).__name__ for e in log.read_stream(late.id)] == []  # never written
        assert log.max_position() == 2

    def test_an_urgent_commit_is_written_ahead_of_the_queue(self, log, journal, monkeypatch):
        """A command's commit (an HTTP caller waits) goes in the next transaction, alone,
        not behind the reports queued before it; the queue keeps its order."""
        stuck, release = stall_appends(monkeypatch, log)
        blocker = journal.submit(Counter(name="first").collect_events())  # holds the writer
        assert stuck.wait(5)
        queued = [journal.submit(Counter(name=f"q{i}").collect_events(), sync=False) for i in range(20)]
        urgent: list[list[int]] = []
        caller = threading.Thread(target=lambda: urgent.append(
            journal.commit(Counter(name="cmd").collect_events(), sync=False, urgent=True)))
        caller.start()
        time.sleep(0.1)  # queued behind the twenty
        release.set()
        caller.join(10)
        positions = [f.future.result(10)[0] for f in queued]
        assert blocker.future.result(10) == [1] and urgent == [[2]]
        assert positions == list(range(3, 23))
        assert journal.batches == 3  # the blocker, the urgent one alone, the twenty together

    def test_a_snapshot_another_process_stored_already_is_no_failure(self, log, journal):
        """Two processes' actors for one device stop at the same version and both snapshot
        it: the second insert fails on the key. That is no store failure (no warning, no
        failure counted) and the other snapshots of its transaction are stored."""
        import structlog.testing

        a, b = Counter(name="a"), Counter(name="b")
        a.add(1)
        b.add(2)
        journal.commit(a.collect_events() + b.collect_events())
        log.put_snapshot(Snapshot.take(a))  # by the other process
        with structlog.testing.capture_logs() as logs:
            journal._put_snapshots([Snapshot.take(a), Snapshot.take(b)])
        assert [e for e in logs if e["log_level"] != "debug"] == []
        assert (log.snapshot_version(a.id), log.snapshot_version(b.id)) == (2, 2)
        assert journal.failures.failing is False

    def test_an_urgent_commit_queued_while_the_writer_gathers_is_not_left_behind(self, log, journal):
        """Its wake-up item is taken (and skipped) by the writer gathering a transaction:
        the urgent batch must still be written then, not wait for the next item, which a
        quiet system may never send (a command hung until its commit timed out)."""
        from eventstore.journal import Journal

        real_queue, fired = journal._queue, []
        urgent: list[Any] = []

        class Racing:  # the writer's queue: an urgent commit arrives as it gathers
            def get(self, *a, **k):
                return real_queue.get(*a, **k)

            def get_nowait(self):
                if not fired:
                    fired.append(True)
                    urgent.append(Journal._enqueue(journal, Counter(name="cmd").collect_events(), True, True))
                return real_queue.get_nowait()

            def put(self, item):
                real_queue.put(item)

            def empty(self):
                return real_queue.empty()

        journal._queue = Racing()
        journal.submit(Counter(name="report").collect_events(), sync=False).future.result(5)
        assert fired and urgent[0].future.result(5) == [1]  # written ahead of the gathered report

    def test_an_urgent_commit_ends_the_gathering_of_a_transaction(self, log, journal):
        """Under load the writer gathers queued batches into one transaction until the queue
        is quiet; an urgent commit's wake-up ends that at once: it is written before any
        batch queued behind it is even taken (it once waited for the whole gathering, a
        hundred milliseconds and more behind a steady trickle of reports)."""
        from eventstore.journal import Queued

        real_queue, state = journal._queue, {"taken_after": 0, "at_write": None}
        urgent: list[Queued] = []

        class Busy:  # the writer's queue: an urgent commit arrives as it gathers, reports behind it
            def get(self, *a, **k):
                return self._count(real_queue.get(*a, **k))

            def get_nowait(self):
                if not urgent:
                    urgent.append(Journal._enqueue(journal, Counter(name="cmd").collect_events(), True, True))
                    urgent[0].future.add_done_callback(lambda f: state.update(at_write=state["taken_after"]))
                    for i in range(3):
                        journal.submit(Counter(name=f"late{i}").collect_events(), sync=False)
                return self._count(real_queue.get_nowait())

            def _count(self, item):
                if urgent and isinstance(item, Queued):
                    state["taken_after"] += 1
                return item

            def put(self, item):
                real_queue.put(item)

            def empty(self):
                return real_queue.empty()

        journal._queue = Busy()
        first = journal.submit(Counter(name="report").collect_events(), sync=False)
        assert first.future.result(5) == [2]  # gathered before the urgent commit came
        assert urgent and urgent[0].future.result(5) == [1]
        assert state["at_write"] == 0  # no batch behind it was taken before it was written

    def test_a_commit_queued_as_the_journal_closes_is_written_not_stranded(self, log):
        """A caller found the journal open and is putting its batch on the queue when the
        journal closes: the batch goes ahead of the writer's stop item and is written,
        never behind it, where nobody would take it and its caller would wait for ever."""
        from eventstore.journal import Queued

        journal = Journal(log)
        real_queue, putting = journal._queue, threading.Event()

        class Slow:  # a caller preempted between checking `_closed` and its put
            def __getattr__(self, name):
                return getattr(real_queue, name)

            def put(self, item):
                if isinstance(item, Queued):
                    putting.set()
                    time.sleep(0.2)
                real_queue.put(item)

        journal._queue = Slow()
        queued: list[Queued] = []
        caller = threading.Thread(target=lambda: queued.append(journal.submit(Counter(name="late").collect_events())))
        caller.start()
        assert putting.wait(5)
        journal.close()
        caller.join(5)
        assert queued[0].future.result(5) == [1]

    def test_unflushed_commits_land_like_flushed_ones(self, log, journal):
        c = Counter(name="u")
        journal.commit(c.collect_events(), sync=False)  # e.g. QoS 0 telemetry: nobody is told
        c.add(4)
        journal.commit(c.collect_events())  # acknowledged: flushed, and carries the first along
        assert (journal.batches, journal.flushed) == (2, 1)
        assert log.load(c.id).total == 4
        stale = log.load(c.id)
        c.add(1)
        journal.commit(c.collect_events(), sync=False)
        stale.add(1)
        with pytest.raises(RecordConflictError):  # the same guarantees, only not yet on disk
            journal.commit(stale.collect_events(), sync=False)


def test_sqlite_flushes_only_the_transactions_that_ask(tmp_path, monkeypatch):
    """The SQLite recorder switches the writer connection's `synchronous` per transaction:
    NORMAL (WAL written, not fsynced) for sync=False, FULL (fsync at commit) otherwise."""
    import eventsourcing.sqlite as es_sqlite

    statements: list[str] = []
    create = es_sqlite.SQLiteConnectionPool._create_connection

    def traced(pool):
        conn = create(pool)
        conn._sqlite_conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(es_sqlite.SQLiteConnectionPool, "_create_connection", traced)
    log = EventLog(StoreConfig.resolve(tmp_path, None))
    try:
        c = Counter(name="t")
        log.append(c.collect_events(), sync=False)
        c.add(1)
        log.append(c.collect_events(), sync=True)
        c.add(1)
        log.append(c.collect_events(), sync=True)
    finally:
        log.close()
    modes = [s for s in statements if s.startswith("PRAGMA synchronous") or s.startswith("INSERT")]
    assert [m.split()[0] if m.startswith("INSERT") else m for m in modes] == [
        "PRAGMA synchronous=NORMAL", "INSERT", "PRAGMA synchronous=FULL", "INSERT", "INSERT"]


def test_a_locked_sqlite_log_fails_a_commit_in_eventsourcings_terms_and_rolls_it_back(tmp_path):
    """The recorder writes on the sqlite3 connection itself (recorders.py, _insert_written):
    a failure still reaches the journal and the breaker as eventsourcing's error class,
    the transaction is rolled back, and the writer goes on once the lock is gone."""
    import sqlite3

    from eventsourcing.persistence import OperationalError

    config = StoreConfig.resolve(tmp_path, None)
    log = EventLog(config)
    try:
        with log._app.recorder.datastore.get_connection(commit=True) as writer:
            writer._sqlite_conn.execute("PRAGMA busy_timeout=50")  # not the 10 s default
        c = Counter(name="t")
        log.append(c.collect_events())
        other = sqlite3.connect(config.sqlite_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process writing
        c.add(1)
        events = c.collect_events()
        with pytest.raises(OperationalError, match="locked"):
            log.append(events)
        other.execute("ROLLBACK")
        other.close()
        assert log.append(events) == [2]  # the failed one left nothing behind
        assert [le.version for le in log.read_all(0)] == [1, 2]
    finally:
        log.close()


def test_sqlite_writes_all_go_through_one_connection_whose_cache_survives(tmp_path, monkeypatch):
    """SQLite drops a connection's page cache when another connection wrote since: every
    write (events, snapshots) goes through one connection set aside for it, and readers
    use the pool, so the writer finds its cache as it left it."""
    import eventsourcing.sqlite as es_sqlite
    from eventsourcing.domain import Snapshot

    writers: dict[int, list[str]] = {}
    create = es_sqlite.SQLiteConnectionPool._create_connection

    def traced(pool):
        conn = create(pool)
        seen = writers.setdefault(id(conn), [])
        conn._sqlite_conn.set_trace_callback(
            lambda sql: seen.append(sql) if sql.startswith(("INSERT", "PRAGMA cache_size")) else None)
        return conn

    monkeypatch.setattr(es_sqlite.SQLiteConnectionPool, "_create_connection", traced)
    log = EventLog(StoreConfig.resolve(tmp_path, None))
    try:
        c = Counter(name="t")
        for i in range(5):
            c.add(1)
            log.append(c.collect_events(), sync=i % 2 == 0)
            assert log.load(c.id).total == i + 1  # a reader between writes
        log.put_snapshot(Snapshot.take(c))
        writer = log._app.recorder.datastore._writer
        assert writer._sqlite_conn.execute("PRAGMA cache_size").fetchone()[0] == -65536
    finally:
        log.close()
    busy = [sqls for sqls in writers.values() if any(s.startswith("INSERT") for s in sqls)]
    assert len(busy) == 1
    assert busy[0][0] == "PRAGMA cache_size=-65536"  # set once, before its first write
    assert sum(s.startswith("INSERT INTO stored_events") for s in busy[0]) == 5  # an INSERT per append
    assert sum(s.startswith("INSERT INTO stored_snapshots") for s in busy[0]) == 1
    assert len(writers) > 1  # the readers had connections of their own


def _wal_syncs(monkeypatch) -> list[str]:
    """Record the files the recorder fdatasyncs (by path), and still sync them."""
    import eventstore.recorders as recorders

    synced: list[str] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(recorders.os, "fdatasync", fdatasync)
    return synced


def test_make_durable_syncs_the_wal_only_when_the_log_is_not_on_disk_that_far(tmp_path, monkeypatch):
    """Views live in a file of their own: before one records a position, the log must be on
    disk up to it, or a power loss could leave the view ahead of the log."""
    synced = _wal_syncs(monkeypatch)
    log = EventLog(StoreConfig.resolve(tmp_path, None))
    try:
        c = Counter(name="t")
        (first,) = log.append(c.collect_events(), sync=False)  # written, not synced
        log.make_durable(first)
        assert synced == [str(tmp_path.resolve() / "events.sqlite-wal")]
        log.make_durable(first)  # already on disk: nothing to do
        assert len(synced) == 1
        c.add(1)
        (second,) = log.append(c.collect_events(), sync=True)  # FULL: synced at commit
        log.make_durable(second)
        assert len(synced) == 1
        c.add(1)
        (third,) = log.append(c.collect_events(), sync=False)
        log.make_durable(third)
        assert len(synced) == 2
    finally:
        log.close()


def test_a_fresh_process_syncs_once_before_trusting_what_it_found(tmp_path, monkeypatch):
    """What an earlier process wrote unsynced may still sit in the page cache."""
    log = EventLog(StoreConfig.resolve(tmp_path, None))
    try:
        c = Counter(name="t")
        (position,) = log.append(c.collect_events(), sync=False)
    finally:
        log.close()
    synced = _wal_syncs(monkeypatch)
    log = EventLog(StoreConfig.resolve(tmp_path, None))
    try:
        log.max_position()  # opens a connection, so the WAL exists again
        log.make_durable(position)
        log.make_durable(position)
        assert len(synced) == 1
    finally:
        log.close()


def test_a_warmed_wal_is_written_over_from_its_start_instead_of_growing(tmp_path):
    """`warm_up` gives the WAL its working size; the log's next commits then write over it
    from the start (no fdatasync has to flush a new file size), the scratch table is gone,
    and the log reads and writes as before. A second warm-up has nothing to do."""
    from eventstore.recorders import WARM_WAL_FRAMES

    config = StoreConfig.resolve(tmp_path, None)
    log = EventLog(config)
    journal = Journal(log)
    wal = config.sqlite_path + "-wal"
    try:
        c = Counter(name="before")
        journal.commit(c.collect_events())
        assert os.path.getsize(wal) < 1 << 20
        assert log.warm_up()
        warmed = os.path.getsize(wal)
        assert warmed >= WARM_WAL_FRAMES * 4096
        assert not log.warm_up()
        for i in range(200):
            c.add(i)
            journal.commit(c.collect_events())
        assert os.path.getsize(wal) == warmed  # written over, not grown
        assert log.load(c.id).total == sum(range(200))
        import sqlite3

        with sqlite3.connect(config.sqlite_path) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "parley_wal_warmup" not in tables
    finally:
        journal.close()
        log.close()


def test_warming_the_wal_gives_way_to_a_reader_and_a_full_disk_and_is_a_no_op_on_postgres(
        tmp_path, pg_database, monkeypatch):
    import sqlite3

    config = StoreConfig.resolve(tmp_path, None)
    log = EventLog(config)
    try:
        c = Counter(name="r")
        log.append(c.collect_events())
        reader = sqlite3.connect(config.sqlite_path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM stored_events").fetchone()  # holds a read snapshot
        assert not log.warm_up()  # RESTART cannot finish while the reader reads: not done
        reader.execute("COMMIT")
        reader.close()
        assert log.load(c.id).name == "r"
        c.add(2)
        log.append(c.collect_events())
        assert log.load(c.id).total == 2
    finally:
        log.close()
    import shutil
    from collections import namedtuple

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("U", "total used free")(1 << 30, 0, 100 << 20))
    fresh = StoreConfig.resolve(tmp_path / "nearly-full", None)
    small = EventLog(fresh)
    try:
        small.append(Counter(name="s").collect_events())
        assert not small.warm_up()  # 100 MiB free: the space is left to the events
        assert os.path.getsize(fresh.sqlite_path + "-wal") < 1 << 20
    finally:
        small.close()
        monkeypatch.setattr(shutil, "disk_usage", real)
    pg = EventLog(StoreConfig.resolve(".", pg_database))
    try:
        assert not pg.warm_up()
    finally:
        pg.close()


class TestEventLogPostgres(TestEventLog):
    @pytest.fixture
    def store(self, pg_database) -> StoreConfig:
        return StoreConfig.resolve(".", pg_database)

    def test_a_transaction_of_many_megabytes_is_written_in_chunks(self, log, monkeypatch):
        """One INSERT of 7 MB or more hung for good in psycopg's pipeline mode, holding the
        table lock (40 device reports of 200 KB in one burst). Bigger transactions go in
        statements of at most INSERT_CHUNK_BYTES, and their positions come back in order."""
        from actors.device import Device

        recorder = log._app.recorder
        big = Device(product_id="p", device_id="big")
        for i in range(40):
            big.report_state({"k": f"{i:03d}" + "x" * 200_000}, None, 1, None)
        positions = log.append(big.collect_events())  # 8 MB: it returned at all
        assert len(positions) == 41 and positions == list(range(positions[0], positions[0] + 41))
        assert log.load(big.id).state["k"].startswith("039")
        # Small events in chunks of a few: the positions match what the log reads back.
        monkeypatch.setattr(type(recorder), "INSERT_CHUNK_BYTES", 200)
        small = Device(product_id="p", device_id="small")
        for i in range(25):
            small.report_state({"i": i}, None, 1, None)
        positions = log.append(small.collect_events())
        assert [le.position for le in log.read_stream_logged(small.id)] == positions
        assert log.append(Device(product_id="p", device_id="one").collect_events())  # one chunk again


class Reading(Aggregate):
    """Version 2 of an event whose version 1 had no `unit`: old events are upcast on read."""

    @event("Created")
    def __init__(self) -> None:
        self.values: list[tuple[float, str]] = []

    class Taken(Aggregate.Event):
        class_version = 2
        value: float
        unit: str

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["unit"] = "celsius"

        def apply(self, aggregate: Any) -> None:
            aggregate.values.append((self.value, self.unit))


def test_upcasting_old_events(tmp_path):
    log = EventLog(StoreConfig.resolve(tmp_path, None))
    journal = Journal(log)
    try:
        r = Reading()
        r.trigger_event(Reading.Taken, value=21.5, unit="kelvin")
        events = r.collect_events()
        # Store the second event as version 1 would have: no unit, no class_version.
        old = events[1]
        old.__dict__.pop("unit")
        Reading.Taken.class_version = 1
        try:
            journal.commit(events)
        finally:
            Reading.Taken.class_version = 2
        assert log.load(r.id).values == [(21.5, "celsius")]
    finally:
        journal.close()
        log.close()


def test_rows_are_what_eventsourcings_mapper_makes_of_each_event(tmp_path):
    """EventLog maps events to rows itself (StoredRow, not eventsourcing's StoredEvent); the
    bytes must be the mapper's, class_version included, and read back through its mapper."""
    from actors.device.aggregate import Device

    log = EventLog(StoreConfig.resolve(tmp_path, None))
    try:
        d = Device("thermostat", "t-1")
        d.report_status("online", {"temperature": 21.5}, 1, 2, {"fw": "1.0"})
        d.report_state({"mode": "heat", "nested": {"a": [1, 2.5, None, "é"]}}, None, 3, None)
        r = Reading()
        r.trigger_event(Reading.Taken, value=21.5, unit="kelvin")  # class_version 2
        events = d.collect_events() + r.collect_events() + Counter(name="c").collect_events()
        mapper = log._app.mapper
        assert mapper.compressor is None and mapper.cipher is None  # which _stored leaves out
        for row, event in zip(log._stored(events), events, strict=True):
            theirs = mapper.to_stored_event(event)
            assert tuple(row) == (theirs.originator_id, theirs.originator_version, theirs.topic, theirs.state)
            assert vars(mapper.to_domain_event(theirs)) == vars(event)
        log.append(events)
        assert log.load(d.id).state == {"temperature": 21.5, "mode": "heat", "nested": {"a": [1, 2.5, None, "é"]}}
        assert log.load(r.id).values == [(21.5, "kelvin")]
    finally:
        log.close()


def _missing_database(pg_url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(pg_url)._replace(path=f"/parley_missing_{uuid4().hex[:8]}").geturl()


def test_a_missing_postgresql_database_is_named_before_any_pool_opens(tmp_path, pg_url, monkeypatch):
    """One direct connection names the problem; eventsourcing's pool would retry for its
    whole timeout first and then say only that it got no connection."""
    import eventstore.store as store_module

    def no_pool(*a: Any, **k: Any) -> None:
        raise AssertionError("the pool was opened for a database that does not exist")

    monkeypatch.setattr(store_module._ParleyApplication, "__init__", no_pool)
    missing = _missing_database(pg_url)
    with pytest.raises(StoreUnavailable, match=r'database "parley_missing_\w+" does not exist \(create it: createdb'):
        EventLog(StoreConfig.resolve(tmp_path, missing))


def test_a_half_built_log_is_closed_by_the_thread_that_built_it(tmp_path, monkeypatch):
    """The application fails after its factory (and a PostgreSQL pool's threads) exist: the
    factory is closed there and then, and the half-built application's `__del__`, which
    once ran in a pool worker that collected it ("cannot join current thread"), does
    nothing more."""
    import eventstore.store as store_module
    from eventsourcing.application import Application

    closed_by: list[str] = []

    def fail_recorder(self: Any) -> None:
        real_close = self.factory.close
        self.factory.close = lambda: (closed_by.append(threading.current_thread().name), real_close())
        raise RuntimeError("the store went away")

    monkeypatch.setattr(Application, "construct_recorder", fail_recorder)
    with pytest.raises(RuntimeError, match="went away") as caught:
        EventLog(StoreConfig.resolve(tmp_path, None))
    assert closed_by == [threading.current_thread().name]
    half_built = caught.traceback[-1].frame.f_locals["self"]
    assert isinstance(half_built, store_module._ParleyApplication)
    half_built.__del__()  # as the collector would, in any thread
    assert closed_by == [threading.current_thread().name]


def test_ids_a_failed_chunked_insert_left_are_not_handed_to_the_next_commit(tmp_path, pg_database):
    """PostgreSQL, a transaction over 1 MiB inserted in chunks: if the connection drops
    between the chunks and eventsourcing's fetch of the ids, they stayed on the thread,
    and the thread's next commit returned them as its own positions."""
    log = EventLog(StoreConfig.resolve(tmp_path, pg_database))
    try:
        first = Counter(name="first")
        log.append(first.collect_events())
        log._app.recorder._chunked.ids = [999]  # what the failed insert left on this thread
        positions = log.append(Counter(name="next").collect_events())
        assert positions == [log.max_position()] and positions != [999]
    finally:
        log.close()


def test_a_queued_commit_is_withdrawn_on_time_while_a_caller_writes_on_its_own_thread(tmp_path, monkeypatch):
    """An idle journal lets a caller write on its own thread, holding the write lock for as
    long as the store hangs. A commit queued meanwhile must still time out (withdrawn):
    the writer used to take it first and then wait for the lock, past its caller's timeout."""
    from eventstore.journal import JournalTimeout

    log = EventLog(StoreConfig.resolve(tmp_path, None))
    journal = Journal(log)
    try:
        entered, release = stall_appends(monkeypatch, log)
        direct = threading.Thread(target=lambda: journal.commit(Counter(name="direct").collect_events()))
        direct.start()  # the writer is idle: this caller writes itself, and hangs in the store
        assert entered.wait(5)
        late = Counter(name="late")
        started = time.monotonic()
        with pytest.raises(JournalTimeout):
            journal.commit(late.collect_events(), timeout=0.3)
        assert time.monotonic() - started < 5
        release.set()
        direct.join(5)
        journal.commit(Counter(name="after").collect_events())
        assert list(log.read_stream(late.id)) == []  # withdrawn: never written
    finally:
        journal.close()
        log.close()


def test_every_postgresql_connection_gives_up_on_a_server_that_vanished(tmp_path, pg_database):
    """TCP keepalives and a user timeout on the log's pool, the views' pool and the LISTEN
    connection: a partition fails a query in seconds, not after the kernel's 15 minutes."""
    from eventstore.breaker import TCP_LIMITS
    from projections.db import ViewDatabase

    log = EventLog(StoreConfig.resolve(tmp_path, pg_database))
    views = ViewDatabase(StoreConfig.resolve(tmp_path, pg_database))
    try:
        with log._app.recorder.datastore.get_connection() as conn:
            params = conn.info.get_parameters()
        with views._pool.connection() as conn:
            view_params = conn.info.get_parameters()
        for given in (params, view_params):
            assert {k: given.get(k) for k in TCP_LIMITS} == {k: str(v) for k, v in TCP_LIMITS.items()}
    finally:
        views.close()
        log.close()


def _lost_at_commit(monkeypatch, write: Any) -> list[int]:
    """The first PostgreSQL insert runs `write(insert, self, stored_events, **kw)`, then fails
    as a connection lost while its COMMIT was under way would; later ones run normally."""
    from eventsourcing.persistence import OperationalError

    from eventstore import recorders

    real, calls = recorders._insert_once, []

    def insert(self: Any, stored_events: Any, **kw: Any) -> Any:
        calls.append(len(stored_events))
        if len(calls) == 1:
            write(real, self, stored_events, **kw)
            raise OperationalError("server closed the connection unexpectedly")
        return real(self, stored_events, **kw)

    monkeypatch.setattr(recorders, "_insert_once", insert)
    monkeypatch.setattr(recorders.PostgresRecorder, "INSERT_RETRY_WAIT_S", 0.01)
    return calls


def test_a_commit_in_doubt_that_landed_is_not_taken_for_a_conflict(tmp_path, pg_database, monkeypatch):
    """PostgreSQL: the connection is lost while the COMMIT is under way, but the commit
    landed. The retry fails on its own rows; it must return their positions, not report a
    conflict (the caller would store its message again, or fail a command that succeeded)."""
    import structlog.testing

    log = EventLog(StoreConfig.resolve(tmp_path, pg_database))
    try:
        log.append(Counter(name="before").collect_events())
        calls = _lost_at_commit(monkeypatch, lambda real, self, events, **kw: real(self, events, **kw))
        counter = Counter(name="in doubt")
        counter.add(2)
        with structlog.testing.capture_logs() as logs:
            positions = log.append(counter.collect_events())
        assert calls == [2, 2]  # tried again, once
        assert positions == [2, 3] == [le.position for le in log.read_stream_logged(counter.id)]
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["store.commit_in_doubt_landed"]
    finally:
        log.close()


def test_a_commit_in_doubt_that_did_not_land_still_meets_another_writers_events(tmp_path, pg_database,
                                                                                monkeypatch):
    """In doubt, and meanwhile another writer took those versions with other events: that
    is a real conflict (compared byte for byte), reported as one."""
    from eventsourcing.persistence import StoredEvent

    log = EventLog(StoreConfig.resolve(tmp_path, pg_database))
    try:
        def other_writer(real: Any, self: Any, events: Any, **kw: Any) -> None:
            real(self, [StoredEvent(e.originator_id, e.originator_version, e.topic, e.state + b"!")
                        for e in events], **kw)

        _lost_at_commit(monkeypatch, other_writer)
        counter = Counter(name="in doubt")
        with pytest.raises(RecordConflictError):
            log.append(counter.collect_events())
    finally:
        log.close()
