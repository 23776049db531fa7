"""The actor system: one actor per stream, even under concurrent tells and passivation."""

from __future__ import annotations

import threading
import time

import pytest
import structlog.testing

from actors.device import Device, DeviceActor, ExpireLiveness, ReportTelemetry, SendCommand
from actors.errors import DeviceNotFound
from actors.errors import Unavailable
from actors.ports import FutureReply
from actors.system import ActorSystem, SystemSettings
from eventstore import EventLog, Journal, StoreConfig
from tests.actors.test_device_actor import Hold, Link  # test-only: a message that keeps an actor busy; a device link
from tests.support import now_ms, wait_until


@pytest.fixture
def system(tmp_path):
    log = EventLog(StoreConfig.resolve(tmp_path, None))
    journal = Journal(log)
    # evict_after=0: the cap's tests evict actors used a moment ago (see the test of evict_after).
    system = ActorSystem(log, journal, SystemSettings(sweep_interval=3600, max_active=50, evict_after=0))
    yield system
    system.shutdown()
    journal.close()
    log.close()


def test_never_two_actors_for_one_device(system, monkeypatch):
    """An actor drives its stream from its load to its stop: those spans never overlap for
    one key, however tells and passivations interleave (a new actor's thread may start while
    the old one drains, but it loads only once the old one has stopped)."""
    live: dict[tuple, int] = {}
    worst = [0]
    lock = threading.Lock()
    real_load, real_stop = DeviceActor._ensure_loaded, DeviceActor.on_stop

    def ensure_loaded(self):
        was_loaded = self._loaded
        error = real_load(self)
        if not was_loaded and self._loaded:
            with lock:
                live[self.key] = live.get(self.key, 0) + 1
                worst[0] = max(worst[0], live[self.key])
        return error

    def on_stop(self):
        with lock:
            if self._loaded:
                live[self.key] -= 1
        real_stop(self)

    monkeypatch.setattr(DeviceActor, "_ensure_loaded", ensure_loaded)
    monkeypatch.setattr(DeviceActor, "on_stop", on_stop)

    replies: list[FutureReply] = []
    stop = threading.Event()

    def sender(i: int) -> None:
        for n in range(60):
            r = FutureReply()
            replies.append(r)
            system.tell(DeviceActor, ("p", f"d{n % 3}"), ReportTelemetry("status", "online", {"n": n}, None, now_ms(), reply=r))

    def passivator() -> None:
        while not stop.is_set():
            system.passivate_idle(now=time.monotonic() + 10_000)
            time.sleep(0.001)

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(4)]
    p = threading.Thread(target=passivator)
    p.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in replies:
        r.get(10)
    stop.set()
    p.join()
    assert worst[0] == 1
    # Every telemetry message was committed exactly once, whatever actor handled it.
    total = sum(system.log.load(Device.create_id("p", f"d{i}")).version for i in range(3))
    assert total == 3 + 4 * 60


def test_a_tell_does_not_wait_for_a_passivated_actor_still_busy(system):
    """A message for an actor passivated while busy starts a new actor that waits for the
    old one on its own thread: the tell returns at once, other streams go on, and the new
    actor handles the message only once the old one has ended."""
    key = ("p", "busy")
    first = FutureReply()
    system.tell(DeviceActor, key, ReportTelemetry("status", "online", None, None, now_ms(), reply=first))
    first.get(5)
    gate = threading.Event()
    system.tell(DeviceActor, key, Hold(gate))
    assert system.passivate_idle(now=time.monotonic() + 10_000) == 1  # its stop waits behind Hold
    try:
        queued = FutureReply()
        t0 = time.monotonic()
        system.tell(DeviceActor, key, ReportTelemetry("state", None, {"n": 1}, None, now_ms(), reply=queued))
        other = FutureReply()
        system.tell(DeviceActor, ("p", "other"), ReportTelemetry("status", "online", None, None, now_ms(), reply=other))
        other.get(5)
        assert time.monotonic() - t0 < 2  # neither tell waited for the busy actor (up to 5 s)
        assert not queued.future.done()  # not handled while the old actor still runs
    finally:
        gate.set()
    queued.get(5)
    assert states(system, key) == [{"n": 1}]


