"""Commits that keep failing (a full disk, an I/O error): said once, then counted.

When SQLite's disk filled up under 2,000 messages a second, every message's commit failed
and said so twice (the journal and the actor): 12,000 error lines in 30 s, 2.7 MB of log
for one fact, written to a disk that was full. The journal now reports through this: the
first failure with its error, a count every `every_s` while they go on, and one line when
a commit succeeds again. `/api/health` shows the state (`storeWritable`, `storeError`).

A store known to be down (PostgreSQL, eventstore/breaker.py) is the breaker's to report;
this is for a store that answers but cannot write.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)


class CommitFailures:
    def __init__(self, every_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self._clock = clock
        self._lock = threading.Lock()  # commits run on the writer thread and, at idle, on callers'
        self.error: str | None = None  # the last failure's, while failing
        self.since_ms: int | None = None  # wall clock of the first failure, while failing
        self._started = 0.0
        self._said = 0.0
        self._total = 0
        self._unsaid = 0

    @property
    def failing(self) -> bool:
        return self.error is not None

    def failed(self, exc: BaseException, events: int, what: str = "commit") -> None:
        error = str(exc) or type(exc).__name__
        now = self._clock()
        with self._lock:
            if error != self.error:
                # The first failure, or a different one: worth its own line.
                if self.error is None:
                    self._started, self._total = now, 0
                    self.since_ms = int(time.time() * 1000)
                self.error, self._said, self._unsaid = error, now, 0
                self._total += 1
                log.error(f"journal.{what}_failed", error=error, error_type=type(exc).__name__, events=events)
                return
            self._total += 1
            self._unsaid += 1
            if now - self._said < self.every_s:
                return
            failed, self._unsaid, self._said = self._unsaid, 0, now
            seconds = round(now - self._started, 1)
        log.error("journal.still_failing", error=error, failed=failed, seconds=seconds)

    def succeeded(self) -> None:
        if self.error is None:  # the common case, without the lock
            return
        with self._lock:
            if self.error is None:
                return
            failed, seconds = self._total, round(self._clock() - self._started, 1)
            self.error = self.since_ms = None
        log.warning("journal.recovered", failed=failed, seconds=seconds)
