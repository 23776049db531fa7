"""Projections follow the log exactly once, survive restarts, and serve the views."""

from __future__ import annotations

import re
import time

import pytest

from actors.device import DeviceActor, ReportEvent, ReportTelemetry
from actors.ports import FutureReply
from projections.view import View
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

    IDS = ["10", "9", "A", "Zeta", "a b", "a-b", "a.b", "a_b", "alpha", "café", "ü-x"]  # code point order

    def test_devices_are_listed_in_code_point_order(self, runtime):
        """docs/http-api.md: devices are ordered by deviceId, alike on every store and
        whatever a PostgreSQL database's collation (TestDeviceOrderOnAnIcuDatabase)."""
        for device_id in reversed(self.IDS):
            pos = tell(runtime, ("thermostat", device_id),
                       lambda r: ReportTelemetry("status", "online", None, None, now_ms(), reply=r))
        assert runtime.projections.wait_for(pos, 5)
        assert [d.device_id for d in runtime.devices.list_devices("thermostat")] == self.IDS == sorted(self.IDS)

    def test_an_event_name_with_nul_does_not_stop_the_views(self, runtime):
        """The MQTT gateway refuses such names; a log written before it did still has them,
        and PostgreSQL text cannot hold NUL: the view stores U+FFFD instead and goes on."""
        bad = tell(runtime, ("p", "d"), lambda r: ReportEvent("bad\x00name", {"i": 0}, None, now_ms(), reply=r))
        pos = tell(runtime, ("p", "d"), lambda r: ReportEvent("next", {"i": 1}, None, now_ms(), reply=r))
        assert runtime.projections.wait_for(pos, 5)
        assert [(e.position, e.name) for e in runtime.device_events.recent("p", "d", 10)] == [
            (pos, "next"), (bad, "bad\ufffdname")]

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
            # Paging back from a position (GET .../events?before=): older ones only, newest first.
            third = rt.device_events.recent("p", "d", 100)[2].position
            assert [e.data["i"] for e in rt.device_events.recent("p", "d", 2, before=third)] == [2, 1]
            assert rt.device_events.recent("p", "d", 100, before=2**63 - 1)[0].data["i"] == 5
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


    @pytest.mark.parametrize("path", ["the caller's thread (idle)", "the writer thread (under load)"])
    def test_a_commit_is_known_to_reads_before_its_caller_hears(self, runtime, monkeypatch, path):
        """Read-your-writes: a read after an acknowledgement (an MQTT ack, an HTTP 2xx) waits
        for the views to reach `committed`, so `committed` must move before the caller is
        answered, not after (the writer used to answer first, then publish the commit)."""
        key = ("thermostat", "ryw")
        tell(runtime, key, lambda r: ReportTelemetry("status", "online", {"t": 1}, None, now_ms(), reply=r))
        assert runtime.projections.wait_for(runtime.log.max_position(), 5)
        if path.startswith("the writer"):
            monkeypatch.setattr(runtime.journal, "BUSY_CALLERS", 0)
        publish = runtime.log.publish_committed

        def slow_publish(events, positions):  # the writer losing the GIL at the wrong moment
            time.sleep(0.05)
            publish(events, positions)

        monkeypatch.setattr(runtime.log, "publish_committed", slow_publish)
        pos = tell(runtime, key, lambda r: ReportTelemetry("state", None, {"t": 2}, None, now_ms(), reply=r))
        assert runtime.projections.committed >= pos
        assert runtime.projections.wait_for_committed(2.0)  # what read_view does
        assert runtime.devices.find("ryw")[0].state["t"] == 2

    def test_the_log_is_on_disk_before_a_view_records_a_position(self, runtime, monkeypatch):
        """A power loss must never leave a view ahead of the log (on SQLite they are two
        files): every view transaction first makes the log durable up to its last event."""
        order: list[tuple[str, int]] = []
        make_durable = runtime.log.make_durable
        monkeypatch.setattr(runtime.log, "make_durable",
                            lambda position: (order.append(("durable", position)), make_durable(position)))
        transaction = runtime.views_db.transaction

        def traced_transaction():
            order.append(("view", runtime.projections.position))
            return transaction()

        monkeypatch.setattr(runtime.views_db, "transaction", traced_transaction)
        # QoS 0 telemetry: committed without a flush of its own.
        runtime.system.tell(DeviceActor, ("p", "d"), ReportTelemetry("state", None, {"t": 1}, None, now_ms()))
        runtime.system.tell(DeviceActor, ("p", "d"), ReportTelemetry("state", None, {"t": 2}, None, now_ms()))
        pos = tell(runtime, ("p", "d"), lambda r: ReportEvent("e", {}, None, now_ms(), reply=r))
        assert runtime.projections.wait_for(pos, 5)
        writes = [i for i, (what, _) in enumerate(order) if what == "view"]
        assert writes, "the runner wrote no view"
        for i in writes:
            assert order[i - 1][0] == "durable" and order[i - 1][1] > order[i][1]  # up to the batch's end


class TestViewsPostgres(TestViews):
    handed_over_in_memory = False

    @pytest.fixture
    def database_url(self, pg_database):
        return pg_database


@pytest.fixture
def icu_database(pg_url):
    """A fresh database whose collation is ICU's en-US (a database made with the cluster's
    en_US.UTF-8 locale orders alike): not code point order."""
    from tests import services

    admin = services.pg_admin_url()
    try:
        url = services.create_database(admin, icu_locale="en-US")
    except Exception as exc:  # noqa: BLE001 - a server built without ICU
        if services.require_services():
            pytest.fail(f"PARLEY_REQUIRE_SERVICES=1: no ICU collation on this PostgreSQL: {exc}", pytrace=False)
        pytest.skip(f"no ICU collation on this PostgreSQL: {exc}")
    try:
        yield url
    finally:
        services.drop_database(admin, url)