def test_a_new_actor_answers_unavailable_while_its_predecessor_runs_too_long(system, monkeypatch):
    monkeypatch.setattr(DeviceActor, "predecessor_wait_s", 1.0)
    key = ("p", "stuck")
    system.tell(DeviceActor, key, ReportTelemetry("status", "online", None, None, now_ms()))
    gate = threading.Event()
    system.tell(DeviceActor, key, Hold(gate))
    old = system._active[(DeviceActor, key)].ref
    system.passivate_idle(now=time.monotonic() + 10_000)
    try:
        waited = FutureReply()
        system.tell(DeviceActor, key, ReportTelemetry("state", None, {"n": 1}, None, now_ms(), reply=waited))
        with pytest.raises(Unavailable, match="previous device actor"):
            waited.get(5)
        at_once = FutureReply()
        t0 = time.monotonic()
        system.tell(DeviceActor, key, ReportTelemetry("state", None, {"n": 2}, None, now_ms(), reply=at_once))
        with pytest.raises(Unavailable):
            at_once.get(5)
        assert time.monotonic() - t0 < 1.0  # past the wait, no message waits again
    finally:
        gate.set()
    later = FutureReply()
    wait_until(old.actor_stopped.is_set)  # (not `_stopping`: the new actor took it over)
    system.tell(DeviceActor, key, ReportTelemetry("state", None, {"n": 3}, None, now_ms(), reply=later))
    later.get(5)
    assert states(system, key) == [{"n": 3}]


def test_lru_cap_passivates_least_recently_used(system):
    for i in range(60):
        r = FutureReply()
        system.tell(DeviceActor, ("p", f"d{i}"), ReportTelemetry("status", "online", None, None, now_ms(), reply=r))
        r.get(5)
    assert system.active_count() <= 50
    assert system.is_active(DeviceActor, ("p", "d59"))
    assert not system.is_active(DeviceActor, ("p", "d0"))


def test_the_lru_cap_evicts_only_idle_actors_and_the_sweep_trims_the_rest(tmp_path):
    """An actor with messages waiting is not evicted (it would have to handle them all
    before it could stop); once it is idle, the sweep brings the system back to the cap."""
    log = EventLog(StoreConfig.resolve(tmp_path, None))
    journal = Journal(log)
    system = ActorSystem(log, journal, SystemSettings(sweep_interval=3600, max_active=1, evict_after=0))
    try:
        gate = threading.Event()
        busy = ("p", "busy")
        system.tell(DeviceActor, busy, ReportTelemetry("status", "online", None, None, now_ms()))
        system.tell(DeviceActor, busy, Hold(gate))
        queued = FutureReply()
        system.tell(DeviceActor, busy, ReportTelemetry("state", None, {"n": 1}, None, now_ms(), reply=queued))
        for i in range(2):
            r = FutureReply()
            system.tell(DeviceActor, ("p", f"d{i}"), ReportTelemetry("status", "online", None, None, now_ms(), reply=r))
            r.get(5)
        assert system.is_active(DeviceActor, busy)  # the least recently used, but busy
        assert not system.is_active(DeviceActor, ("p", "d0"))  # idle: evicted for d1
        assert system.active_count() == 2  # over the cap while the other is busy
        gate.set()
        queued.get(5)
        assert system.passivate_idle() == 1  # nothing idle for idle_timeout: only the cap
        assert system.active_count() == 1 and not system.is_active(DeviceActor, busy)
        wait_until(lambda: system.stopping_count() == 0)
    finally:
        gate.set()
        system.shutdown()
        journal.close()
        log.close()


def test_the_lru_cap_keeps_actors_used_within_evict_after_and_says_it_is_exceeded(tmp_path):
    """A cap below the devices in use evicted actors about to be used again: a reload from
    the log per message (a soak of 2,000 devices at 1 s with a cap of 200 collapsed). The
    working set stays; the sweep trims what leaves it, and warns that the cap is too low."""
    log = EventLog(StoreConfig.resolve(tmp_path, None))
    journal = Journal(log)
    system = ActorSystem(log, journal, SystemSettings(sweep_interval=3600, max_active=2, evict_after=0.5))
    try:
        with structlog.testing.capture_logs() as logs:
            for rounds in range(3):  # three devices reporting in turn: each is used again soon
                for i in range(3):
                    r = FutureReply()
                    system.tell(DeviceActor, ("p", f"d{i}"),
                                ReportTelemetry("state", None, {"n": rounds}, None, now_ms(), reply=r))
                    r.get(5)
            assert system.activations == 3 and system.active_count() == 3  # none evicted
            assert system.passivate_idle() == 0  # all used within evict_after
            assert [e["active"] for e in logs if e["event"] == "actors.over_cap"] == [3]
            wait_until(lambda: system.passivate_idle() == 1, timeout=5)  # d0 left the working set
        assert system.active_count() == 2 and not system.is_active(DeviceActor, ("p", "d0"))
    finally:
        system.shutdown()
        journal.close()
        log.close()


