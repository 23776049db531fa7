"""A failure that repeats (a full disk, a broker that is down): said once, then counted.

When SQLite's disk filled up under 2,000 messages a second, every message's commit failed
and said so twice (the journal and the actor): 12,000 error lines in 30 s, 2.7 MB of log
for one fact, written to a disk that was full; a broker that stayed down was a line per
reconnect try. Both now report through this: the first failure with its error, a count
every `every_s` while they go on, and the end of the episode (its own line, or returned
for the caller's line, as `mqtt.connected` does).

The journal's is what `/api/health` shows (`storeWritable`, `storeError`). A store known
to be down (PostgreSQL, eventstore/breaker.py) is the breaker's to report; the journal's
record is for a store that answers but cannot write.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class RepeatedFailures:
    def __init__(self, first_event: str, still_event: str, recovered_event: str | None = None, *,
                 every_s: float = 30.0, level: str = "error",
                 clock: Callable[[], float] = time.monotonic, **fields: Any) -> None:
        self.first_event, self.still_event, self.recovered_event = first_event, still_event, recovered_event
        self.every_s = every_s
        self._log = getattr(log, level)
        self._fields = fields  # on every line (e.g. the broker's address)
        self._clock = clock
        self._lock = threading.Lock()  # e.g. commits run on the writer thread and, at idle, on callers'
        self.error: str | None = None  # the last failure's, while failing
        self._started = 0.0
        self._said = 0.0
        self._total = 0
        self._unsaid = 0

    @property
    def failing(self) -> bool:
        return self.error is not None

    def failed(self, exc: BaseException | None, event: str | None = None, **fields: Any) -> None:
        """One failure. `event` names the first line instead of `first_event` (e.g. a
        snapshot's failure in the commits' episode); `fields` go on the first line."""
        error = (str(exc) or type(exc).__name__) if exc is not None else "unknown"
        now = self._clock()
        with self._lock:
            if error != self.error:
                # The first failure, or a different one: worth its own line.
                if self.error is None:
                    self._started, self._total = now, 0
                self.error, self._said, self._unsaid = error, now, 0
                self._total += 1
                self._log(event or self.first_event, **self._fields, error=error,
                          error_type=type(exc).__name__ if exc is not None else None, **fields)
                return
            self._total += 1
            self._unsaid += 1
            if now - self._said < self.every_s:
                return
            failed, self._unsaid, self._said = self._unsaid, 0, now
            seconds = round(now - self._started, 1)
        self._log(self.still_event, **self._fields, error=error, failed=failed, seconds=seconds)

    def succeeded(self) -> tuple[int, float] | None:
        """The episode is over: (failures, seconds) it lasted, or None if there was none."""
        if self.error is None:  # the common case, without the lock
            return None
        with self._lock:
            if self.error is None:
                return None
            failed, seconds = self._total, round(self._clock() - self._started, 1)
            self.error = None
        if self.recovered_event:
            log.warning(self.recovered_event, **self._fields, failed=failed, seconds=seconds)
        return failed, seconds
