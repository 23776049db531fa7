"""The liveness sweep: silent devices go offline, told in rounds so a mass silence does not
start an actor thread per device at once."""

from __future__ import annotations

import threading
import time

from actors.device import DeviceActor, ReportTelemetry
from actors.ports import FutureReply
from actors.system import ActorSystem
from gateways.runtime import Runtime
from tests.support import make_runtime, now_ms


def test_silent_devices_go_offline_told_a_round_at_a_time(tmp_path, monkeypatch):
    runtime = make_runtime(tmp_path, liveness_check_interval=3600, liveness_window=90)
    try:
        keys = [("thermostat", f"d{i}") for i in range(300)]
        replies = []
        for key in keys:
            r = FutureReply()
            runtime.system.tell(DeviceActor, key, ReportTelemetry("status", "online", None, None, now_ms(), reply=r))
            replies.append(r)
        position = max(r.get(10) for r in replies)
        assert runtime.projections.wait_for(position, 10)

        monkeypatch.setattr(Runtime, "LIVENESS_ROUND", 64)
        outstanding: list[FutureReply] = []
        worst = [0]
        lock = threading.Lock()
        real_tell = ActorSystem.tell

        def tell(self, kind, key, message):
            with lock:
                outstanding[:] = [r for r in outstanding if not r.future.done()]
                outstanding.append(message.reply)
                worst[0] = max(worst[0], len(outstanding))
            real_tell(self, kind, key, message)

        monkeypatch.setattr(ActorSystem, "tell", tell)
        assert runtime.expire_silent(now_ms() + 91_000) == 300
        assert worst[0] <= 64  # never more than a round told and not yet handled
        assert runtime.projections.wait_for(runtime.log.max_position(), 10)
        assert runtime.devices.stale(now_ms() + 91_000) == []
        offline = runtime.devices.list_devices("thermostat", online=False)
        assert len(offline) == 300
    finally:
        runtime.close()


class _Link:
    """The one thing the sweep asks of the MQTT link: since when it could hear devices."""

    def __init__(self, listening_since: float | None) -> None:
        self.listening_since = listening_since
        self.connected = listening_since is not None


def test_the_sweep_waits_while_devices_cannot_be_heard_and_one_window_after(tmp_path):
    runtime = make_runtime(tmp_path, liveness_check_interval=0.05, liveness_window=0.5)
    try:
        link = _Link(None)  # the broker link is down
        runtime.attach_device_link(link)
        r = FutureReply()
        runtime.system.tell(DeviceActor, ("thermostat", "heard"),
                            ReportTelemetry("status", "online", None, None, now_ms(), reply=r))
        assert runtime.projections.wait_for(r.get(10), 10)

        def online() -> bool:
            return runtime.devices.find("heard", "thermostat")[0].online

        threading.Event().wait(1.5)  # three windows of silence, thirty sweeps
        assert online()
        link.listening_since = time.time()  # back: the device gets one window to be heard
        threading.Event().wait(0.2)
        assert online()
        deadline = time.monotonic() + 10  # then the sweep goes on: silent, it goes offline
        while online() and time.monotonic() < deadline:
            threading.Event().wait(0.05)
        assert not online()
    finally:
        runtime.close()


def test_the_sweep_waits_while_the_store_is_down_and_one_window_after(tmp_path):
    """While PostgreSQL is down nothing a device sends is stored, so its last_seen stands
    still; after, its QoS 1 reports come in again over the broker's retries. An audit saw
    every device of a 3-minute outage go offline in the first sweep after it."""
    from eventstore.breaker import StoreBreaker

    runtime = make_runtime(tmp_path, liveness_check_interval=3600, liveness_window=90)
    try:
        breaker = runtime.log.breaker = StoreBreaker({}, "test")  # (SQLite has none of its own)
        now = now_ms()
        breaker.down_since = time.time()
        assert runtime.liveness_paused(now) == "the store is down"
        breaker.down_since, breaker.up_since = None, time.time()
        assert "store is back" in runtime.liveness_paused(now)
        assert runtime.liveness_paused(now + 91_000) == ""
    finally:
        runtime.close()
