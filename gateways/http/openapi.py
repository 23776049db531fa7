"""GET /api/openapi.json: a hand-written OpenAPI 3.1 document of every route.

Hand-written on purpose: the routes parse JSON themselves (two error families, seed
shapes), so nothing could generate this faithfully. tests/http/test_openapi.py fails if
a route is added without documenting it here, or a route gives an answer not described here.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint

from actors.agent.config import MAX_ITEMS

bp = Blueprint("openapi", __name__)


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def resp(description: str, schema: str | dict[str, Any] = "Error") -> dict[str, Any]:
    body = ref(schema) if isinstance(schema, str) else schema
    return {"description": description, "content": {"application/json": {"schema": body}}}


def param(name: str, where: str, schema: dict[str, Any], description: str,
          required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required or where == "path",
            "schema": schema, "description": description}


def body(schema: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": ref(schema)}}}


STR, INT, OBJ = {"type": "string"}, {"type": "integer"}, {"type": "object"}
HEADERS = {"type": "object", "additionalProperties": STR,
           "description": "HTTP header names to their values, every value a string "
                          "(any other type is 422)."}
DEVICE_ID = param("deviceId", "path", STR, "The device's id (its MQTT client's deviceId).")
PRODUCT_Q = param("productId", "query", STR,
                  "Disambiguates a deviceId used in several products; default: most recently seen.")
AGENT_ID = param("id", "path", STR, "Numeric agent id; an agent_id string is accepted too, "
                 "unless it is written as an id is (ASCII digits, no leading zero): that is always an id.")


def generic(name: str) -> dict[str, str]:
    """A generic refusal (components.responses), referenced where an operation lists it."""
    return {"$ref": f"#/components/responses/{name}"}


TOO_LARGE = resp("Body larger than 1 MiB (code request_entity_too_large).")
STORE_503 = generic("StoreUnavailable")
AGENT_400 = resp(
    "The body is not a JSON object: empty, malformed, or a value Parley cannot store (code "
    "invalid_json), or valid JSON that is not an object (code invalid_request). A field of "
    "the wrong type or range is not a 400 on the agent routes: it is 422.")
AGENT_404 = resp("No such agent.", "AgentNotFound")
AGENT_422_RULES = (
    "`agent` missing or not an object, or a field that breaks its rule: a required field "
    "missing, null or blank, a field of the wrong JSON type (converted only as the platform's "
    "Ecto cast converts: \"yes\" and 1 are no boolean, \"1.0\" is no id), a string too long or "
    "short, a header value that is not a string, an invalid device_spec; `errors` names each field")
AGENT_503 = resp("The agent actor did not answer within 10 s, the server is shutting down, or "
                 "the store is down (code unavailable); the write may have been committed, so "
                 "read the agent back.")
MALFORMED_HEADERS = {
    "Connection": {"schema": {"const": "close"}, "description": "The connection is closed."},
    "X-Request-Id": {"schema": STR, "description": "A new id; the log line carries it as trace_id."}}
COMPRESSED = resp("A body with a Content-Encoding (code unsupported_media_type): bodies are "
                  "taken uncompressed.")
AGENT_UPDATE = {
    "summary": "Update some fields of an agent.", "parameters": [AGENT_ID],
    "requestBody": body("AgentInput"), "responses": {
        "200": resp("Updated (message 智能体更新成功).", "AgentSaved"), "400": AGENT_400,
        "404": AGENT_404, "413": TOO_LARGE, "415": COMPRESSED,
        "422": resp(f"Validation failed: {AGENT_422_RULES}, also of the merged "
                    "agent; or a different agent_id (cannot be changed).", "AgentErrors"),
        "503": AGENT_503}}


def malformed(description: str) -> dict[str, Any]:
    return {**resp(description), "headers": MALFORMED_HEADERS}


# Generic refusals, the same on every route: documented once here (info.description points
# to them) rather than repeated in each operation. Each description starts with its status
# and code (tests/http/test_openapi.py reads them so).
GENERIC: dict[str, Any] = {
    "MalformedRequest": malformed(
        "400 bad_request: an HTTP request that cannot be parsed (a malformed request line, no "
        "Host header, two Content-Length headers, ...); refused before any route sees it, "
        "with {error: 'malformed HTTP request: bad request', code: 'bad_request'}, "
        "Connection: close and a new X-Request-Id, and logged (http.request_refused)."),
    "InvalidRequestTarget": resp(
        "400 invalid_request: the path or the query string is not valid UTF-8 once "
        "percent-decoded, or a query parameter the route reads is given more than once."),
    "InvalidJson": resp(
        "400 invalid_json: on a route that takes a body, the body is empty or not valid JSON, "
        "or JSON Parley cannot store: an integer beyond 64 bits, NaN/Infinity (or a number "
        "like 1e400), nesting deeper than 32 levels, a string with a lone surrogate."),
    "InvalidBody": resp(
        "400 invalid_request: on a route that takes a body, the body is valid JSON but not an "
        "object. (A field of the wrong type or range is 400 invalid_request on the device "
        "routes, 422 on the agent routes.)"),
    "NoSuchRoute": resp(
        "404 not_found ({error: 'no such route', code: 'not_found'}): no such route, which "
        "includes a path with an encoded slash (%2F) or an empty segment (/api//health); never "
        "a redirect."),
    "MethodNotAllowed": {**resp(
        "405 method_not_allowed: the route exists, the method does not (OPTIONS included); "
        "the Allow header lists the methods. HEAD is allowed wherever GET is."),
        "headers": {"Allow": {"schema": STR, "description": "The route's methods."}}},
    "RequestTimeout": resp("408 request_timeout: the request body did not arrive within 60 s."),
    "RequestEntityTooLarge": resp("413 request_entity_too_large: a body larger than 1 MiB."),
    "RequestHeaderFieldsTooLarge": malformed(
        "431 request_header_fields_too_large: the request line and headers are too large: "
        "over 64 KiB always, over 16 KiB if they are still incomplete after one read of the "
        "connection (as when they arrive in parts); refused before any route sees it, with "
        "Connection: close and a new X-Request-Id, and logged."),
    "InternalError": resp("500 internal_error: a bug; details are in the server log only."),
    "NotImplemented": malformed(
        "501 not_implemented: a Transfer-Encoding other than chunked (or several of them); "
        "refused before any route sees it, with Connection: close and a new X-Request-Id, "
        "and logged."),
    "StoreUnavailable": resp(
        "503 unavailable ({error: 'the store is not reachable; try again later', code: "
        "'unavailable'}): the database is down, out of connections (a read waits at most 5 s "
        "for one), locked or full; logged as http.store_unavailable. Any route that reads or "
        "writes the store (all but /api/openapi.json); listed on each."),
}

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error", "code"], "properties": {
        "error": STR, "code": STR, "requestId": STR}},
    "AgentNotFound": {"type": "object", "properties": {"error": {"const": "Agent not found"}}},
    "AgentErrors": {"type": "object", "properties": {
        "success": {"const": False},
        "errors": {"type": "object", "additionalProperties": {"type": "array", "items": STR}}}},
    "Health": {"type": "object", "properties": {
        "status": {"const": "ok"}, "projectionPosition": INT,
        "projectionOwner": {"type": "boolean", "description": "this process writes the views"},
        "projectionError": {"type": "string", "description":
                            "the error the views' next batch failed with; only while it lasts (tried "
                            "again a second later; the same error again in one view halts that view)"},
        "haltedViews": {"type": "array", "description": (
            "only when there are any: views that stopped at an event they cannot apply; their tables "
            "reflect the log up to position, the other views go on, and each is tried again from "
            "there when a Parley process next starts writing the views"),
            "items": {"type": "object", "properties": {
                "view": STR, "position": INT, "error": STR, "since": {"type": "string", "format": "date-time"}}}},
        "logPosition": INT,
        "storeWritable": {"type": "boolean", "description":
                          "false while the log's commits fail (a full disk, an I/O error); "
                          "true again at the next commit that succeeds"},
        "storeError": {"type": "string", "description": "why commits fail; only while storeWritable is false"},
        "activeActors": INT,
        "loadingActors": {"type": "integer", "description":
                          "actors waiting for a slot to load from the log (an activation storm after a restart)"},
        "stoppingActors": {"type": "integer", "description": "passivated actors whose threads still drain their queue"},
        "mqttConnected": {"type": ["boolean", "null"], "description":
                          "whether commands can go out now (connected to the broker and subscribed); "
                          "null without an MQTT gateway"},
        "mqtt": {"type": "object", "additionalProperties": INT,
                 "description": "MQTT gateway counters: received, acked, dropped.<reason>"}}},
    "Device": {"type": "object", "properties": {
        "deviceId": STR, "productId": STR, "online": {"type": "boolean"},
        "status": {"enum": ["online", "offline"]}, "state": OBJ,
        "lastSeen": {"type": ["string", "null"], "format": "date-time"},
        "lastSeenTs": INT, "registeredAt": {"type": "string", "format": "date-time"}}},
    "DeviceList": {"type": "object", "properties": {
        "productId": STR, "devices": {"type": "array", "items": ref("Device")}}},
    "CommandRequest": {"type": "object", "required": ["command"], "properties": {
        "command": STR, "params": {"type": ["object", "null"], "default": {}},
        "timeoutMs": {"type": ["integer", "null"], "minimum": 1, "maximum": 300000, "default": 30000},
        "productId": STR}},
    "CommandResult": {"type": "object", "description": (
        "The device's answer. `code` is the device's own code: a device answering 400 or 404 "
        "still gives HTTP 200."), "properties": {
        "requestId": STR, "command": STR, "code": INT, "msg": STR, "data": {}}},
    "DeviceEvents": {"type": "object", "properties": {
        "deviceId": STR, "productId": STR, "events": {"type": "array", "items": {
            "type": "object", "properties": {
                "id": INT, "event": STR, "eventType": {"enum": ["alert", "info"]}, "data": OBJ,
                "ts": {"type": ["integer", "null"]},
                "receivedAt": {"type": "string", "format": "date-time"}}}}}},
    "AgentInput": {"type": "object", "required": ["agent"], "properties": {"agent": {
        "type": "object", "properties": {
            "agent_id": {**STR, "minLength": 3, "maxLength": 255, "pattern": "^[A-Za-z0-9_-]+$"},
            "name": {**STR, "minLength": 3, "maxLength": 255},
            "agent_type": {"enum": ["single", "multi"]},
            "voice_type": {**STR, "maxLength": 255}, "is_custom_agent": {"type": "boolean"},
            "sys_prompt": {**STR, "maxLength": 2000}, "welcome_message": {**STR, "maxLength": 500},
            "custom_agent_endpoint": {**STR, "pattern": "^wss?://",
                                      "description": "A ws:// or wss:// URL with a host; required when "
                                                     "is_custom_agent is true."},
            "custom_agent_http_headers": {**HEADERS, "type": ["object", "null"]},
            "emqx_config_id": {"type": ["integer", "null"]}, "mqtt_opts": {"type": ["object", "null"]},
            "tools": {"type": ["array", "null"], "items": ref("Tool"), "maxItems": MAX_ITEMS},
            "data_definitions": {"type": ["array", "null"], "items": ref("DataDefinition"),
                                 "maxItems": MAX_ITEMS},
            "device_spec": {"type": ["object", "null"], "description": "Commands, telemetry and events "
                            "of the devices; without one (null) the product accepts no commands."}},
        "description": "On create: agent_id, name, agent_type, voice_type, is_custom_agent are "
                       "required. On update: only the fields to change; agent_id cannot change. "
                       "Fields are cast as the platform's Ecto cast does: each has its JSON "
                       "type, except that a boolean may be the string \"true\", \"false\", \"1\" "
                       "or \"0\" and an integer a string of decimal digits (\"42\"); null for an "
                       "optional field is its empty value ({}, [] or null). In the text fields "
                       "an empty or whitespace-only string is no value (a required one is then "
                       "422 can't be blank, an optional one stored as null). Unknown fields are "
                       "ignored (the log line agents.fields_ignored names them), as are those "
                       "only the server sets (id, running, current_clients, inserted_at, updated_at)."}}},
    "Tool": {"type": "object", "required": ["name", "endpoint"], "properties": {
        "name": {**STR, "minLength": 1, "maxLength": 255}, "description": {**STR, "default": ""},
        "transport": {"enum": ["streamable_http", "sse"], "default": "streamable_http"},
        "endpoint": {**STR, "pattern": "^https?://", "description": "An http:// or https:// URL with a host."},
        "http_headers": HEADERS,
        "enabled": {"type": "boolean", "default": True}},
        "description": "An MCP tool. name and endpoint must not be blank (whitespace only is "
                       "422 can't be blank); no two tools of an agent share a name; status, set "
                       "by the server, is ignored on input; other fields are kept as sent."},
    "DataDefinition": {"type": "object", "required": ["topic_filter"], "properties": {
        "topic_filter": {**STR, "minLength": 1}, "description": {**STR, "default": ""},
        "data_prompts": {**STR, "default": ""}, "json_schema": OBJ,
        "push_data_analysis_via_voice": {"type": "boolean", "default": False}},
        "description": "Other fields are kept as sent."},
    "Agent": {"type": "object", "properties": {
        "id": {**INT, "description": (
            "The log position of the event that created the agent: increasing in creation "
            "order but not consecutive; an agent_id deleted and created again gets a new id.")},
        "agent_id": STR, "name": STR, "agent_type": STR,
        "sys_prompt": {"type": ["string", "null"]}, "voice_type": STR,
        "welcome_message": {"type": ["string", "null"]}, "is_custom_agent": {"type": "boolean"},
        "custom_agent_endpoint": {"type": ["string", "null"]}, "custom_agent_http_headers": HEADERS,
        "emqx_config_id": {"type": ["integer", "null"]}, "mqtt_opts": OBJ,
        "tools": {"type": "array", "items": {"allOf": [ref("Tool"), {"properties": {
            "status": {"enum": ["connected", "disconnected"]}}}]}},
        "data_definitions": {"type": "array", "items": ref("DataDefinition")},
        "current_clients": {"type": "array", "items": STR,
                            "description": "Ids of the product's online devices."},
        "running": {"type": "boolean"}, "inserted_at": STR, "updated_at": STR,
        "device_spec": {"type": ["object", "null"]}}},
    "AgentSaved": {"type": "object", "properties": {
        "success": {"const": True}, "message": STR, "agent": ref("Agent")}},
}

PATHS: dict[str, Any] = {
    "/api/health": {"get": {"summary": "Is the HTTP API up; how far the views follow the log.",
                            "responses": {"200": resp("Up.", "Health"), "503": STORE_503}}},
    "/api/openapi.json": {"get": {"summary": "This document.",
                                  "responses": {"200": resp("OpenAPI 3.1.", OBJ)}}},
    "/api/products/{productId}/devices": {"get": {
        "summary": "List the devices of a product (device agent).",
        "parameters": [param("productId", "path", STR, "The product (= agent_id)."),
                       param("status", "query", {"enum": ["online", "offline"]}, "Filter.")],
        "responses": {"200": resp("Devices, ordered by deviceId.", "DeviceList"),
                      "400": resp("status neither online nor offline, or given twice "
                                  "(code invalid_request)."),
                      "404": resp("Unknown product (code product_not_found)."),
                      "503": STORE_503}}},
    "/api/devices/{deviceId}": {"get": {
        "summary": "A device's status, state and last seen time.",
        "parameters": [DEVICE_ID, PRODUCT_Q],
        "responses": {"200": resp("The device.", "Device"),
                      "400": resp("productId empty or given twice (code invalid_request)."),
                      "404": resp("No such device (code device_not_found)."),
                      "503": STORE_503}}},
    "/api/devices/{deviceId}/commands": {"post": {
        "summary": "Send a command from the product's device spec and wait for the answer.",
        "parameters": [DEVICE_ID, PRODUCT_Q], "requestBody": body("CommandRequest"),
        "responses": {
            "200": resp("The device answered (whatever its own code).", "CommandResult"),
            "400": resp("invalid_json (malformed body), invalid_request (body not an object, "
                        "a field of the wrong type or range), or invalid_command: unknown "
                        "command, bad params, or no device spec. Nothing was sent."),
            "404": resp("No such device (code device_not_found)."),
            "409": resp("Device offline (code device_offline)."), "413": TOO_LARGE, "415": COMPRESSED,
            "500": resp("The device actor failed (code internal_error)."),
            "503": resp("No MQTT link, the server is shutting down, or the store is down "
                        "(code unavailable)."),
            "504": resp("No answer within timeoutMs (code command_timeout, with requestId).")}}},
    "/api/devices/{deviceId}/events": {"get": {
        "summary": "Events the device reported, newest first.",
        "parameters": [DEVICE_ID, PRODUCT_Q, param(
            "limit", "query", {**INT, "minimum": 1, "maximum": 1000, "default": 50}, "How many."),
            param("before", "query", {**INT, "minimum": 1, "maximum": 2**63 - 1},
                  "Only events older than this event id: to page back, the last id of the "
                  "previous page.")],
        "responses": {"200": resp("Events.", "DeviceEvents"),
                      "400": resp("limit not an integer in 1..1000 or before not an event id "
                                  "(ASCII digits), productId empty, or any of them given twice "
                                  "(code invalid_request)."),
                      "404": resp("No such device (code device_not_found)."),
                      "503": STORE_503}}},
    "/api/agents": {
        "get": {"summary": "List agents.", "responses": {"200": resp("Agents.", {
            "type": "object", "properties": {"agents": {"type": "array", "items": ref("Agent")}}}),
            "503": STORE_503}},
        "post": {"summary": "Create an agent.", "requestBody": body("AgentInput"), "responses": {
            "201": resp("Created (message 智能体创建成功).", "AgentSaved"), "400": AGENT_400,
            "413": TOO_LARGE, "415": COMPRESSED,
            "422": resp(f"Validation failed: {AGENT_422_RULES}; or agent_id already taken (by a "
                        "live agent: a deleted one's agent_id can be created again).",
                        "AgentErrors"),
            "503": AGENT_503}}},
    "/api/agents/{id}": {
        "get": {"summary": "One agent.", "parameters": [AGENT_ID],
                "responses": {"200": resp("The agent.", "Agent"), "404": AGENT_404,
                              "503": STORE_503}},
        "put": AGENT_UPDATE,
        "patch": {**AGENT_UPDATE, "summary": "The same as PUT (Phoenix routes take both)."},
        "delete": {"summary": "Delete an agent.", "parameters": [AGENT_ID], "responses": {
            "200": resp("Deleted.", {"type": "object", "properties": {"success": {"const": True}}}),
            "404": AGENT_404, "503": AGENT_503}}},
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Parley HTTP API", "version": "0.1.0", "description": (
        "Devices, commands and events (errors {error, code}) and agent management "
        "(errors {error: 'Agent not found'} / {success: false, errors}). See docs/http-api.md. "
        "Every response carries X-Request-Id. Any route may also answer the generic refusals "
        "described once in components.responses, all {error, code}: 400 bad_request, 431 and "
        "501 (malformed HTTP, refused before routing, with Connection: close), 400 "
        "invalid_request (path or query not UTF-8, a query parameter repeated), 404 (no such "
        "route, an encoded slash), 405 (wrong method, OPTIONS included; with Allow), 408 (body "
        "not received within 60 s), 500, and 503 unavailable (the store is down; listed on "
        "each route it applies to). Routes that take a body also answer 400 invalid_json and "
        "400 invalid_request (body not an object) and 413 (body over 1 MiB).")},
    "paths": PATHS,
    "components": {"schemas": SCHEMAS, "responses": GENERIC},
}


@bp.get("/api/openapi.json")
async def openapi() -> dict[str, Any]:
    return DOCUMENT
