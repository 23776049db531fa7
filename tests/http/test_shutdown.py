"""Shutdown answers the requests waiting on actors: 503 `unavailable` in the API's error
shape, at once, instead of a connection hypercorn's drain closes with no response.

Served as serve.py serves it (serve_http with `on_shutdown=answer_waiting_requests`), over
real sockets; cancelling the server's scope is what SIGTERM does to `parley serve`
(tests/gateways/test_serve_shutdown.py does that to a real process)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import pytest
import trio

from actors.agent import AgentActor
from gateways.bridge import PendingReplies
from gateways.http.app import PENDING_KEY, answer_waiting_requests, create_app
from gateways.http_server import serve_http
from gateways.runtime import Runtime
from tests.http.conftest import FakeLink, agent_input, create_agent, set_status

GRACEFUL_TIMEOUT = 2.0  # serve_http's hypercorn graceful_timeout: what the requests used to wait for


@dataclass
class Server:
    client: httpx.AsyncClient
    pending: PendingReplies
    nursery: trio.Nursery
    scope: trio.CancelScope
    stopped: trio.Event

    async def waiting(self, count: int = 1) -> None:
        """Until `count` requests wait on actors."""
        with trio.fail_after(10):
            while len(self.pending) < count:
                await trio.sleep(0.005)

    def in_background(self, request: Callable[[], Any]) -> list[httpx.Response]:
        responses: list[httpx.Response] = []

        async def run() -> None:
            responses.append(await request())

        self.nursery.start_soon(run)
        return responses


@pytest.fixture
async def server(runtime: Runtime) -> AsyncIterator[Server]:
    app = create_app(runtime)
    scope, stopped = trio.CancelScope(), trio.Event()

    async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await serve_http(app, "127.0.0.1", 0, on_shutdown=partial(answer_waiting_requests, app),
                             task_status=task_status)
        stopped.set()

    async with trio.open_nursery() as nursery:
        port = await nursery.start(run)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
            yield Server(client, app.extensions[PENDING_KEY], nursery, scope, stopped)
        scope.cancel()


async def shut_down(server: Server, responses: list[httpx.Response]) -> float:
    """Begin the shutdown; wait for the answer and for the server to stop. Seconds to answer."""
    start = trio.current_time()
    server.scope.cancel()
    with trio.fail_after(GRACEFUL_TIMEOUT + 3):
        while not responses:
            await trio.sleep(0.001)
        answered = trio.current_time() - start
        await server.stopped.wait()
    return answered


async def test_a_command_waiting_on_its_device_gets_503_when_the_server_shuts_down(
        server: Server, runtime: Runtime, link: FakeLink) -> None:
    link.silent = True  # the device never answers: the command waits for its 60 s timeout
    await create_agent(server.client)
    await set_status(runtime, "thermostat", "t-001", "online")
    responses = server.in_background(lambda: server.client.post(
        "/api/devices/t-001/commands",
        json={"command": "reboot", "timeoutMs": 60_000}, headers={"X-Request-Id": "shutdown-1"}))
    await server.waiting()
    # The request is pending once the HTTP side registered it; the device actor publishes on
    # its own thread, so the command may reach the link a moment later.
    with trio.fail_after(10):
        while not link.published:
            await trio.sleep(0.005)
    assert len(link.published) == 1

    answered = await shut_down(server, responses)

    r = responses[0]
    assert r.status_code == 503
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-request-id"] == "shutdown-1"
    assert r.json() == {"error": "server is shutting down", "code": "unavailable",
                        "requestId": link.published[0][2]["requestId"]}
    assert answered < GRACEFUL_TIMEOUT / 2  # at once, not when hypercorn's drain runs out
    assert len(server.pending) == 0


async def test_an_agent_write_waiting_on_its_actor_gets_503_when_the_server_shuts_down(
        server: Server, runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    tell = runtime.system.tell

    def agents_do_not_answer(kind: Any, key: Any, message: Any) -> None:
        if kind is not AgentActor:
            tell(kind, key, message)

    monkeypatch.setattr(runtime.system, "tell", agents_do_not_answer)
    responses = server.in_background(lambda: server.client.post(
        "/api/agents", json={"agent": agent_input("stuck-agent")}))
    await server.waiting()

    answered = await shut_down(server, responses)

    assert responses[0].status_code == 503
    assert responses[0].json() == {"error": "server is shutting down", "code": "unavailable"}
    assert answered < GRACEFUL_TIMEOUT / 2


async def test_requests_that_finished_leave_nothing_behind(server: Server, runtime: Runtime,
                                                          link: FakeLink) -> None:
    await create_agent(server.client)
    await set_status(runtime, "thermostat", "t-001", "online")
    r = await server.client.post("/api/devices/t-001/commands", json={"command": "reboot"})
    assert r.status_code == 200
    link.silent = True
    r = await server.client.post("/api/devices/t-001/commands", json={"command": "reboot", "timeoutMs": 50})
    assert r.status_code == 504
    assert len(server.pending) == 0