# -- tell_many ---------------------------------------------------------------------------


def states(system, key) -> list[dict]:
    """The `state` of each telemetry event of the device's stream, in log order."""
    return [e.state for e in system.log.read_stream(Device.create_id(*key)) if type(e).__name__ == "StateReported"]


def test_tell_many_activates_a_fresh_key_and_delivers_every_message_in_order(system):
    key = ("p", "fresh")
    assert not system.is_active(DeviceActor, key)
    replies = [FutureReply() for _ in range(40)]
    system.tell_many(DeviceActor, key, [
        ReportTelemetry("state", None, {"i": i}, None, now_ms(), reply=r) for i, r in enumerate(replies)])
    positions = [r.get(5) for r in replies]
    assert system.is_active(DeviceActor, key) and system.activations == 1
    assert positions == sorted(positions)  # acknowledged in order (one commit or several)
    assert states(system, key) == [{"i": i} for i in range(40)]
    device = system.log.load(Device.create_id(*key))
    assert (device.version, device.state, device.online) == (41, {"i": 39}, True)  # Registered + 40


def test_a_burst_larger_than_max_batch_is_committed_in_bounded_pieces_in_order(system, monkeypatch):
    key = ("p", "big")
    monkeypatch.setattr(DeviceActor, "max_batch", 16)
    commits: list[int] = []
    commit = system.journal.commit

    def counting(events, *args, **kwargs):
        commits.append(len(events))
        return commit(events, *args, **kwargs)

    monkeypatch.setattr(system.journal, "commit", counting)
    replies = [FutureReply() for _ in range(50)]
    system.tell_many(DeviceActor, key, [
        ReportTelemetry("state", None, {"i": i}, None, now_ms(), reply=r) for i, r in enumerate(replies)])
    positions = [r.get(5) for r in replies]
    assert positions == sorted(positions)
    assert states(system, key) == [{"i": i} for i in range(50)]
    # Registered rides with the first 16 reports; no commit holds more than max_batch reports.
    assert commits == [17, 16, 16, 2]


def test_tell_many_keeps_the_order_across_messages_that_are_not_folded(system):
    """A message that is not batchable (a liveness expiry) stays between the reports it was
    sent between: the reports before it are committed first, those after it after."""
    key = ("p", "mixed")
    later = now_ms() + 1_000_000
    last = FutureReply()
    system.tell_many(DeviceActor, key, [
        ReportTelemetry("status", "online", {"a": 1}, None, now_ms()),
        ReportTelemetry("state", None, {"b": 2}, None, now_ms()),
        ExpireLiveness(later, 1000),
        ReportTelemetry("state", None, {"c": 3}, None, now_ms(), reply=last),
    ])
    last.get(5)
    kinds = [type(e).__name__ for e in system.log.read_stream(Device.create_id(*key))]
    assert kinds == ["Registered", "StatusReported", "StateReported", "WentSilent", "StateReported"]
    device = system.log.load(Device.create_id(*key))
    assert device.online and device.state == {"a": 1, "b": 2, "c": 3}


