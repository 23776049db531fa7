"""Agent CRUD over real HTTP (seed 001 shapes)."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
import structlog
import structlog.testing

from gateways.runtime import Runtime
from tests.http.conftest import SPEC, agent_input, create_agent, set_status

NULL = object()  # in a parametrized body: the field sent as JSON null (None: left out)
SEED_FIELDS = ["id", "agent_id", "name", "agent_type", "sys_prompt", "voice_type", "welcome_message",
               "is_custom_agent", "custom_agent_endpoint", "custom_agent_http_headers", "emqx_config_id",
               "mqtt_opts", "tools", "data_definitions", "current_clients", "running", "inserted_at",
               "updated_at", "device_spec"]


async def test_create_then_list_and_get(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/agents", json={"agent": agent_input()})
    assert r.status_code == 201
    body = r.json()
    assert body["success"] is True and body["message"] == "智能体创建成功"
    agent = body["agent"]
    assert list(agent) == SEED_FIELDS
    assert isinstance(agent["id"], int)
    assert agent["agent_id"] == "thermostat" and agent["name"] == "Thermostat agent"
    assert agent["sys_prompt"] == "你是一个智能助手" and agent["custom_agent_endpoint"] is None
    assert agent["tools"][0]["name"] == "home-control"
    assert agent["tools"][0]["status"] == "disconnected"
    assert agent["current_clients"] == [] and agent["running"] is True
    # Whole seconds and Z, as the seed shows them: "2026-01-01T00:00:00Z".
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", agent["inserted_at"])
    assert agent["inserted_at"] == agent["updated_at"]
    assert set(agent["device_spec"]["commands"]) == set(SPEC["commands"])

    # Visible at once: the create waited for the projection.
    listed = (await client.get("/api/agents")).json()
    assert listed == {"agents": [agent]}
    assert (await client.get(f"/api/agents/{agent['id']}")).json() == agent
    assert (await client.get("/api/agents/thermostat")).json() == agent  # agent_id works too


async def test_list_is_ordered_and_reports_online_clients(client: httpx.AsyncClient, runtime: Runtime) -> None:
    first = await create_agent(client, "thermostat")
    second = await create_agent(client, "lamp", device_spec=None)
    await set_status(runtime, "thermostat", "t-001", "online")
    await set_status(runtime, "thermostat", "t-002", "offline")
    await set_status(runtime, "lamp", "l-001", "online")
    agents = (await client.get("/api/agents")).json()["agents"]
    assert [a["agent_id"] for a in agents] == ["thermostat", "lamp"]
    assert first["id"] < second["id"]
    assert agents[0]["current_clients"] == ["t-001"]  # the offline one is not a client
    assert agents[1]["current_clients"] == ["l-001"]
    assert agents[1]["device_spec"] is None


async def test_unknown_agent_is_404(client: httpx.AsyncClient) -> None:
    for method in ("GET", "PUT", "DELETE"):
        r = await client.request(method, "/api/agents/999", json={"agent": {"name": "whatever"}})
        assert r.status_code == 404, method
        assert r.json() == {"error": "Agent not found"}
    assert (await client.get("/api/agents/no-such-agent")).json() == {"error": "Agent not found"}


async def test_only_ascii_digits_are_a_numeric_id(client: httpx.AsyncClient) -> None:
    agent = await create_agent(client)
    assert agent["id"] == 1
    # str.isdigit() is true for all three, and int() refuses "²" and reads "١" as 1.
    for ident in ("%C2%B2", "%D9%A1", "9" * 5000):
        for method in ("GET", "PUT", "DELETE"):
            r = await client.request(method, f"/api/agents/{ident}", json={"agent": {"name": "whatever"}})
            assert (r.status_code, r.json()) == (404, {"error": "Agent not found"}), (ident[:8], method)
    assert (await client.get("/api/agents/1")).json() == agent


async def test_a_numeric_id_is_read_only_as_ids_are_written(client: httpx.AsyncClient) -> None:
    """`001` is no way to write the id 1: it is the agent_id "001" (or nothing), so a PUT or
    DELETE meant for that agent never lands on agent 1."""
    first = await create_agent(client)
    zeros = await create_agent(client, "001")
    assert (first["id"], zeros["id"]) == (1, 2)
    assert (await client.get("/api/agents/001")).json()["agent_id"] == "001"
    assert (await client.get("/api/agents/01")).status_code == 404
    assert (await client.delete("/api/agents/001")).status_code == 200
    assert (await client.get("/api/agents/1")).json() == first
    assert (await client.get("/api/agents/001")).status_code == 404


async def test_an_all_digit_agent_id_is_reached_by_its_id_only(client: httpx.AsyncClient) -> None:
    """An id-looking path is an id, whether or not an agent has that id yet: it cannot
    change meaning as the log grows and reach another agent."""
    digits = await create_agent(client, "313")
    assert digits["id"] != 313
    for method in ("GET", "PUT", "DELETE"):
        r = await client.request(method, "/api/agents/313", json={"agent": {"name": "whatever"}})
        assert (r.status_code, r.json()) == (404, {"error": "Agent not found"}), method
    assert (await client.get(f"/api/agents/{digits['id']}")).json() == digits
    assert (await client.get("/api/agents/9223372036854775808")).status_code == 404  # past any position


@pytest.mark.parametrize("changes, field, message", [
    ({"agent_id": "has space"}, "agent_id", "may contain only letters, digits, underscores and hyphens"),
    ({"agent_id": "a/b"}, "agent_id", "may contain only letters, digits, underscores and hyphens"),
    ({"agent_id": "abc\n"}, "agent_id", "may contain only letters, digits, underscores and hyphens"),
    ({"agent_id": "ab"}, "agent_id", "String should have at least 3 characters"),
    ({"agent_id": "a" * 256}, "agent_id", "String should have at most 255 characters"),
    ({"name": "ab"}, "name", "String should have at least 3 characters"),
    ({"name": "n" * 256}, "name", "String should have at most 255 characters"),
    ({"agent_type": "triple"}, "agent_type", "Input should be 'single' or 'multi'"),
    ({"voice_type": None}, "voice_type", "can't be blank"),
    ({"is_custom_agent": None}, "is_custom_agent", "can't be blank"),
    # Blank is no value, and null on a required field is missing (Ecto's casting).
    ({"voice_type": ""}, "voice_type", "can't be blank"),
    ({"voice_type": "   "}, "voice_type", "can't be blank"),
    ({"name": " \t "}, "name", "can't be blank"),
    ({"name": NULL}, "name", "can't be blank"),
    ({"agent_type": NULL}, "agent_type", "can't be blank"),
    # JSON types as documented, not guessed.
    ({"is_custom_agent": "no"}, "is_custom_agent", "Input should be a valid boolean"),
    ({"is_custom_agent": 1}, "is_custom_agent", "Input should be a valid boolean"),
    ({"emqx_config_id": True}, "emqx_config_id", "Input should be a valid integer"),
    ({"emqx_config_id": "1.0"}, "emqx_config_id", "Input should be a valid integer"),  # Ecto: whole "1" only
    ({"emqx_config_id": " 1"}, "emqx_config_id", "Input should be a valid integer"),
    ({"emqx_config_id": "99999999999999999999"}, "emqx_config_id", "Input should be a valid integer"),  # > 64 bits
    ({"is_custom_agent": "yes"}, "is_custom_agent", "Input should be a valid boolean"),
    ({"device_spec": {"telemetry": {}, "properties": {}}}, "device_spec",
     "give telemetry or properties (its older name), not both"),
    ({"is_custom_agent": True, "custom_agent_endpoint": "http://x.example/ws"},
     "custom_agent_endpoint", "must start with ws:// or wss://"),
    ({"is_custom_agent": True}, "custom_agent_endpoint", "can't be blank for a custom agent"),
    ({"sys_prompt": "p" * 2001}, "sys_prompt", "String should have at most 2000 characters"),
    ({"welcome_message": "w" * 501}, "welcome_message", "String should have at most 500 characters"),
    # What could never work later: a header that would split a request, a URL with no
    # host, a tool no model could call by name, a command no client could send.
    ({"custom_agent_http_headers": {"X-A": "ok\r\nX-Injected: 1"}}, "custom_agent_http_headers",
     "the value of 'X-A' has a control character (CR, LF, ...)"),
    ({"custom_agent_http_headers": {"Bad Name": "v"}}, "custom_agent_http_headers",
     "'Bad Name' is no HTTP header name (letters, digits and !#$%&'*+.^_`|~-)"),
    ({"is_custom_agent": True, "custom_agent_endpoint": "ws://"}, "custom_agent_endpoint",
     "must be a ws:// or wss:// URL with a host"),
    ({"tools": [{"name": "t", "endpoint": "not a url"}]}, "tools.0.endpoint",
     "must be a http:// or https:// URL with a host"),
    ({"tools": [{"name": "t", "endpoint": "http://a.example/mcp", "http_headers": {"X": "a\nb"}}]},
     "tools.0.http_headers", "the value of 'X' has a control character (CR, LF, ...)"),
    ({"tools": [{"name": "t", "endpoint": "http://a.example/mcp"}, {"name": "t", "endpoint": "http://b.example/mcp"}]},
     "tools", "two tools are named 't'"),
    ({"device_spec": {"commands": {"": {}}}}, "device_spec.commands", "a command needs a name"),
    ({"device_spec": {"commands": {" ": {}}}}, "device_spec.commands", "a command needs a name"),
    ({"tools": [{"name": f"t{i}", "endpoint": "http://a.example/mcp"} for i in range(129)]}, "tools",
     "Input should have at most 128 items, not 129"),
    ({"data_definitions": [{"topic_filter": "a/b"}] * 200}, "data_definitions",
     "Input should have at most 128 items, not 200"),
    ({"device_spec": {"commands": {"c": {"parameters": {"p": {"enum": []}}}}}},
     "device_spec.commands.c.parameters.p", "enum lists no value: no call could ever pass"),
])
async def test_create_rejects_each_invalid_field(client: httpx.AsyncClient, changes: dict[str, Any],
                                                 field: str, message: str) -> None:
    agent = agent_input()
    for key, value in changes.items():
        if value is None:
            agent.pop(key)  # missing
        else:
            agent[key] = None if value is NULL else value
    r = await client.post("/api/agents", json={"agent": agent})
    assert r.status_code == 422
    assert r.json() == {"success": False, "errors": {field: [message]}}
    assert (await client.get("/api/agents")).json() == {"agents": []}


async def test_a_422_names_at_most_twenty_errors_however_many_there_are(client: httpx.AsyncClient) -> None:
    """100,000 empty tools made a 422 of 8 MB, and a log line as long."""
    for changes in ({"tools": [{}] * 100}, {"data_definitions": [{}] * 100}):
        with structlog.testing.capture_logs() as logs:
            r = await client.post("/api/agents", json={"agent": {**agent_input(), **changes}})
        assert r.status_code == 422 and len(r.content) < 4000
        errors = r.json()["errors"]
        assert sum(len(messages) for messages in errors.values()) == 21
        assert errors["agent"][-1].endswith("more errors not shown")
        refused = [e for e in logs if e["event"] == "http.request_refused"]
        assert len(refused) == 1 and len(str(refused[0])) < 5000


async def test_fields_are_cast_as_the_platforms_ecto_casts_them(client: httpx.AsyncClient) -> None:
    """Seed 001's platform reads its fields with Ecto's cast: null for an optional field is
    no value, a boolean or an integer may come as the string Ecto takes ("true", "0",
    "42"), and fields it does not know are ignored. A client that relies on any of it works
    against Parley unchanged (an audit: `"tools": null` was a 422 here)."""
    optional_nulls = {"custom_agent_http_headers": None, "mqtt_opts": None, "tools": None,
                      "data_definitions": None, "emqx_config_id": None, "device_spec": None}
    with structlog.testing.capture_logs() as logs:
        agent = await create_agent(client, agent_id="casts", is_custom_agent="false", avatar_url="x",
                                   **optional_nulls)
    assert {k: agent[k] for k in optional_nulls} == {
        "custom_agent_http_headers": {}, "mqtt_opts": {}, "tools": [], "data_definitions": [],
        "emqx_config_id": None, "device_spec": None}
    assert agent["is_custom_agent"] is False and "avatar_url" not in agent
    (ignored,) = [e for e in logs if e["event"] == "agents.fields_ignored"]
    assert ignored["fields"] == ["avatar_url"] and ignored["agent_id"] == "casts"

    r = await client.put(f"/api/agents/{agent['id']}", json={"agent": {
        "emqx_config_id": "42", "is_custom_agent": "0", "mqtt_opts": {"qos": 1},
        "tools": [{"name": "t", "endpoint": "http://a.example/mcp", "enabled": "false", "description": None}],
        "data_definitions": [{"topic_filter": "a/b", "push_data_analysis_via_voice": "1"}]}})
    assert r.status_code == 200, r.text
    updated = r.json()["agent"]
    assert updated["emqx_config_id"] == 42 and updated["is_custom_agent"] is False
    assert updated["tools"][0]["enabled"] is False and updated["tools"][0]["description"] == ""
    assert updated["data_definitions"][0]["push_data_analysis_via_voice"] is True
    # null in an update: the field's empty value again, not a 422
    r = await client.put(f"/api/agents/{agent['id']}", json={"agent": {"mqtt_opts": None, "tools": None}})
    assert r.status_code == 200, r.text
    assert r.json()["agent"]["mqtt_opts"] == {} and r.json()["agent"]["tools"] == []
    # 30,000 unknown fields: ignored, and the log line says how many, not all of them
    with structlog.testing.capture_logs() as logs:
        r = await client.put(f"/api/agents/{agent['id']}",
                             json={"agent": {f"unknown_{i}": 1 for i in range(30_000)}})
    assert r.status_code == 200, r.text
    (ignored,) = [e for e in logs if e["event"] == "agents.fields_ignored"]
    assert ignored["count"] == 30_000 and len(ignored["fields"]) == 20 and len(str(ignored)) < 2000


async def test_patch_updates_as_put_does(client: httpx.AsyncClient) -> None:
    """The platform's Phoenix `resources` routes take PATCH for an update too."""
    agent = await create_agent(client)
    r = await client.patch(f"/api/agents/{agent['id']}", json={"agent": {"name": "Patched agent"}})
    assert r.status_code == 200, r.text
    assert r.json()["message"] == "智能体更新成功" and r.json()["agent"]["name"] == "Patched agent"
    r = await client.patch(f"/api/agents/{agent['id']}", json={"agent": {"name": "ab"}})
    assert r.status_code == 422


