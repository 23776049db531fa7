"""Two gaps in hypercorn 0.18's HTTP/1.1 server, closed for Parley's HTTP API, and work saved
per response.

1. A client that stops reading holds its connection forever, and holds up shutdown too.
   hypercorn writes every response shielded from cancellation (`TCPServer.protocol_send`)
   and with no timeout, so neither its idle timer nor the deadline `serve_http` puts on
   shutdown can end a write to a peer whose receive window stays shut (an audit held one
   connection for 90 s, and a shutdown for 44 s). `StallBoundedTCPServer` writes in chunks
   and closes the connection when one chunk makes no progress for WRITE_STALL_S.
2. A request h11 cannot parse (a malformed request line, a 64 KiB header, two
   Content-Lengths, ...) got an empty 400/431/501 with no X-Request-Id and no log line,
   while every other refusal is JSON `{"error", "code"}` and logged.
   `JsonErrorH11Protocol` answers those in the API's shape and logs them.

3. hypercorn writes a response's head as soon as the app starts it, and its body in a
   second write: two `send()` calls and two wake-ups of the client for every JSON answer.
   `JsonErrorH11Protocol` holds the head of a response that declares its Content-Length
   (Quart's in-memory responses, sent whole right after their head) and writes it with the
   body; a streamed response (SSE: no Content-Length) still gets its head at once. (A sized
   response whose body came slowly would hold its head until the first chunk; Parley
   serves none.)

4. hypercorn's keep-alive timer is a task it cancels when a request starts and starts anew
   when the response has gone out: each is a few passes of trio's scheduler and a task,
   on the connection's path between a request's bytes and the app, and after the response
   while the client may already send its next request. `IdleDeadline` keeps one task per
   connection and moves its deadline instead (the same closes: idle for the keep-alive
   timeout, or idle at shutdown), and ends it when the connection stops reading.
5. Each write took hypercorn's send lock with a pass of the scheduler before the bytes
   went out, and a sized response's end (no bytes) took the lock and a pass too.
   `StallBoundedTCPServer` takes a free lock at once and writes nothing for no bytes.
   With 4., `bench.ab`: -0.03, -0.13, -0.10 ms per command (bench/notes.md).
6. Each write chunk is bounded by the shielded scope's own deadline, moved on before each
   chunk, not by a second deadline scope inside it (about 5 µs a write less).

hypercorn has no hook for any of these, so `install()` puts the two subclasses where hypercorn
looks them up when a connection starts (`hypercorn.trio.run.TCPServer`,
`hypercorn.protocol.H11Protocol`). hypercorn is pinned to 0.18 in pyproject.toml for this;
tests/gateways/test_hypercorn_fixes.py and (the keep-alive timer)
tests/gateways/test_http_server.py cover them over real sockets.
"""

from __future__ import annotations

import json
import math
from http import HTTPStatus
from typing import Any

import h11
import hypercorn.protocol
import hypercorn.trio.run
import structlog
import trio
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer

from gateways import ids

log = structlog.get_logger(__name__)

# A response write that moves no bytes for this long means the client stopped reading (as
# long as the keep-alive timeout: a client silent that long is gone). Chunks are small
# enough that a slow but reading client always makes progress within it.
WRITE_STALL_S = 5.0
WRITE_CHUNK = 64 * 1024