def test_devices_are_listed_in_code_point_order_on_an_icu_database(tmp_path, icu_database):
    rt = make_runtime(tmp_path, icu_database)
    try:
        TestViews.test_devices_are_listed_in_code_point_order(TestViews(), rt)
    finally:
        rt.close()


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

    def test_a_view_halted_by_the_owner_is_resumed_by_the_process_taking_over(self, two, monkeypatch):
        a, b = two
        first = tell(a, ("p", "d5"), lambda r: ReportEvent("before", {}, None, now_ms(), reply=r))
        assert a.projections.wait_for(first, 5)
        _failing_apply(monkeypatch, None, RuntimeError("a view bug"))
        halted_at = tell(a, ("p", "d5"), lambda r: ReportEvent("e", {}, None, now_ms(), reply=r))
        assert a.projections.wait_for(halted_at, 30) and "device_events" in a.projections.halted
        assert not b.projections.halted  # a follower writes no table: it has nothing halted
        monkeypatch.undo()  # b runs a version without the bug
        a.close()
        assert wait_until(lambda: b.projections.owner and not b.projections.halted, 15), "b did not resume it"
        assert _halts(b) == []
        last = tell(b, ("p", "d5"), lambda r: ReportEvent("after", {}, None, now_ms(), reply=r))
        assert b.projections.wait_for(last, 10)
        assert [e.position for e in b.device_events.recent("p", "d5", 10)] == [last, halted_at, first]

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


    def test_a_follower_whose_mirror_is_ahead_takes_over_and_applies_updates_and_deletes(
            self, tmp_path, database_url):
        """The owner stops behind the log; the follower's mirror has already followed an
        update and a deletion when it takes over and goes back to the tables' position.
        Which agent those events touch comes from the table, not from the mirror (where the
        deleted agent no longer is): otherwise the table kept the deleted agent, which came
        back after a restart and could not be deleted."""
        from actors.agent import AgentActor, DeleteAgent, UpdateAgent
        from eventstore import EventLog
        from projections.agents import Agents
        from projections.db import ViewDatabase
        from projections.runner import ProjectionRunner

        a = make_runtime(tmp_path, database_url)
        log, db = EventLog(a.store), ViewDatabase(a.store)  # another process's
        agents = Agents(db)
        b = ProjectionRunner(log, db, [agents], name="views", poll_interval=3600)
        try:
            create_agent(a, "kept")
            create_agent(a, "gone")  # a writes the tables: both are there
            assert not b.owner
            a.projections.stop()  # the owner stops behind the log (e.g. shutting down)
            r = FutureReply()
            a.system.tell(AgentActor, ("kept",), UpdateAgent({"name": "renamed"}, reply=r))
            r.get(5)
            r = FutureReply()
            a.system.tell(AgentActor, ("gone",), DeleteAgent(None, reply=r))
            deleted_at = r.get(5)
            b._next_claim = 1e18
            b.catch_up()  # b follows the log: its mirror has the update and no 'gone'
            assert agents.get("gone") is None and b.position == deleted_at
            b._next_claim = 0
            b.catch_up()  # b takes over from the tables' position and writes from there
            assert b.owner and b.stored_position() == deleted_at
            assert [r[0] for r in db.query("SELECT agent_id FROM parley_agents")] == ["kept"]
            restarted = Agents(db)
            with db.transaction() as cur:
                restarted.create(cur)  # what a process starting now loads
            assert [x.agent_id for x in restarted.list()] == ["kept"]
            assert restarted.get("kept").config["name"] == "renamed" == agents.get("kept").config["name"]
        finally:
            b.stop()
            db.close()
            log.close()
            a.close()

    def test_a_read_after_a_command_answered_through_the_log_sees_the_answer(self, tmp_path, database_url):
        """B (a follower) sends a command; the device answers on A (the owner), which
        commits the device's report and the outcome; B learns the outcome from the log and
        answers 200. A read on B right after must see the report, though A gathers its
        commits for a while before it writes its tables: B waits for the position it
        learned the outcome at, not only for its own commits."""
        import threading

        from actors.device import DeviceResponded, SendCommand

        class AnsweredOnA:
            connected = True

            def publish_command(self, product_id, device_id, payload):
                sent = a.log.max_position()  # CommandSent is committed before it is published

                def device():
                    # The device answers once A knows of the command (A's actor settles it)
                    # and A has written its tables: what it reports next waits in A's gathering.
                    wait_until(lambda: a.projections.position >= sent and a.projections.owner, 5)
                    tell(a, (product_id, device_id), lambda r: ReportTelemetry(
                        "state", None, {"target": payload["params"]["target_temperature"]}, None, now_ms(), reply=r))
                    a.system.tell(DeviceActor, (product_id, device_id), DeviceResponded(
                        payload["requestId"], 0, "ok", {}, now_ms()))
                threading.Thread(target=device).start()
                return payload["requestId"]

            def withdraw(self, handle):
                pass

        a = make_runtime(tmp_path, database_url)
        b = make_runtime(tmp_path, database_url)
        try:
            assert a.projections.owner and not b.projections.owner
            a.projections.coalesce = 0.3  # the owner writes its tables 0.3 s after a commit
            b.projections.poll_interval = 0.02  # SQLite: B follows within 20 ms (no NOTIFY)
            b.projections._wake.set()
            b.attach_device_link(AnsweredOnA())
            create_agent(a, "thermostat")
            tell(b, ("thermostat", "d5"), lambda r: ReportTelemetry("status", "online", None, None, now_ms(), reply=r))
            stale = []
            for i in range(3):
                answer = tell(b, ("thermostat", "d5"), lambda r: SendCommand(
                    f"c{i}", "set_target_temperature", {"target_temperature": i}, 5000, reply=r))
                assert answer["code"] == 0  # B's caller hears 200
                assert b.projections.wait_for_committed(2.0)  # what read_view does
                (row,) = b.devices.find("d5")
                if row.state.get("target") != i:
                    stale.append((i, row.state))
            assert stale == []
        finally:
            b.close()
            a.close()


