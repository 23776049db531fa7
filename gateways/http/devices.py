"""Devices, commands and events (seed 000 family; errors `{"error", "code"}`).

Reads come from the registry and events views (in a worker thread: they hit the
database), once the views hold every write acknowledged before the read (`read_view`).
Commands go to the DeviceActor, which publishes them over the DeviceLink
(MQTT) and replies when the device answers or the command times out.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import trio
from quart import Blueprint

from actors.device import DeviceActor
from actors.device.messages import SendCommand
from actors.errors import InvalidCommand, ParleyError
from gateways import ids
from gateways.bridge import PendingReplies, TrioReply
from gateways.http.app import (ApiError, ascii_int, get_pending, get_runtime, json_object, query_arg,
                               read_view, shown)
from gateways.runtime import Runtime
from projections.device_events import MAX_POSITION, DeviceEventRow
from projections.device_registry import DeviceRow

bp = Blueprint("devices", __name__)

DEFAULT_TIMEOUT_MS = 30_000
MAX_TIMEOUT_MS = 300_000
# The actor answers at timeoutMs with CommandTimedOut; our own wait is a backstop only.
REPLY_MARGIN_S = 5.0


def iso_ms(ms: int) -> str:
    """Epoch ms -> ISO-8601 UTC with milliseconds and Z, as the seed's examples show."""
    dt = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def device_json(row: DeviceRow) -> dict[str, Any]:
    return {
        "deviceId": row.device_id,
        "productId": row.product_id,
        "online": row.online,
        "status": "online" if row.online else "offline",
        "state": row.state,
        # last_seen_ms is 0 for a device that registered but never said anything.
        "lastSeen": iso_ms(row.last_seen_ms) if row.last_seen_ms else None,
        "lastSeenTs": row.last_seen_ms,
        "registeredAt": iso_ms(row.registered_ms),
    }


def _optional_str(value: Any, name: str) -> str | None:
    if value is None or (isinstance(value, str) and value):
        return value
    raise ApiError.coded(400, "invalid_request", f"{name} must be a non-empty string")


def _product_exists(runtime: Runtime, product_id: str) -> bool:
    return runtime.agents.get(product_id) is not None  # in-memory mirror: no query


async def find_device(device_id: str, product_id: str | None, runtime: Runtime | None = None) -> DeviceRow:
    """The device with this id; without a product, the most recently seen one. Only
    devices of products that exist: a deleted product's devices stay in the log and the
    registry (its history), but are no longer served, nor chosen over a live device that
    shares their id."""
    runtime = runtime or get_runtime()
    rows = await read_view(runtime.devices.find, device_id, product_id, runtime=runtime)
    live = [r for r in rows if _product_exists(runtime, r.product_id)]
    if not live:
        where = f" in product {shown(product_id)}" if product_id else ""
        why = ""
        if rows and product_id:
            why = " (the product no longer exists)"
        elif rows:
            gone = ", ".join(map(shown, sorted({r.product_id for r in rows})))
            why = f" (its product {gone} no longer exists)"
        raise ApiError.coded(404, "device_not_found", f"device {shown(device_id)} not found{where}{why}")
    return live[0]


async def command_product(runtime: Runtime, device_id: str, product_id: str | None) -> str:
    """The product a command goes to. The registry's in-memory index answers without a
    query; only a device id shared by several products needs the view (most recently seen),
    and so does a device the index does not know yet (`find_device` waits for the views)."""
    products = [p for p in runtime.devices.products_of(device_id) if _product_exists(runtime, p)]
    if product_id is not None:
        if product_id in products:
            return product_id
    elif len(products) == 1:
        return products[0]
    return (await find_device(device_id, product_id, runtime)).product_id


@bp.get("/api/products/<product_id>/devices")
async def list_devices(product_id: str) -> dict[str, Any]:
    runtime = get_runtime()
    status = query_arg("status")
    if status not in (None, "online", "offline"):
        raise ApiError.coded(400, "invalid_request",
                             f"status must be 'online' or 'offline', not {shown(status)}")
    if runtime.agents.get(product_id) is None:  # in-memory mirror: no query needed
        raise ApiError.coded(404, "product_not_found", f"product {shown(product_id)} not found")
    online = None if status is None else status == "online"
    rows = await read_view(runtime.devices.list_devices, product_id, online)
    return {"productId": product_id, "devices": [device_json(r) for r in rows]}


@bp.get("/api/devices/<device_id>")
async def get_device(device_id: str) -> dict[str, Any]:
    product_id = _optional_str(query_arg("productId"), "productId")
    return device_json(await find_device(device_id, product_id))


