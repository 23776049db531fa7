"""Agent CRUD (seed 001 family): 404 `{"error": "Agent not found"}`, 422 `{"success": false,
"errors": {field: [messages]}}`.

Reads use the Agents view's in-memory mirror (no query). Writes go to the AgentActor; the
reply is the log position of the change, and we wait for the views to reach it so that
the caller's next GET already sees what it just wrote.
"""

from __future__ import annotations

from typing import Any

import structlog
import trio
from pydantic import ValidationError
from quart import Blueprint

from actors.agent import AgentActor, AgentConfig, AgentPatch, CreateAgent, DeleteAgent, UpdateAgent
from actors.agent.config import unknown_fields, validation_errors
from actors.errors import AgentAlreadyExists, AgentNotFound, InvalidAgent, InvalidCommand, ParleyError
from gateways.bridge import TrioReply
from gateways.http.app import ApiError, ascii_int, get_pending, get_runtime, in_thread, json_object, read_view
from projections.agents import AgentRecord

log = structlog.get_logger(__name__)
bp = Blueprint("agents", __name__)

ACTOR_TIMEOUT_S = 10.0
PROJECTION_TIMEOUT_S = 10.0
# The seed's field order; `device_spec` is ours (what the product's devices can do).
CONFIG_FIELDS = ("name", "agent_type", "sys_prompt", "voice_type", "welcome_message",
                 "is_custom_agent", "custom_agent_endpoint", "custom_agent_http_headers",
                 "emqx_config_id", "mqtt_opts")


def not_found() -> ApiError:
    # A fresh instance each time: a shared exception object would accumulate tracebacks.
    return ApiError(404, {"error": "Agent not found"})


def invalid(errors: dict[str, list[str]]) -> ApiError:
    return ApiError(422, {"success": False, "errors": errors})


def agent_json(record: AgentRecord, clients: list[str]) -> dict[str, Any]:
    c = record.config
    out: dict[str, Any] = {"id": record.id, "agent_id": record.agent_id}
    out.update({f: c.get(f) for f in CONFIG_FIELDS})
    out["custom_agent_http_headers"] = c.get("custom_agent_http_headers") or {}
    out["mqtt_opts"] = c.get("mqtt_opts") or {}
    # MCP connections arrive in a later issue; until then no tool is connected.
    out["tools"] = [{**t, "status": "disconnected"} for t in c.get("tools") or []]
    out["data_definitions"] = c.get("data_definitions") or []
    out.update(current_clients=clients, running=record.running,
               inserted_at=record.inserted_at, updated_at=record.updated_at,
               device_spec=c.get("device_spec"))
    return out


async def online_clients(product_ids: list[str]) -> dict[str, list[str]]:
    """Ids of each product's online devices, in one trip to a worker thread."""
    devices = get_runtime().devices

    def query() -> dict[str, list[str]]:
        return {p: [d.device_id for d in devices.list_devices(p, True)] for p in product_ids}

    return await read_view(query)


async def render(record: AgentRecord) -> dict[str, Any]:
    clients = await online_clients([record.agent_id])
    return agent_json(record, clients[record.agent_id])


def lookup(ident: str) -> AgentRecord:
    """`<id>` is the numeric id (seed 001); as a convenience the agent_id works too, for
    every agent_id that is not written as an id is. An id as ids are written (ASCII digits,
    no leading zero) is only ever an id: an all-digit agent_id such as "313" is reached by
    its numeric id. Were the agent_id taken when no id matched, `/api/agents/313` would mean
    that agent today and, once the log reached position 313, another one (a PUT or DELETE
    landing on the wrong agent). "001" is the agent_id "001", not the agent with id 1."""
    agents = get_runtime().agents
    if ident.isascii() and ident.isdigit() and not (ident.startswith("0") and ident != "0"):
        number = ascii_int(ident, 19)  # "²" and "١" are no ids; more than 19 digits, no position
        record = agents.get_by_id(number) if number is not None and number < 2**63 else None
    else:
        record = agents.get(ident)
    if record is None:
        raise not_found()
    return record


async def agent_body() -> dict[str, Any]:
    body = await json_object()
    agent = body.get("agent")
    if agent is None:  # absent or null, as the seed's own check reads
        raise invalid({"agent": ["can't be blank"]})
    if not isinstance(agent, dict):
        raise invalid({"agent": ["must be a JSON object"]})
    return agent


