"""Device listing, details and events over real HTTP (seed 000 shapes)."""

from __future__ import annotations

import re
from datetime import datetime

import httpx
import structlog.testing

from gateways.runtime import Runtime
from tests.http.conftest import create_agent, now_ms, raw_request, report_event, set_status

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


async def test_list_devices_with_status_filter(client: httpx.AsyncClient, runtime: Runtime) -> None:
    await create_agent(client)
    await set_status(runtime, "thermostat", "t-002", "online", {"temperature": 21})
    await set_status(runtime, "thermostat", "t-001", "online")
    await set_status(runtime, "thermostat", "t-003", "offline")
    await create_agent(client, "lamp")
    await set_status(runtime, "lamp", "l-001", "online")  # another product: never listed here

    async def ids(query: str = "") -> list[str]:
        r = await client.get(f"/api/products/thermostat/devices{query}")
        assert r.status_code == 200
        assert r.json()["productId"] == "thermostat"
        return [d["deviceId"] for d in r.json()["devices"]]

    assert await ids() == ["t-001", "t-002", "t-003"]
    assert await ids("?status=online") == ["t-001", "t-002"]
    assert await ids("?status=offline") == ["t-003"]
    devices = (await client.get("/api/products/thermostat/devices")).json()["devices"]
    assert devices[1]["state"] == {"temperature": 21} and devices[1]["online"] is True
    assert devices[2]["status"] == "offline" and devices[2]["online"] is False


async def test_list_devices_errors(client: httpx.AsyncClient) -> None:
    await create_agent(client)
    r = await client.get("/api/products/thermostat/devices?status=asleep")
    assert r.status_code == 400
    assert r.json() == {"error": "status must be 'online' or 'offline', not 'asleep'", "code": "invalid_request"}
    r = await client.get("/api/products/nope/devices")
    assert r.status_code == 404
    assert r.json() == {"error": "product 'nope' not found", "code": "product_not_found"}
    empty = await client.get("/api/products/thermostat/devices")
    assert empty.json() == {"productId": "thermostat", "devices": []}


async def test_device_details(client: httpx.AsyncClient, runtime: Runtime) -> None:
    await create_agent(client)
    seen = now_ms()
    await set_status(runtime, "thermostat", "t-001", "online", {"temperature": 22.5, "mode": "heat"},
                     received_ms=seen)
    r = await client.get("/api/devices/t-001")
    assert r.status_code == 200
    device = r.json()
    assert list(device) == ["deviceId", "productId", "online", "status", "state", "lastSeen",
                            "lastSeenTs", "registeredAt"]
    assert device["deviceId"] == "t-001" and device["productId"] == "thermostat"
    assert device["online"] is True and device["status"] == "online"
    assert device["state"] == {"temperature": 22.5, "mode": "heat"}
    assert device["lastSeenTs"] == seen
    assert ISO_MS.match(device["lastSeen"]) and ISO_MS.match(device["registeredAt"])
    # The ISO form and the epoch ms are the same instant.
    parsed = datetime.fromisoformat(device["lastSeen"].replace("Z", "+00:00"))
    assert round(parsed.timestamp() * 1000) == seen


async def test_device_id_in_two_products(client: httpx.AsyncClient, runtime: Runtime) -> None:
    await create_agent(client, "thermostat")
    await create_agent(client, "lamp")
    await set_status(runtime, "thermostat", "shared-1", "online", received_ms=now_ms() - 5000)
    await set_status(runtime, "lamp", "shared-1", "offline", received_ms=now_ms())
    assert (await client.get("/api/devices/shared-1")).json()["productId"] == "lamp"  # seen last
    picked = (await client.get("/api/devices/shared-1?productId=thermostat")).json()
    assert picked["productId"] == "thermostat" and picked["online"] is True


async def test_unknown_device_is_404(client: httpx.AsyncClient, runtime: Runtime) -> None:
    r = await client.get("/api/devices/ghost")
    assert r.status_code == 404
    assert r.json() == {"error": "device 'ghost' not found", "code": "device_not_found"}
    await set_status(runtime, "thermostat", "t-001", "online")
    r = await client.get("/api/devices/t-001?productId=lamp")
    assert r.status_code == 404
    assert r.json() == {"error": "device 't-001' not found in product 'lamp'", "code": "device_not_found"}