class TestSharedDatabasePostgres(TestSharedDatabase):
    @pytest.fixture
    def database_url(self, pg_database):
        return pg_database


def test_each_view_gets_only_the_event_types_it_reads_in_log_order():
    from uuid import uuid4

    from actors.device import Device
    from eventstore import LoggedEvent
    from projections.runner import ProjectionRunner

    class Reads(View):
        def __init__(self, types):
            super().__init__(None)
            self.event_types = types

        def apply(self, cur, events) -> None:
            pass

    def logged(position, event_class):
        return LoggedEvent(position, uuid4(), 1, event_class.__name__, object.__new__(event_class))

    state, alert = Device.StateReported, Device.EventReported
    everything, states, alerts = Reads(None), Reads(frozenset({state})), Reads(frozenset({alert}))
    only_states = [logged(1, state), logged(2, state)]
    kinds = {state}
    assert ProjectionRunner._for(everything, only_states, kinds) is only_states
    assert ProjectionRunner._for(states, only_states, kinds) is only_states  # whole, not copied
    assert ProjectionRunner._for(alerts, only_states, kinds) == []
    mixed = [logged(1, state), logged(2, alert), logged(3, state)]
    kinds = {state, alert}
    assert [le.position for le in ProjectionRunner._for(states, mixed, kinds)] == [1, 3]
    assert [le.position for le in ProjectionRunner._for(alerts, mixed, kinds)] == [2]
    assert ProjectionRunner._for(everything, mixed, kinds) is mixed


class FailOnce(View):
    """A view that raises in `apply` when armed: the batch's view transaction rolls back."""

    name = "fail_once"

    def __init__(self) -> None:
        super().__init__(None)
        self.armed = False
        self.committed = 0

    def apply(self, cur, events) -> None:
        if self.armed:
            self.armed = False
            raise RuntimeError("a view bug")

    def after_commit(self) -> None:
        self.committed += 1


