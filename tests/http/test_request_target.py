"""What the server does with the request target and headers before any route sees them:
encoded slashes, bytes that are not UTF-8, slash merging and redirects, automatic OPTIONS,
X-Request-Id. Sent over raw sockets (`raw_request`), so the bytes on the wire are exactly
the ones written here."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import structlog
import structlog.testing
import trio

from gateways.http import create_app
from gateways.http_server import serve_http
from gateways.runtime import Runtime
from tests.http.conftest import FakeLink, agent_input, create_agent, raw_request, set_status

NO_ROUTE = {"error": "no such route", "code": "not_found"}


def capture() -> Any:
    # merge_contextvars: the captured lines carry the trace_id TraceIds bound.
    return structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars])


async def test_encoded_slash_in_the_path_is_404_and_does_nothing(
        client: httpx.AsyncClient, runtime: Runtime, link: FakeLink) -> None:
    agent = await create_agent(client)
    await set_status(runtime, "thermostat", "thermostat-001", "online")
    command = b'{"command": "reboot"}'
    new_agent = httpx.Request("POST", "http://x", json={"agent": agent_input("other")}).read()
    cases = [
        ("POST", "/api/devices/thermostat-001%2Fcommands", command),
        ("POST", "/api/devices/thermostat-001%2fcommands", command),
        ("POST", "/api%2Fagents", new_agent),
        ("DELETE", f"/api%2Fagents%2F{agent['id']}", b""),
        ("DELETE", "/api%2fagents%2fthermostat", b""),
        ("GET", "/api/devices/a%2Fb", b""),
    ]
    for method, target, body in cases:
        with capture() as logs:
            r = await raw_request(client, method, target, body, {"X-Request-Id": b"slash-1"})
        assert r.status == 404, target
        assert r.json() == NO_ROUTE
        assert r.headers["content-type"] == b"application/json"
        assert r.headers["x-request-id"] == b"slash-1"  # TraceIds is outside the refusal
        refused = [e for e in logs if e["event"] == "http.request_refused"]
        assert len(refused) == 1, target
        assert refused[0]["path"] == target and refused[0]["status"] == 404
        assert refused[0]["body"] == NO_ROUTE and refused[0]["trace_id"] == "slash-1"
    assert link.published == []  # no command ran
    agents = (await client.get("/api/agents")).json()["agents"]
    assert [a["agent_id"] for a in agents] == ["thermostat"]  # none created, none deleted
    # An encoded slash in the query is only a value: the device is looked up and not found.
    r = await raw_request(client, "GET", "/api/devices/thermostat-001?productId=a%2Fb")
    assert r.status == 404 and r.json()["code"] == "device_not_found"


@pytest.mark.parametrize("target", [
    "/api/health#frag", "/api/devices/thermostat-001#x", "/api/devices/thermostat-001/commands#x",
    "/api/devices/thermostat-001?productId=thermostat#x"])
async def test_a_fragment_in_the_target_is_400_not_part_of_an_id(
        client: httpx.AsyncClient, runtime: Runtime, link: FakeLink, target: str) -> None:
    """A client never sends a fragment (RFC 9110, 4.2.4); read as part of the path it
    named a device `thermostat-001#x`, or a route that does not exist."""
    await create_agent(client)
    await set_status(runtime, "thermostat", "thermostat-001", "online")
    method, body = ("POST", b'{"command": "reboot"}') if "/commands" in target else ("GET", b"")
    with capture() as logs:
        r = await raw_request(client, method, target, body, {"X-Request-Id": b"frag-1"})
    assert r.status == 400 and r.json() == {
        "error": "the request target has a fragment ('#'), which is not sent to a server", "code": "invalid_request"}
    assert r.headers["x-request-id"] == b"frag-1"
    refused = [e for e in logs if e["event"] == "http.request_refused"]
    assert [(e["status"], e["trace_id"]) for e in refused] == [(400, "frag-1")]
    assert link.published == []


@pytest.mark.parametrize("target", [
    "/api/devices/a%ff", "/api/devices/a%c0%af", "/api/devices/%ed%a0%80",
    "/api/devices/a%FF/events", "/api%ff/health", "/api/agents/%80"])
async def test_path_that_is_not_utf8_is_400(client: httpx.AsyncClient, target: str) -> None:
    with capture() as logs:
        r = await raw_request(client, "GET", target, headers={"X-Request-Id": b"utf-1"})
    assert r.status == 400
    assert r.json() == {"error": "path is not valid UTF-8", "code": "invalid_request"}
    assert r.headers["x-request-id"] == b"utf-1"
    refused = [e for e in logs if e["event"] == "http.request_refused"]
    assert [(e["path"], e["status"], e["trace_id"]) for e in refused] == [(target, 400, "utf-1")]


@pytest.mark.parametrize("query", ["productId=%ff", "productId=%c0%af", "x=1&productId=a%ED%A0%80",
                                   "%ff=1"])
async def test_query_that_is_not_utf8_is_400(client: httpx.AsyncClient, query: str) -> None:
    with capture() as logs:
        r = await raw_request(client, "GET", f"/api/devices/t-001?{query}")
    assert r.status == 400
    assert r.json() == {"error": "query string is not valid UTF-8", "code": "invalid_request"}
    assert [e["status"] for e in logs if e["event"] == "http.request_refused"] == [400]


async def test_utf8_in_path_and_query_still_works(client: httpx.AsyncClient, runtime: Runtime) -> None:
    await create_agent(client, "thermo")
    await set_status(runtime, "thermo", "café-1", "online")
    r = await raw_request(client, "GET", "/api/devices/caf%C3%A9-1?productId=thermo")
    assert r.status == 200 and r.json()["deviceId"] == "café-1"
    r = await raw_request(client, "GET", "/api/devices/caf%C3%A9-1?productId=th%C3%A9rmo")
    assert r.status == 404
    assert r.json()["error"] == "device 'café-1' not found in product 'thérmo'"
    # A real U+FFFD, sent as UTF-8, is an id like any other (`a%ff` no longer becomes it).
    r = await raw_request(client, "GET", "/api/devices/a%EF%BF%BD")
    assert r.status == 404 and r.json()["error"] == "device 'a\ufffd' not found"


@pytest.mark.parametrize("target", ["//api//health", "/api//health", "/api/health//",
                                    "/api/health/", "/api/agents/", "/api/devices//events",
                                    "/api/products/thermostat/devices/"])
async def test_no_slash_merging_and_no_redirect(client: httpx.AsyncClient, target: str) -> None:
    r = await raw_request(client, "GET", target, headers={"Host": b"evil.example"})
    assert r.status == 404
    assert r.json() == NO_ROUTE
    assert "location" not in r.headers


async def test_leading_slashes_are_one(client: httpx.AsyncClient) -> None:
    # werkzeug reads `//api/health` as `/api/health` (Request.path strips leading slashes):
    # no redirect, and no id can be misread since the first segment is always `api`.
    r = await raw_request(client, "GET", "//api/health", headers={"Host": b"evil.example"})
    assert r.status == 200 and r.json()["status"] == "ok" and "location" not in r.headers


async def test_no_rule_ends_with_a_slash(runtime: Runtime) -> None:
    # werkzeug redirects /x to /x/ for a rule "/x/" (strict_slashes): none may exist.
    assert [r.rule for r in create_app(runtime).url_map.iter_rules() if r.rule.endswith("/")] == []


async def test_a_redirect_would_be_a_json_404(runtime: Runtime) -> None:
    # Should a trailing-slash rule be added one day, werkzeug's redirect still never leaves.
    app = create_app(runtime)

    async def listing() -> dict[str, Any]:
        return {"ok": True}

    app.add_url_rule("/api/listing/", "listing", listing)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, app, "127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            assert (await c.get("/api/listing/")).json() == {"ok": True}
            r = await raw_request(c, "GET", "/api/listing", headers={"Host": b"evil.example"})
            assert r.status == 404 and r.json() == NO_ROUTE and "location" not in r.headers
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("target, allow", [
    ("/api/health", b"GET, HEAD"), ("/api/openapi.json", b"GET, HEAD"),
    ("/api/agents", b"GET, HEAD, POST"), ("/api/agents/1", b"DELETE, GET, HEAD, PATCH, PUT"),
    ("/api/products/p/devices", b"GET, HEAD"), ("/api/devices/d", b"GET, HEAD"),
    ("/api/devices/d/commands", b"POST"), ("/api/devices/d/events", b"GET, HEAD")])
async def test_options_is_a_json_405(client: httpx.AsyncClient, target: str, allow: bytes) -> None:
    r = await raw_request(client, "OPTIONS", target)
    assert r.status == 405
    assert r.headers["content-type"] == b"application/json"
    assert r.json()["code"] == "method_not_allowed"
    assert r.headers["allow"] == allow


async def test_head_on_a_get_route_still_works(client: httpx.AsyncClient) -> None:
    r = await raw_request(client, "HEAD", "/api/health")
    assert r.status == 200 and r.body == b""


async def test_request_id_is_utf8(client: httpx.AsyncClient) -> None:
    async def echoed(given: bytes) -> tuple[bytes, str]:
        with capture() as logs:
            r = await raw_request(client, "GET", "/api/devices/ghost", headers={"X-Request-Id": given})
        assert r.status == 404
        (line,) = [e for e in logs if e["event"] == "http.request_refused"]
        return r.headers["x-request-id"], line["trace_id"]

    cafe = "café ☕".encode()
    assert await echoed(cafe) == (cafe, "café ☕")  # echoed as sent, logged as text
    long_ok = ("é" * 128).encode()  # 128 characters, 256 bytes
    assert await echoed(long_ok) == (long_ok, "é" * 128)
    for refused in (("é" * 129).encode(), b"a" * 129, b"caf\xe9", b"\xc3", "a\u2028b".encode(),
                    "\u200b".encode()):
        header, trace_id = await echoed(refused)
        assert header != refused and len(trace_id) == 16, refused  # a new id instead
        assert header == trace_id.encode()
