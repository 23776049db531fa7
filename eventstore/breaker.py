"""Whether the PostgreSQL server answers: a circuit breaker shared by the log and the views.

Without it, every read and write during an outage waited out eventsourcing's retries (10
tries, each waiting 5 s for a pool connection): `GET /api/health` answered after 52 s, a
command became a 504 after its timeout, and a Ctrl-C waited minutes while each actor's
queued messages tried their loads one after the other. With it, the first failure that
may mean "server gone" starts a probe (a fresh connection and `SELECT 1`, off the pool);
if the probe fails, the store is down: every use fails at once with `StoreUnavailable`
(an HTTP 503, an MQTT message left unacknowledged) until a probe, once a second, gets
through. Down and up are one log line each, not one per failed query.

A failure the probe does not confirm (a lock timeout, a query cancelled) changes nothing.

A server process that hangs while its host still answers TCP (stopped, stuck on I/O) makes
no query fail: its kernel acknowledges what is sent, and the query waits for an answer
that never comes. So the breaker also watches how long each use has been running: one that
has run for STALL_S starts the same probe, whose connection gets no answer from such a
server within its timeout, and the store is down until the server answers again.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog

log = structlog.get_logger(__name__)


# How long psycopg_pool keeps trying to replace a connection lost in an outage (its default,
# 5 minutes, with waits doubling to 64 s: the log was back 40-55 s after the server). Past
# this the attempt ends, and the next use after the outage (StoreBreaker lets none through
# before) connects at once.
POOL_RECONNECT_TIMEOUT_S = 5.0

# On every PostgreSQL connection: a server that vanished without a reset (a network
# partition, a host that froze) makes a query fail within some 15-20 s instead of hanging
# until the kernel gives up on it, some 15 minutes later (a reviewer's test held two
# commits for a minute with the breaker none the wiser); the failure then trips the breaker.
# Data sent and not acknowledged for 15 s, or an idle connection whose 3 keepalive probes
# go unanswered after 10 s. (A server process that hangs while its host answers is not
# seen this way: its kernel acknowledges.)
TCP_LIMITS = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 3, "keepalives_count": 3,
              "tcp_user_timeout": 15000}


def _connection_errors() -> tuple[type[BaseException], ...]:
    import psycopg
    from eventsourcing.persistence import InterfaceError, OperationalError

    # psycopg's own (the views' pool; PoolTimeout is an OperationalError) and eventsourcing's
    # wrappers of them (the log). StoreUnavailable is neither: eventsourcing does not retry it.
    return (psycopg.OperationalError, psycopg.InterfaceError, OperationalError, InterfaceError)


CONNECTION_ERRORS = _connection_errors()


class StoreUnavailable(Exception):
    """The log's database cannot be reached or used; the message says why and where."""


def store_down(exc: BaseException | None) -> bool:
    """Whether `exc` comes of the store being known down (the breaker's StoreUnavailable)."""
    while exc is not None:
        if isinstance(exc, StoreUnavailable):
            return True
        exc = exc.__cause__
    return False


def is_store_error(exc: BaseException) -> bool:
    """An error of the database (PostgreSQL down, its pool out of connections, SQLite
    locked or its disk full), not of Parley's code."""
    if isinstance(exc, StoreUnavailable):
        return True
    return type(exc).__module__.split(".")[0] in ("psycopg", "psycopg_pool", "sqlite3", "eventsourcing")


def is_database_error(exc: BaseException) -> bool:
    """A failure of the database itself (down, locked, full, out of connections), which
    every stream meets alike. Narrower than `is_store_error`: not eventsourcing's errors
    about one stream's contents (an event topic this version cannot resolve, say)."""
    from eventsourcing.persistence import PersistenceError

    return store_down(exc) or isinstance(exc, PersistenceError) \
        or type(exc).__module__.split(".")[0] in ("psycopg", "psycopg_pool", "sqlite3")


def is_data_error(exc: BaseException) -> bool:
    """An error the database raises about what it was given (a constraint, a value out of a
    column's range), which the same statement meets again every time; not one about the
    database itself (down, locked, full)."""
    import sqlite3

    if isinstance(exc, (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.ProgrammingError)):
        return True
    if type(exc).__module__.split(".")[0] != "psycopg" or store_down(exc):
        return False
    import psycopg

    return isinstance(exc, (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError,
                            psycopg.NotSupportedError))


