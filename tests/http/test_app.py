"""Health, the OpenAPI document, and the generic JSON errors every route shares."""

from __future__ import annotations

import re

import httpx
import pytest
import structlog.testing
import trio

from gateways.http import create_app
from gateways.http.app import MAX_BODY, TEXT_LIMIT
from gateways.http_server import serve_http
from gateways.runtime import Runtime
from tests.http.conftest import RawResponse, agent_input, create_agent, raw_request


async def test_health_reports_positions(client: httpx.AsyncClient) -> None:
    await create_agent(client)
    r = await client.get("/api/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert set(body) == {"status", "projectionPosition", "projectionOwner", "logPosition", "storeWritable",
                         "activeActors", "loadingActors", "stoppingActors", "mqttConnected", "mqtt"}
    assert body["storeWritable"] is True
    assert body["mqttConnected"] is None  # no MQTT gateway in this test
    assert body["projectionOwner"] is True  # the only process on its database
    # The create waited for the views, so they are caught up with the log.
    assert body["logPosition"] >= 1
    assert body["projectionPosition"] == body["logPosition"]
    assert body["activeActors"] >= 1  # the agent's actor
    assert body["stoppingActors"] == 0
    assert body["loadingActors"] == 0


async def test_health_says_whether_commands_can_go_out(client: httpx.AsyncClient, link) -> None:
    """The HTTP API is up (`status` ok) whether or not the broker is there; `mqttConnected`
    says whether a command can go out now."""
    assert (await client.get("/api/health")).json()["mqttConnected"] is True
    link.connected = False
    body = (await client.get("/api/health")).json()
    assert (body["status"], body["mqttConnected"]) == ("ok", False)


