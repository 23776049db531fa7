"""POST /api/devices/:deviceId/commands served at the ASGI level, ahead of Quart.

The command round trip is the latency Parley's users wait on, and most of the HTTP part of
it was Quart's machinery for a request, not the route's own work. Quart opens a nursery
with two tasks per request (one reads the body, one runs the handler), pushes request and
app contexts, routes, builds a Response object and sends its body as an async iteration.
Inside a command that work ran two to three times slower than a no-op server runs it
back to back (on the 2-core test host, CPUs run slower for a while after every idle spell,
and the trio thread idles while the device answers). Measured in one server, alternating
1,000 command pairs (three rounds): the same route at the ASGI level answered 0.39-0.68 ms
sooner than through Quart; bypassing only Quart's two tasks saved 0.05-0.1 ms of that.
`bench.ab` against the Quart route: -0.48 to -0.62 ms per command (bench/notes.md).

So the usual command request is served here: a POST with no query string, a Content-Length
within MAX_BODY and no Content-Encoding. It goes through the same `devices.command`, the same
body parsing (`parse_json`, `as_object`), the same refusals and log lines (`refused`,
`failed`, `http_refused`) and the same response bytes as the Quart route. The Quart route
still serves every other request to this path: `?productId=`, a chunked or encoded body,
another method (its 405). It also keeps the route in the URL map and the OpenAPI document.
tests/http/test_command_route.py holds the two paths to the same answers.

One difference: Quart cancels a handler whose client disconnected. Here the wait for the
device's answer runs to its end, bounded by the command's timeoutMs. The command is carried
out either way (it was sent); only the answer goes unread.
"""

from __future__ import annotations

from typing import Any

import trio
from quart_trio import QuartTrio
from werkzeug.exceptions import RequestTimeout

from gateways.http.app import (MAX_BODY, PENDING_KEY, RUNTIME_KEY, ApiError, as_object, failed, http_refused,
                               parse_json, refused)
from gateways.http.devices import command

PREFIX, SUFFIX = "/api/devices/", "/commands"
_HEADERS = [(b"content-type", b"application/json")]


def device_id_served_here(scope: dict[str, Any]) -> str | None:
    """The device id of a command request this route serves, or None for one Quart serves."""
    if scope["type"] != "http" or scope["method"] != "POST" or scope.get("query_string") \
            or scope.get("root_path"):
        return None
    path: str = scope["path"]
    if not (path.startswith(PREFIX) and path.endswith(SUFFIX)):
        return None
    device_id = path[len(PREFIX):-len(SUFFIX)]
    if not device_id or "/" in device_id:  # what Quart's <device_id> matches: [^/]+
        return None
    length = None
    for name, value in scope["headers"]:  # h11 gives names in lower case
        if name == b"content-length":
            length = value
        elif name in (b"content-encoding", b"transfer-encoding"):
            return None
    if length is None or not length.isdigit() or int(length) > MAX_BODY:
        return None  # Quart answers 413 for a body too large
    return device_id


class CommandRoute:
    """ASGI middleware: serves the usual command request (see the module docstring) and
    hands every other request to `app` untouched."""

    def __init__(self, app: Any, quart: QuartTrio) -> None:
        self.app = app
        self.quart = quart

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        device_id = device_id_served_here(scope)
        if device_id is None:
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        body_timeout = self.quart.config["BODY_TIMEOUT"]
        body: bytes | None = b""
        with trio.move_on_after(body_timeout) as reading:
            body = await self._body(receive)
        if body is None:
            return  # the client went away before its body came: nobody to answer
        try:
            if reading.cancelled_caught:
                status, answer = http_refused(RequestTimeout(), "POST", path, body_timeout)
            else:
                runtime, pending = self.quart.extensions[RUNTIME_KEY], self.quart.extensions[PENDING_KEY]
                answer = await command(runtime, pending, device_id, as_object(parse_json(body)))
                status = 200
        except ApiError as exc:
            refused(exc, "POST", path)
            status, answer = exc.status, exc.body
        except Exception as exc:
            status, answer = failed(exc, "POST", path)
        # As Quart's jsonify writes it (app.json: orjson, compact, a newline at the end).
        data = (self.quart.json.dumps(answer, separators=(",", ":")) + "\n").encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [*_HEADERS, (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    @staticmethod
    async def _body(receive: Any) -> bytes | None:
        """The whole request body, or None if the client disconnected first."""
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                return b"".join(chunks)
