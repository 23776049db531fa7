"""GET /api/openapi.json: every served route is documented, and so is every answer it gives."""

from __future__ import annotations

import re
import sqlite3
from typing import Any

import httpx
import jsonschema
import pytest
import trio

from gateways.http import create_app
from gateways.runtime import Runtime
from tests.http.conftest import FakeLink, RawResponse, agent_input, create_agent, set_status


def _normalise(path: str) -> str:
    return re.sub(r"<[^>]+>|\{[^}]+\}", "{}", path)


async def test_openapi_documents_every_route(client: httpx.AsyncClient, runtime: Runtime) -> None:
    r = await client.get("/api/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"] == "3.1.0"
    documented = {(_normalise(p), m.upper()) for p, ops in doc["paths"].items() for m in ops}
    served = {(_normalise(rule.rule), m) for rule in create_app(runtime).url_map.iter_rules()
              for m in rule.methods - {"HEAD"}}
    assert "OPTIONS" not in {m for _, m in served}  # no automatic OPTIONS: it is a 405
    assert served == documented  # nothing undocumented, nothing documented that is gone
    # Every $ref resolves.
    for kind in ("schemas", "responses"):
        refs = set(re.findall(rf'"#/components/{kind}/(\w+)"', r.text))
        assert refs <= set(doc["components"][kind])