class IdleDeadline:
    """hypercorn's keep-alive timer for one connection (4. above), in place of its
    `TrioSingleTask`: hypercorn calls `restart` when the connection goes idle and `stop`
    when a request starts. One task per connection waits under a cancel scope whose
    deadline these two move, where hypercorn cancelled a task at each request and started
    a new one after each response. What it does is hypercorn's `TCPServer._idle_timeout`:
    an idle connection is closed when the keep-alive timeout passes, or at once when the
    server shuts down."""

    def __init__(self, server: TCPServer) -> None:
        self.server = server
        self.scope: trio.CancelScope | None = None
        self.idle = False
        self.ended = False
        self._idle_again: trio.Event | None = None  # waited on only while shutting down

    async def restart(self, task_group: Any, action: Any) -> None:
        self.idle = True
        if self.scope is None:
            self.scope = await task_group._nursery.start(self._watch)
        self.scope.deadline = trio.current_time() + self.server.config.keep_alive_timeout
        if self._idle_again is not None:
            self._idle_again.set()

    async def stop(self) -> None:
        self.idle = False
        if self.scope is not None:
            self.scope.deadline = math.inf

    def end(self) -> None:
        """The connection reads no more (the client or the server closed it): nothing is
        left to time out, and the connection's task group must not wait for this task.
        (hypercorn's timer, stopped during a request, never outlived a connection closed
        then; one left idle kept its connection's task until the timeout.)"""
        self.ended = True
        if self.scope is not None:
            self.scope.cancel()

    async def _watch(self, task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await self.server.context.terminated.wait()
            # Shutting down in the middle of a request: the end of its response closes the
            # connection (hypercorn's H11Protocol._maybe_recycle), or it goes idle first.
            while not self.idle:
                self._idle_again = trio.Event()
                await self._idle_again.wait()
        if self.ended:
            return
        with trio.CancelScope(shield=True):
            await self.server._initiate_server_close()


class StallBoundedTCPServer(TCPServer):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.idle_task = IdleDeadline(self)

    async def _read_data(self) -> None:
        try:
            await super()._read_data()
        finally:
            self.idle_task.end()

    async def protocol_send(self, event: Event) -> None:
        if not isinstance(event, RawData):
            await super().protocol_send(event)
            return
        if not event.data:
            return  # a sized response's end (h11's EndOfMessage) is no bytes: nothing to write
        # The lock taken without a pass of trio's scheduler when nobody holds it (5. above):
        # the response goes out now; the write's own checkpoint follows it.
        try:
            self.send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self.send_lock.acquire()
        try:
            data = memoryview(event.data)
            try:
                # Shielded as in hypercorn (a cancelled write would leave half a response
                # on the wire), but each chunk bounded: the shield keeps outer cancellation
                # out, not the scope's own deadline, moved on before each chunk (one scope
                # for both, 6. above).
                with trio.CancelScope(shield=True) as scope:
                    for start in range(0, len(data), WRITE_CHUNK):
                        scope.deadline = trio.current_time() + WRITE_STALL_S
                        await self.stream.send_all(data[start:start + WRITE_CHUNK])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.protocol.handle(Closed())
                return
            if scope.cancelled_caught:
                log.info("http.write_stalled", client=_peer(self.stream), stall_s=WRITE_STALL_S,
                         unsent=len(data) - start)
                await self.protocol.handle(Closed())
        finally:
            self.send_lock.release()


def _peer(stream: object) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]  # type: ignore[attr-defined]
        return f"{host}:{port}"
    except (AttributeError, OSError):
        return "?"


def _sized(response: h11.Response) -> bool:
    return any(name.lower() == b"content-length" for name, _ in response.headers)


# "HTTP/1.1 200 OK", not hypercorn's "HTTP/1.1 200 " (an empty reason phrase is allowed,
# RFC 9112 4, but curl -i and every proxy log show it as if something were missing).
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}


def _with_reason(head: bytes, status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    end = head.find(b"\r\n")
    if line is None or end < 0 or not head.startswith(b"HTTP/1.1 "):
        return head
    return line + head[end + 2:]


class JsonErrorH11Protocol(H11Protocol):
    _held_head = b""  # a sized response's head, written with what follows it (3. above)

    async def _send_h11_event(self, event: Any) -> None:
        try:
            data = self.connection.send(event)
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            return
        if isinstance(event, h11.Response):
            if not event.reason:
                data = _with_reason(data, event.status_code)
            if _sized(event):
                self._held_head = data
                return
        if self._held_head:
            data, self._held_head = self._held_head + data, b""
        await self.send(RawData(data=data))

    async def stream_send(self, event: Any) -> None:
        if isinstance(event, StreamClosed) and self._held_head:
            # The app ended after the head of a sized response, without its body: the head
            # goes out as hypercorn would have sent it, and hypercorn closes the connection.
            data, self._held_head = self._held_head, b""
            await self.send(RawData(data=data))
        await super().stream_send(event)

    async def _send_error_response(self, status_code: int) -> None:
        status = HTTPStatus(status_code)
        code = status.phrase.lower().replace(" ", "_")  # as app.py names Quart's refusals
        # Written as every other answer is (compact, a newline at the end).
        body = (json.dumps({"error": f"malformed HTTP request: {status.phrase.lower()}", "code": code},
                           separators=(",", ":")) + "\n").encode()
        trace_id = ids.trace_id()
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        log.info("http.request_refused", status=status_code, code=code, reason="malformed HTTP",
                 client=client, trace_id=trace_id)
        await self._send_h11_event(h11.Response(status_code=status_code, headers=[
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"), (b"x-request-id", trace_id.encode()),
            *self.config.response_headers("h11")]))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())


def install() -> None:
    """Make hypercorn use the two classes above for the connections it starts from now on."""
    hypercorn.trio.run.TCPServer = StallBoundedTCPServer  # type: ignore[misc]
    hypercorn.protocol.H11Protocol = JsonErrorH11Protocol  # type: ignore[misc]