class TestRegistryRowCache:
    """The registry keeps the rows it wrote last (`_cache`) and reads no row back while this
    process wrote every batch since (the runner's `tables_at`); a rolled-back batch leaves
    the cache as it was; once another process wrote the tables, the cache is dropped."""

    P = "thermostat"

    @pytest.fixture
    def database_url(self):
        return None

    @pytest.fixture
    def parts(self, tmp_path, database_url):
        from eventstore import EventLog, Journal, StoreConfig
        from projections.db import ViewDatabase
        from projections.device_registry import DeviceRegistry
        from projections.runner import ProjectionRunner

        store = StoreConfig.resolve(tmp_path, database_url)
        log = EventLog(store)
        journal = Journal(log)
        db = ViewDatabase(store)
        registry, failing = DeviceRegistry(db), FailOnce()
        # Never started: the test drives it, so every batch boundary is known.
        runner = ProjectionRunner(log, db, [registry, failing], batch=3, poll_interval=3600)
        assert runner.owner
        yield store, log, journal, db, registry, failing, runner
        runner.stop()
        journal.close()
        db.close()
        log.close()

    @staticmethod
    def row_selects(db, table: str = "parley_(devices|device_streams)") -> list[str]:
        """The reads of device rows (or of `parley_device_streams`) inside view transactions
        (`DeviceRegistry._prefetch` and `_row`; the queries of `find` and `list_devices` end
        in ORDER BY), traced on this thread's SQLite connection. Not traced on PostgreSQL:
        there the checks on the rows must do."""
        seen: list[str] = []

        def trace(sql: str) -> None:
            if re.match(rf"SELECT .* FROM {table} WHERE ", sql) and "ORDER BY" not in sql:
                seen.append(sql)

        if not db.is_postgres:
            db._sqlite().set_trace_callback(trace)
        return seen

    @staticmethod
    def settle(journal, runner, *devices) -> None:
        """Commit the devices' pending events in one transaction; the runner applies them."""
        journal.commit([e for d in devices for e in d.collect_events()])
        runner.catch_up()

    def online(self, journal, runner, device_id: str, state: dict | None = None):
        """A device that has reported itself online (at 1000 ms), applied to the views."""
        from actors.device import Device

        d = Device(product_id=self.P, device_id=device_id)
        d.report_status("online", state, None, 1000, None)
        self.settle(journal, runner, d)
        return d

    def check_rows(self, log, registry, devices) -> None:
        """Every device's table row is what its stream says, and the cache holds that row."""
        from actors.device import Device

        for device_id in devices:
            (row,) = registry.find(device_id, self.P)  # from the table
            device = log.load(Device.create_id(self.P, device_id))
            assert (row.online, row.state, row.last_seen_ms) == (device.online, device.state, device.last_seen_ms), device_id
            # Registered when its first message arrived (received_ms) if that was earlier.
            first = next(e.received_ms for e in log.read_stream(device.id) if hasattr(e, "received_ms"))
            assert row.registered_ms == min(int(device.created_on.timestamp() * 1000), first)
            assert registry._cache[(self.P, device_id)] == row, device_id

    def test_rows_from_the_cache_match_the_log_across_many_batches(self, parts):
        from actors.device import Device

        _, log, journal, db, registry, _, runner = parts
        devices = {f"c{i}": Device(product_id=self.P, device_id=f"c{i}") for i in range(3)}
        t = 1000
        for i, d in enumerate(devices.values()):
            d.report_status("online", {"mode": "auto", "i": i}, None, t, None)
        self.settle(journal, runner, *devices.values())
        selects = self.row_selects(db)
        for step in range(8):  # each round spans batches of 3, several per device
            for i, d in enumerate(devices.values()):
                t += 10
                if step == 3 and i == 0:
                    d.go_silent(d.last_seen_ms, 1000)
                elif step == 5 and i == 1:
                    d.report_status("offline", None, None, t, None)
                elif step == 6 and i == 2:
                    d.report_event("temperature_alert", {"t": 40}, None, t, None)
                else:
                    d.report_state({f"k{step % 3}": step, "nested": {"step": step}}, None, t, None)
            self.settle(journal, runner, *devices.values())
            self.check_rows(log, registry, devices)
        assert registry.tables_at == runner.position == log.max_position()
        assert runner.applied == log.max_position()
        assert selects == []  # every batch continued the last: no row was read back
        assert registry.find("c0")[0].state == {"mode": "auto", "i": 0, "k0": 6, "k1": 7, "k2": 5, "nested": {"step": 7}}

    def test_positions_the_registry_does_not_read_keep_the_cache(self, parts):
        """Commands in flight and agent events lie between the registry's events (and on
        PostgreSQL a rolled-back insert leaves a gap in the positions): none of that means
        another process wrote the table, so no row is read back."""
        _, log, journal, db, registry, _, runner = parts
        d = self.online(journal, runner, "g1", {"a": 1})
        selects = self.row_selects(db)
        for i in range(4):
            d.send_command(f"r{i}", "set_target_temperature", {"target_temperature": 20 + i}, 5000, 1100 + i)
            self.settle(journal, runner, d)  # not a registry event: a gap in what it reads
            d.command_succeeded(f"r{i}", 0, "ok", {}, 1200 + i)
            d.report_state({"target_temperature": 20 + i}, None, 1300 + i, None)
            self.settle(journal, runner, d)
            self.check_rows(log, registry, ["g1"])
        assert registry.tables_at == runner.position == log.max_position()
        assert selects == []

    def test_last_seen_follows_the_stream_when_the_clock_steps_back(self, parts):
        """lastSeen is the receive time of the device's latest message, as its aggregate
        folds it (liveness compares it with the same clock), even if that clock was stepped
        back between two messages: the view must not keep the later-looking time."""
        from actors.device import Device

        _, log, journal, db, registry, _, runner = parts
        d = Device(product_id=self.P, device_id="s1")
        d.report_status("online", None, None, 50_000, None)
        self.settle(journal, runner, d)
        d.report_event("temperature_alert", {"t": 40}, None, 40_000, None)  # the clock stepped back
        self.settle(journal, runner, d)
        assert registry.find("s1")[0].last_seen_ms == 40_000
        d.send_command("r1", "set_target_temperature", {"target_temperature": 21}, 5000, 41_000)
        d.command_succeeded("r1", 0, "ok", {}, 30_000)  # and back again
        self.settle(journal, runner, d)
        assert registry.find("s1")[0].last_seen_ms == 30_000
        self.check_rows(log, registry, ["s1"])

    def test_a_rolled_back_batch_leaves_the_cache_as_it_was(self, parts):
        _, log, journal, db, registry, failing, runner = parts
        d = self.online(journal, runner, "r1", {"a": 1})
        key = (self.P, "r1")
        before, position = registry.find("r1")[0], runner.position
        assert registry._cache[key] == before and registry.tables_at == position

        d.report_status("offline", {"b": 2}, None, 2000, None)
        journal.commit(d.collect_events())
        failing.armed = True
        with pytest.raises(RuntimeError, match="a view bug"):
            runner.step()
        assert runner.position == runner.stored_position() == position
        assert registry.find("r1")[0] == before  # the table: rolled back
        assert registry._cache[key] == before  # the cache: as it was, not what the batch computed
        assert registry.tables_at == position

        selects = self.row_selects(db)
        d.report_state({"c": 3}, None, 3000, None)
        self.settle(journal, runner, d)
        (row,) = registry.find("r1")
        assert (row.online, row.state, row.last_seen_ms) == (True, {"a": 1, "b": 2, "c": 3}, 3000)
        self.check_rows(log, registry, ["r1"])
        assert selects == []  # the table was still what the cache said: nothing read back
        assert failing.committed == 2  # after_commit only for the batches that committed

    def test_rows_memory_lacks_are_read_a_few_hundred_to_a_query(self, parts):
        """A process that just started knows no row and no stream (nor does one with more
        devices than its caches hold): the rows a batch needs are read 500 to a query, not
        one by one (on PostgreSQL each was a round trip). A device id that two products
        share gets each product's own row."""
        from actors.device import Device

        _, log, journal, db, registry, _, runner = parts
        runner.batch = 5000
        devices = [Device(product_id=self.P, device_id=f"m{i}") for i in range(620)]
        twin = Device(product_id="other", device_id="m7")
        for d in (*devices, twin):
            d.report_status("online", {"first": d.product_id}, None, 1000, None)
        self.settle(journal, runner, *devices, twin)
        registry._cache.clear()
        registry._keys.clear()
        selects = self.row_selects(db)
        for i, d in enumerate(devices):
            d.report_state({"i": i}, None, 2000 + i, None)
        twin.report_state({"twin": True}, None, 3000, None)
        self.settle(journal, runner, *devices, twin)
        self.check_rows(log, registry, [d.device_id for d in devices])
        (row,) = registry.find("m7", "other")
        assert (row.state, row.last_seen_ms) == ({"first": "other", "twin": True}, 3000)
        assert registry.find("m7", self.P)[0].state == {"first": self.P, "i": 7}
        if not db.is_postgres:
            streams = [q for q in selects if "FROM parley_device_streams" in q]
            assert len(streams) == 2  # 621 streams: 500 + 121
            assert len(selects) - len(streams) == 2  # 620 device ids (m7 once for both products): 500 + 120

    def test_a_batch_written_by_another_process_clears_the_cache(self, parts):
        from projections.db import ViewDatabase
        from projections.device_registry import DeviceRegistry
        from projections.runner import ProjectionRunner

        store, log, journal, db, registry, _, runner = parts
        d = self.online(journal, runner, "o1", {"a": 1})
        assert registry._cache[(self.P, "o1")].state == {"a": 1}

        # Another process writes the next batch of the same views (it believes it owns them).
        other_db = ViewDatabase(store)
        other = ProjectionRunner(log, other_db, [DeviceRegistry(other_db)], poll_interval=3600)
        try:
            assert not other.owner
            other.owner = True
            d.report_state({"x": 9}, None, 2000, None)
            journal.commit(d.collect_events())
            other.step()
            assert other.stored_position() == log.max_position()
        finally:
            other.stop()
            other_db.close()
        runner.step()  # the tables moved on without us: we follow, and write nothing
        assert not runner.owner and runner.position == log.max_position()

        selects = self.row_selects(db)
        d.report_state({"y": 1}, None, 3000, None)
        journal.commit(d.collect_events())
        runner._next_claim = 0  # take the views back now, not after the poll interval
        runner.catch_up()
        assert runner.owner
        (row,) = registry.find("o1")
        assert row.state == {"a": 1, "x": 9, "y": 1}  # not {"a": 1, "y": 1} from a stale cache
        self.check_rows(log, registry, ["o1"])
        if not db.is_postgres:
            assert len(selects) == 1  # the row was read back from the table, once
        assert registry.tables_at == runner.position