def _parse_command(body: dict[str, Any]) -> tuple[str, dict[str, Any], int, str | None]:
    command = body.get("command")
    if not isinstance(command, str) or not command:
        # `cmd` is the field's name on MQTT (the device's side): say which one HTTP wants.
        hint = "; over HTTP the field is 'command' ('cmd' is its name on MQTT)" if "cmd" in body else ""
        raise ApiError.coded(400, "invalid_request", "command must be a non-empty string" + hint)
    params = body.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ApiError.coded(400, "invalid_request", "params must be a JSON object")
    timeout_ms = body.get("timeoutMs")
    if timeout_ms is None:  # absent or null: the default, as for params
        timeout_ms = DEFAULT_TIMEOUT_MS
    elif isinstance(timeout_ms, float) and timeout_ms.is_integer():
        # 5000.0 is an integer to JSON Schema (and to the OpenAPI document), and what a
        # client computing seconds * 1000 sends; as for integer params (actors/spec.py).
        timeout_ms = int(timeout_ms)
    # bool is an int in Python; `true` is not a timeout.
    if not isinstance(timeout_ms, int) or isinstance(timeout_ms, bool) \
            or not 1 <= timeout_ms <= MAX_TIMEOUT_MS:
        raise ApiError.coded(400, "invalid_request",
                             f"timeoutMs must be an integer from 1 to {MAX_TIMEOUT_MS}")
    return command, params, timeout_ms, _optional_str(body.get("productId"), "productId")


@bp.post("/api/devices/<device_id>/commands")
async def send_command(device_id: str) -> dict[str, Any]:
    # Most POSTs here never reach Quart: CommandRoute (command_route.py) serves them at the
    # ASGI level and leaves this view the rest (a query string, a chunked or encoded body).
    return await command(get_runtime(), get_pending(), device_id, await json_object(),
                         _optional_str(query_arg("productId"), "productId"))


async def command(runtime: Runtime, pending: PendingReplies, device_id: str, body: dict[str, Any],
                  in_query: str | None = None) -> dict[str, Any]:
    """POST /api/devices/:deviceId/commands, after its JSON body is read: check, send, and
    wait for the device's answer (the 200 body) or raise ApiError."""
    command, params, timeout_ms, product_id = _parse_command(body)
    # `?productId=` as on the device's GET routes, or in the body; both must agree.
    if in_query is not None and product_id is not None and in_query != product_id:
        raise ApiError.coded(400, "invalid_request", f"productId {shown(in_query)} in the query and "
                             f"{shown(product_id)} in the body differ")
    product_id = await command_product(runtime, device_id, product_id or in_query)
    # Check against the product's spec before anything is committed or published:
    # a typo must not reach the device, nor leave a CommandSent in the log.
    agent = runtime.agents.get(product_id)
    spec = agent.device_spec if agent is not None else None
    if spec is None:
        raise ApiError.coded(400, "invalid_command",
                             f"product {shown(product_id)} has no device spec; it accepts no commands")
    try:
        spec.check_command(command, params)
    except InvalidCommand as exc:
        raise ApiError.from_actor(exc) from None
    params = spec.as_sent(command, params)

    request_id = ids.request_id()
    reply = TrioReply()
    try:
        pending.add(reply)  # shutdown answers it (503); once shut down, raises before the tell
        runtime.system.tell(DeviceActor, (product_id, device_id),
                            SendCommand(request_id, command, params, timeout_ms, reply))
        return await reply.wait(timeout_ms / 1000 + REPLY_MARGIN_S)
    except ParleyError as exc:
        raise ApiError.from_actor(exc, requestId=request_id) from None
    except trio.TooSlowError:
        # The actor's own deadline should have answered first; reaching here means it is stuck.
        raise ApiError.coded(504, "command_timeout", f"no answer to {request_id} within "
                             f"{timeout_ms} ms", requestId=request_id) from None
    finally:
        pending.discard(reply)


def _limit(raw: str | None) -> int:
    """`limit`: ASCII digits for 1..1000, else 400."""
    if raw is None:
        return 50
    limit = ascii_int(raw, 4)
    if limit is not None and 1 <= limit <= 1000:
        return limit
    raise ApiError.coded(400, "invalid_request", f"limit must be an integer from 1 to 1000, not {shown(raw)}")


def _before(raw: str | None) -> int | None:
    """`before`: an event's `id` (ASCII digits, 1..2^63-1); only older events are listed.
    Paging back through a device's history: pass the last `id` of the previous page."""
    if raw is None:
        return None
    before = ascii_int(raw, 19)
    if before is not None and 1 <= before <= MAX_POSITION:
        return before
    raise ApiError.coded(400, "invalid_request",
                         f"before must be an event id (an integer from 1 to {MAX_POSITION}), not {shown(raw)}")


@bp.get("/api/devices/<device_id>/events")
async def list_events(device_id: str) -> dict[str, Any]:
    runtime = get_runtime()
    limit = _limit(query_arg("limit"))
    before = _before(query_arg("before"))
    product_id = _optional_str(query_arg("productId"), "productId")
    device = await find_device(device_id, product_id)
    rows: list[DeviceEventRow] = await read_view(
        runtime.device_events.recent, device.product_id, device.device_id, limit, before)
    agent = runtime.agents.get(device.product_id)
    spec = agent.device_spec if agent is not None else None
    return {
        "deviceId": device.device_id,
        "productId": device.product_id,
        "events": [{
            "id": r.position,
            "event": r.name,
            # Events the spec does not declare are "info": only declared alerts alarm anyone.
            "eventType": spec.event_type(r.name) if spec is not None else "info",
            "data": r.data,
            "ts": r.device_ts,
            "receivedAt": iso_ms(r.received_ms),
        } for r in rows],
    }
