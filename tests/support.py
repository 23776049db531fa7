"""Small helpers shared by the tests (no fixtures here)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateways.runtime import Runtime, RuntimeSettings

THERMO_SPEC = {
    "commands": {"set_target_temperature": {"parameters": {
        "target_temperature": {"type": "number", "required": True}}}},
    "telemetry": {"temperature": {"type": "number"}},
    "events": {"temperature_alert": {"eventType": "alert"}},
}


def now_ms() -> int:
    return int(time.time() * 1000)


def stall_appends(monkeypatch: Any, log: Any) -> tuple[threading.Event, threading.Event]:
    """A store stuck in a transaction: `log.append` sets `entered` and waits for `release`;
    once that is set, appends go through at once. Returns (entered, release)."""
    entered, release = threading.Event(), threading.Event()
    append = log.append

    def stalled(events: Any, **kw: Any) -> Any:
        if not release.is_set():
            entered.set()
            release.wait(10)
        return append(events, **kw)

    monkeypatch.setattr(log, "append", stalled)
    return entered, release


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def make_runtime(data_dir: Path, database_url: str | None = None, **kw: Any) -> Runtime:
    runtime = Runtime(RuntimeSettings(data_dir=data_dir, database_url=database_url, **kw))
    runtime.start()
    return runtime


def agent_config(agent_id: str = "thermostat", spec: dict[str, Any] | None = None) -> dict[str, Any]:
    from actors.agent import AgentConfig

    return AgentConfig.model_validate({
        "agent_id": agent_id, "name": f"{agent_id[:240]} agent", "agent_type": "single", "voice_type": "default",
        "is_custom_agent": False, "device_spec": THERMO_SPEC if spec is None else spec,
    }).to_record()


def create_agent(runtime: Runtime, agent_id: str = "thermostat") -> None:
    from actors.agent import AgentActor, CreateAgent
    from actors.ports import FutureReply

    reply = FutureReply()
    runtime.system.tell(AgentActor, (agent_id,), CreateAgent(agent_config(agent_id), reply=reply))
    assert runtime.projections.wait_for(reply.get(), 10)


def capture_serve_settings(monkeypatch: Any) -> list[Any]:
    """`parley serve` records its Settings here instead of serving (what the CLI made of
    flags, PARLEY_* variables and parley.toml)."""
    import gateways.serve

    seen: list[Any] = []

    async def fake_main(settings: Any) -> None:
        seen.append(settings)

    monkeypatch.setattr(gateways.serve, "main", fake_main)
    return seen
