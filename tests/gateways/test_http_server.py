"""Server-side connection closing for QuartTrio on hypercorn's trio worker.

Regression test for quart-trio cancelling hypercorn's close/recycle bookkeeping
(see gateways/http_server.py). Uses raw TCP so we observe the server's EOF directly.
"""

from __future__ import annotations

from functools import partial
from typing import AsyncIterator

import pytest
import trio
from quart_trio import QuartTrio

from gateways.http_server import serve_http

KEEP_ALIVE = 0.5


def make_app() -> QuartTrio:
    app = QuartTrio(__name__)

    @app.route("/ping")
    async def ping() -> str:
        return "pong"

    @app.route("/slow")
    async def slow() -> str:  # busier than the keep-alive timeout is long
        await trio.sleep(KEEP_ALIVE * 2)
        return "pong"

    return app


@pytest.fixture
async def port() -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        serve = partial(serve_http, keep_alive_timeout=KEEP_ALIVE)
        bound = await nursery.start(serve, make_app(), "127.0.0.1", 0)
        yield bound
        nursery.cancel_scope.cancel()


def request(close: bool, path: bytes = b"/ping") -> bytes:
    conn = b"Connection: close\r\n" if close else b""
    return b"GET " + path + b" HTTP/1.1\r\nHost: test\r\n" + conn + b"\r\n"


async def read_response(stream: trio.SocketStream, buf: bytearray) -> bytes:
    """Read one response (headers + Content-Length body) and return its body."""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(4096)
        assert chunk, "server closed before sending a full response"
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    headers = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:])
    length = int({k.strip().lower(): v for k, v in headers.items()}[b"content-length"])
    while len(rest) < length:
        chunk = await stream.receive_some(4096)
        assert chunk, "server closed mid-body"
        rest += chunk
    buf[:] = rest[length:]
    return rest[:length]


async def closed_by_server(stream: trio.SocketStream, within: float) -> bool:
    with trio.move_on_after(within):
        while await stream.receive_some(4096):
            pass  # no further data expected, but drain if any
        return True
    return False


async def test_connection_close_gets_eof(port: int) -> None:
    eofs = 0
    for _ in range(50):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(request(close=True))
            assert await read_response(stream, bytearray()) == b"pong"
            eofs += await closed_by_server(stream, within=2.0)
    assert eofs == 50


async def test_idle_keep_alive_is_closed(port: int) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(request(close=False))
        assert await read_response(stream, bytearray()) == b"pong"
        start = trio.current_time()
        assert await closed_by_server(stream, within=KEEP_ALIVE + 3.0)
        assert trio.current_time() - start >= KEEP_ALIVE * 0.8  # idle timeout, not an early close


async def test_keep_alive_serves_two_requests(port: int) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        buf = bytearray()
        for _ in range(2):
            await stream.send_all(request(close=False))
            with trio.fail_after(2):
                assert await read_response(stream, buf) == b"pong"


# The keep-alive timer (gateways/hypercorn_fixes.py, IdleDeadline) counts idleness only:
# from the connection's start or its last response, never across a request.

async def test_a_connection_that_never_sends_is_closed_after_the_keep_alive_timeout(port: int) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        start = trio.current_time()
        assert await closed_by_server(stream, within=KEEP_ALIVE + 3.0)
        assert trio.current_time() - start >= KEEP_ALIVE * 0.8


async def test_requests_closer_together_than_the_timeout_keep_the_connection(port: int) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        buf = bytearray()
        for _ in range(6):  # 6 x 0.6 of the timeout: longer than it, never idle that long
            await trio.sleep(KEEP_ALIVE * 0.6)
            await stream.send_all(request(close=False))
            with trio.fail_after(2):
                assert await read_response(stream, buf) == b"pong"
        assert await closed_by_server(stream, within=KEEP_ALIVE + 3.0)


async def test_a_request_busier_than_the_timeout_keeps_its_connection(port: int) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        buf = bytearray()
        for path in (b"/slow", b"/ping"):
            await stream.send_all(request(close=False, path=path))
            with trio.fail_after(KEEP_ALIVE * 2 + 2):
                assert await read_response(stream, buf) == b"pong"


async def test_shutdown_closes_an_idle_keep_alive_connection_at_once() -> None:
    async with trio.open_nursery() as nursery:
        serve = partial(serve_http, keep_alive_timeout=30.0)
        port = await nursery.start(serve, make_app(), "127.0.0.1", 0)
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(request(close=False))
            assert await read_response(stream, bytearray()) == b"pong"
            start = trio.current_time()
            nursery.cancel_scope.cancel()  # serve_http's graceful shutdown
            with trio.CancelScope(shield=True):
                assert await closed_by_server(stream, within=5.0)
            assert trio.current_time() - start < 5.0  # not the 30 s keep-alive


async def test_shutdown_in_the_middle_of_a_request_answers_it_then_closes() -> None:
    async with trio.open_nursery() as nursery:
        serve = partial(serve_http, keep_alive_timeout=30.0)
        port = await nursery.start(serve, make_app(), "127.0.0.1", 0)
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(request(close=False, path=b"/slow"))
            await trio.sleep(KEEP_ALIVE / 2)  # the handler is asleep now
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                assert await read_response(stream, bytearray()) == b"pong"
                assert await closed_by_server(stream, within=5.0)


def keep_alive_timers() -> int:
    """Live keep-alive timer tasks (IdleDeadline._watch) in this trio run."""
    def walk(task: trio.lowlevel.Task) -> int:
        n = int(task.name.endswith("IdleDeadline._watch"))
        for nursery in task.child_nurseries:
            n += sum(walk(child) for child in nursery.child_tasks)
        return n
    return walk(trio.lowlevel.current_root_task())


async def timers_gone(within: float) -> bool:
    with trio.move_on_after(within):
        while keep_alive_timers():
            await trio.sleep(0.01)
        return True
    return False


@pytest.mark.parametrize("how", ["connection_close", "client_closes_while_idle", "client_closes_mid_request"])
async def test_a_closed_connection_leaves_no_keep_alive_timer_behind(how: str) -> None:
    async with trio.open_nursery() as nursery:
        serve = partial(serve_http, keep_alive_timeout=30.0)
        port = await nursery.start(serve, make_app(), "127.0.0.1", 0)
        for _ in range(3):
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                if how == "connection_close":
                    await stream.send_all(request(close=True))
                    assert await read_response(stream, bytearray()) == b"pong"
                    assert await closed_by_server(stream, within=2.0)
                elif how == "client_closes_while_idle":
                    await stream.send_all(request(close=False))
                    assert await read_response(stream, bytearray()) == b"pong"
                else:
                    await stream.send_all(request(close=False, path=b"/slow"))
                    await trio.sleep(0.05)
        # Not the 30 s keep-alive, nor forever (a timer set aside for a busy connection).
        assert await timers_gone(within=KEEP_ALIVE * 2 + 2)
        nursery.cancel_scope.cancel()
