"""One timer thread for all actors' deadlines (command timeouts), instead of a thread per timer.

Most deadlines are cancelled long before they come (a device answers in milliseconds, its
command times out in 30 s). A cancelled timer stays in the heap until the thread next wakes,
and the thread waits for the earliest timer still live, so a steady stream of commands
wakes it about once per timeout rather than once per command.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)


class Timer:
    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self.wakeups = 0  # times the thread woke (tests: cancelled timers do not wake it)
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._thread.start()

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        timer = Timer()
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), timer, fn))
            if self._heap[0][2] is timer:  # a new earliest deadline: the thread must re-wait
                self._cond.notify()
        return timer

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(5)

    def _run(self) -> None:
        heap = self._heap
        while True:
            with self._cond:
                while True:
                    # Cancelled timers at the top are dropped unwaited. One cancelled while
                    # we wait still wakes us at its deadline, once; a new timer earlier than
                    # the one we wait for is the top when pushed, and call_later notifies.
                    while heap and heap[0][2].cancelled:
                        heapq.heappop(heap)
                    if self._stopped or (heap and heap[0][0] <= time.monotonic()):
                        break
                    self._cond.wait(heap[0][0] - time.monotonic() if heap else None)
                    self.wakeups += 1
                if self._stopped:
                    return
                _, _, timer, fn = heapq.heappop(heap)
            if not timer.cancelled:
                try:
                    fn()
                except Exception:
                    log.exception("scheduler.callback_failed")