class StoreBreaker:
    PROBE_INTERVAL_S = 1.0
    PROBE_TIMEOUT_S = 2  # psycopg's connect_timeout: whole seconds
    # A use of a connection still running after this long starts a probe (see the module
    # docstring). Parley's own queries take milliseconds; a long one that is only slow
    # costs a probe that finds the server up, and a log line.
    STALL_S = 10.0

    def __init__(self, connect_kwargs: dict[str, Any], shown: str) -> None:
        self._connect_kwargs = {k: v for k, v in connect_kwargs.items() if v is not None and v != ""}
        self._shown = shown  # where, without the password
        self._lock = threading.Lock()
        self._prober: threading.Thread | None = None
        self._closed = threading.Event()
        self.down_since: float | None = None  # wall clock; None while the server answers
        self.up_since = 0.0  # wall clock: when the last outage ended (0: none yet)
        self.reason = ""
        self._on_recovered: list[Callable[[], None]] = []
        self._on_up: list[Callable[[], None]] = []
        # Disarmed until the log has opened: a server that is not there at start is the
        # caller's one clear error (StoreUnavailable from EventLog), not an outage.
        self._armed = False
        # The uses running now: a number each -> when it began (monotonic). Plain dict
        # operations, atomic under the GIL: no lock on every query's way.
        self._uses: dict[int, float] = {}
        self._use_ids = itertools.count()
        self._watchdog: threading.Thread | None = None

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def check(self) -> None:
        """Raise StoreUnavailable if the store is known to be down or closed."""
        if self._closed.is_set():
            raise StoreUnavailable("the store is closed: the server is stopping")
        since = self.down_since
        if since is not None:
            raise StoreUnavailable(f"PostgreSQL at {self._shown} is not answering (for "
                                   f"{time.time() - since:.0f} s: {self.reason}); try again later")

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Around one use of a connection (the log's datastore, the views' pool): fail at
        once while the store is known down, and look when a failure may mean it is."""
        self.check()
        use = next(self._use_ids)
        self._uses[use] = time.monotonic()
        try:
            yield
        except CONNECTION_ERRORS as exc:
            self.suspect()
            # The first use to meet the outage waits for the probe's word (a refused
            # connection: at once; no answer: the probe's connect timeout): a failure the
            # probe confirms is the outage, said once by store.down, like every later one.
            # Passed on raw, it was logged as an error of its own (a load, a message not
            # committed) ahead of store.down, now and then.
            if self._confirmed_down(self.PROBE_TIMEOUT_S + 1.0):
                try:
                    self.check()
                except StoreUnavailable as down:
                    raise down from exc
            raise
        finally:
            self._uses.pop(use, None)

    def _confirmed_down(self, timeout: float) -> bool:
        """Wait up to `timeout` for a running probe's first verdict; True if the store is
        down. At once False with no probe running (disarmed, closed, or it said up)."""
        deadline = time.monotonic() + timeout
        while not self.down:
            if self._prober is None or self._closed.is_set() or time.monotonic() >= deadline:
                return False
            self._closed.wait(0.005)
        return True

    def on_recovered(self, callback: Callable[[], None]) -> None:
        """Call `callback` (on the prober's thread) when the server answers again after an
        outage, before the store is used again: pools drop their dead connections there."""
        self._on_recovered.append(callback)

    def on_up(self, callback: Callable[[], None]) -> None:
        """Call `callback` (on the prober's thread) once the store is up again after an
        outage: what was held back for it can go now."""
        self._on_up.append(callback)

    def arm(self) -> None:
        self._armed = True
        with self._lock:
            if self._watchdog is None and not self._closed.is_set():
                self._watchdog = threading.Thread(target=self._watch, name="store-watchdog", daemon=True)
                self._watchdog.start()

    def _watch(self) -> None:
        """Once a second: a use running for STALL_S or more starts a probe (once per use)."""
        reported = -1  # the newest use reported stalled: an older one is not reported again
        while not self._closed.wait(1.0):
            now = time.monotonic()
            stalled = [(use, began) for use, began in list(self._uses.items())
                       if now - began >= self.STALL_S and use > reported]
            if stalled and not self.down:
                reported = max(use for use, _ in stalled)
                log.warning("store.query_stalled", store=self._shown, uses=len(stalled),
                            running_s=round(now - min(began for _, began in stalled), 1))
                self.suspect()

    def suspect(self) -> None:
        """A query failed in a way that may mean the server is gone: probe, once at a time."""
        with self._lock:
            if self._prober is not None or self._closed.is_set() or not self._armed:
                return
            self._prober = threading.Thread(target=self._probe_loop, name="store-probe", daemon=True)
            self._prober.start()

    def wait_up(self, timeout: float) -> bool:
        """Wait up to `timeout` for the store to be up; False if it is still down or closed."""
        deadline = time.monotonic() + timeout
        while self.down and not self._closed.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._closed.wait(min(left, 0.2))
        return not self._closed.is_set()

    def close(self) -> None:
        self._closed.set()

    def _probe_loop(self) -> None:
        try:
            while not self._closed.is_set():
                problem = self._probe()
                if problem is None:
                    self._recovered()
                    return
                if self.down_since is None:
                    self.reason = problem
                    self.down_since = time.time()
                    log.error("store.down", store=self._shown, error=problem,
                              retry_every_s=self.PROBE_INTERVAL_S)
                self._closed.wait(self.PROBE_INTERVAL_S)
        finally:
            with self._lock:
                self._prober = None

    def _recovered(self) -> None:
        since = self.down_since
        if since is None:
            return  # the failure was not the server's: nothing changes
        for callback in self._on_recovered:
            try:
                callback()
            except Exception as exc:  # a pool that cannot check its connections: they fail on use
                log.warning("store.recovery_step_failed", error=repr(exc))
        self.up_since = time.time()
        self.down_since = None
        log.warning("store.up", store=self._shown, down_s=round(time.time() - since, 1))
        for callback in self._on_up:
            try:
                callback()
            except Exception:
                log.exception("store.on_up_failed")

    def _probe(self) -> str | None:
        """None if the server takes a connection and a query, else why not (one line)."""
        import psycopg

        try:
            with psycopg.connect(**self._connect_kwargs, **TCP_LIMITS, connect_timeout=self.PROBE_TIMEOUT_S,
                                 autocommit=True) as conn:
                conn.execute("SELECT 1")
        except Exception as exc:  # noqa: BLE001 - its message is the reason we log
            return " ".join(str(exc).split()) or type(exc).__name__
        return None
