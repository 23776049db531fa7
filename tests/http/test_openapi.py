"""GET /api/openapi.json: every served route is documented, and so is every answer it gives."""

from __future__ import annotations

import re

import httpx

from gateways.http import create_app
from gateways.runtime import Runtime


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
        return {status: r["description"] for status, r in paths[path][method]["responses"].items()}

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
    assert [d[:3] for d in generic.values()] == ["400", "404", "405", "408", "413", "500"]
    assert "UTF-8" in generic["InvalidRequestTarget"] and "more than once" in generic["InvalidRequestTarget"]
    assert "%2F" in generic["NoSuchRoute"] and "OPTIONS" in generic["MethodNotAllowed"]
    assert "components.responses" in doc["info"]["description"]
