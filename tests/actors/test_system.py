"""The actor system: one actor per stream, even under concurrent tells and passivation."""

from __future__ import annotations

import threading
import time

import pytest

from actors.device import Device, DeviceActor, ReportTelemetry
from actors.ports import FutureReply
from actors.system import ActorSystem, SystemSettings
from eventstore import EventLog, Journal, StoreConfig
from tests.support import now_ms


@pytest.fixture
def system(tmp_path):
    log = EventLog(StoreConfig.resolve(tmp_path, None))
    journal = Journal(log)
    system = ActorSystem(log, journal, SystemSettings(sweep_interval=3600, max_active=50))
    yield system
    system.shutdown()
    journal.close()
    log.close()


def test_never_two_actors_for_one_device(system, monkeypatch):
    live: dict[tuple, int] = {}
    worst = [0]
    lock = threading.Lock()
    real_start, real_stop = DeviceActor.on_start, DeviceActor.on_stop

    def on_start(self):
        with lock:
            live[self.key] = live.get(self.key, 0) + 1
            worst[0] = max(worst[0], live[self.key])
        real_start(self)

    def on_stop(self):
        with lock:
            live[self.key] -= 1
        real_stop(self)

    monkeypatch.setattr(DeviceActor, "on_start", on_start)
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


def test_lru_cap_passivates_least_recently_used(system):
    for i in range(60):
        r = FutureReply()
        system.tell(DeviceActor, ("p", f"d{i}"), ReportTelemetry("status", "online", None, None, now_ms(), reply=r))
        r.get(5)
    assert system.active_count() <= 50
    assert system.is_active(DeviceActor, ("p", "d59"))
    assert not system.is_active(DeviceActor, ("p", "d0"))
