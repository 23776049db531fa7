"""Crossing from the trio loop into actors and back, without blocking the loop.

An actor replies on its own thread; `TrioReply` hands the outcome to the loop with
`TrioToken.run_sync_soon` (p50 about 100 µs, REFERENCE.md), which reschedules the waiting
task. Never `Future.get()` here.
`PendingReplies` keeps the ones requests are waiting on, so shutdown can answer them.
"""

from __future__ import annotations

from typing import Any

import trio

from actors.errors import Unavailable


class TrioReply:
    """One answer from an actor to the trio task waiting for it.

    The waiting task parks itself (`wait_task_rescheduled`) and the answer reschedules it
    directly, rather than setting a `trio.Event` it waits on: a request crosses to an actor
    thread and back once, and that crossing cost a quart-trio POST 0.15-0.20 ms (a no-op
    handler against one that waits for a thread's answer); the Event's parking lot was
    about 0.04 ms of it. The first answer stands; a late one is ignored.
    """

    def __init__(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._answered = False
        self._value: Any = None
        self._error: Exception | None = None
        self._task: trio.lowlevel.Task | None = None  # parked in `wait`

    def ok(self, value: Any = None) -> None:
        self._post(value, None)

    def fail(self, error: Exception) -> None:
        self._post(None, error)

    def _post(self, value: Any, error: Exception | None) -> None:
        try:
            self._token.run_sync_soon(self._set, value, error)
        except trio.RunFinishedError:
            pass  # the server stopped; nobody is waiting any more

    def _set(self, value: Any, error: Exception | None) -> None:
        """On the loop: record the first answer and wake the task waiting for it."""
        if self._answered:
            return
        self._answered, self._value, self._error = True, value, error
        task, self._task = self._task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    async def wait(self, timeout: float) -> Any:
        """The actor's answer; raises the actor's error, or trio.TooSlowError."""
        if self._answered:
            await trio.lowlevel.checkpoint()
        else:
            def abort(_: Any) -> trio.lowlevel.Abort:
                self._task = None  # timed out or cancelled: an answer after this wakes nobody
                return trio.lowlevel.Abort.SUCCEEDED

            with trio.fail_after(timeout):
                self._task = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(abort)
        if self._error is not None:
            raise self._error
        return self._value


class PendingReplies:
    """The `TrioReply`s that requests are waiting on (one per app; O(1) add and discard).

    `close` fails them all at once with `Unavailable`: `serve_http` calls it when shutdown
    begins, before hypercorn's graceful drain, which would otherwise cancel a request still
    waiting for a device and close its connection without any response. After `close`,
    `add` refuses at once, before the handler tells an actor anything.
    Only ever touched on the trio loop, so no lock.
    """

    def __init__(self) -> None:
        self._waiting: set[TrioReply] = set()
        self._closed: str | None = None  # the reason, once closed

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, reply: TrioReply) -> None:
        """Track `reply` until `discard`; raises `Unavailable` once closed."""
        if self._closed is not None:
            raise Unavailable(self._closed)
        self._waiting.add(reply)

    def discard(self, reply: TrioReply) -> None:
        self._waiting.discard(reply)

    def close(self, reason: str = "server is shutting down") -> None:
        """Answer every tracked reply with `Unavailable(reason)`, and refuse later ones."""
        if self._closed is None:
            self._closed = reason
        waiting, self._waiting = self._waiting, set()
        for reply in waiting:
            # One error each: the waiters raise it in their own tasks.
            reply._set(None, Unavailable(self._closed))  # on the loop already: no run_sync_soon