def test_a_burst_told_at_once_is_folded_into_one_journal_transaction(system):
    key = ("p", "burst")
    first = FutureReply()
    system.tell(DeviceActor, key, ReportTelemetry("status", "online", None, None, now_ms(), reply=first))
    first.get(5)
    gate = threading.Event()
    system.tell(DeviceActor, key, Hold(gate))  # the burst lands in the inbox while the actor is busy
    batches = system.journal.batches
    replies = [FutureReply() for _ in range(100)]
    system.tell_many(DeviceActor, key, [
        ReportTelemetry("state", None, {"i": i}, None, now_ms(), reply=r) for i, r in enumerate(replies)])
    gate.set()
    positions = {r.get(5) for r in replies}
    assert len(positions) == 1  # every message acknowledged after the same commit
    assert system.journal.batches - batches == 1
    stored = list(system.log.read_stream(Device.create_id(*key)))
    assert [e.originator_version for e in stored] == list(range(1, 103))
    assert [e.state for e in stored[2:]] == [{"i": i} for i in range(100)]
    assert system.log.load(Device.create_id(*key)).state == {"i": 99}


class _DiesBeforeTell:
    """An actor's ref whose actor stops for real just before the `at`-th tell (after
    handling what it was told before), as if it crashed between tell_many's lookup and
    that tell: pykka then raises ActorDeadError on the tell."""

    def __init__(self, ref, at: int) -> None:
        self.ref, self.at, self.told = ref, at, 0

    def tell(self, message) -> None:
        if self.told == self.at:
            self.ref.stop(block=True)
        self.told += 1
        self.ref.tell(message)

    def __getattr__(self, name):
        return getattr(self.ref, name)


@pytest.mark.parametrize("dies_at,only_reports", [(0, True), (0, False), (4, False)])
def test_when_the_actor_dies_during_tell_many_a_new_one_gets_the_rest_in_order(system, dies_at, only_reports):
    key = ("p", "dying")
    first = FutureReply()
    system.tell(DeviceActor, key, ReportTelemetry("status", "online", None, None, now_ms(), reply=first))
    first.get(5)
    entry = system._active[(DeviceActor, key)]
    old_ref = entry.ref
    entry.ref = _DiesBeforeTell(old_ref, at=dies_at)
    replies = [FutureReply() for _ in range(10)]
    messages: list = [ReportTelemetry("state", None, {"i": i}, None, now_ms(), reply=r) for i, r in enumerate(replies)]
    if not only_reports:
        messages.insert(2, ExpireLiveness(now_ms(), 10**9))  # not silent: no event, but not a report either
    system.tell_many(DeviceActor, key, messages)
    assert all(isinstance(r.get(5), int) for r in replies)  # none lost, none failed
    assert not old_ref.is_alive() and entry.ref.told > dies_at
    assert system.activations == 2 and system.is_active(DeviceActor, key)
    assert system._active[(DeviceActor, key)].ref is not entry.ref
    assert states(system, key) == [{"i": i} for i in range(10)]
    assert system.log.load(Device.create_id(*key)).version == 12


def test_a_burst_for_an_actor_that_cannot_load_fails_every_message_and_the_next_retries(system, monkeypatch):
    key = ("p", "unloadable")
    real_load = system.log.load_many
    monkeypatch.setattr(system.log, "load_many", lambda *a, **k: (_ for _ in ()).throw(OSError("pool exhausted")))
    replies = [FutureReply() for _ in range(3)]
    system.tell_many(DeviceActor, key, [
        ReportTelemetry("state", None, {"i": i}, None, now_ms(), reply=r) for i, r in enumerate(replies)])
    for r in replies:  # each one told, none left waiting
        with pytest.raises(Unavailable):
            r.get(5)
    monkeypatch.setattr(system.log, "load_many", real_load)
    again = [FutureReply() for _ in range(3)]
    system.tell_many(DeviceActor, key, [
        ReportTelemetry("state", None, {"i": i}, None, now_ms(), reply=r) for i, r in enumerate(again)])
    assert all(isinstance(r.get(5), int) for r in again)
    assert states(system, key) == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_tell_many_carries_the_senders_log_context_into_the_actor(system):
    """Messages are wrapped in `Traced` when the sender has a structlog context: the
    actor's log lines about them (here: going silent) carry it, and the wrapped reports
    are still handled (and folded) like plain ones."""
    import structlog

    seen: list[dict] = []

    def capture(logger, method, event_dict):
        seen.append(dict(event_dict))
        raise structlog.DropEvent

    structlog.configure(processors=[structlog.contextvars.merge_contextvars, capture])
    try:
        key = ("p", "traced")
        done = FutureReply()
        with structlog.contextvars.bound_contextvars(trace_id="burst-7"):
            system.tell_many(DeviceActor, key, [
                ReportTelemetry("status", "online", {"a": 1}, None, now_ms()),
                ReportTelemetry("state", None, {"b": 2}, None, now_ms(), reply=done),
                ExpireLiveness(now_ms() + 1_000_000, 1000),
            ])
        assert isinstance(done.get(5), int)
        wait_until(lambda: any(e.get("event") == "device.went_silent" for e in seen))
        silent = [e for e in seen if e.get("event") == "device.went_silent"]
        assert silent[0]["trace_id"] == "burst-7" and silent[0]["key"] == "p:traced"
        device = system.log.load(Device.create_id(*key))
        assert device.state == {"a": 1, "b": 2} and not device.online
    finally:
        structlog.reset_defaults()