async def test_events_newest_first_with_event_type(client: httpx.AsyncClient, runtime: Runtime) -> None:
    await create_agent(client)
    await set_status(runtime, "thermostat", "t-001", "online")
    p1 = await report_event(runtime, "thermostat", "t-001", "temperature_alert",
                            {"temperature": 38.5, "level": "warning"}, device_ts=1710000010000)
    p2 = await report_event(runtime, "thermostat", "t-001", "heartbeat", {})
    p3 = await report_event(runtime, "thermostat", "t-001", "door_open", {"door": "front"})
    await report_event(runtime, "thermostat", "t-002", "heartbeat", {})  # another device
    r = await client.get("/api/devices/t-001/events")
    assert r.status_code == 200
    body = r.json()
    assert body["deviceId"] == "t-001" and body["productId"] == "thermostat"
    events = body["events"]
    assert [e["id"] for e in events] == [p3, p2, p1]
    assert [e["event"] for e in events] == ["door_open", "heartbeat", "temperature_alert"]
    # alert comes from the spec; heartbeat is declared info; door_open is undeclared -> info
    assert [e["eventType"] for e in events] == ["info", "info", "alert"]
    assert events[2]["data"] == {"temperature": 38.5, "level": "warning"}
    assert events[2]["ts"] == 1710000010000 and events[0]["ts"] is None
    assert all(ISO_MS.match(e["receivedAt"]) for e in events)
    assert list(events[0]) == ["id", "event", "eventType", "data", "ts", "receivedAt"]

    limited = (await client.get("/api/devices/t-001/events?limit=2")).json()["events"]
    assert [e["id"] for e in limited] == [p3, p2]


async def test_events_page_back_with_before(client: httpx.AsyncClient, runtime: Runtime) -> None:
    await create_agent(client)
    await set_status(runtime, "thermostat", "t-001", "online")
    ids = [await report_event(runtime, "thermostat", "t-001", "heartbeat", {"i": i}) for i in range(7)]
    await report_event(runtime, "lamp", "t-001", "heartbeat", {})  # same id, another product

    pages, before = [], None
    while True:
        query = "limit=3" + (f"&before={before}" if before is not None else "")
        r = await client.get(f"/api/devices/t-001/events?{query}&productId=thermostat")
        assert r.status_code == 200
        page = [e["id"] for e in r.json()["events"]]
        if not page:
            break
        pages.append(page)
        before = page[-1]
    newest_first = ids[::-1]
    assert pages == [newest_first[0:3], newest_first[3:6], newest_first[6:]]

    # A page does not move when newer events arrive; `before` need not be one of the device's ids.
    await report_event(runtime, "thermostat", "t-001", "heartbeat", {"i": 7})
    r = await client.get(f"/api/devices/t-001/events?limit=3&before={ids[4]}&productId=thermostat")
    assert [e["id"] for e in r.json()["events"]] == [ids[3], ids[2], ids[1]]
    r = await client.get(f"/api/devices/t-001/events?before={ids[-1] + 1000}&productId=thermostat")
    assert len(r.json()["events"]) == 8
    r = await client.get("/api/devices/t-001/events?before=1&productId=thermostat")
    assert r.json()["events"] == []


async def test_events_before_errors(client: httpx.AsyncClient, runtime: Runtime) -> None:
    await create_agent(client)
    await set_status(runtime, "thermostat", "t-001", "online")
    for sent, seen in [("0", "0"), ("-1", "-1"), ("abc", "abc"), ("1.5", "1.5"), ("%2B1", "+1"),
                       ("1_0", "1_0"), ("9223372036854775808", "9223372036854775808"), ("", "")]:
        r = await client.get(f"/api/devices/t-001/events?before={sent}")
        assert r.status_code == 400, sent
        assert r.json() == {"error": "before must be an event id (an integer from 1 to "
                                     f"9223372036854775807), not {seen!r}", "code": "invalid_request"}
    r = await client.get(f"/api/devices/t-001/events?before={'9' * 10_000}")
    assert r.status_code == 400 and r.json()["error"].endswith("(10000 characters)")
    r = await client.get("/api/devices/t-001/events?before=9223372036854775807")
    assert r.status_code == 200 and r.json()["events"] == []
    r = await client.get("/api/devices/t-001/events?before=1&before=2")
    assert r.status_code == 400 and r.json()["error"] == "before given more than once"


async def test_events_errors(client: httpx.AsyncClient, runtime: Runtime) -> None:
    await create_agent(client)
    await set_status(runtime, "thermostat", "t-001", "online")
    for bad in ("0", "1001", "abc", "-1"):
        r = await client.get(f"/api/devices/t-001/events?limit={bad}")
        assert r.status_code == 400, bad
        assert r.json() == {"error": f"limit must be an integer from 1 to 1000, not {bad!r}",
                            "code": "invalid_request"}
    assert (await client.get("/api/devices/t-001/events?limit=1000")).json()["events"] == []
    r = await client.get("/api/devices/ghost/events")
    assert r.status_code == 404 and r.json()["code"] == "device_not_found"