async def test_update_reads_back_nested_defaults_as_create_does(client: httpx.AsyncClient) -> None:
    """A tool, a data definition or a spec given in a PUT was stored without the defaults
    inside it (`exclude_unset`), so it read back other than the same one created."""
    nested = {"tools": [{"name": "t", "endpoint": "http://a.example/mcp"}],
              "data_definitions": [{"topic_filter": "a/b"}],
              "device_spec": {"commands": {"go": {"parameters": {"n": {"type": "integer"}}}}}}
    created = await create_agent(client, agent_id="created", **nested)
    other = await create_agent(client, agent_id="updated")
    r = await client.put(f"/api/agents/{other['id']}", json={"agent": nested})
    assert r.status_code == 200, r.text
    updated = (await client.get(f"/api/agents/{other['id']}")).json()
    for field in nested:
        assert updated[field] == created[field] == r.json()["agent"][field], field
    assert updated["tools"][0]["transport"] == "streamable_http" and updated["tools"][0]["enabled"] is True


async def test_create_without_agent_object_is_422(client: httpx.AsyncClient) -> None:
    for body in ({}, {"agent": None}, {"agent_id": "thermostat"}):
        r = await client.post("/api/agents", json=body)
        assert r.status_code == 422
        assert r.json() == {"success": False, "errors": {"agent": ["can't be blank"]}}
    for body in ({"agent": "thermostat"}, {"agent": []}, {"agent": 1}):  # there, but no object
        r = await client.post("/api/agents", json=body)
        assert r.status_code == 422
        assert r.json() == {"success": False, "errors": {"agent": ["must be a JSON object"]}}