class TestRegistryRowCachePostgres(TestRegistryRowCache):
    @pytest.fixture
    def database_url(self, pg_database):
        return pg_database


def test_an_owner_commit_while_a_process_starts_is_followed(tmp_path, pg_database):
    """On PostgreSQL each statement of the start-up transaction sees the commits made
    before it. The owner commits a batch after a starting process has loaded its mirrors:
    the process must still follow that batch (its position was read before the mirrors,
    not after, which skipped it: the agent was never known to this process)."""
    from eventstore import EventLog
    from projections.agents import Agents
    from projections.db import ViewDatabase
    from projections.runner import ProjectionRunner

    a = make_runtime(tmp_path, pg_database)
    log, db = EventLog(a.store), ViewDatabase(a.store)  # another process's

    class OwnerCommitsMeanwhile(Agents):
        def create(self, cur):
            super().create(cur)  # the mirror, loaded from parley_agents
            create_agent(a, "late")  # the owner commits a batch (and writes its tables)

    agents = OwnerCommitsMeanwhile(db)
    b = ProjectionRunner(log, db, [agents], name="views", poll_interval=3600)
    try:
        assert not b.owner and b.position < a.agents.get("late").id
        b.catch_up()
        assert agents.get("late") is not None
    finally:
        b.stop()
        db.close()
        log.close()
        a.close()


def test_a_process_starting_locks_no_view_table_against_writes(tmp_path, pg_database):
    """Every process creates the view tables if they are missing, in its start-up
    transaction. On PostgreSQL, CREATE INDEX IF NOT EXISTS and ALTER TABLE lock the table
    even when there is nothing to do (SHARE, ACCESS EXCLUSIVE): a process starting would
    hold up the owner's view writes, and reads too, for that whole transaction."""
    import psycopg

    from eventstore import StoreConfig
    from projections.agents import Agents
    from projections.db import ViewDatabase
    from projections.device_events import DeviceEvents
    from projections.device_registry import DeviceRegistry

    make_runtime(tmp_path, pg_database).close()  # the tables exist
    db = ViewDatabase(StoreConfig(pg_database))
    registry = DeviceRegistry(db)
    with psycopg.connect(pg_database, autocommit=True) as watcher, db.transaction() as cur:
        for view in (registry, DeviceEvents(db, registry), Agents(db)):
            view.create(cur)
        locks = watcher.execute(
            "SELECT c.relname, l.mode FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
            " WHERE c.relname LIKE 'parley%' AND l.pid <> pg_backend_pid()").fetchall()
    assert locks and {mode for _, mode in locks} == {"AccessShareLock"}, locks
    db.close()


# parley_devices as views made before the liveness index was dropped had it.
OLD_REGISTRY_SCHEMA = (
    "CREATE TABLE parley_devices (product_id TEXT NOT NULL, device_id TEXT NOT NULL, online INTEGER NOT NULL,"
    " state TEXT NOT NULL, last_seen_ms BIGINT NOT NULL, registered_ms BIGINT NOT NULL,"
    " pending INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (product_id, device_id))",
    "CREATE INDEX parley_devices_by_id ON parley_devices (device_id)",
    "CREATE INDEX parley_devices_liveness ON parley_devices (online, last_seen_ms)",
    "CREATE TABLE parley_device_streams (stream_id TEXT PRIMARY KEY, product_id TEXT NOT NULL, device_id TEXT NOT NULL)",
)