async def test_limit_is_ascii_digits_only(client: httpx.AsyncClient, runtime: Runtime) -> None:
    await create_agent(client)
    await set_status(runtime, "thermostat", "t-001", "online")
    await report_event(runtime, "thermostat", "t-001", "heartbeat", {})
    # int() takes all of these; they are not "an integer from 1 to 1000" in a URL.
    for sent, seen in [("1_0", "1_0"), ("%D9%A3", "٣"), ("%EF%BC%91", "１"), ("+1", " 1"),
                       ("%2B1", "+1"), ("%201%20", " 1 "), ("1.0", "1.0"), ("", ""),
                       ("1" + "0" * 5000, None)]:
        r = await raw_request(client, "GET", f"/api/devices/t-001/events?limit={sent}")
        assert r.status == 400, sent
        assert r.json()["code"] == "invalid_request"
        if seen is not None:
            assert r.json()["error"] == f"limit must be an integer from 1 to 1000, not {seen!r}"
    for good in ("1", "0001", "1000"):
        r = await raw_request(client, "GET", f"/api/devices/t-001/events?limit={good}")
        assert r.status == 200 and len(r.json()["events"]) == 1, good


async def test_a_query_parameter_given_twice_is_400(client: httpx.AsyncClient, runtime: Runtime) -> None:
    await create_agent(client)
    await set_status(runtime, "thermostat", "t-001", "online")
    for target, name in [
            ("/api/products/thermostat/devices?status=online&status=bogus", "status"),
            ("/api/products/thermostat/devices?status=online&status=online", "status"),
            ("/api/devices/t-001/events?limit=1&limit=2", "limit"),
            ("/api/devices/t-001/events?productId=thermostat&productId=lamp", "productId"),
            ("/api/devices/t-001?productId=thermostat&productId=thermostat", "productId"),
            ("/api/devices/t-001?productId=thermostat&productId=", "productId")]:
        r = await client.get(target)
        assert r.status_code == 400, target
        assert r.json() == {"error": f"{name} given more than once", "code": "invalid_request"}
    # Once each, or parameters the route does not read: as before.
    assert (await client.get("/api/products/thermostat/devices?status=online&x=1&x=2")).status_code == 200
    assert (await client.get("/api/devices/t-001/events?limit=1&productId=thermostat")).status_code == 200


async def test_empty_product_id_query_is_400(client: httpx.AsyncClient, runtime: Runtime) -> None:
    await set_status(runtime, "thermostat", "t-001", "online")
    for target in ("/api/devices/t-001?productId=", "/api/devices/t-001/events?productId="):
        r = await client.get(target)
        assert r.status_code == 400, target
        assert r.json() == {"error": "productId must be a non-empty string", "code": "invalid_request"}


async def test_long_ids_are_not_echoed_whole(client: httpx.AsyncClient) -> None:
    long_id = "d" * 10_000
    with structlog.testing.capture_logs() as logs:
        r = await client.get(f"/api/devices/{long_id}?productId={'p' * 5000}")
    assert r.status_code == 404
    assert r.json()["error"] == (f"device {'d' * 100 + '…'!r} (10000 characters) not found "
                                 f"in product {'p' * 100 + '…'!r} (5000 characters)")
    r = await client.get(f"/api/products/{long_id}/devices?status={'s' * 300}")
    assert r.status_code == 400 and len(r.json()["error"]) < 200
    r = await client.get(f"/api/products/{long_id}/devices")
    assert r.json()["error"] == f"product {'d' * 100 + '…'!r} (10000 characters) not found"
    r = await client.get(f"/api/devices/t-001/events?limit={'9' * 10_000}")
    assert r.status_code == 400 and len(r.json()["error"]) < 200
    (line,) = [e for e in logs if e["event"] == "http.request_refused"]
    assert len(line["path"]) <= 1001 and len(line["body"]["error"]) < 300


async def test_a_store_outage_on_a_read_is_503_not_500(client, runtime, monkeypatch) -> None:
    import sqlite3

    from psycopg_pool import PoolTimeout

    for error in (sqlite3.OperationalError("database is locked"),
                  PoolTimeout("couldn't get a connection after 5.00 sec")):
        def down(*a, error=error, **k):
            raise error

        monkeypatch.setattr(runtime.devices, "find", down)
        r = await client.get("/api/devices/d-1")
        assert r.status_code == 503
        assert r.json() == {"error": "the store is not reachable; try again later", "code": "unavailable"}
    monkeypatch.setattr(runtime.log, "max_position", lambda: (_ for _ in ()).throw(sqlite3.OperationalError("disk I/O error")))
    assert (await client.get("/api/health")).status_code == 503
