"""POST /api/devices/<id>/commands over real HTTP, with a fake DeviceLink playing the device."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import structlog.testing

from gateways.http.app import TEXT_LIMIT
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


async def test_long_input_is_not_echoed_whole(client: httpx.AsyncClient, online: FakeLink) -> None:
    name = "x" * 1_000_000  # just under the 1 MiB body limit
    with structlog.testing.capture_logs() as logs:
        r = await send(client, {"command": name})
        assert r.status_code == 400
        assert r.json() == {"error": f"unknown command {'x' * 100 + '…'!r} (this product's commands: "
                                     "reboot, set_mode, set_target_temperature)", "code": "invalid_command"}
        # A param value the JSON Schema message quotes: its first 100 characters.
        r = await send(client, {"command": "set_target_temperature",
                                "params": {"target_temperature": "h" * 1_000_000}})
        assert r.status_code == 400 and r.json() == {
            "error": f"invalid params for 'set_target_temperature': target_temperature: '{'h' * 99}… is not of type 'number'",
            "code": "invalid_command"}
        # Where many values are quoted, every error body is cut at TEXT_LIMIT.
        r = await send(client, {"command": "set_target_temperature",
                                "params": {"target_temperature": 1, **{f"x{i:03}" + "y" * 20: 0 for i in range(100)}}})
        assert r.status_code == 400 and r.json()["code"] == "invalid_command"
        assert len(r.json()["error"]) == TEXT_LIMIT + 1 and r.json()["error"].endswith("…")
    refused = [e for e in logs if e["event"] == "http.request_refused"]
    assert len(refused) == 3 and all(len(str(e)) < 2000 for e in refused)
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


@pytest.mark.parametrize("timeout_ms", [300, 300.0])  # 300.0: a whole number, as JSON Schema counts it
async def test_silent_device_times_out_504(client: httpx.AsyncClient, online: FakeLink, timeout_ms: Any) -> None:
    online.silent = True
    with structlog.testing.capture_logs() as logs:
        r = await send(client, {"command": "reboot", "timeoutMs": timeout_ms})
    assert r.status_code == 504
    body = r.json()
    request_id = online.published[0][2]["requestId"]
    assert body == {"error": f"device did not answer {request_id} within 300 ms",
                    "code": "command_timeout", "requestId": request_id}
    # The device's trouble, not the server's: a warning, not an error.
    (line,) = [e for e in logs if e["event"] == "http.request_refused"]
    assert line["log_level"] == "warning" and line["status"] == 504


async def test_no_device_link_is_503(client: httpx.AsyncClient, runtime: Runtime) -> None:
    await create_agent(client)
    await set_status(runtime, "thermostat", "t-001", "online")
    r = await send(client, {"command": "reboot"})  # no link attached: MQTT is down
    assert r.status_code == 503
    assert r.json()["code"] == "unavailable"
    assert r.json()["error"] == "no MQTT link to devices: the broker is not connected"


@pytest.mark.parametrize("body, message", [
    ([1, 2], "request body must be a JSON object"),
    ("reboot", "request body must be a JSON object"),
    ({}, "command must be a non-empty string"),
    ({"command": 5}, "command must be a non-empty string"),
    ({"command": ""}, "command must be a non-empty string"),
    ({"cmd": "reboot"}, "command must be a non-empty string; over HTTP the field is 'command' ('cmd' is its name on MQTT)"),
    ({"command": "reboot", "params": [1]}, "params must be a JSON object"),
    ({"command": "reboot", "params": "x"}, "params must be a JSON object"),
    ({"command": "reboot", "timeoutMs": "100"}, "timeoutMs must be an integer from 1 to 300000"),
    ({"command": "reboot", "timeoutMs": 1.5}, "timeoutMs must be an integer from 1 to 300000"),
    ({"command": "reboot", "timeoutMs": True}, "timeoutMs must be an integer from 1 to 300000"),
    ({"command": "reboot", "timeoutMs": 0}, "timeoutMs must be an integer from 1 to 300000"),
    ({"command": "reboot", "timeoutMs": 300001}, "timeoutMs must be an integer from 1 to 300000"),
    ({"command": "reboot", "timeoutMs": 300001.0}, "timeoutMs must be an integer from 1 to 300000"),
    ({"command": "reboot", "timeoutMs": 0.0}, "timeoutMs must be an integer from 1 to 300000"),
    ({"command": "reboot", "timeoutMs": 1e300}, "timeoutMs must be an integer from 1 to 300000"),
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


async def test_a_read_right_after_a_command_sees_what_the_device_reported(
        client: httpx.AsyncClient, runtime: Runtime, online: FakeLink) -> None:
    """The seed's call order: send a command, then read the device's state and events.
    The device reports its new state (and an event) before answering; the 200 comes once
    the answer is committed; the read that follows must see that state, though the views
    follow the log later (here 0.3 s later, unless a read asks for them)."""
    runtime.projections.coalesce = 0.3
    online.state_first = True
    for target in (18, 19, 20):
        r = await send(client, {"command": "set_target_temperature", "params": {"target_temperature": target}})
        assert r.status_code == 200 and r.json()["code"] == 0
        device = (await client.get("/api/devices/t-001")).json()
        assert device["state"]["target_temperature"] == target
        events = (await client.get("/api/devices/t-001/events?limit=1")).json()["events"]
        assert events[0]["event"] == "set_target_temperature" and events[0]["data"] == {"target_temperature": target}
        listed = (await client.get("/api/products/thermostat/devices")).json()["devices"]
        assert listed[0]["state"]["target_temperature"] == target


async def test_a_command_right_after_a_new_devices_first_message_finds_it(
        client: httpx.AsyncClient, runtime: Runtime, link: FakeLink) -> None:
    """Acknowledged (committed) but not yet in the views: the device is found, not 404."""
    import trio

    from actors.device import DeviceActor, ReportTelemetry
    from actors.ports import FutureReply
    from tests.http.conftest import now_ms

    await create_agent(client)
    runtime.projections.coalesce = 0.3
    reply = FutureReply()
    runtime.system.tell(DeviceActor, ("thermostat", "t-new"),
                        ReportTelemetry("status", "online", None, None, now_ms(), reply=reply))
    await trio.to_thread.run_sync(reply.get)  # what the MQTT ack waits for: the commit
    r = await send(client, {"command": "set_target_temperature", "params": {"target_temperature": 21}}, "t-new")
    assert r.status_code == 200, r.text


async def test_a_deleted_products_devices_are_no_longer_served(
        client: httpx.AsyncClient, runtime: Runtime, link: FakeLink) -> None:
    """A device id in two products, and the product that spoke last is deleted: the device
    routes and commands (without productId, as seed 000 sends them) go to the live
    product's device. A device whose only product was deleted is 404, saying why; its
    history stays in the log."""
    await create_agent(client)
    await create_agent(client, "prody")
    await set_status(runtime, "thermostat", "twin", "online")
    await set_status(runtime, "prody", "twin", "online")  # spoke last
    await set_status(runtime, "prody", "solo", "online")
    assert (await client.get("/api/devices/twin")).json()["productId"] == "prody"
    assert (await client.delete("/api/agents/prody")).status_code == 200

    assert (await client.get("/api/devices/twin")).json()["productId"] == "thermostat"
    r = await send(client, {"command": "set_target_temperature", "params": {"target_temperature": 22}},
                   device="twin")
    assert r.status_code == 200 and r.json()["code"] == 0
    assert [(p, d) for p, d, _ in link.published] == [("thermostat", "twin")]

    gone = {"error": "device 'solo' not found (its product 'prody' no longer exists)", "code": "device_not_found"}
    for r in (await client.get("/api/devices/solo"), await client.get("/api/devices/solo/events"),
              await send(client, {"command": "reboot"}, device="solo")):
        assert r.status_code == 404 and r.json() == gone
    r = await client.get("/api/devices/twin?productId=prody")
    assert r.status_code == 404
    assert r.json()["error"] == "device 'twin' not found in product 'prody' (the product no longer exists)"
    assert link.published == [("thermostat", "twin", link.published[0][2])]  # nothing sent to prody's


async def test_product_id_in_the_query_as_on_the_get_routes(
        client: httpx.AsyncClient, runtime: Runtime, link: FakeLink) -> None:
    """`?productId=` chooses the device's product, as on GET /api/devices/:id; given in the
    body too, the two must agree."""
    await create_agent(client)
    await create_agent(client, "other")
    await set_status(runtime, "thermostat", "twin", "online")
    await set_status(runtime, "other", "twin", "online")  # spoke last: the default
    body = {"command": "set_target_temperature", "params": {"target_temperature": 22}}
    r = await client.post("/api/devices/twin/commands?productId=thermostat", json=body)
    assert r.status_code == 200 and r.json()["code"] == 0
    assert [(p, d) for p, d, _ in link.published] == [("thermostat", "twin")]
    r = await client.post("/api/devices/twin/commands?productId=thermostat", json={**body, "productId": "other"})
    assert r.status_code == 400 and r.json() == {
        "error": "productId 'thermostat' in the query and 'other' in the body differ", "code": "invalid_request"}
    assert len(link.published) == 1


async def test_an_integer_given_as_a_whole_float_is_sent_as_an_integer(
        client: httpx.AsyncClient, runtime: Runtime, link: FakeLink) -> None:
    """JSON Schema takes 2.0 as an integer; the device gets 2, which firmware reading an int
    can parse. A number parameter keeps what was sent. timeoutMs null is the default, as
    params null is {}."""
    spec = {"commands": {"set_speed": {"parameters": {"speed": {"type": "integer"}, "ratio": {"type": "number"}}}}}
    await create_agent(client, "fan", device_spec=spec)
    await set_status(runtime, "fan", "f-1", "online")
    r = await send(client, {"command": "set_speed", "params": {"speed": 2.0, "ratio": 1.0}, "timeoutMs": None},
                   device="f-1")
    assert r.status_code == 200 and r.json()["code"] == 0
    params = link.published[0][2]["params"]
    assert params == {"speed": 2, "ratio": 1.0}
    assert (type(params["speed"]), type(params["ratio"])) == (int, float)
    r = await send(client, {"command": "set_speed", "params": {"speed": 2.5}}, device="f-1")
    assert r.status_code == 400 and "2.5 is not of type 'integer'" in r.json()["error"]


async def test_an_integer_given_as_a_float_beyond_64_bits_is_400_not_a_crash(
        client: httpx.AsyncClient, runtime: Runtime, link: FakeLink) -> None:
    """1e20 is an integer to JSON Schema, and was sent as one: the log could not store the
    command, its actor crashed, and the caller got a 500 naming msgpack. An enum may even
    list it."""
    spec = {"commands": {"set_speed": {"parameters": {"speed": {"type": "integer"}}},
                         "pick": {"parameters": {"n": {"type": "integer", "enum": [1e20, 1]}}}}}
    await create_agent(client, "fan", device_spec=spec)
    await set_status(runtime, "fan", "f-1", "online")
    with structlog.testing.capture_logs() as logs:
        for command, params in (("set_speed", {"speed": 1e20}), ("set_speed", {"speed": -1e19}),
                                ("pick", {"n": 1e20})):
            r = await send(client, {"command": command, "params": params}, device="f-1")
            assert r.status_code == 400, r.text
            name, value = next(iter(params.items()))
            assert r.json() == {"error": f"invalid params for {command!r}: {name}: {value:g} is beyond the 64-bit "
                                         "integers a command can carry", "code": "invalid_command"}
    assert link.published == []
    assert not [e for e in logs if e["log_level"] == "error"]
    r = await send(client, {"command": "set_speed", "params": {"speed": 1e19}}, device="f-1")  # fits uint64
    assert r.status_code == 200 and link.published[0][2]["params"] == {"speed": 10**19}
