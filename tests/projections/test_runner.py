"""Projections follow the log exactly once, survive restarts, and serve the views."""

from __future__ import annotations

import pytest

from actors.device import DeviceActor, ReportEvent, ReportTelemetry
from actors.ports import FutureReply
from tests.support import create_agent, make_runtime, now_ms, wait_until


def tell(runtime, key, msg_factory):
    r = FutureReply()
    runtime.system.tell(DeviceActor, key, msg_factory(r))
    return r.get(5)


class TestViews:
    # On PostgreSQL our own commit's NOTIFY may wake the runner before the journal hands
    # the events over; it then reads them back (correct, only slower).
    handed_over_in_memory = True

    @pytest.fixture
    def database_url(self):
        return None

    @pytest.fixture
    def runtime(self, tmp_path, database_url):
        rt = make_runtime(tmp_path, database_url)
        yield rt
        rt.close()

    def test_registry_events_and_agents(self, runtime):
        create_agent(runtime, "thermostat")
        assert runtime.agents.get("thermostat").device_spec.commands
        tell(runtime, ("thermostat", "a"), lambda r: ReportTelemetry("status", "online", {"t": 1}, None, now_ms(), reply=r))
        tell(runtime, ("thermostat", "b"), lambda r: ReportTelemetry("status", "offline", None, None, now_ms(), reply=r))
        pos = tell(runtime, ("thermostat", "a"), lambda r: ReportEvent("temperature_alert", {"t": 40}, 7, now_ms(), reply=r))
        assert runtime.projections.wait_for(pos, 5)
        assert [d.device_id for d in runtime.devices.list_devices("thermostat", online=True)] == ["a"]
        assert [d.device_id for d in runtime.devices.list_devices("thermostat", online=False)] == ["b"]
        (a,) = runtime.devices.find("a")
        assert a.state == {"t": 1} and a.online
        (ev,) = runtime.device_events.recent("thermostat", "a", 10)
        if self.handed_over_in_memory:  # this process's commits reach the views without a read
            assert runtime.projections.read_back < runtime.projections.applied
        assert (ev.name, ev.data, ev.device_ts, ev.position) == ("temperature_alert", {"t": 40}, 7, pos)

    def test_position_survives_restart_and_nothing_applies_twice(self, tmp_path, database_url):
        rt = make_runtime(tmp_path, database_url)
        for i in range(5):
            pos = tell(rt, ("p", "d"), lambda r: ReportEvent("e", {"i": i}, None, now_ms(), reply=r))
        assert rt.projections.wait_for(pos, 5)
        rt.close()
        rt = make_runtime(tmp_path, database_url)
        try:
            assert rt.projections.position == pos
            assert len(rt.device_events.recent("p", "d", 100)) == 5
            pos = tell(rt, ("p", "d"), lambda r: ReportEvent("e", {"i": 5}, None, now_ms(), reply=r))
            assert rt.projections.wait_for(pos, 5)
            assert [e.data["i"] for e in rt.device_events.recent("p", "d", 100)] == [5, 4, 3, 2, 1, 0]
        finally:
            rt.close()

    def test_views_rebuild_from_the_log(self, tmp_path, database_url, runtime):
        """Dropping a view's tables and position rebuilds it from the log (the log is the truth)."""
        pos = tell(runtime, ("p", "x"), lambda r: ReportTelemetry("status", "online", {"v": 3}, None, now_ms(), reply=r))
        assert runtime.projections.wait_for(pos, 5)
        with runtime.views_db.transaction() as cur:
            cur.execute("DELETE FROM parley_devices")
            cur.execute("DELETE FROM parley_device_streams")
            cur.execute("DELETE FROM parley_tracking")
        runtime.projections.position = 0
        runtime.projections.catch_up()
        assert runtime.devices.find("x")[0].state == {"v": 3}


class TestViewsPostgres(TestViews):
    handed_over_in_memory = False

    @pytest.fixture
    def database_url(self, pg_database):
        return pg_database


def test_postgres_notify_wakes_a_runner_for_another_processes_commits(pg_database):
    """Two logs on one database stand for two Parley processes: the runner of the first
    follows what the second commits, woken by LISTEN/NOTIFY (its polling is off)."""
    import time

    from actors.device import Device
    from eventstore import EventLog, Journal, StoreConfig
    from projections.db import ViewDatabase
    from projections.device_registry import DeviceRegistry
    from projections.runner import ProjectionRunner

    store = StoreConfig.resolve(".", pg_database)
    reader_log, writer_log = EventLog(store), EventLog(store)
    db = ViewDatabase(store)
    registry = DeviceRegistry(db)
    runner = ProjectionRunner(reader_log, db, [registry], poll_interval=3600)
    runner.start()
    writer = Journal(writer_log)
    try:
        time.sleep(0.5)  # let the listener connect
        device = Device(product_id="p", device_id="elsewhere")
        device.report_status("online", {"t": 1}, None, now_ms(), None)
        position = writer.commit(device.collect_events())[-1]
        deadline = time.monotonic() + 5
        while runner.position < position and time.monotonic() < deadline:
            time.sleep(0.01)  # watch only: wait_for() would nudge the runner itself
        assert runner.position >= position, "NOTIFY did not wake the runner"
        assert registry.find("elsewhere")[0].state == {"t": 1}
        assert runner.read_back == 2  # read from the store: not this process's commit
    finally:
        writer.close()
        runner.stop()
        db.close()
        writer_log.close()
        reader_log.close()


