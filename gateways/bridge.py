"""Crossing from the trio loop into actors and back, without blocking the loop.

An actor replies on its own thread; `TrioReply` hands the outcome to the loop with
`TrioToken.run_sync_soon` (p50 about 100 µs, REFERENCE.md). Never `Future.get()` here.
"""

from __future__ import annotations

from typing import Any

import trio


class TrioReply:
    def __init__(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._done = trio.Event()
        self._value: Any = None
        self._error: Exception | None = None

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
        if not self._done.is_set():
            self._value, self._error = value, error
            self._done.set()

    async def wait(self, timeout: float) -> Any:
        """The actor's answer; raises the actor's error, or trio.TooSlowError."""
        with trio.fail_after(timeout):
            await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value
