"""Agents an older version stored, over HTTP: read back as written, commands checked
against what their spec allows, updates possible; the input rules stay for input."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateways.runtime import Runtime
from tests.http.conftest import FakeLink, set_status, started_runtime
from tests.projections.test_agents import CORRUPT_SPEC, OLD_CONFIG, OLD_SPEC, write_old_agents


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    """The conftest's runtime, on a log an older version wrote: `fan` (a spec today's input
    rules refuse) and `broken` (a spec nobody could read)."""
    write_old_agents(tmp_path, {"fan": OLD_CONFIG,
                                "broken": {**OLD_CONFIG, "agent_id": "broken", "device_spec": CORRUPT_SPEC}})
    with started_runtime(tmp_path) as rt:
        yield rt


async def command(client: httpx.AsyncClient, product: str, params: dict[str, Any]) -> httpx.Response:
    return await client.post("/api/devices/d-1/commands",
                             json={"command": "set_speed", "params": params, "productId": product})


async def test_an_old_agent_reads_back_and_its_commands_are_checked(
        client: httpx.AsyncClient, runtime: Runtime, link: FakeLink) -> None:
    r = await client.get("/api/agents/fan")
    assert r.status_code == 200
    assert r.json()["device_spec"] == OLD_SPEC and r.json()["voice_type"] == ""
    await set_status(runtime, "fan", "d-1")
    r = await command(client, "fan", {"speed": "max"})
    assert r.status_code == 400 and r.json() == {
        "error": "invalid params for 'set_speed': speed: 'max' is not of type 'integer'", "code": "invalid_command"}
    r = await command(client, "fan", {"speed": 3})
    assert r.status_code == 400 and "speed: 3 is not one of" in r.json()["error"]
    r = await command(client, "fan", {"speed": 2})
    assert r.status_code == 200 and r.json()["code"] == 0
    assert [p[2]["params"] for p in link.published] == [{"speed": 2}]


async def test_an_old_agent_can_be_updated_and_new_input_is_still_strict(client: httpx.AsyncClient) -> None:
    r = await client.put("/api/agents/fan", json={"agent": {"name": "ceiling fan"}})
    assert r.status_code == 200, r.text
    assert r.json()["agent"]["name"] == "ceiling fan" and r.json()["agent"]["device_spec"] == OLD_SPEC
    # The stored spec sent back as input is input: checked as any new spec.
    r = await client.put("/api/agents/fan", json={"agent": {"device_spec": OLD_SPEC}})
    assert r.status_code == 422
    assert r.json() == {"success": False, "errors": {
        "device_spec": ["give telemetry or properties (its older name), not both"]}}
    spec = {k: v for k, v in OLD_SPEC.items() if k != "properties"}
    r = await client.put("/api/agents/fan", json={"agent": {"device_spec": spec}})
    assert r.status_code == 422
    assert r.json() == {"success": False, "errors": {
        "device_spec.commands.set_speed.parameters.speed": ["enum value 'max' is not of type integer"]}}
    # A blank required field is still "can't be blank", though the stored one is blank.
    r = await client.put("/api/agents/fan", json={"agent": {"name": " "}})
    assert r.status_code == 422 and r.json()["errors"] == {"name": ["can't be blank"]}


async def test_an_agent_whose_spec_cannot_be_read_accepts_no_commands(
        client: httpx.AsyncClient, runtime: Runtime) -> None:
    r = await client.get("/api/agents/broken")
    assert r.status_code == 200 and r.json()["device_spec"] == CORRUPT_SPEC
    await set_status(runtime, "broken", "d-1")
    r = await command(client, "broken", {"speed": 1})
    assert r.status_code == 400 and r.json() == {
        "error": "product 'broken' has no device spec; it accepts no commands", "code": "invalid_command"}
    # Sending a good spec repairs it.
    good = {"commands": {"set_speed": {"parameters": {"speed": {"type": "integer"}}}}}
    r = await client.put("/api/agents/broken", json={"agent": {"device_spec": good}})
    assert r.status_code == 200, r.text
    r = await command(client, "broken", {"speed": "x"})
    assert r.status_code == 400 and "speed: 'x' is not of type 'integer'" in r.json()["error"]