async def test_unknown_route_is_json_404(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/nope")
    assert r.status_code == 404
    assert r.json() == {"error": "no such route", "code": "not_found"}


async def test_status_lines_carry_their_reason_phrase(client: httpx.AsyncClient) -> None:
    """hypercorn wrote "HTTP/1.1 200 " (an empty reason, allowed, but read as if something
    were missing); every answer, the command route's and a refusal's too, names its status."""
    for method, target, body, line in [
            ("GET", "/api/health", b"", b"HTTP/1.1 200 OK"),
            ("GET", "/api/nope", b"", b"HTTP/1.1 404 Not Found"),
            ("POST", "/api/devices/x/commands", b"{}", b"HTTP/1.1 400 Bad Request"),
            ("DELETE", "/api/health", b"", b"HTTP/1.1 405 Method Not Allowed")]:
        r = await raw_request(client, method, target, body)
        assert r.status_line == line, (target, r.status_line)


async def test_wrong_method_is_json_405(client: httpx.AsyncClient) -> None:
    r = await client.delete("/api/health")
    assert r.status_code == 405
    assert r.json()["code"] == "method_not_allowed"
    assert r.json()["error"]
    assert "GET" in r.headers["allow"]


async def test_a_compressed_body_is_415_and_a_bom_is_named(client: httpx.AsyncClient) -> None:
    """A gzip body is not read as broken UTF-8, and a body that starts with a byte order
    mark is told so, not "Expecting value: line 1 column 1"."""
    import gzip

    for path in ("/api/agents", "/api/devices/d1/commands"):
        r = await client.post(path, content=gzip.compress(b'{"agent": {}}'),
                              headers={"content-type": "application/json", "content-encoding": "gzip"})
        assert (r.status_code, r.json()) == (415, {
            "error": "Content-Encoding 'gzip' is not supported: send the body uncompressed",
            "code": "unsupported_media_type"}), path
        r = await client.post(path, content=b'\xef\xbb\xbf{"agent": {}}', headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["code"] == "invalid_json", path
        assert "byte order mark (BOM)" in r.json()["error"]
    r = await client.post("/api/agents", content=b'{"agent": null}', headers={"content-encoding": "identity"})
    assert r.status_code == 422  # identity is no encoding: read as usual


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    for path in ("/api/agents", "/api/devices/d1/commands"):
        r = await client.post(path, content=b'{"agent": ', headers={"content-type": "application/json"})
        assert r.status_code == 400, path
        assert r.json()["code"] == "invalid_json"
        assert "not valid JSON" in r.json()["error"]
        assert "Traceback" not in r.text


async def test_json_parley_cannot_store_is_400(client: httpx.AsyncClient) -> None:
    for body in (b'{"command": "x", "params": {"n": 36893488147419103232}}', b'{"command": "x", "params": {"n": NaN}}'):
        r = await client.post("/api/devices/d1/commands", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["code"] == "invalid_json", body
        assert "cannot store" in r.json()["error"]


async def test_empty_body_is_400(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/agents")
    assert r.status_code == 400
    assert r.json() == {"error": "request body is empty; expected a JSON object", "code": "invalid_json"}


async def test_body_over_1_mib_is_413(client: httpx.AsyncClient) -> None:
    big = b'{"command": "reboot", "params": {"x": "' + b"a" * MAX_BODY + b'"}}'
    r = await client.post("/api/devices/d1/commands", content=big,
                          headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json() == {"error": f"request body exceeds {MAX_BODY} bytes", "code": "request_entity_too_large"}


async def test_bad_input_is_logged(client: httpx.AsyncClient) -> None:
    with structlog.testing.capture_logs() as logs:
        await client.get("/api/devices/ghost")
        await client.post("/api/agents", content=b"nope")
    refused = [e for e in logs if e["event"] == "http.request_refused"]
    assert [(e["path"], e["status"]) for e in refused] == [("/api/devices/ghost", 404), ("/api/agents", 400)]
    assert refused[0]["body"]["code"] == "device_not_found"


async def test_a_bug_is_a_json_500_without_traceback(client: httpx.AsyncClient, runtime: Runtime,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> int:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(runtime.log, "max_position", broken)
    r = await client.get("/api/health")
    assert r.status_code == 500
    assert r.json() == {"error": "internal server error", "code": "internal_error"}
    assert "disk on fire" not in r.text


async def test_request_id_is_echoed_or_made(client) -> None:
    given = await client.get("/api/health", headers={"X-Request-Id": "trace-42"})
    assert given.headers["X-Request-Id"] == "trace-42"
    made = await client.get("/api/health")
    assert len(made.headers["X-Request-Id"]) == 16


async def test_quarts_own_refusals_are_logged_with_their_body(client: httpx.AsyncClient) -> None:
    with structlog.testing.capture_logs() as logs:
        await client.get("/api/nope")
        await client.delete("/api/health")
        await client.request("OPTIONS", "/api/agents")
        await client.post("/api/devices/d1/commands", content=b"x" * (MAX_BODY + 1))
    refused = [e for e in logs if e["event"] == "http.request_refused"]
    assert [(e["method"], e["status"], e["body"]["code"]) for e in refused] == [
        ("GET", 404, "not_found"), ("DELETE", 405, "method_not_allowed"),
        ("OPTIONS", 405, "method_not_allowed"), ("POST", 413, "request_entity_too_large")]
    assert refused[0]["body"] == {"error": "no such route", "code": "not_found"}
    assert all(e["body"]["error"] for e in refused)


# The command route's usual requests are served ahead of Quart (command_route.py): its own 408.
@pytest.mark.parametrize("path, start", [("/api/agents", b'{"agent"'), ("/api/devices/t-001/commands", b'{"command"')])
async def test_body_not_received_in_time_is_a_json_408(runtime: Runtime, path: str, start: bytes) -> None:
    app = create_app(runtime)
    app.config["BODY_TIMEOUT"] = 0.3  # 60 s in production
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, app, "127.0.0.1", 0)
        with structlog.testing.capture_logs() as logs:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                      b"Content-Length: 100\r\nX-Request-Id: slow-1\r\n\r\n" + start)
                data = b""
                with trio.fail_after(10):
                    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                        chunk = await stream.receive_some()
                        if not chunk:
                            break
                        data += chunk
        nursery.cancel_scope.cancel()
    r = RawResponse(data)
    assert r.status == 408
    assert r.json() == {"error": "the request body was not received in full within 0.3 s", "code": "request_timeout"}
    assert r.headers["x-request-id"] == b"slow-1"
    (line,) = [e for e in logs if e["event"] == "http.request_refused"]
    assert line["status"] == 408 and line["body"] == r.json()


async def test_a_huge_unknown_field_is_not_echoed_whole(client: httpx.AsyncClient) -> None:
    name = "f" * 500_000
    spec = {"commands": {name: {"parameters": {"p": {"enum": []}}}}}
    r = await client.post("/api/agents", json={"agent": agent_input("big", device_spec=spec)})
    assert r.status_code == 422
    (key,) = r.json()["errors"]
    assert key == ("device_spec.commands." + name)[:TEXT_LIMIT] + "…"


def test_json_responses_are_written_by_orjson_as_json_would_write_them():
    """The app's JSON provider (gateways/http/json_provider.py): the same text as `json` with
    Parley's options (compact, fields in order, UTF-8), `json` for what orjson writes
    otherwise, and valid JSON where `json` would not write any (NaN)."""
    import datetime
    import json
    import uuid

    from quart_trio import QuartTrio

    from gateways.http.json_provider import OrjsonProvider

    app = QuartTrio(__name__)
    app.json = OrjsonProvider(app)
    for obj in ({"b": 1, "a": "温度 🌡", "f": 21.5, "n": None, "l": [True, 1e16], 3: "int key"},
                {"big": 2**70}, {"at": datetime.datetime(2026, 1, 1)}, {"id": uuid.UUID(int=1)}):
        assert app.json.dumps(obj, separators=(",", ":")) == json.dumps(
            obj, separators=(",", ":"), ensure_ascii=False, default=app.json.default)
    assert app.json.dumps({"x": float("nan")}) == '{"x":null}'
    assert app.json.dumps({"b": 1, "a": 2}, indent=2) == '{\n  "b": 1,\n  "a": 2\n}'


async def test_access_log_is_one_line_per_request_when_asked_and_none_by_default(runtime: Runtime) -> None:
    lines = {}
    for access_log in (False, True):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_http, create_app(runtime, access_log=access_log), "127.0.0.1", 0)
            with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as c:
                    assert (await c.get("/api/health", headers={"X-Request-Id": "acc-1"})).status_code == 200
                    assert (await c.get("/api/devices/nobody/events?limit=5")).status_code == 404
                    assert (await c.post("/api/agents", content=b"{")).status_code == 400
                # The line comes once the app has returned, a moment after the client has its answer.
                with trio.move_on_after(1 if access_log else 0.2):
                    while sum(e["event"] == "http.request" for e in logs) < 3:
                        await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        lines[access_log] = [e for e in logs if e["event"] == "http.request"]
    assert lines[False] == []
    health, events, agents = lines[True]
    assert (health["method"], health["path"], health["status"], health["trace_id"]) == \
        ("GET", "/api/health", 200, "acc-1")
    assert (events["path"], events["status"]) == ("/api/devices/nobody/events?limit=5", 404)
    assert (agents["method"], agents["status"]) == ("POST", 400)
    assert all(e["log_level"] == "info" and isinstance(e["ms"], float) and e["ms"] > 0 for e in lines[True])
    assert len({e["trace_id"] for e in lines[True]}) == 3  # each request its own


async def test_reads_do_not_wait_for_views_stuck_on_an_event(client: httpx.AsyncClient, monkeypatch) -> None:
    """While the views are stuck on an event (an in-memory mirror cannot follow it), a read
    answers at once from what they hold (not after waiting out its read-your-writes wait each
    time), a create is answered without the read side, and the stuck view is logged by the
    runner, not per read."""
    import gateways.http.agents
    import gateways.http.app
    from projections.agents import Agents

    await create_agent(client, "before")
    # Waits no test could sit out: answering in time means not waiting at all.
    monkeypatch.setattr(gateways.http.app, "READ_WAIT_S", 600.0)
    monkeypatch.setattr(gateways.http.agents, "PROJECTION_TIMEOUT_S", 600.0)

    def broken(self, events):
        raise ValueError("a mirror bug")

    monkeypatch.setattr(Agents, "follow", broken)
    with structlog.testing.capture_logs() as logs, trio.fail_after(30):
        r = await client.post("/api/agents", json={"agent": agent_input("during")})
        assert r.status_code == 201 and r.json()["success"] is True
        for _ in range(3):
            listed = await client.get("/api/agents")
            assert listed.status_code == 200
            # What the views hold: the agent from before, not the one they cannot follow.
            assert [a["agent_id"] for a in listed.json()["agents"]] == ["before"]
    assert not [e for e in logs if e["event"] == "http.projection_lagging"]
    assert [e["event"] for e in logs if e["event"].startswith("projection.")] == ["projection.apply_failed"]
    monkeypatch.undo()
    with trio.fail_after(30):
        while len((await client.get("/api/agents")).json()["agents"]) < 2:  # fixed: it goes on
            await trio.sleep(0.05)


async def test_health_names_a_view_halted_on_an_event_it_cannot_apply(client: httpx.AsyncClient, runtime,
                                                                      monkeypatch) -> None:
    """A view that cannot apply an event stops at that position, the other views go on, and
    /api/health says which view, where and why, not only that something drifts apart."""
    from projections.agents import Agents

    def broken(self, cur, events):
        raise ValueError("a view bug")

    before = (await client.get("/api/health")).json()["logPosition"]
    monkeypatch.setattr(Agents, "apply", broken)
    with trio.fail_after(30):
        r = await client.post("/api/agents", json={"agent": agent_input("thermostat")})
        assert r.status_code == 201  # committed and answered; its view stopped before it
        while "haltedViews" not in (body := (await client.get("/api/health")).json()):
            await trio.sleep(0.05)
    (halted,) = body["haltedViews"]
    assert (halted["view"], halted["position"], halted["error"]) == ("agents", before, "ValueError('a view bug')")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", halted["since"])
    assert "projectionError" not in body  # not failing any more: halted, and the others caught up
    assert body["projectionPosition"] == body["logPosition"] > before