class TestRegistryTable:
    """Every message a device sends rewrites its row in parley_devices. On PostgreSQL that
    update must be HOT (no new index entries, the old version reclaimed without VACUUM):
    no index on a column it changes, and room for the new version in the row's page (a
    fillfactor). Views made before had an index on (online, last_seen_ms): a start drops it."""

    P = "thermostat"

    @pytest.fixture
    def database_url(self):
        return None

    @pytest.fixture
    def db(self, tmp_path, database_url):
        from eventstore import StoreConfig
        from projections.db import ViewDatabase

        db = ViewDatabase(StoreConfig.resolve(tmp_path, database_url))
        yield db
        db.close()

    @staticmethod
    def indexes(db) -> set[str]:
        if db.is_postgres:
            sql = "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() AND tablename = 'parley_devices'"
        else:  # sql IS NULL: the primary key's automatic index
            sql = "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'parley_devices' AND sql IS NOT NULL"
        return {r[0] for r in db.query(sql)}

    @staticmethod
    def reloptions(db) -> list[str] | None:
        return db.query("SELECT reloptions FROM pg_class WHERE oid = to_regclass('parley_devices')")[0][0]

    @staticmethod
    def create(db, registry) -> None:
        """What a process starting does (ProjectionRunner.__init__)."""
        with db.transaction() as cur:
            registry.create(cur)

    def report(self, db, registry, device, position: int) -> int | None:
        """Apply the device's pending events as the runner does, in one view transaction;
        on PostgreSQL, the number of HOT updates of parley_devices it made."""
        from eventstore import LoggedEvent

        events = [LoggedEvent(position + i, device.id, e.originator_version, "", e)
                  for i, e in enumerate(device.collect_events())]
        with db.transaction() as cur:
            # Counted within the transaction: these counters move with each statement,
            # and reach the shared statistics only after the commit.
            sql = "SELECT pg_stat_get_xact_tuples_hot_updated(to_regclass('parley_devices'))"
            if db.is_postgres:
                cur.execute(sql)
                before = cur.fetchone()[0]
            registry.apply(cur, events)
            hot = None
            if db.is_postgres:
                cur.execute(sql)
                hot = cur.fetchone()[0] - before
        registry.after_commit()
        return hot

    def test_a_new_view_has_no_index_on_what_messages_change(self, db):
        from projections.device_registry import DeviceRegistry

        self.create(db, DeviceRegistry(db))
        assert self.indexes(db) == ({"parley_devices_pkey", "parley_devices_by_id"} if db.is_postgres
                                    else {"parley_devices_by_id"})
        if db.is_postgres:
            assert self.reloptions(db) == [f"fillfactor={DeviceRegistry.FILLFACTOR}"]

    def test_a_view_made_before_loses_its_liveness_index_at_start(self, db):
        from actors.device import Device
        from projections.device_registry import DeviceRegistry

        with db.transaction() as cur:
            for statement in OLD_REGISTRY_SCHEMA:
                cur.execute(statement)
        registry = DeviceRegistry(db)
        d = Device(product_id=self.P, device_id="old")
        d.report_status("online", {"t": 1}, None, 1000, None)
        self.report(db, registry, d, 1)
        d.report_state({"t": 2}, None, 2000, None)
        # The old table: no update of a device row is HOT (last_seen_ms is indexed).
        assert self.report(db, registry, d, 3) == (0 if db.is_postgres else None)
        assert "parley_devices_liveness" in self.indexes(db)

        registry = DeviceRegistry(db)  # the next process
        self.create(db, registry)
        assert "parley_devices_liveness" not in self.indexes(db)
        assert "parley_devices_by_id" in self.indexes(db)
        if db.is_postgres:
            assert self.reloptions(db) == [f"fillfactor={DeviceRegistry.FILLFACTOR}"]
        assert registry.products_of("old") == (self.P,)
        (row,) = registry.find("old")
        assert (row.online, row.state, row.last_seen_ms) == (True, {"t": 2}, 2000)
        # The liveness sweep still finds who is silent, now by scanning the table.
        assert registry.stale(2001) == [(self.P, "old")] and registry.stale(2000) == []
        for t in (3000, 4000):
            d.report_state({"t": t}, None, t, None)
            assert self.report(db, registry, d, t) == (1 if db.is_postgres else None)
        assert registry.find("old")[0].state == {"t": 4000}

        self.create(db, DeviceRegistry(db))  # and the start after that finds nothing to change
        assert "parley_devices_liveness" not in self.indexes(db)


class TestRegistryTablePostgres(TestRegistryTable):
    @pytest.fixture
    def database_url(self, pg_database):
        return pg_database

    def test_a_fillfactor_set_by_hand_is_kept(self, db):
        from projections.device_registry import DeviceRegistry

        with db.transaction() as cur:
            for statement in OLD_REGISTRY_SCHEMA:
                cur.execute(statement)
            cur.execute("ALTER TABLE parley_devices SET (fillfactor = 70)")
        self.create(db, DeviceRegistry(db))
        assert self.reloptions(db) == ["fillfactor=70"]
        assert "parley_devices_liveness" not in self.indexes(db)


