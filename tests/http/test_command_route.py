"""The command route served at the ASGI level (gateways/http/command_route.py) answers as
the Quart route does: same statuses, bodies, headers and log lines. Each case is sent both
ways: as a client usually sends it (Content-Length: the ASGI route) and with a chunked
body, which only the Quart route takes. Quart's `request_started` signal tells which
served it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import structlog.testing
import trio
from quart import request_started

from gateways.http.app import MAX_BODY
from gateways.http.command_route import device_id_served_here
from gateways.runtime import Runtime
from tests.http.conftest import FakeLink, RawResponse, create_agent, raw_request, set_status


@pytest.fixture
async def online(client: httpx.AsyncClient, runtime: Runtime, link: FakeLink) -> FakeLink:
    await create_agent(client)
    await set_status(runtime, "thermostat", "t-001", "online")
    await set_status(runtime, "thermostat", "t-off", "offline")
    return link


@pytest.fixture
def quart_served() -> Iterator[list[str]]:
    """The paths of the requests Quart's own request handling took, in order."""
    served: list[str] = []

    def started(sender: Any, **extra: Any) -> None:
        from quart import request
        served.append(request.path)

    request_started.connect(started)
    try:
        yield served
    finally:
        request_started.disconnect(started)


async def _chunked(data: bytes) -> AsyncIterator[bytes]:
    # An async iterator body: httpx sends it with Transfer-Encoding: chunked.
    yield data


async def both_ways(client: httpx.AsyncClient, path: str, data: bytes,
                    quart_served: list[str]) -> tuple[httpx.Response, httpx.Response, list[Any], list[Any]]:
    headers = {"content-type": "application/json"}
    quart_served.clear()  # the fixtures' own requests
    with structlog.testing.capture_logs() as fast_logs:
        fast = await client.post(path, content=data, headers=headers)
    assert quart_served == []  # the ASGI route served it
    with structlog.testing.capture_logs() as quart_logs:
        slow = await client.post(path, content=_chunked(data), headers=headers)
    assert quart_served == [path]
    quart_served.clear()
    return fast, slow, fast_logs, quart_logs


def _refusals(logs: list[Any]) -> list[tuple[Any, ...]]:
    return [(e["event"], e["log_level"], e["method"], e["path"], e.get("status"),
             {k: v for k, v in e["body"].items() if k != "requestId"} if "body" in e else None)
            for e in logs if e["event"].startswith("http.")]


@pytest.mark.parametrize("device, data", [
    ("t-001", b'{"command": "set_target_temperature", "params": {"target_temperature": 22}}'),
    ("t-001", b'{"command": "self_destruct"}'),  # 400 unknown command
    ("t-001", b'{"command": "set_mode", "params": {"mode": "dry"}}'),  # 400 bad params
    ("t-001", b'{"cmd": "reboot"}'),  # 400 with the hint
    ("t-001", b'{"command": "reboot", "timeoutMs": 0}'),  # 400 timeoutMs
    ("t-001", b'{"command": '),  # 400 malformed JSON
    ("t-001", b''),  # 400 empty body
    ("t-001", b'[1, 2]'),  # 400 not an object
    ("t-001", b'{"command": "x", "params": {"n": NaN}}'),  # 400 not storable
    ("ghost", b'{"command": "reboot"}'),  # 404
    ("t-off", b'{"command": "reboot"}'),  # 409 (with its requestId)
    ("t-001", b'{"command": "reboot", "productId": "nope"}'),  # 404 in that product
])
async def test_both_routes_answer_alike(client: httpx.AsyncClient, online: FakeLink, quart_served: list[str],
                                        device: str, data: bytes) -> None:
    path = f"/api/devices/{device}/commands"
    fast, slow, fast_logs, quart_logs = await both_ways(client, path, data, quart_served)
    assert fast.status_code == slow.status_code
    a, b = fast.json(), slow.json()
    if "requestId" in a:  # made per request: the rest must match
        assert a.pop("requestId") != b.pop("requestId")
    assert a == b
    for name in ("content-type",):
        assert fast.headers[name] == slow.headers[name] == "application/json"
    assert int(fast.headers["content-length"]) == len(fast.content)
    assert fast.content.endswith(b"\n") and slow.content.endswith(b"\n")
    assert len(fast.headers["x-request-id"]) == 16
    assert _refusals(fast_logs) == _refusals(quart_logs)


async def test_a_command_through_each_route_is_sent_once(client: httpx.AsyncClient, online: FakeLink,
                                                         quart_served: list[str]) -> None:
    body = b'{"command": "set_target_temperature", "params": {"target_temperature": 22}}'
    fast, slow, _, _ = await both_ways(client, "/api/devices/t-001/commands", body, quart_served)
    sent = [payload["requestId"] for _, _, payload in online.published]
    assert [fast.json()["requestId"], slow.json()["requestId"]] == sent
    assert fast.json()["data"] == slow.json()["data"] == {"applied": {"target_temperature": 22}}