def test_a_waiter_cuts_the_coalescing_short(tmp_path):
    """The runner gathers commits for `coalesce` seconds after a wake-up; someone in
    wait_for() (read-your-writes) must not wait for that."""
    from actors.device import Device
    from eventstore import EventLog, Journal, StoreConfig
    from projections.db import ViewDatabase
    from projections.device_registry import DeviceRegistry
    from projections.runner import ProjectionRunner

    store = StoreConfig.resolve(tmp_path, None)
    log = EventLog(store)
    db = ViewDatabase(store)
    registry = DeviceRegistry(db)
    runner = ProjectionRunner(log, db, [registry], coalesce=3600)  # an hour: only a waiter gets through
    runner.start()
    journal = Journal(log)
    try:
        device = Device(product_id="p", device_id="d")
        device.report_status("online", {"t": 2}, None, now_ms(), None)
        position = journal.commit(device.collect_events())[-1]
        assert runner.wait_for(position, 10), "wait_for waited out the coalescing window"
        assert registry.find("d")[0].state == {"t": 2}
    finally:
        journal.close()
        runner.stop()
        db.close()
        log.close()


class TestSharedDatabase:
    """Two runtimes on one database stand for two Parley processes: one writes the views,
    the other follows the log for its in-memory mirrors and takes over when the first stops."""

    @pytest.fixture
    def database_url(self, tmp_path):
        return None  # SQLite: both runtimes use the same data dir

    @pytest.fixture
    def two(self, tmp_path, database_url):
        a = make_runtime(tmp_path, database_url)
        b = make_runtime(tmp_path, database_url)
        yield a, b
        b.close()
        a.close()

    def test_one_writes_the_views_and_both_mirrors_follow(self, two):
        a, b = two
        assert a.projections.owner and not b.projections.owner
        create_agent(b, "thermostat")  # b's own commit; its wait_for waits for a's tables too
        assert a.agents.get("thermostat") is not None and b.agents.get("thermostat") is not None
        pos = 0
        for i in range(20):
            pos = tell(b, ("thermostat", "d1"), lambda r: ReportTelemetry("state", None, {"i": i}, None, now_ms(), reply=r))
        assert b.projections.wait_for(pos, 10)
        assert b.devices.find("d1")[0].state == {"i": 19}  # the table, written by a
        assert b.devices.products_of("d1") == ("thermostat",) == a.devices.products_of("d1")
        assert a.projections.wait_for(pos, 10)
        assert b.projections.applied == 0 and a.projections.applied == pos  # each event written once
        assert b.projections.followed == a.projections.followed == pos

    def test_the_follower_takes_over_when_the_owner_stops(self, two):
        a, b = two
        create_agent(a, "thermostat")
        a.close()
        assert wait_until(lambda: b.projections.owner, 10), "b never took over"
        pos = tell(b, ("thermostat", "d2"), lambda r: ReportEvent("temperature_alert", {"t": 41}, None, now_ms(), reply=r))
        assert b.projections.wait_for(pos, 10)
        (ev,) = b.device_events.recent("thermostat", "d2", 10)
        assert ev.position == pos and b.projections.stored_position() == pos

    def test_two_runners_that_both_think_they_own_never_apply_twice(self, two):
        a, b = two
        b.projections.owner = True  # e.g. a lock connection that died unnoticed
        pos = 0
        for i in range(10):
            pos = tell(a, ("p", "d3"), lambda r: ReportEvent("e", {"i": i}, None, now_ms(), reply=r))
        assert a.projections.wait_for(pos, 10) and b.projections.wait_for(pos, 10)
        assert a.projections.applied + b.projections.applied == pos  # compare-and-set on the position
        assert [e.data["i"] for e in a.device_events.recent("p", "d3", 100)] == list(range(9, -1, -1))


    def test_a_lagging_follower_catches_up_its_mirrors_before_taking_over(self, tmp_path, database_url):
        from eventstore import EventLog
        from projections.agents import Agents
        from projections.db import ViewDatabase
        from projections.runner import ProjectionRunner

        a = make_runtime(tmp_path, database_url)
        log, db = EventLog(a.store), ViewDatabase(a.store)  # another process's
        agents = Agents(db)
        lagging = ProjectionRunner(log, db, [agents], name="views", poll_interval=3600)  # never started
        try:
            assert not lagging.owner
            create_agent(a, "late")  # a writes the tables; `lagging` has followed nothing
            a.close()
            lagging._next_claim = 0
            lagging.step()  # the tables are ahead of its mirror: it must not jump there
            assert not lagging.owner and agents.get("late") is not None
            lagging._next_claim = 0
            lagging.catch_up()
            assert lagging.owner and agents.get("late") is not None
        finally:
            lagging.stop()
            db.close()
            log.close()


class TestSharedDatabasePostgres(TestSharedDatabase):
    @pytest.fixture
    def database_url(self, pg_database):
        return pg_database