def _failing_apply(monkeypatch, times: int | None, error: Exception) -> list[int]:
    """The device events view fails `times` times (None: always) on its next batches."""
    from projections.device_events import DeviceEvents

    real, calls = DeviceEvents.apply, []

    def apply(self, cur, events):
        calls.append(len(events))
        if times is None or len(calls) <= times:
            raise error
        return real(self, cur, events)

    monkeypatch.setattr(DeviceEvents, "apply", apply)
    return calls


@pytest.mark.parametrize("error", [RuntimeError("a passing view bug"),
                                   __import__("sqlite3").OperationalError("database is locked")])
def test_reads_wait_through_a_failure_the_retry_gets_past(tmp_path, monkeypatch, error):
    """A batch that fails once (a lock, a blip) is retried a second later: a read waiting
    for it waits (read-your-writes), it is not told the views are stuck."""
    runtime = make_runtime(tmp_path, None)
    try:
        calls = _failing_apply(monkeypatch, 1, error)
        pos = tell(runtime, ("p", "d"), lambda r: ReportEvent("e", {}, None, now_ms(), reply=r))
        assert runtime.projections.wait_for(pos, 30)
        assert len(calls) == 2 and not runtime.projections.stuck
        assert [e.position for e in runtime.device_events.recent("p", "d", 10)] == [pos]
    finally:
        runtime.close()


def _failing_follow(monkeypatch) -> list[int]:
    """The device registry's in-memory mirror fails on every batch from now on."""
    from projections.device_registry import DeviceRegistry

    calls: list[int] = []

    def follow(self, events):
        calls.append(len(events))
        raise RuntimeError("a mirror bug")

    monkeypatch.setattr(DeviceRegistry, "follow", follow)
    return calls


def test_reads_stop_waiting_for_views_stuck_on_an_event(tmp_path, monkeypatch):
    """The same error again on the retry at the same position, outside a view's tables (an
    in-memory mirror): the views cannot get past that event by themselves, and a read no
    longer waits out its whole wait for them. The tables the batch was written to before
    the mirror failed are not written twice, and the process keeps them."""
    runtime = make_runtime(tmp_path, None)
    try:
        calls = _failing_follow(monkeypatch)
        pos = tell(runtime, ("p", "d"), lambda r: ReportEvent("e", {}, None, now_ms(), reply=r))
        started = time.monotonic()
        assert not runtime.projections.wait_for(pos, 600)
        assert time.monotonic() - started < 60 and len(calls) >= 2 and runtime.projections.stuck
        assert not runtime.projections.wait_for_committed(600)  # at once now
        assert runtime.projections.owner and not runtime.projections.halted
        monkeypatch.undo()  # the mirror fixed: it goes on, and reads wait for it again
        assert wait_until(lambda: runtime.projections.position >= pos, 30)
        assert not runtime.projections.stuck and runtime.projections.wait_for(pos, 5)
        assert runtime.projections.owner  # it never lost the views to itself
        assert [e.position for e in runtime.device_events.recent("p", "d", 10)] == [pos]
        assert runtime.devices.products_of("d") == ("p",)
    finally:
        runtime.close()


def test_the_database_failing_again_and_again_halts_no_view(tmp_path, monkeypatch):
    """A database that is locked (or down) fails every view alike, and is not the view's
    fault: the batch is tried every second until it goes through, the view is not halted."""
    runtime = make_runtime(tmp_path, None)
    try:
        calls = _failing_apply(monkeypatch, 3, __import__("sqlite3").OperationalError("database is locked"))
        pos = tell(runtime, ("p", "d"), lambda r: ReportEvent("e", {}, None, now_ms(), reply=r))
        assert runtime.projections.wait_for(pos, 30)
        assert len(calls) == 4 and not runtime.projections.halted and not runtime.projections.stuck
        assert [e.position for e in runtime.device_events.recent("p", "d", 10)] == [pos]
    finally:
        runtime.close()


def _halts(runtime) -> list[tuple]:
    return runtime.views_db.query("SELECT view, position FROM parley_view_halts WHERE runner = 'views'")


