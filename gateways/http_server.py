"""Serve a QuartTrio app on hypercorn's trio worker, with server-side closes that work.

Why the wrapper below exists: hypercorn drives its per-connection state machine *inline*
inside the ASGI ``send`` callable. The final response message runs, in the app's task:
EndOfMessage -> StreamClosed -> put ``http.disconnect`` into the app's receive queue ->
then either close the socket (``Connection: close``) or restart the keep-alive idle timer.
quart-trio 0.12 (``TrioASGIHTTPConnection``) runs the receive loop and the response in one
nursery and cancels that nursery as soon as the receive loop sees ``http.disconnect``.
The memory-channel put yields, the receive loop wakes, cancels, and the next checkpoint in
hypercorn (``send_eof`` before ``aclose``, or the idle-timer lock) raises Cancelled, which
quart-trio's nursery swallows. Result: the socket is never closed and the idle timer is
never re-armed, so neither ``Connection: close`` nor ``keep_alive_timeout`` closes anything.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Awaitable, Callable, MutableMapping

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from gateways import hypercorn_fixes

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]


def _is_final(message: Message) -> bool:
    """The message after which hypercorn finishes the stream (and may close/recycle)."""
    kind = message.get("type")
    if kind == "http.response.body":
        return not message.get("more_body", False)
    if kind == "http.response.trailers":
        return not message.get("more_trailers", False)
    return False


class _ShieldFinalSend:
    """ASGI wrapper: run the final HTTP ``send`` shielded so hypercorn's close/recycle
    bookkeeping always completes. Only the final message is shielded, so a streaming
    response (SSE) whose client goes away is still cancelled normally; hypercorn itself
    already shields the socket write, so this adds no new way to block. Scoped to the app
    we serve -- no global monkeypatch of quart-trio or hypercorn."""

    def __init__(self, app: Callable[[Message, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_final_shielded(message: Message) -> None:
            if _is_final(message):
                with trio.CancelScope(shield=True):
                    await send(message)
            else:
                await send(message)

        await self.app(scope, receive, send_final_shielded)


async def _serve_until_told(
    app: Any, config: Config, stop: trio.Event, scope: trio.CancelScope,
    *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    # Shielded from the caller's cancellation: on shutdown we want hypercorn's own graceful
    # path (stop accepting, close idle keep-alives, run lifespan shutdown), which a plain
    # cancel would skip. ``scope`` carries a hard deadline set by serve_http on shutdown.
    with scope:
        await serve(app, config, shutdown_trigger=stop.wait, task_status=task_status, mode="asgi")


async def serve_http(
    app: Any,
    host: str,
    port: int,
    *,
    keep_alive_timeout: float = 5.0,
    on_shutdown: Callable[[], None] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` (0 = any free port) until cancelled.

    Calls ``task_status.started(bound_port)`` once listening. On cancellation, calls
    ``on_shutdown()`` (synchronous, on the loop: answer the requests that would otherwise
    wait out the drain, e.g. ``answer_waiting_requests``), then shuts down gracefully:
    in-flight requests get ``graceful_timeout`` and the whole drain is capped.
    """
    # A client that stops reading cannot hold its connection (or shutdown) forever, and
    # malformed HTTP gets a JSON refusal and a log line (gateways/hypercorn_fixes.py).
    hypercorn_fixes.install()
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.keep_alive_timeout = keep_alive_timeout
    config.graceful_timeout = 2.0
    config.accesslog = None
    # A Logger, not hypercorn's default "-": it would add a handler of its own format;
    # this one propagates to the root handler (gateways/logs.py), JSON in production.
    config.errorlog = logging.getLogger("hypercorn.error")

    stop = trio.Event()
    server_scope = trio.CancelScope(shield=True)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(_serve_until_told, _ShieldFinalSend(app), config, stop, server_scope)
        )
        # hypercorn reports e.g. "http://127.0.0.1:54321" or "http://[::1]:54321".
        task_status.started(int(binds[0].rsplit(":", 1)[1]))
        try:
            await trio.sleep_forever()
        finally:
            try:
                if on_shutdown is not None:
                    # Before hypercorn's drain: the answers it wakes are sent during the drain.
                    on_shutdown()
            finally:
                stop.set()
                # Cap the drain: hypercorn's graceful_timeout plus a margin for lifespan shutdown.
                server_scope.deadline = trio.current_time() + config.graceful_timeout + 1.0