def test_tell_many_after_shutdown_is_refused(tmp_path):
    log = EventLog(StoreConfig.resolve(tmp_path, None))
    journal = Journal(log)
    system = ActorSystem(log, journal, SystemSettings(sweep_interval=3600))
    system.shutdown()
    try:
        with pytest.raises(Unavailable):
            system.tell_many(DeviceActor, ("p", "late"), [ReportTelemetry("status", "online", None, None, now_ms())])
        assert system.active_count() == 0 and log.max_position() == 0
    finally:
        journal.close()
        log.close()


def _online(reply: FutureReply) -> ReportTelemetry:
    return ReportTelemetry("status", "online", None, None, now_ms(), reply=reply)


def test_a_sweep_tells_idle_actors_to_stop_in_batches_without_holding_the_lock(system, monkeypatch):
    """Thousands of actors idle at once (a fleet gone silent): the sweep takes them out of
    the active set under the lock, then tells them to stop in batches with pauses, the lock
    free meanwhile, so every other tell (the HTTP loop's too) goes on."""
    replies = [FutureReply() for _ in range(25)]
    for i, reply in enumerate(replies):
        system.tell(DeviceActor, ("p", f"d{i}"), _online(reply))
    for reply in replies:
        reply.future.result(10)
    refs = [e.ref for e in system._active.values()]
    monkeypatch.setattr(ActorSystem, "PASSIVATE_BATCH", 10)
    lock_free_in_pauses: list[bool] = []
    real_sleep = time.sleep

    def pause(seconds: float) -> None:  # the sweep's pause between batches, on its thread
        free = []
        probe = threading.Thread(target=lambda: free.append(system._lock.acquire(timeout=0)
                                                             and (system._lock.release() or True)))
        probe.start()
        probe.join()
        lock_free_in_pauses.append(free == [True])
        real_sleep(seconds)

    monkeypatch.setattr("actors.system.time.sleep", pause)
    assert system.passivate_idle(now=time.monotonic() + 10_000, wait=True) == 25
    assert lock_free_in_pauses == [True, True]  # 25 actors: batches of 10, 10 and 5
    assert all(ref.actor_stopped.is_set() for ref in refs) and system.active_count() == 0


def test_an_actor_passivated_but_not_yet_told_to_stop_is_told_by_its_successor(system):
    """Between the sweep taking an actor out of the active set and telling it to stop, a
    message for its device starts a new actor, which loads once the old one has stopped:
    the activation tells the old one at once instead of leaving its successor to wait."""
    first = FutureReply()
    system.tell(DeviceActor, ("p", "d"), _online(first))
    first.future.result(10)
    k = (DeviceActor, ("p", "d"))
    with system._lock:
        old = system._passivate(k, system._active[k], stop=False)  # the sweep's first step
    second = FutureReply()
    system.tell(DeviceActor, ("p", "d"), _online(second))
    second.future.result(5)  # well before the successor's 10 s wait for its predecessor
    assert old.actor_stopped.is_set()


def test_shutdown_stops_every_actor_and_gives_the_gil_switch_interval_back(tmp_path):
    """Shutdown holds the GIL through its loop of stop messages (ActorSystem.shutdown) and
    must leave the interpreter's switch interval as it found it."""
    import sys

    log = EventLog(StoreConfig.resolve(tmp_path, None))
    journal = Journal(log)
    system = ActorSystem(log, journal, SystemSettings(sweep_interval=3600))
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.003)
    try:
        replies = [FutureReply() for _ in range(20)]
        for i, reply in enumerate(replies):
            system.tell(DeviceActor, ("p", f"d{i}"), ReportTelemetry("status", "online", None, None, now_ms(),
                                                                    reply=reply))
        for reply in replies:
            reply.future.result(10)
        refs = [e.ref for e in system._active.values()]
        system.shutdown()
        assert sys.getswitchinterval() == pytest.approx(0.003)
        assert len(refs) == 20 and all(ref.actor_stopped.is_set() for ref in refs)
    finally:
        sys.setswitchinterval(before)
        journal.close()
        log.close()


