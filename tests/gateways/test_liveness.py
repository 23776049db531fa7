"""The liveness sweep: silent devices go offline, told in rounds so a mass silence does not
start an actor thread per device at once."""

from __future__ import annotations

import threading

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