async def test_a_bug_is_the_same_json_500(client: httpx.AsyncClient, online: FakeLink, quart_served: list[str],
                                          runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("actor system on fire")

    monkeypatch.setattr(runtime.system, "tell", broken)
    fast, slow, fast_logs, quart_logs = await both_ways(
        client, "/api/devices/t-001/commands", b'{"command": "reboot"}', quart_served)
    assert fast.status_code == slow.status_code == 500
    assert fast.json() == slow.json() == {"error": "internal server error", "code": "internal_error"}
    assert "on fire" not in fast.text
    assert _refusals(fast_logs) == _refusals(quart_logs) == [
        ("http.unhandled_error", "error", "POST", "/api/devices/t-001/commands", None, None)]


def _scope(method: str = "POST", path: str = "/api/devices/d1/commands", query: bytes = b"",
           headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "query_string": query, "root_path": "",
            "headers": [(b"content-length", b"20")] if headers is None else headers}


@pytest.mark.parametrize("scope, served", [
    (_scope(), "d1"),
    (_scope(path="/api/devices/温度/commands"), "温度"),
    (_scope(method="GET"), None),  # Quart's 405
    (_scope(query=b"productId=p"), None),
    (_scope(path="/api/devices//commands"), None),  # Quart's 404
    (_scope(path="/api/devices/a/b/commands"), None),
    (_scope(path="/api/devices/d1/commands/"), None),
    (_scope(path="/api/devices/d1/events"), None),
    (_scope(headers=[]), None),  # no Content-Length
    (_scope(headers=[(b"transfer-encoding", b"chunked")]), None),
    (_scope(headers=[(b"content-length", b"20"), (b"content-encoding", b"gzip")]), None),
    (_scope(headers=[(b"content-length", str(MAX_BODY + 1).encode())]), None),  # Quart's 413
    (_scope(headers=[(b"content-length", str(MAX_BODY).encode())]), "d1"),
])
def test_which_requests_the_asgi_route_takes(scope: dict[str, Any], served: str | None) -> None:
    assert device_id_served_here(scope) == served


async def test_a_client_gone_before_its_body_leaves_no_trace(client: httpx.AsyncClient, online: FakeLink) -> None:
    port = client.base_url.port
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"POST /api/devices/t-001/commands HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{")
    await stream.aclose()
    r = await raw_request(client, "POST", "/api/devices/t-001/commands", b'{"command": "reboot"}')
    assert r.status == 200 and r.json()["code"] == 0
    assert len(online.published) == 1


async def test_concurrent_commands_each_get_their_own_answer(client: httpx.AsyncClient, online: FakeLink) -> None:
    answers: dict[int, Any] = {}

    async def one(i: int) -> None:
        r = await client.post("/api/devices/t-001/commands",
                              json={"command": "set_target_temperature", "params": {"target_temperature": i}})
        answers[i] = (r.status_code, r.json())

    async with trio.open_nursery() as nursery:
        for i in range(30):
            nursery.start_soon(one, i)
    assert all(status == 200 for status, _ in answers.values())
    assert {i: a["data"]["applied"]["target_temperature"] for i, (_, a) in answers.items()} == {i: i for i in range(30)}
    assert len({a["requestId"] for _, a in answers.values()}) == 30 == len(online.published)


async def test_pipelined_commands_are_answered_in_order(client: httpx.AsyncClient, online: FakeLink) -> None:
    """Two requests written at once on one connection (HTTP/1.1 pipelining): the second is
    read only once the first is answered, and the answers come in the order asked."""
    bodies = [b'{"command": "set_target_temperature", "params": {"target_temperature": %d}}' % t for t in (1, 2)]
    requests = b"".join(b"POST /api/devices/t-001/commands HTTP/1.1\r\nHost: x\r\nContent-Length: "
                        + str(len(b)).encode() + b"\r\n\r\n" + b for b in bodies)
    stream = await trio.open_tcp_stream("127.0.0.1", client.base_url.port)
    async with stream:
        await stream.send_all(requests)
        data = b""
        with trio.fail_after(10):
            while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"}\n"):
                data += await stream.receive_some()
    first, second = (RawResponse(b"HTTP/1.1 200" + part) for part in data.split(b"HTTP/1.1 200")[1:])
    assert [first.json()["data"]["applied"], second.json()["data"]["applied"]] == [
        {"target_temperature": 1}, {"target_temperature": 2}]