def test_activations_load_one_at_a_time_on_sqlite(tmp_path, monkeypatch):
    """On SQLite a load is CPU under the GIL and loads at once only fight over it (10,000
    activations: 26 s eight at a time, 15 s one at a time)."""
    assert _most_loads_at_once(tmp_path, None, monkeypatch) == 1


def test_activations_load_eight_at_a_time_on_postgres(tmp_path, pg_database, monkeypatch):
    """On PostgreSQL a load waits on the server, and up to 8 overlap those waits."""
    assert _most_loads_at_once(tmp_path, pg_database, monkeypatch) == 8


def _most_loads_at_once(tmp_path, url, monkeypatch) -> int:
    """Activate 24 device actors at once, each load slowed down; how many loads overlapped."""
    log = EventLog(StoreConfig.resolve(tmp_path, url))
    journal = Journal(log)
    system = ActorSystem(log, journal, SystemSettings(sweep_interval=3600))
    at_once, worst = [0], [0]
    lock = threading.Lock()
    real_load = EventLog.load_many

    def load(self, *args, **kwargs):
        with lock:
            at_once[0] += 1
            worst[0] = max(worst[0], at_once[0])
        try:
            time.sleep(0.01)  # a slow load: long enough for the others to pile up behind it
            return real_load(self, *args, **kwargs)
        finally:
            with lock:
                at_once[0] -= 1

    monkeypatch.setattr(EventLog, "load_many", load)
    try:
        replies = []
        for i in range(24):
            r = FutureReply()
            replies.append(r)
            system.tell(DeviceActor, ("p", f"many{i}"), ReportTelemetry("status", "online", None, None, now_ms(), reply=r))
        for r in replies:
            r.get(30)
        assert system.active_count() == 24
        return worst[0]
    finally:
        system.shutdown()
        journal.close()
        log.close()


class _SlowLoads:
    """EventLog.load_many held by the test: the first load waits until `go` is set, so the
    activations behind it queue for the slot; records which streams loaded in which order
    (a slot holder's first, then the waiters it took along) and how many at a time."""

    def __init__(self, monkeypatch) -> None:
        self.go = threading.Event()
        self.order: list[tuple[str, str]] = []
        self.batches: list[int] = []
        real_load_many = EventLog.load_many
        streams: dict = {}
        self.streams = streams

        def load_many(log, stream_ids):
            if not self.order:
                self.go.wait(10)
            self.order.extend(streams.get(s, ("?", "?")) for s in stream_ids)
            self.batches.append(len(stream_ids))
            return real_load_many(log, stream_ids)

        monkeypatch.setattr(EventLog, "load_many", load_many)

    def key(self, key: tuple[str, str]) -> tuple[str, str]:
        self.streams[DeviceActor.stream_id(key)] = key
        return key


def _report(system, key) -> FutureReply:
    r = FutureReply()
    system.tell(DeviceActor, key, ReportTelemetry("status", "online", None, None, now_ms(), reply=r))
    return r


def test_an_actor_with_a_command_loads_ahead_of_the_reports_waiting_in_line(system, monkeypatch):
    """After a restart thousands of reports activate their actors at once; a command's
    actor joining that line used to wait for all of them (4,000 devices: 11-20 s)."""
    loads = _SlowLoads(monkeypatch)
    replies = [_report(system, loads.key(("p", f"r{i}"))) for i in range(12)]
    assert wait_until(lambda: system.loading.waiting() == 11, 5)  # r0 loads, held; the rest wait
    command = FutureReply()
    system.tell(DeviceActor, loads.key(("p", "cmd")), SendCommand("req-1", "reboot", {}, 5000, reply=command))
    assert wait_until(lambda: system.loading.waiting() == 12, 5)
    loads.go.set()
    with pytest.raises(DeviceNotFound):  # (no such device: what matters is when it loaded)
        command.get(10)
    for r in replies:
        r.get(10)
    assert loads.order[:2] == [("p", "r0"), ("p", "cmd")]
    assert sorted(loads.order[2:]) == sorted(("p", f"r{i}") for i in range(1, 12))
    assert loads.batches == [1, 12]  # the command's actor loaded the eleven behind it too