def test_a_view_that_cannot_apply_an_event_is_halted_and_the_others_go_on(tmp_path, monkeypatch):
    """The events view fails on a batch, again on the retry: it stops at the position its
    table reflects (recorded with the others' next batch), and the registry, the agents and
    every read go on; nothing waits for the halted view."""
    runtime = make_runtime(tmp_path, None)
    try:
        first = tell(runtime, ("p", "d"), lambda r: ReportEvent("before", {}, None, now_ms(), reply=r))
        assert runtime.projections.wait_for(first, 5)
        calls = _failing_apply(monkeypatch, None, RuntimeError("a view bug"))
        pos = tell(runtime, ("p", "d"), lambda r: ReportEvent("e", {"n": 1}, 5, now_ms(), reply=r))
        started = time.monotonic()
        assert runtime.projections.wait_for(pos, 30)  # the other views went on
        assert time.monotonic() - started < 10 and len(calls) == 2  # tried twice, then halted
        halt = runtime.projections.halted["device_events"]
        assert (halt.position, halt.error) == (first, "RuntimeError('a view bug')")
        assert _halts(runtime) == [("device_events", first)]
        assert not runtime.projections.stuck and not runtime.projections.failing
        later = tell(runtime, ("p", "d"), lambda r: ReportTelemetry("state", None, {"t": 2}, None, now_ms(), reply=r))
        assert runtime.projections.wait_for_committed(5) and runtime.projections.position >= later
        assert runtime.devices.find("d")[0].state == {"t": 2}  # the registry follows the log
        assert [e.name for e in runtime.device_events.recent("p", "d", 10)] == ["before"]  # stopped
        assert len(calls) == 2  # a halted view is not tried on later batches
    finally:
        runtime.close()


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_a_halted_view_catches_up_from_where_it_stopped_at_the_next_start(tmp_path, monkeypatch, request, store):
    url = request.getfixturevalue("pg_database") if store == "postgres" else None
    runtime = make_runtime(tmp_path, url)
    try:
        first = tell(runtime, ("p", "d"), lambda r: ReportEvent("before", {}, None, now_ms(), reply=r))
        assert runtime.projections.wait_for(first, 5)
        _failing_apply(monkeypatch, None, RuntimeError("a view bug"))
        positions = [tell(runtime, ("p", "d"), lambda r, i=i: ReportEvent(f"e{i}", {}, None, now_ms(), reply=r))
                     for i in range(3)]
        assert runtime.projections.wait_for(positions[-1], 30)
        assert "device_events" in runtime.projections.halted
    finally:
        runtime.close()
    # Started again with the bug still there: it stays halted, the server starts all the same.
    runtime = make_runtime(tmp_path, url)
    try:
        assert runtime.projections.halted["device_events"].position == first
        more = tell(runtime, ("p", "d"), lambda r: ReportEvent("e3", {}, None, now_ms(), reply=r))
        assert runtime.projections.wait_for(more, 10)
        positions.append(more)
        assert [e.name for e in runtime.device_events.recent("p", "d", 10)] == ["before"]
    finally:
        runtime.close()
    monkeypatch.undo()  # a version without the bug
    runtime = make_runtime(tmp_path, url)
    try:
        assert not runtime.projections.halted and _halts(runtime) == []
        got = runtime.device_events.recent("p", "d", 10)
        assert [e.position for e in got] == [*reversed(positions), first]  # each once, in order
        last = tell(runtime, ("p", "d"), lambda r: ReportEvent("e4", {}, None, now_ms(), reply=r))
        assert runtime.projections.wait_for(last, 5)
        assert runtime.device_events.recent("p", "d", 1)[0].position == last  # back with the others
    finally:
        runtime.close()


def test_a_view_failing_on_an_event_at_start_is_halted_there(tmp_path, monkeypatch):
    """A log whose events a view cannot apply (written by a version without the bug, say)
    does not keep the server from starting: catching up at start halts that view too."""
    runtime = make_runtime(tmp_path, None)
    try:
        runtime.projections.stop()  # the log moves on without the views
        pos = tell(runtime, ("p", "d"), lambda r: ReportEvent("e", {}, None, now_ms(), reply=r))
    finally:
        runtime.close()
    _failing_apply(monkeypatch, None, __import__("sqlite3").IntegrityError("UNIQUE constraint failed"))
    runtime = make_runtime(tmp_path, None)
    try:
        assert runtime.projections.position >= pos
        assert runtime.projections.halted["device_events"].position < pos
        assert runtime.devices.find("d")[0].device_id == "d"
    finally:
        runtime.close()


def test_a_resume_cut_short_by_the_database_goes_on_from_where_it_got(tmp_path, monkeypatch):
    """Catching a halted view up is batch by batch, each moving its halt in the same
    transaction: the database failing in the middle (a transient error, raised like any
    step's) leaves the halt where the tables are, and the next try goes on from there,
    every event applied once."""
    import sqlite3

    from eventstore import EventLog, Journal, StoreConfig
    from actors.device.aggregate import Device
    from projections.db import ViewDatabase
    from projections.device_events import DeviceEvents
    from projections.device_registry import DeviceRegistry
    from projections.runner import ProjectionRunner

    store = StoreConfig.resolve(tmp_path, None)
    log, db = EventLog(store), ViewDatabase(store)
    journal = Journal(log)

    def runner() -> tuple[ProjectionRunner, DeviceEvents]:
        registry = DeviceRegistry(db)
        events = DeviceEvents(db, registry)
        return ProjectionRunner(log, db, [registry, events], batch=5, poll_interval=3600), events

    device = Device(product_id="p", device_id="d")

    def report(n: int) -> list[int]:
        out = []
        for i in range(n):
            device.report_event(f"e{i}", {"i": i}, None, now_ms(), None)
            out += journal.commit(device.collect_events())
        return out

    a, _ = runner()
    try:
        first = report(1)
        a.catch_up()
        _failing_apply(monkeypatch, None, RuntimeError("a view bug"))
        positions = first + report(12)
        a.catch_up()
        assert a.halted["device_events"].position == first[-1] and a.position == positions[-1]
    finally:
        a.stop()
    monkeypatch.undo()
    b, events_view = runner()
    real, calls = ProjectionRunner._apply_halted, []

    def apply_halted(self, *args):
        calls.append(args[1])
        if len(calls) == 2:
            raise sqlite3.OperationalError("database is locked")
        return real(self, *args)

    monkeypatch.setattr(ProjectionRunner, "_apply_halted", apply_halted)
    try:
        with pytest.raises(sqlite3.OperationalError):
            b.catch_up()
        moved = b.halted["device_events"].position
        assert first[-1] < moved < positions[-1]  # one batch in, and recorded so
        assert db.query("SELECT position FROM parley_view_halts WHERE view = 'device_events'") == [(moved,)]
        assert b.catch_up() == positions[-1] and not b.halted
        assert db.query("SELECT count(*) FROM parley_view_halts") == [(0,)]
        got = [e.position for e in events_view.recent("p", "d", 100)]
        assert got == sorted(positions[1:], reverse=True)  # each event once (not the registration)
    finally:
        b.stop()
        journal.close()
        db.close()
        log.close()