async def test_custom_agent_with_wss_endpoint_is_accepted(client: httpx.AsyncClient) -> None:
    agent = await create_agent(client, "custom-agent-1", is_custom_agent=True,
                               custom_agent_endpoint="wss://my-agent.example.com/ws")
    assert agent["is_custom_agent"] is True
    assert agent["custom_agent_endpoint"] == "wss://my-agent.example.com/ws"


async def test_duplicate_agent_id_is_422(client: httpx.AsyncClient) -> None:
    await create_agent(client)
    r = await client.post("/api/agents", json={"agent": agent_input(name="Another name")})
    assert r.status_code == 422
    assert r.json() == {"success": False, "errors": {"agent_id": ["has already been taken"]}}
    agents = (await client.get("/api/agents")).json()["agents"]
    assert [a["name"] for a in agents] == ["Thermostat agent"]  # the first one is untouched


async def test_update_changes_only_given_fields(client: httpx.AsyncClient) -> None:
    agent = await create_agent(client)
    r = await client.put(f"/api/agents/{agent['id']}",
                         json={"agent": {"name": "更新后的名称", "sys_prompt": "新的系统提示词"}})
    assert r.status_code == 200
    body = r.json()
    assert body["success"] is True and body["message"] == "智能体更新成功"
    updated = body["agent"]
    assert updated["name"] == "更新后的名称" and updated["sys_prompt"] == "新的系统提示词"
    assert updated["voice_type"] == agent["voice_type"] and updated["id"] == agent["id"]
    assert updated["inserted_at"] == agent["inserted_at"]
    assert updated["updated_at"] >= agent["updated_at"]
    assert (await client.get(f"/api/agents/{agent['id']}")).json() == updated


