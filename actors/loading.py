"""How many actors load from the log at once, and which goes next.

After a restart every device reports within one heartbeat, so thousands of actors ask to
load at the same moment and wait in line for a slot (one on SQLite, eight on PostgreSQL:
see `ActorSystem`). Measured with 4,000 devices reporting every 2 s on SQLite, the line
took about 24 s to drain, and an HTTP command whose device's actor joined it waited 11-20 s
before it was even published. So a load that someone is waiting on (its actor has one of
the kind's `urgent` messages queued: an HTTP command, an agent change) takes the next free
slot ahead of every other; the others keep their order. A slot is handed to the next
waiter when it is released, never raced for, so a newcomer cannot overtake the line.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager


class _Waiter:
    __slots__ = ("who", "urgent", "granted", "event")

    def __init__(self, who: Hashable, urgent: bool) -> None:
        self.who = who
        self.urgent = urgent
        self.granted = False
        self.event = threading.Event()


class LoadGate:
    """A counting semaphore with two lines: urgent loads first, each line in arrival order."""

    def __init__(self, slots: int) -> None:
        self._free = slots  # > 0 only while nobody waits: a release hands its slot on
        self._lock = threading.Lock()
        self._urgent: deque[_Waiter] = deque()
        self._normal: deque[_Waiter] = deque()  # may hold promoted waiters, skipped when reached
        self._waiting: dict[Hashable, _Waiter] = {}
        self.promoted = 0  # loads moved ahead after they had joined the line

    @contextmanager
    def slot(self, who: Hashable, urgent: Callable[[], bool]) -> Iterator[None]:
        """Hold a load slot. `urgent()` is asked under the gate's lock, so that an urgent
        message told meanwhile either is seen by it or finds this waiter to `promote`."""
        with self._lock:
            if self._free > 0:
                self._free -= 1
                waiter = None
            else:
                waiter = _Waiter(who, urgent())
                (self._urgent if waiter.urgent else self._normal).append(waiter)
                self._waiting[who] = waiter
        if waiter is not None:
            waiter.event.wait()
        try:
            yield
        finally:
            self._release()

    def promote(self, who: Hashable) -> None:
        """`who` now has an urgent message queued: if it waits for a slot, it goes next."""
        with self._lock:
            waiter = self._waiting.get(who)
            if waiter is not None and not waiter.urgent:
                waiter.urgent = True
                self._urgent.append(waiter)  # its entry in the normal line is skipped later
                self.promoted += 1

    def waiting(self) -> int:
        """Loads waiting for a slot (the size of an activation storm, in /api/health)."""
        with self._lock:
            return len(self._waiting)

    @property
    def free(self) -> int:
        return self._free

    def _release(self) -> None:
        with self._lock:
            while self._urgent or self._normal:
                waiter = (self._urgent or self._normal).popleft()
                if waiter.granted:
                    continue
                waiter.granted = True
                if self._waiting.get(waiter.who) is waiter:
                    del self._waiting[waiter.who]
                waiter.event.set()
                return
            self._free += 1