@pytest.fixture
def linked(tmp_path):
    """An actor system whose device link answers every command with code 0."""
    log = EventLog(StoreConfig.resolve(tmp_path, None))
    journal = Journal(log)
    link = Link()
    system = ActorSystem(log, journal, SystemSettings(sweep_interval=3600), device_link=link)
    link.system = system
    yield system
    system.shutdown()
    journal.close()
    log.close()


def test_a_command_told_to_an_actor_already_waiting_to_load_moves_it_ahead(linked, monkeypatch):
    system = linked
    loads = _SlowLoads(monkeypatch)
    replies = [_report(system, loads.key(("p", f"r{i}"))) for i in range(12)]
    assert wait_until(lambda: system.loading.waiting() == 11, 5)
    # r9 waits in line for its report; then a command for it arrives.
    command = FutureReply()
    system.tell(DeviceActor, ("p", "r9"), SendCommand("req-2", "reboot", {}, 5000, reply=command))
    assert system.loading.promoted == 1
    loads.go.set()
    for r in replies:
        r.get(10)
    assert command.get(10)["code"] == 0  # its report came first (online), then the command
    assert loads.order[:2] == [("p", "r0"), ("p", "r9")]


def test_an_actor_whose_thread_cannot_start_fails_what_it_was_told_and_the_next_tell_starts_another(
        system, monkeypatch):
    real_start = threading.Thread.start
    refused = []

    def start(thread):
        if thread.name.startswith("DeviceActor") and not refused:
            refused.append(thread.name)
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    with structlog.testing.capture_logs() as logs:
        first = _report(system, ("p", "nothread"))
        with pytest.raises(Unavailable, match="could not start its thread"):
            first.get(5)
    assert refused and any(e["event"] == "actors.thread_not_started" for e in logs)
    assert _report(system, ("p", "nothread")).get(5) is not None  # a new actor, with a thread
    assert system.is_active(DeviceActor, ("p", "nothread"))


class _HeldStarts:
    """The first Thread.start of an actor thread named `held` waits until `go` is set."""

    def __init__(self, monkeypatch, held: str) -> None:
        self.go = threading.Event()
        self.waiting = threading.Event()
        real_start = threading.Thread.start

        def start(thread):
            if thread.name.startswith(held) and not self.waiting.is_set():
                self.waiting.set()
                self.go.wait(10)
            real_start(thread)

        monkeypatch.setattr(threading.Thread, "start", start)


def test_activating_does_not_wait_for_the_actors_thread_to_run(system, monkeypatch):
    """pykka's start() returns once the new thread runs; in a storm of activations that held
    the MQTT gateway (and, under the system's lock, every tell) for each new thread."""
    starts = _HeldStarts(monkeypatch, "DeviceActor")
    t = time.monotonic()
    reply = _report(system, ("p", "later"))
    assert time.monotonic() - t < 1
    assert starts.waiting.wait(5)  # the starter's thread waits, not the teller
    starts.go.set()
    assert reply.get(5) is not None


def test_a_command_starts_its_actors_thread_at_once_not_behind_the_line(linked, monkeypatch):
    system = linked
    _report(system, ("p", "cmd")).get(5)  # known and online
    system.passivate_idle(time.monotonic() + 3600, wait=True)  # (as after a restart)
    starts = _HeldStarts(monkeypatch, "DeviceActor")
    _report(system, ("p", "first"))  # its thread's start holds the starter's line
    assert starts.waiting.wait(5)
    queued = _report(system, ("p", "cmd"))  # activated by a report: in line, behind it
    command = FutureReply()
    system.tell(DeviceActor, ("p", "cmd"), SendCommand("req-3", "reboot", {}, 5000, reply=command))
    assert queued.get(5) is not None and command.get(5)["code"] == 0  # while "first" still waits
    starts.go.set()
