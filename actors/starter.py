"""Actor threads are started on a thread of their own, not by whoever activates them.

pykka starts an actor's thread inside `Actor.start()`, and `Thread.start()` returns only
once the new thread runs. `ActorSystem` activates under its lock, mostly on the MQTT
gateway's network thread, so in a storm of activations (every device's first report after
a restart) each one held the network thread, and every other `tell`, until the new thread
had won the GIL among thousands: on PostgreSQL with 3,000 devices the gateway read nothing
for 2 s at a time, and a command's answer waited in its socket. Now an activation queues
the thread here, and its messages wait in the actor's inbox as they would while it loads.
A message someone waits on (the kind's `urgent` types) starts its actor's thread at once
instead, on the teller's thread as before, so it never waits behind this line.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger(__name__)

_numbers = itertools.count()


def actor_thread(target: Callable[[], None], kind: str, daemon: bool) -> threading.Thread:
    """A thread named as pykka names its actors' threads (DeviceActor-12)."""
    return threading.Thread(target=target, name=f"{kind}-{next(_numbers)}", daemon=daemon)


class ThreadStarter:
    """`not_started(actor)` is called for an actor whose thread could not be started: it
    must make the actor dead and fail what was told to it."""

    def __init__(self, not_started: Callable[[Any], None]) -> None:
        self._not_started = not_started
        self._pending: dict[str, tuple[Any, threading.Thread]] = {}  # actor_urn -> not started yet
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="actor-starter", daemon=True)
        self._thread.start()

    def start(self, actor: Any, thread: threading.Thread) -> None:
        """Start `actor`'s `thread` soon, after those queued before it."""
        with self._lock:
            self._pending[actor.actor_urn] = (actor, thread)
        self._queue.put(actor.actor_urn)

    def expedite(self, actor_urn: str) -> None:
        """If that actor's thread waits in line, start it now, on this thread."""
        with self._lock:
            item = self._pending.pop(actor_urn, None)
        if item is not None:
            self._start(*item)

    def close(self, timeout: float = 10.0) -> None:
        """Start what is queued, then end (actors stopped at shutdown still need their
        threads to handle the stop)."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            urn = self._queue.get()
            if urn is None:
                return
            with self._lock:
                item = self._pending.pop(urn, None)
            if item is not None:  # (else expedited meanwhile)
                self._start(*item)

    def _start(self, actor: Any, thread: threading.Thread) -> None:
        try:
            thread.start()
        except RuntimeError as exc:  # "can't start new thread": out of threads or memory
            log.error("actors.thread_not_started", thread=thread.name, error=str(exc))
            self._not_started(actor)