async def test_openapi_documents_the_real_responses(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/api/openapi.json")).json()
    paths = doc["paths"]

    def responses(path: str, method: str) -> dict[str, str]:
        return {status: _resolve(doc, r)["description"]
                for status, r in paths[path][method]["responses"].items()}

    # Empty (or repeated) productId is a 400 on both routes that read it.
    assert "productId" in responses("/api/devices/{deviceId}", "get")["400"]
    events_400 = responses("/api/devices/{deviceId}/events", "get")["400"]
    assert "limit" in events_400 and "productId" in events_400
    # The agent routes that ask the agent actor can answer 503 unavailable.
    for path, method in [("/api/agents", "post"), ("/api/agents/{id}", "put"),
                         ("/api/agents/{id}", "delete")]:
        assert "unavailable" in responses(path, method)["503"], (path, method)
    # The generic refusals, documented once.
    generic = {name: r["description"] for name, r in doc["components"]["responses"].items()}
    assert [d[:3] for d in generic.values()] == [
        "400", "400", "400", "400", "404", "405", "408", "413", "431", "500", "501", "503"]
    assert "UTF-8" in generic["InvalidRequestTarget"] and "more than once" in generic["InvalidRequestTarget"]
    assert "%2F" in generic["NoSuchRoute"] and "OPTIONS" in generic["MethodNotAllowed"]
    assert "components.responses" in doc["info"]["description"]


# -- every answer a route gives is documented ----------------------------------------------
#
# The requests below make each route give each answer it can give over HTTP (all but 408,
# which takes 60 s, and the 500s and agent 503s that need a crashed or unreachable actor;
# those are checked to be listed below). Each answer must be documented: under its status in
# the operation, naming its `code` if it has one, or as a generic refusal in
# components.responses, whose descriptions start "<status> <code>". invalid_json and the
# store's 503 must be in the operation itself: they depend on the route.

ROUTE_SPECIFIC = {"invalid_json", "unavailable"}


def _resolve(doc: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in response:
        return doc["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    return response


def _generic(doc: dict[str, Any]) -> set[tuple[int, str]]:
    return {(int(d[:3]), re.match(r"\w+", d[4:]).group()) for d in
            (r["description"] for r in doc["components"]["responses"].values())}


def _undocumented(doc: dict[str, Any], answers: list[tuple[str, str, int, str | None]]) -> list[Any]:
    missing = []
    for path, method, status, code in answers:
        operation = doc["paths"][path].get(method.lower(), {"responses": {}})  # none: a 405
        listed = operation["responses"].get(str(status))
        if listed is not None and (code is None or code in _resolve(doc, listed)["description"]):
            continue
        if code not in ROUTE_SPECIFIC and (status, code) in _generic(doc):
            continue
        missing.append((method, path, status, code))
    return missing


class Answers:
    """Sends requests and notes (route, method, status, code) of every answer."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.seen: list[tuple[str, str, int, str | None]] = []

    async def __call__(self, method: str, url: str, route: str, **kwargs: Any) -> httpx.Response:
        r = await self.client.request(method, url, **kwargs)
        body = r.json()
        code = body.get("code") if isinstance(body, dict) and r.status_code >= 400 else None
        self.seen.append((route, method, r.status_code, code))
        return r


def _store_down(*args: Any, **kwargs: Any) -> Any:
    raise sqlite3.OperationalError("database is locked")


async def test_every_answer_of_every_route_is_documented(
        client: httpx.AsyncClient, runtime: Runtime, link: FakeLink,
        monkeypatch: pytest.MonkeyPatch) -> None:
    doc = (await client.get("/api/openapi.json")).json()
    ask = Answers(client)
    big = b'{"x": "' + b"a" * (1024 * 1024) + b'"}'

    await ask("GET", "/api/health", "/api/health")
    await ask("GET", "/api/openapi.json", "/api/openapi.json")

    # Agents.
    agents, agent = "/api/agents", "/api/agents/{id}"
    await ask("GET", agents, agents)
    created = (await ask("POST", agents, agents, json={"agent": agent_input()})).json()["agent"]
    one = f"/api/agents/{created['id']}"
    for method, url, route in [("POST", agents, agents), ("PUT", one, agent)]:
        await ask(method, url, route, content=b"{bad")
        await ask(method, url, route, content=b"")
        await ask(method, url, route, json=[1])
        await ask(method, url, route, content=big)
        await ask(method, url, route, json={"agent": "x"})
        await ask(method, url, route, json={"agent": {**agent_input("other"), "is_custom_agent": "yes"}})
        await ask(method, url, route, json={"agent": {"custom_agent_http_headers": {"A": 1}}})
        await ask(method, url, route, json={"agent": {"tools": [{"name": "t" * 256, "endpoint": "e"}]}})
    await ask("POST", agents, agents, json={"agent": agent_input()})  # taken
    await ask("PUT", one, agent, json={"agent": {"agent_id": "renamed"}})
    await ask("PUT", one, agent, json={"agent": {"name": "Renamed"}})
    await ask("GET", one, agent)
    for method in ("GET", "PUT", "DELETE"):
        await ask(method, "/api/agents/999999", agent, json={"agent": {}})

    # Devices, commands and events.
    await set_status(runtime, "thermostat", "t-001", "online")
    await set_status(runtime, "thermostat", "t-002", "offline")
    devices, device = "/api/products/{productId}/devices", "/api/devices/{deviceId}"
    commands, events = "/api/devices/{deviceId}/commands", "/api/devices/{deviceId}/events"
    await ask("GET", "/api/products/thermostat/devices?status=online", devices)
    await ask("GET", "/api/products/thermostat/devices?status=bogus", devices)
    await ask("GET", "/api/products/thermostat/devices?status=online&status=online", devices)
    await ask("GET", "/api/products/ghost/devices", devices)
    for url in ("/api/devices/t-001", "/api/devices/t-001?productId=", "/api/devices/ghost"):
        await ask("GET", url, device)
    for url in ("/api/devices/t-001/events", "/api/devices/t-001/events?limit=0",
                "/api/devices/t-001/events?limit=1&limit=2", "/api/devices/ghost/events"):
        await ask("GET", url, events)
    for body in ({"command": "reboot"}, {"command": "reboot", "timeoutMs": "1"}, {"command": "nope"}, [1]):
        await ask("POST", "/api/devices/t-001/commands", commands, json=body)
    await ask("POST", "/api/devices/t-001/commands", commands, content=b"{bad")
    await ask("POST", "/api/devices/t-001/commands", commands, content=big)
    await ask("POST", "/api/devices/ghost/commands", commands, json={"command": "reboot"})
    await ask("POST", "/api/devices/t-002/commands", commands, json={"command": "reboot"})
    link.silent = True
    await ask("POST", "/api/devices/t-001/commands", commands, json={"command": "reboot", "timeoutMs": 100})
    link.connected = False
    await ask("POST", "/api/devices/t-001/commands", commands, json={"command": "reboot"})

    # The generic refusals that routes reach: a path not UTF-8, an unknown route, a method.
    await ask("GET", "/api/devices/%ff", device)
    await ask("GET", "/api/devices/a%2Fb", device)
    await ask("PATCH", "/api/devices/t-001", device)
    await ask("OPTIONS", agents, agents)

    # The store down: every route that reads it answers 503 unavailable.
    monkeypatch.setattr(runtime.log, "max_position", _store_down)
    for view, name in [(runtime.devices, "find"), (runtime.devices, "list_devices"),
                       (runtime.device_events, "recent")]:
        monkeypatch.setattr(view, name, _store_down)
    await ask("GET", "/api/health", "/api/health")
    await ask("GET", "/api/products/thermostat/devices", devices)
    await ask("GET", "/api/devices/t-001", device)
    await ask("GET", "/api/devices/t-001/events", events)
    await ask("POST", "/api/devices/t-009/commands", commands, json={"command": "reboot"})
    await ask("GET", agents, agents)
    await ask("GET", one, agent)
    await ask("POST", agents, agents, json={"agent": agent_input("lamp")})
    await ask("PUT", one, agent, json={"agent": {"name": "Renamed again"}})

    monkeypatch.setattr(runtime.log, "max_position", lambda: 1 / 0)  # a bug
    await ask("GET", "/api/health", "/api/health")

    seen = {(path, method, status) for path, method, status, _ in ask.seen}
    assert {("/api/health", "GET", 503), ("/api/agents", "POST", 503), ("/api/agents/{id}", "PUT", 503),
            ("/api/devices/{deviceId}/commands", "POST", 504), ("/api/agents/{id}", "PUT", 413),
            ("/api/agents/{id}", "PUT", 422), ("/api/agents/{id}", "DELETE", 404)} <= seen
    assert _undocumented(doc, ask.seen) == []
    # The answers no request above could give are listed too.
    for path, method in [("/api/agents", "post"), ("/api/agents/{id}", "put"),
                         ("/api/agents/{id}", "delete")]:
        assert "503" in doc["paths"][path][method]["responses"]
    assert {(408, "request_timeout"), (500, "internal_error")} <= _generic(doc)


HEAD = b"GET /api/health HTTP/1.1\r\nHost: t\r\n"


@pytest.mark.parametrize("raw, status, code", [
    (b"GARBAGE\r\n\r\n", 400, "bad_request"),
    # A head over 64 KiB (the most the server reads at once) is always too large; one over
    # 16 KiB is when it is still incomplete after a read (here: never completed).
    (HEAD + b"X: " + b"a" * 70_000 + b"\r\n\r\n", 431, "request_header_fields_too_large"),
    (HEAD + b"X: " + b"a" * 17_000, 431, "request_header_fields_too_large"),
    (HEAD + b"Transfer-Encoding: gzip\r\n\r\n", 501, "not_implemented"),
])
async def test_malformed_http_refusals_are_documented(client: httpx.AsyncClient, raw: bytes,
                                                      status: int, code: str) -> None:
    doc = (await client.get("/api/openapi.json")).json()
    async with await trio.open_tcp_stream("127.0.0.1", client.base_url.port) as stream:
        await stream.send_all(raw)
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some():
                data += chunk
    answer = RawResponse(data)
    assert answer.status == status, data[:300]
    assert answer.json()["code"] == code
    assert answer.headers["connection"] == b"close" and answer.headers["x-request-id"]
    assert (status, code) in _generic(doc)
    (documented,) = [r for r in doc["components"]["responses"].values()
                     if r["description"].startswith(f"{status} {code}")]
    assert set(documented["headers"]) == {"Connection", "X-Request-Id"}


async def test_schemas_are_valid_and_fit_real_agents(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/api/openapi.json")).json()
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)

    def check(name: str, value: Any) -> None:
        # The document's own refs (#/components/...) resolve against this root.
        jsonschema.validate(value, {"$ref": f"#/components/schemas/{name}", "components": doc["components"]},
                            cls=jsonschema.Draft202012Validator)

    sent = agent_input(custom_agent_http_headers={"Authorization": "Bearer x"}, tools=[
        {"name": "t" * 255, "endpoint": "http://localhost:8080/mcp", "http_headers": {"X-Key": "k"}}])
    check("AgentInput", {"agent": sent})
    r = await client.post("/api/agents", json={"agent": sent})
    assert r.status_code == 201, r.text
    check("AgentSaved", r.json())
    check("Agent", (await client.get("/api/agents/thermostat")).json())
    # What the server refuses, the schema refuses too.
    for bad in ({"custom_agent_http_headers": {"A": 1}},
                {"tools": [{"name": "t" * 256, "endpoint": "e"}]},
                {"tools": [{"name": "t", "endpoint": "e", "http_headers": {"A": True}}]}):
        with pytest.raises(jsonschema.ValidationError):
            check("AgentInput", {"agent": {**sent, **bad}})
        r = await client.put("/api/agents/thermostat", json={"agent": bad})
        assert r.status_code == 422, r.text


async def test_agent_ids_are_described_as_log_positions(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/api/openapi.json")).json()
    first = await create_agent(client, "thermostat")
    await client.delete("/api/agents/thermostat")
    again = await create_agent(client, "thermostat")
    assert again["id"] > first["id"] + 1  # a new id, and not the next number
    assert "log position" in doc["components"]["schemas"]["Agent"]["properties"]["id"]["description"]
