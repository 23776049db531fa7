"""gateways/hypercorn_fixes.py over real sockets: a client that stops reading loses its
connection instead of holding it (and shutdown) forever, and malformed HTTP is refused in
the API's JSON shape with a log line; a sized response goes out in one write, a streamed
one's head at once."""

from __future__ import annotations

import json
import socket
from functools import partial
from typing import AsyncIterator

import pytest
import structlog
import trio
from quart_trio import QuartTrio

from gateways import hypercorn_fixes
from gateways.http_server import serve_http
from tests.gateways.test_http_server import read_response

BIG = b"x" * (4 * 1024 * 1024)  # far more than the kernel buffers of a client that reads nothing


def make_app() -> QuartTrio:
    app = QuartTrio(__name__)

    @app.route("/big")
    async def big() -> bytes:
        return BIG

    @app.route("/ping", methods=["GET", "HEAD"])
    async def ping() -> str:
        return "pong"

    @app.route("/stream")
    async def stream() -> tuple:
        async def events():  # its first event waits for the test: the head must not
            await app.config["RELEASE"].wait()
            yield b"data: 1\n\n"

        return events(), 200, {"Content-Type": "text/event-stream"}

    app.config["RELEASE"] = trio.Event()
    return app


@pytest.fixture
async def port(monkeypatch) -> AsyncIterator[int]:
    monkeypatch.setattr(hypercorn_fixes, "WRITE_STALL_S", 0.5)
    async with trio.open_nursery() as nursery:
        yield await nursery.start(serve_http, make_app(), "127.0.0.1", 0)
        nursery.cancel_scope.cancel()


def non_reader(port: int) -> socket.socket:
    """A client that asks for a large response and never reads it."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
    return s


async def ping(port: int) -> bytes:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"GET /ping HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        return await read_response(stream, bytearray())


async def test_a_client_that_stops_reading_loses_its_connection(port: int) -> None:
    s = non_reader(port)
    try:
        with structlog.testing.capture_logs() as logs:
            with trio.fail_after(5):
                while not any(e["event"] == "http.write_stalled" for e in logs):
                    assert await ping(port) == b"pong"  # everyone else is served meanwhile
                    await trio.sleep(0.1)
        # The server closed it: what the client reads now ends (after the buffered part).
        s.setblocking(False)
        await trio.sleep(0.1)
        got = b""
        with trio.fail_after(5):
            while True:
                try:
                    chunk = s.recv(1 << 20)
                except BlockingIOError:
                    await trio.sleep(0.01)
                    continue
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                got += chunk
        assert len(got) < len(BIG)  # cut off, not delivered
    finally:
        s.close()


async def test_shutdown_is_not_held_by_a_client_that_stops_reading(monkeypatch) -> None:
    monkeypatch.setattr(hypercorn_fixes, "WRITE_STALL_S", 0.5)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, make_app(), "127.0.0.1", 0)
        s = non_reader(port)
        await trio.sleep(0.2)  # the write is stuck now
        start = trio.current_time()
        nursery.cancel_scope.cancel()
    # serve_http returned: graceful time (2 s) plus at most one stalled chunk, not forever.
    assert trio.current_time() - start < 4.0
    s.close()


@pytest.mark.parametrize("raw, status, code", [
    (b"GARBAGE\r\n\r\n", 400, "bad_request"),
    (b"GET /ping HTTP/1.1\r\n\r\n", 400, "bad_request"),  # no Host
    (b"GET /ping HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400, "bad_request"),
    (b"GET /ping HTTP/1.1\r\nHost: t\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431,
     "request_header_fields_too_large"),
])
async def test_malformed_http_is_refused_as_json_and_logged(port: int, raw: bytes, status: int, code: str) -> None:
    with structlog.testing.capture_logs() as logs:
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(raw)
            data = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some(65536):
                    data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), head
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(b":", 1) for line in head.split(b"\r\n")[1:])}
    assert headers[b"content-type"] == b"application/json" and headers[b"x-request-id"]
    answer = json.loads(body)
    assert answer["code"] == code and answer["error"].startswith("malformed HTTP request")
    assert body == json.dumps(answer, separators=(",", ":")).encode() + b"\n"  # as every other answer
    refused = [e for e in logs if e["event"] == "http.request_refused"]
    assert refused and refused[0]["status"] == status and refused[0]["trace_id"] == headers[b"x-request-id"].decode()


async def test_a_sized_response_is_written_once_head_and_body_together(port: int, monkeypatch) -> None:
    """Head and body in one write (one wake-up of the client), for a body and for none (HEAD)."""
    writes: list[bytes] = []
    send = hypercorn_fixes.StallBoundedTCPServer.protocol_send

    async def recording(self, event):
        if isinstance(event, hypercorn_fixes.RawData) and event.data:
            writes.append(bytes(event.data))
        await send(self, event)

    monkeypatch.setattr(hypercorn_fixes.StallBoundedTCPServer, "protocol_send", recording)
    assert await ping(port) == b"pong"
    assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 200") and writes[0].endswith(b"\r\n\r\npong")
    writes.clear()
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"HEAD /ping HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"\r\n\r\n") and b"content-length: 4" in data.lower()
    assert writes == [data]


async def test_a_streamed_response_gets_its_head_before_its_first_event(monkeypatch) -> None:
    app = make_app()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, app, "127.0.0.1", 0)
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
            head = b""
            with trio.fail_after(5):  # while the app still waits for its first event
                while b"\r\n\r\n" not in head:
                    head += await stream.receive_some(65536)
            assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
            assert not head.partition(b"\r\n\r\n")[2]  # nothing of the body yet
            app.config["RELEASE"].set()
            body = b""
            with trio.fail_after(5):
                while b"data: 1" not in body:
                    body += await stream.receive_some(65536)
        nursery.cancel_scope.cancel()
