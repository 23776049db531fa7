"""POST /api/devices/<id>/commands over real HTTP, with a fake DeviceLink playing the device."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gateways.runtime import Runtime
from tests.http.conftest import FakeLink, create_agent, set_status


@pytest.fixture
async def online(client: httpx.AsyncClient, runtime: Runtime, link: FakeLink) -> FakeLink:
    """Product `thermostat` with device t-001 online; returns the link."""
    await create_agent(client)
    await set_status(runtime, "thermostat", "t-001", "online")
    return link


async def send(client: httpx.AsyncClient, body: Any, device: str = "t-001") -> httpx.Response:
    return await client.post(f"/api/devices/{device}/commands", json=body)


async def test_command_success(client: httpx.AsyncClient, online: FakeLink) -> None:
    r = await send(client, {"command": "set_target_temperature", "params": {"target_temperature": 24},
                            "timeoutMs": 30000})
    assert r.status_code == 200
    assert len(online.published) == 1
    product, device, payload = online.published[0]
    assert (product, device) == ("thermostat", "t-001")
    assert payload["cmd"] == "set_target_temperature" and payload["params"] == {"target_temperature": 24}
    assert r.json() == {"requestId": payload["requestId"], "command": "set_target_temperature",
                        "code": 0, "msg": "ok", "data": {"applied": {"target_temperature": 24}}}


async def test_params_default_to_empty(client: httpx.AsyncClient, online: FakeLink) -> None:
    r = await send(client, {"command": "reboot"})
    assert r.status_code == 200 and r.json()["code"] == 0
    assert online.published[0][2]["params"] == {}


async def test_device_error_code_is_still_http_200(client: httpx.AsyncClient, online: FakeLink) -> None:
    online.answer = (400, "target out of range")
    r = await send(client, {"command": "set_target_temperature", "params": {"target_temperature": 99}})
    assert r.status_code == 200
    assert r.json()["code"] == 400 and r.json()["msg"] == "target out of range"


async def test_unknown_command_is_400_and_not_sent(client: httpx.AsyncClient, online: FakeLink) -> None:
    r = await send(client, {"command": "self_destruct"})
    assert r.status_code == 400
    assert r.json() == {"error": "unknown command 'self_destruct' (this product's commands: reboot, "
                                 "set_mode, set_target_temperature)", "code": "invalid_command"}
    assert online.published == []


@pytest.mark.parametrize("params, detail", [
    ({}, "'target_temperature' is a required property"),
    ({"target_temperature": "hot"}, "'hot' is not of type 'number'"),
    ({"target_temperature": 24, "extra": 1}, "Additional properties are not allowed"),
])
async def test_bad_params_is_400_and_not_sent(client: httpx.AsyncClient, online: FakeLink,
                                              params: dict[str, Any], detail: str) -> None:
    r = await send(client, {"command": "set_target_temperature", "params": params})
    assert r.status_code == 400
    body = r.json()
    assert body["code"] == "invalid_command"
    assert body["error"].startswith("invalid params for 'set_target_temperature': ")
    assert detail in body["error"]
    assert online.published == []


async def test_enum_param(client: httpx.AsyncClient, online: FakeLink) -> None:
    r = await send(client, {"command": "set_mode", "params": {"mode": "dry"}})
    assert r.status_code == 400 and "'dry' is not one of ['heat', 'cool']" in r.json()["error"]
    assert (await send(client, {"command": "set_mode", "params": {"mode": "cool"}})).status_code == 200


async def test_product_without_spec_refuses_commands(client: httpx.AsyncClient, runtime: Runtime,
                                                     link: FakeLink) -> None:
    await create_agent(client, "lamp", device_spec=None)
    await set_status(runtime, "lamp", "l-001", "online")
    r = await send(client, {"command": "reboot"}, device="l-001")
    assert r.status_code == 400
    assert r.json() == {"error": "product 'lamp' has no device spec; it accepts no commands",
                        "code": "invalid_command"}
    assert link.published == []


async def test_unknown_device_is_404(client: httpx.AsyncClient, online: FakeLink) -> None:
    r = await send(client, {"command": "reboot"}, device="ghost")
    assert r.status_code == 404
    assert r.json() == {"error": "device 'ghost' not found", "code": "device_not_found"}
    r = await send(client, {"command": "reboot", "productId": "lamp"})
    assert r.status_code == 404 and r.json()["code"] == "device_not_found"
    assert online.published == []


async def test_offline_device_is_409(client: httpx.AsyncClient, runtime: Runtime, online: FakeLink) -> None:
    await set_status(runtime, "thermostat", "t-001", "offline")
    r = await send(client, {"command": "reboot"})
    assert r.status_code == 409
    body = r.json()
    assert body["code"] == "device_offline" and body["error"] == "device 't-001' is offline"
    assert isinstance(body["requestId"], str)
    assert online.published == []


async def test_silent_device_times_out_504(client: httpx.AsyncClient, online: FakeLink) -> None:
    online.silent = True
    r = await send(client, {"command": "reboot", "timeoutMs": 300})
    assert r.status_code == 504
    body = r.json()
    request_id = online.published[0][2]["requestId"]
    assert body == {"error": f"device did not answer {request_id} within 300 ms",
                    "code": "command_timeout", "requestId": request_id}


async def test_no_device_link_is_503(client: httpx.AsyncClient, runtime: Runtime) -> None:
    await create_agent(client)
    await set_status(runtime, "thermostat", "t-001", "online")
    r = await send(client, {"command": "reboot"})  # no link attached: MQTT is down
    assert r.status_code == 503
    assert r.json()["code"] == "unavailable" and r.json()["error"] == "no MQTT link to devices"


@pytest.mark.parametrize("body, message", [
    ([1, 2], "request body must be a JSON object"),
    ("reboot", "request body must be a JSON object"),
    ({}, "command must be a non-empty string"),
    ({"command": 5}, "command must be a non-empty string"),
    ({"command": ""}, "command must be a non-empty string"),
    ({"command": "reboot", "params": [1]}, "params must be a JSON object"),
    ({"command": "reboot", "params": "x"}, "params must be a JSON object"),
    ({"command": "reboot", "timeoutMs": "100"}, "timeoutMs must be an integer from 1 to 300000"),
    ({"command": "reboot", "timeoutMs": 1.5}, "timeoutMs must be an integer from 1 to 300000"),
    ({"command": "reboot", "timeoutMs": True}, "timeoutMs must be an integer from 1 to 300000"),
    ({"command": "reboot", "timeoutMs": 0}, "timeoutMs must be an integer from 1 to 300000"),
    ({"command": "reboot", "timeoutMs": 300001}, "timeoutMs must be an integer from 1 to 300000"),
    ({"command": "reboot", "productId": 7}, "productId must be a non-empty string"),
])
async def test_wrong_types_are_400(client: httpx.AsyncClient, online: FakeLink, body: Any, message: str) -> None:
    r = await send(client, body)
    assert r.status_code == 400
    assert r.json() == {"error": message, "code": "invalid_request"}
    assert online.published == []


async def test_malformed_json_is_400(client: httpx.AsyncClient, online: FakeLink) -> None:
    r = await client.post("/api/devices/t-001/commands", content=b"{'command': 'reboot'}",
                          headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_json"
    assert online.published == []
