"""The HTTP gateway's app factory, its error handling and the helpers every route shares.

Two error shapes live side by side, because the two API families we follow differ:
  * devices / health / generic errors: `{"error": "<human message>", "code": "<machine code>"}`
  * agents (seed 001): 404 `{"error": "Agent not found"}`, 422 `{"success": false, "errors": {...}}`
Routes raise `ApiError` with the body they want; the handlers here turn it (and anything
Quart or a bug raises) into JSON, so no traceback ever reaches a client.
"""

from __future__ import annotations

import json
import time
from typing import Any, NoReturn
from urllib.parse import unquote_to_bytes

import structlog
import trio
from quart import Response, current_app, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from actors.errors import ParleyError
from eventstore import StoreUnavailable
from eventstore.breaker import is_store_error
from gateways import ids, json_input
from gateways.bridge import PendingReplies
from gateways.http.json_provider import OrjsonProvider
from gateways.runtime import Runtime

log = structlog.get_logger(__name__)

MAX_BODY = 1024 * 1024  # 1 MiB: commands and agent configs are small; anything bigger is a mistake
RUNTIME_KEY = "parley.runtime"
PENDING_KEY = "parley.pending_replies"

# Actor errors -> HTTP status. `code` comes from the error class itself (actors/errors.py).
ACTOR_STATUS: dict[str, int] = {
    "device_not_found": 404,
    "agent_not_found": 404,
    "device_offline": 409,
    "invalid_command": 400,
    "agent_exists": 422,
    "command_timeout": 504,
    "unavailable": 503,
    "internal_error": 500,
}


# How much of a client's input an error repeats. A message shows a client's value with
# `shown` (at most ECHO_LIMIT characters of it); whatever else reaches an error body (a
# JSON Schema message quoting a param value, a 422 naming a 1 MB unknown field) is cut at
# TEXT_LIMIT characters by ApiError itself, so neither response nor log line can grow
# with the input. Log lines cut the path they name the same way.
ECHO_LIMIT = 100
TEXT_LIMIT = 1000


def shown(value: str) -> str:
    """A client's value as an error message quotes it: its repr, or for a long one the repr
    of its first ECHO_LIMIT characters with an ellipsis and the full length."""
    if len(value) <= ECHO_LIMIT:
        return repr(value)
    return f"{value[:ECHO_LIMIT] + '…'!r} ({len(value)} characters)"


def ascii_int(text: str | None, max_digits: int) -> int | None:
    """`text` as an integer if it is ASCII digits only, at most `max_digits` of them after
    leading zeros; else None. (int() also takes "1_0", "+1", " 1 ", "١" and raises on "²".)"""
    if text is None or not (text.isascii() and text.isdigit()) or len(text.lstrip("0")) > max_digits:
        return None
    return int(text)


def clip(text: str, limit: int = TEXT_LIMIT) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _clipped(value: Any) -> Any:
    """`value` with every string in it (dict keys too) at most TEXT_LIMIT characters."""
    if isinstance(value, str):
        return clip(value)
    if isinstance(value, dict):
        return {_clipped(k): _clipped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clipped(v) for v in value]
    return value


