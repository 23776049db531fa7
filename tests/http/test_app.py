"""Health, the OpenAPI document, and the generic JSON errors every route shares."""

from __future__ import annotations

import re

import httpx
import pytest
import structlog.testing

from gateways.http import create_app
from gateways.http.app import MAX_BODY
from gateways.runtime import Runtime
from tests.http.conftest import create_agent


async def test_health_reports_positions(client: httpx.AsyncClient) -> None:
    await create_agent(client)
    r = await client.get("/api/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert set(body) == {"status", "projectionPosition", "projectionOwner", "logPosition", "activeActors", "mqtt"}
    assert body["projectionOwner"] is True  # the only process on its database
    # The create waited for the views, so they are caught up with the log.
    assert body["logPosition"] >= 1
    assert body["projectionPosition"] == body["logPosition"]
    assert body["activeActors"] >= 1  # the agent's actor


async def test_unknown_route_is_json_404(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/nope")
    assert r.status_code == 404
    assert r.json() == {"error": "no such route", "code": "not_found"}


async def test_wrong_method_is_json_405(client: httpx.AsyncClient) -> None:
    r = await client.delete("/api/health")
    assert r.status_code == 405
    assert r.json()["code"] == "method_not_allowed"
    assert r.json()["error"]
    assert "GET" in r.headers["allow"]


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


def _normalise(path: str) -> str:
    return re.sub(r"<[^>]+>|\{[^}]+\}", "{}", path)


async def test_openapi_documents_every_route(client: httpx.AsyncClient, runtime: Runtime) -> None:
    r = await client.get("/api/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"] == "3.1.0"
    documented = {(_normalise(p), m.upper()) for p, ops in doc["paths"].items() for m in ops}
    served = {(_normalise(rule.rule), m) for rule in create_app(runtime).url_map.iter_rules()
              for m in rule.methods - {"HEAD", "OPTIONS"}}
    assert served == documented  # nothing undocumented, nothing documented that is gone
    # Every $ref resolves.
    refs = set(re.findall(r'"#/components/schemas/(\w+)"', r.text))
    assert refs <= set(doc["components"]["schemas"])


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
