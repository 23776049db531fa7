"""Real parts for the HTTP gateway tests: a Runtime on a tmp SQLite data dir, the app served
by hypercorn on a free port, httpx as the client, and a fake DeviceLink that plays the
devices (the MQTT gateway does this for real; its end-to-end tests live elsewhere)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from actors.device import DeviceActor, DeviceResponded, ReportEvent, ReportTelemetry
from actors.ports import FutureReply
from gateways.http import create_app
from gateways.http_server import serve_http
from gateways.runtime import Runtime, RuntimeSettings

SPEC: dict[str, Any] = {
    "name": "Thermostat",
    "commands": {
        "set_target_temperature": {"description": "Set the target",
                                   "parameters": {"target_temperature": {"type": "number", "required": True}}},
        "set_mode": {"parameters": {"mode": {"type": "string", "enum": ["heat", "cool"]}}},
        "reboot": {},
    },
    "telemetry": {"temperature": {"type": "number"}},
    "events": {"temperature_alert": {"eventType": "alert"}, "heartbeat": {"eventType": "info"}},
}


def agent_input(agent_id: str = "thermostat", **overrides: Any) -> dict[str, Any]:
    agent = {"agent_id": agent_id, "name": "Thermostat agent", "agent_type": "single",
             "voice_type": "zh_female_cancan", "is_custom_agent": False,
             "sys_prompt": "你是一个智能助手", "welcome_message": "你好!", "emqx_config_id": 1,
             "tools": [{"name": "home-control", "endpoint": "http://localhost:8080/mcp"}],
             "device_spec": SPEC}
    agent.update(overrides)
    return agent


def now_ms() -> int:
    return int(time.time() * 1000)


class FakeLink:
    """A DeviceLink whose devices answer from another thread, as MQTT responses would."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.published: list[tuple[str, str, dict[str, Any]]] = []
        self.silent = False  # True: devices never answer (for timeouts)
        self.answer: tuple[int, str] = (0, "ok")
        self.connected = True
        self.state_first = False  # True: report the params as state and an event before answering

    def publish_command(self, product_id: str, device_id: str, payload: dict[str, Any]) -> None:
        self.published.append((product_id, device_id, payload))
        if not self.silent:
            threading.Thread(target=self._respond, args=(product_id, device_id, payload)).start()

    def withdraw(self, handle: Any) -> None:
        pass

    def _respond(self, product_id: str, device_id: str, payload: dict[str, Any]) -> None:
        code, msg = self.answer
        key = (product_id, device_id)
        if self.state_first and code == 0:  # as the SDK does: its new state, then the answer
            self.runtime.system.tell(DeviceActor, key, ReportTelemetry(
                "state", None, dict(payload["params"]), None, now_ms()))
            self.runtime.system.tell(DeviceActor, key, ReportEvent(
                payload["cmd"], dict(payload["params"]), None, now_ms()))
        self.runtime.system.tell(DeviceActor, key, DeviceResponded(
            payload["requestId"], code, msg, {"applied": payload["params"]}, now_ms()))


@contextlib.contextmanager
def started_runtime(data_dir: Path) -> Iterator[Runtime]:
    rt = Runtime(RuntimeSettings(data_dir=data_dir))
    rt.start()
    try:
        yield rt
    finally:
        rt.close()


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    with started_runtime(tmp_path) as rt:
        yield rt


@pytest.fixture
def link(runtime: Runtime) -> FakeLink:
    fake = FakeLink(runtime)
    runtime.attach_device_link(fake)
    return fake


@pytest.fixture
async def client(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, create_app(runtime), "127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as c:
            yield c
        nursery.cancel_scope.cancel()


async def tell_device(runtime: Runtime, product_id: str, device_id: str,
                      make: Callable[[FutureReply], Any]) -> int:
    """Tell a DeviceActor and wait (in a thread) until the views show the result."""

    def run() -> int:
        reply = FutureReply()
        runtime.system.tell(DeviceActor, (product_id, device_id), make(reply))
        position = reply.get(10)
        assert runtime.projections.wait_for(position, 10)
        return position

    return await trio.to_thread.run_sync(run)


async def set_status(runtime: Runtime, product_id: str, device_id: str, status: str = "online",
                     state: dict[str, Any] | None = None, received_ms: int | None = None) -> int:
    received = received_ms or now_ms()
    return await tell_device(runtime, product_id, device_id, lambda reply: ReportTelemetry(
        "status", status, state or {}, None, received, reply=reply))


async def report_event(runtime: Runtime, product_id: str, device_id: str, name: str,
                       data: dict[str, Any], device_ts: int | None = None) -> int:
    return await tell_device(runtime, product_id, device_id, lambda reply: ReportEvent(
        name, data, device_ts, now_ms(), reply=reply))


async def create_agent(client: httpx.AsyncClient, agent_id: str = "thermostat", **overrides: Any) -> dict[str, Any]:
    r = await client.post("/api/agents", json={"agent": agent_input(agent_id, **overrides)})
    assert r.status_code == 201, r.text
    return r.json()["agent"]


class RawResponse:
    """A response read off the socket: status, headers (lower-case names, raw bytes values)
    and body. For requests whose exact target bytes matter (httpx could normalise a URL)."""

    def __init__(self, data: bytes) -> None:
        head, _, self.body = data.partition(b"\r\n\r\n")
        status_line, *lines = head.split(b"\r\n")
        self.status_line = status_line
        self.status = int(status_line.split()[1])
        self.headers: dict[str, bytes] = {}
        for line in lines:
            name, _, value = line.partition(b":")
            self.headers[name.strip().lower().decode()] = value.strip()

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_request(client: httpx.AsyncClient, method: str, target: str, body: bytes = b"",
                      headers: dict[str, bytes] | None = None) -> RawResponse:
    """Send `method target` exactly as written (no URL normalisation) to the client's server
    on a fresh connection, and read the whole response (Connection: close)."""
    headers = {"Host": b"127.0.0.1", **(headers or {})}
    lines = [f"{method} {target} HTTP/1.1".encode(), b"Connection: close",
             b"Content-Length: " + str(len(body)).encode()]
    lines += [name.encode() + b": " + value for name, value in headers.items()]
    stream = await trio.open_tcp_stream("127.0.0.1", client.base_url.port)
    async with stream:
        await stream.send_all(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some():
                data += chunk
    return RawResponse(data)