async def test_get_edit_put_round_trip(client: httpx.AsyncClient) -> None:
    # The fields only the server sets (id, running, inserted_at, a tool's status, ...) are
    # ignored when a client sends back what it read.
    agent = await create_agent(client)
    edited = {**agent, "name": "Round trip", "running": False, "current_clients": ["x"], "id": 99}
    r = await client.put(f"/api/agents/{agent['id']}", json={"agent": edited})
    assert r.status_code == 200, r.text
    updated = r.json()["agent"]
    assert updated == {**agent, "name": "Round trip", "updated_at": updated["updated_at"]}
    r = await client.post("/api/agents", json={"agent": {**agent, "agent_id": "thermostat-2"}})
    assert r.status_code == 201, r.text
    assert r.json()["agent"]["id"] != agent["id"]


async def test_blank_optional_text_is_null(client: httpx.AsyncClient) -> None:
    # What a web form sends for a field left empty.
    agent = await create_agent(client, custom_agent_endpoint="", welcome_message=" ")
    assert agent["custom_agent_endpoint"] is None and agent["welcome_message"] is None
    r = await client.put(f"/api/agents/{agent['id']}", json={"agent": {"sys_prompt": ""}})
    assert r.status_code == 200 and r.json()["agent"]["sys_prompt"] is None