async def ask(agent_id: str, message_type: Any, *args: Any) -> int:
    """Send a command to the AgentActor; return the log position once the views have it."""
    runtime = get_runtime()
    reply = TrioReply()
    pending = get_pending()
    pending.add(reply)  # shutdown answers it (Unavailable); once shut down, raises before the tell
    try:
        runtime.system.tell(AgentActor, (agent_id,), message_type(*args, reply=reply))
        position = await reply.wait(ACTOR_TIMEOUT_S)
    except trio.TooSlowError:
        raise ApiError.coded(503, "unavailable", "the agent did not answer in time") from None
    finally:
        pending.discard(reply)
    if not await in_thread(runtime.projections.wait_for, position, PROJECTION_TIMEOUT_S) \
            and not runtime.projections.stuck:  # stuck views: the runner says so, once
        # Committed, so it is done; only the read side is late. Say so in the log.
        log.warning("http.projection_lagging", agent_id=agent_id, position=position)
    return position


# At most this many ignored field names in a log line (a body may hold thousands).
IGNORED_SHOWN = 20


def log_ignored(agent: dict[str, Any], model: Any, agent_id: str) -> None:
    """Fields the agent API does not know are ignored, as the platform's (Ecto) cast ignores
    them; a line says which, since a misspelt one (`sys_promt`) is a change that never came."""
    ignored = unknown_fields(agent, model)
    if ignored:
        log.info("agents.fields_ignored", agent_id=agent_id, fields=[f[:100] for f in ignored[:IGNORED_SHOWN]],
                 count=len(ignored))


def actor_error(exc: ParleyError) -> ApiError:
    if isinstance(exc, AgentNotFound):
        return not_found()
    if isinstance(exc, AgentAlreadyExists):
        return invalid({"agent_id": ["has already been taken"]})
    if isinstance(exc, InvalidAgent):  # per field, as the route's own check reports them
        return invalid(exc.errors)
    if isinstance(exc, InvalidCommand):
        return invalid({"agent": [str(exc)]})
    return ApiError.from_actor(exc)


@bp.get("/api/agents")
async def list_agents() -> dict[str, Any]:
    records = get_runtime().agents.list()
    clients = await online_clients([r.agent_id for r in records])
    return {"agents": [agent_json(r, clients[r.agent_id]) for r in records]}


@bp.get("/api/agents/<ident>")
async def get_agent(ident: str) -> dict[str, Any]:
    return await render(lookup(ident))


@bp.post("/api/agents")
async def create_agent() -> tuple[dict[str, Any], int]:
    agent = await agent_body()
    try:
        config = AgentConfig.model_validate(agent)
    except ValidationError as exc:
        raise invalid(validation_errors(exc)) from None
    log_ignored(agent, AgentConfig, config.agent_id)
    try:
        await ask(config.agent_id, CreateAgent, config.to_record())
    except ParleyError as exc:
        raise actor_error(exc) from None
    body: dict[str, Any] = {"success": True, "message": "智能体创建成功"}
    record = get_runtime().agents.get(config.agent_id)
    if record is not None:  # absent only if the projection lagged past its timeout
        body["agent"] = await render(record)
    return body, 201


# PATCH as well: the platform's Phoenix `resources` routes take both for an update.
@bp.route("/api/agents/<ident>", methods=["PUT", "PATCH"])
async def update_agent(ident: str) -> dict[str, Any]:
    record = lookup(ident)
    fields = await agent_body()
    if fields.get("agent_id", record.agent_id) != record.agent_id:
        raise invalid({"agent_id": ["cannot be changed"]})
    try:
        changes = AgentPatch.model_validate(fields).changes()
        # The actor checks the merged agent too, but only we can report it per field.
        AgentConfig.updated(record.config, changes, record.agent_id)
    except ValidationError as exc:
        raise invalid(validation_errors(exc)) from None
    log_ignored(fields, AgentPatch, record.agent_id)
    if changes:  # an empty update would only add a no-op event to the log
        try:
            await ask(record.agent_id, UpdateAgent, changes, record.id)
        except ParleyError as exc:
            raise actor_error(exc) from None
    updated = get_runtime().agents.get(record.agent_id) or record
    return {"success": True, "message": "智能体更新成功", "agent": await render(updated)}


@bp.delete("/api/agents/<ident>")
async def delete_agent(ident: str) -> dict[str, Any]:
    record = lookup(ident)
    try:
        await ask(record.agent_id, DeleteAgent, record.id)
    except ParleyError as exc:
        raise actor_error(exc) from None
    return {"success": True}