class ApiError(Exception):
    """An HTTP error response with an explicit JSON body (either family's shape). The body's
    strings are cut at TEXT_LIMIT characters: an error never echoes a client's input whole."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        body = _clipped(body)
        super().__init__(body.get("error") or body.get("errors"))
        self.status = status
        self.body = body

    @classmethod
    def coded(cls, status: int, code: str, message: str, **extra: Any) -> "ApiError":
        return cls(status, {"error": message, "code": code, **extra})

    @classmethod
    def from_actor(cls, exc: ParleyError, **extra: Any) -> "ApiError":
        return cls.coded(ACTOR_STATUS.get(exc.code, 500), exc.code, str(exc), **extra)


class TraceIds:
    """ASGI middleware: every log line about a request, on the trio loop or in the actors it
    reaches, carries its `trace_id`, and the response echoes it as `X-Request-Id` (a
    caller's own id is kept, so logs join across services). Done at the ASGI level rather
    than in Quart's before/after_request hooks: on a no-op POST the hooks added 32 µs per
    request, this middleware 17 µs (seven runs of 2,000 requests each)."""

    def __init__(self, app: Any, access_log: bool = False) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        trace_id = _caller_id(given)
        if trace_id is None:
            trace_id = ids.trace_id()
            given = trace_id.encode("ascii")
        structlog.contextvars.clear_contextvars()
        # `trace_id`, not `request_id`: that name is the device command's requestId in logs.
        structlog.contextvars.bind_contextvars(trace_id=trace_id)
        header = (b"x-request-id", given)  # a caller's id: exactly the bytes it sent
        status = 0  # none yet: the client may go away first

        async def send_with_id(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        if not self.access_log:
            await self.app(scope, receive, send_with_id)
            return
        # Opt-in (`access_log`): one `http.request` line per request once it is done, the
        # refusals among them also logged as `http.request_refused` with their body.
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            query = scope.get("query_string", b"")
            target = scope["path"] + ("?" + query.decode("latin-1") if query else "")
            log.info("http.request", method=scope["method"], path=clip(target), status=status,
                     ms=round((time.perf_counter() - started) * 1000, 2))


def _caller_id(raw: bytes) -> str | None:
    """A caller's X-Request-Id if it is usable: UTF-8, printable, 1..128 characters."""
    if not 0 < len(raw) <= 4 * 128:  # 128 characters are at most 512 bytes of UTF-8
        return None
    try:
        given = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return given if len(given) <= 128 and given.isprintable() else None


def _target_refusal(raw_path: bytes | None, query: bytes) -> tuple[int, str, str] | None:
    """Why a request target cannot be routed as sent (status, code, message), or None.
    The routes see the path percent-decoded, so an encoded slash would route `a%2Fcommands`
    as `a/commands` (ids never contain `/`: they are MQTT topic levels), and bytes that are
    not UTF-8 would be read as U+FFFD in the path (different ids colliding) or left as the
    literal `%FF` in the query."""
    if (raw_path is not None and b"#" in raw_path) or b"#" in query:
        # A fragment is the client's own (RFC 9110, 4.2.4): sent, it would be read as part
        # of a device id or a query value.
        return 400, "invalid_request", "the request target has a fragment ('#'), which is not sent to a server"
    if raw_path is not None and b"%" in raw_path:
        if b"%2f" in raw_path.lower():
            return 404, "not_found", "no such route"
        try:
            unquote_to_bytes(raw_path).decode("utf-8")
        except UnicodeDecodeError:
            return 400, "invalid_request", "path is not valid UTF-8"
    if b"%" in query:
        try:
            unquote_to_bytes(query).decode("utf-8")
        except UnicodeDecodeError:
            return 400, "invalid_request", "query string is not valid UTF-8"
    return None


class CheckTarget:
    """ASGI middleware: refuse a request target that the routes would misread (see
    `_target_refusal`), before Quart decodes it, with the generic JSON error and a log line.
    A target with no `%` or `#` in it (nearly all) costs four substring tests. Inside TraceIds, so
    the refusal carries X-Request-Id and its log line the trace_id."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raw_path = scope.get("raw_path")
            query = scope.get("query_string", b"")
            if (raw_path is not None and (b"%" in raw_path or b"#" in raw_path)) or b"%" in query or b"#" in query:
                refusal = _target_refusal(raw_path, query)
                if refusal is not None:
                    await self._refuse(scope, send, *refusal)
                    return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Any, send: Any, status: int, code: str, message: str) -> None:
        body = {"error": message, "code": code}
        raw_path = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
        log.info("http.request_refused", method=scope["method"],
                 path=clip(raw_path.decode("ascii", "backslashreplace")),
                 query=clip(scope.get("query_string", b"").decode("ascii", "backslashreplace")),
                 status=status, body=body)
        data = (json.dumps(body, separators=(",", ":")) + "\n").encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})


class _App(QuartTrio):
    def raise_routing_exception(self, request: Any) -> NoReturn:
        # Never werkzeug's HTML redirect (its Location is built from the Host header): slash
        # merging is off and no rule ends in "/", so none should arise; if one does, 404.
        if isinstance(request.routing_exception, RequestRedirect):
            raise NotFound()
        raise request.routing_exception


def query_arg(name: str) -> str | None:
    """The query parameter `name`, or None. Given more than once is 400: which one would
    count is a guess (`?status=online&status=bogus` must not pass as `online`)."""
    values = request.args.getlist(name)
    if len(values) > 1:
        raise ApiError.coded(400, "invalid_request", f"{name} given more than once")
    return values[0] if values else None


def get_runtime() -> Runtime:
    return current_app.extensions[RUNTIME_KEY]


def get_pending() -> PendingReplies:
    """The app's registry of replies requests wait on: a handler that waits on an actor
    adds its `TrioReply` before telling the actor and discards it when done, so shutdown
    can answer it (`answer_waiting_requests`)."""
    return current_app.extensions[PENDING_KEY]


def answer_waiting_requests(app: QuartTrio) -> None:
    """Shutdown begins: every request waiting on an actor gets its 503 `unavailable` now,
    and a later one at once, while hypercorn can still send them (its graceful drain would
    cancel them with no response). `serve_http` calls it as `on_shutdown`."""
    app.extensions[PENDING_KEY].close("server is shutting down")


# How long a request waits for a store query (a view read, the log's position). A
# PostgreSQL server that hangs while its host answers TCP never answers at all; the breaker
# finds it out (its STALL_S and probe, some 12 s) and later reads fail at once, but a read
# that was already waiting would wait with it. Longer than any query of ours takes.
STORE_ANSWER_S = 15.0


async def in_thread(fn: Any, *args: Any) -> Any:
    """Run a blocking store query off the trio loop (views hit SQLite/PostgreSQL). Past
    STORE_ANSWER_S the request gives up with StoreUnavailable (a 503); the query's thread
    is left to finish, or to fail, whenever the server lets it."""
    try:
        with trio.fail_after(STORE_ANSWER_S):
            return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
    except trio.TooSlowError:
        raise StoreUnavailable(f"the store did not answer within {STORE_ANSWER_S:g} s") from None


# How long a read waits for the views to catch up before it answers from what they hold.
READ_WAIT_S = 2.0


async def read_view(fn: Any, *args: Any, runtime: Runtime | None = None) -> Any:
    """A view query that sees every write acknowledged before it (read-your-writes, within
    this process): a command's 200 comes when its result is committed, and the views follow
    the log a few ms later, so a client that reads the device right after (the seed's own
    call order) would see the state from before the command. In the worker thread, wait
    until the views hold every commit this process knows of (usually they do already), at
    most READ_WAIT_S (not at all while they are stuck, `stuck`), then query. `runtime`
    where there is no Quart app context (the command route, gateways/http/command_route.py)."""
    runtime = runtime or get_runtime()
    projections, breaker = runtime.projections, runtime.log.breaker

    def query() -> Any:
        if breaker is not None:
            breaker.check()  # known down: 503 now, not after waiting for views that cannot move
        # Stuck on an event a view cannot apply (`stuck`): answered at once from what the
        # views hold; the runner logs that once (and /api/health names it), not every read.
        if not projections.wait_for_committed(READ_WAIT_S) and not projections.stuck:
            log.warning("http.projection_lagging", position=projections.position,
                        committed=projections.committed)
        return fn(*args)

    return await in_thread(query)


async def json_body() -> Any:
    """The request body parsed as JSON, whatever the Content-Type says (curl -d sends
    form-encoded by default). Too large -> 413 (raised by Quart), not JSON -> 400."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):  # a gzip body would read as "can't decode byte 0x8b"
        raise ApiError.coded(415, "unsupported_media_type",
                             f"Content-Encoding {shown(encoding)} is not supported: send the body uncompressed")
    return parse_json(await request.get_data(as_text=False))  # get_data enforces MAX_CONTENT_LENGTH


def parse_json(raw: bytes) -> Any:
    """A request body parsed as JSON; empty, not JSON, or not storable -> 400."""
    if not raw.strip():
        raise ApiError.coded(400, "invalid_json", "request body is empty; expected a JSON object")
    try:
        return json_input.loads(raw)
    except json_input.UnsupportedValue as exc:
        raise ApiError.coded(400, "invalid_json", f"request body has a value Parley cannot store: {exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError.coded(400, "invalid_json", f"request body is not valid JSON: {exc}") from None


async def json_object() -> dict[str, Any]:
    return as_object(await json_body())


def as_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError.coded(400, "invalid_request", "request body must be a JSON object")
    return body


def refused(exc: ApiError, method: str, path: str) -> None:
    """Log a refusal of ours. A device that does not answer in time (504) is the device's
    trouble, not the server's, and a 503 is "try again later" (the store or the broker down,
    said once by store.down or mqtt.disconnected): warnings. Other 5xx (a crashed actor)
    are errors."""
    log_fn = log.info if exc.status < 500 else log.warning if exc.status in (503, 504) else log.error
    log_fn("http.request_refused", method=method, path=clip(path), status=exc.status, body=exc.body)


def failed(exc: Exception, method: str, path: str) -> tuple[int, dict[str, Any]]:
    """Status and body for an exception no route turned into an ApiError, logged."""
    if is_store_error(exc):
        # Not a bug: the database is down, full or locked. 503, and the reason in the log.
        # Known down (the breaker said so once, `store.down`): a warning per request.
        log_fn = log.warning if isinstance(exc, StoreUnavailable) else log.error
        log_fn("http.store_unavailable", method=method, path=clip(path), error=clip(repr(exc)))
        return 503, {"error": "the store is not reachable; try again later", "code": "unavailable"}
    # A bug: log the traceback for us, give the client only a generic message.
    log.exception("http.unhandled_error", method=method, path=clip(path))
    return 500, {"error": "internal server error", "code": "internal_error"}


def http_refused(exc: HTTPException, method: str, path: str, body_timeout: float) -> tuple[int, dict[str, Any]]:
    """Status and body for one of Quart's (werkzeug's) own refusals, logged."""
    status = exc.code or 500
    code = (exc.name or "error").lower().replace(" ", "_")
    message = {404: "no such route", 413: f"request body exceeds {MAX_BODY} bytes",
               408: f"the request body was not received in full within {body_timeout:g} s"}.get(
        status, exc.description or exc.name)
    body = {"error": message, "code": code}
    log.info("http.request_refused", method=method, path=clip(path), status=status, body=body)
    return status, body


def _json(status: int, body: dict[str, Any]) -> Response:
    response = jsonify(body)
    response.status_code = status
    return response


def create_app(runtime: Runtime, *, access_log: bool = False) -> QuartTrio:
    # Imported here, not at the top: the blueprints import helpers from this module.
    from gateways.http.agents import bp as agents_bp
    from gateways.http.command_route import CommandRoute
    from gateways.http.devices import bp as devices_bp
    from gateways.http.health import bp as health_bp
    from gateways.http.openapi import bp as openapi_bp

    app = _App(__name__, static_folder=None)  # an API: no /static route
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    # OPTIONS is a 405 like any method a route lacks (Quart would answer 200 text/html).
    # Read when a rule is added, as is merge_slashes: both before the blueprints.
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    # `//api//health` is a 404, not a 308 HTML redirect to a Location built from Host.
    app.url_map.merge_slashes = False
    app.json = OrjsonProvider(app)  # compact, fields in documented order, UTF-8
    app.extensions[RUNTIME_KEY] = runtime
    app.extensions[PENDING_KEY] = PendingReplies()
    for bp in (health_bp, devices_bp, agents_bp, openapi_bp):
        app.register_blueprint(bp)

    # TraceIds outermost: CheckTarget's refusals carry X-Request-Id and trace_id too.
    # CommandRoute inside both: it serves most command POSTs without Quart (its module says why).
    app.asgi_app = TraceIds(CheckTarget(CommandRoute(app.asgi_app, app)), access_log)  # type: ignore[method-assign]

    @app.errorhandler(ApiError)
    async def api_error(exc: ApiError) -> Response:
        refused(exc, request.method, request.path)
        return _json(exc.status, exc.body)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        # Quart's own refusals (404 no route, 405, 413 body too large, ...) as JSON.
        status, body = http_refused(exc, request.method, request.path, app.config["BODY_TIMEOUT"])
        response = _json(status, body)
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            response.headers["Allow"] = ", ".join(sorted(exc.valid_methods))
        return response

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        return _json(*failed(exc, request.method, request.path))

    return app