async def test_update_accepts_same_agent_id_refuses_another(client: httpx.AsyncClient) -> None:
    agent = await create_agent(client)
    ok = await client.put("/api/agents/thermostat", json={"agent": {"agent_id": "thermostat", "name": "Renamed"}})
    assert ok.status_code == 200 and ok.json()["agent"]["name"] == "Renamed"
    r = await client.put(f"/api/agents/{agent['id']}", json={"agent": {"agent_id": "other"}})
    assert r.status_code == 422
    assert r.json() == {"success": False, "errors": {"agent_id": ["cannot be changed"]}}


@pytest.mark.parametrize("changes, field, message", [
    ({"name": "ab"}, "name", "String should have at least 3 characters"),
    ({"agent_type": "triple"}, "agent_type", "Input should be 'single' or 'multi'"),
    ({"sys_prompt": "p" * 2001}, "sys_prompt", "String should have at most 2000 characters"),
    ({"custom_agent_endpoint": "http://x"}, "custom_agent_endpoint", "must start with ws:// or wss://"),
    # Valid alone, invalid once merged with the stored agent (it has no endpoint).
    ({"is_custom_agent": True}, "custom_agent_endpoint", "can't be blank for a custom agent"),
    ({"voice_type": ""}, "voice_type", "can't be blank"),
    ({"name": None}, "name", "can't be blank"),
    ({"is_custom_agent": "yes"}, "is_custom_agent", "Input should be a valid boolean"),
])
async def test_update_rejects_invalid_changes(client: httpx.AsyncClient, changes: dict[str, Any],
                                              field: str, message: str) -> None:
    agent = await create_agent(client)
    r = await client.put(f"/api/agents/{agent['id']}", json={"agent": changes})
    assert r.status_code == 422
    assert r.json() == {"success": False, "errors": {field: [message]}}
    assert (await client.get(f"/api/agents/{agent['id']}")).json() == agent  # unchanged


async def test_update_without_agent_object_is_422(client: httpx.AsyncClient) -> None:
    agent = await create_agent(client)
    r = await client.put(f"/api/agents/{agent['id']}", json={"name": "flat"})
    assert r.status_code == 422
    assert r.json() == {"success": False, "errors": {"agent": ["can't be blank"]}}


async def test_delete(client: httpx.AsyncClient) -> None:
    agent = await create_agent(client)
    r = await client.delete(f"/api/agents/{agent['id']}")
    assert r.status_code == 200
    assert r.json() == {"success": True}
    assert (await client.get(f"/api/agents/{agent['id']}")).status_code == 404
    assert (await client.get("/api/agents")).json() == {"agents": []}
    again = await client.delete(f"/api/agents/{agent['id']}")
    assert again.status_code == 404 and again.json() == {"error": "Agent not found"}


async def test_agent_id_can_be_taken_again_after_delete(client: httpx.AsyncClient) -> None:
    first = await create_agent(client)
    assert (await client.delete("/api/agents/thermostat")).status_code == 200
    second = await create_agent(client, name="Second life")
    assert second["agent_id"] == "thermostat" and second["name"] == "Second life"
    assert second["id"] != first["id"]
    assert (await client.get("/api/agents")).json() == {"agents": [second]}
