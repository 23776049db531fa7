"""How many actors load from the log at once, and which goes next.

After a restart every device reports within one heartbeat, so thousands of actors ask to
load at the same moment and wait in line for a slot (one on SQLite, eight on PostgreSQL:
see `ActorSystem`). Measured with 4,000 devices reporting every 2 s on SQLite, the line
took about 24 s to drain, and an HTTP command whose device's actor joined it waited 11-20 s
before it was even published. So a load that someone is waiting on (its actor has one of
the kind's `urgent` messages queued: an HTTP command, an agent change) takes the next free
slot ahead of every other; the others keep their order. A slot is handed to the next
waiter when it is released, never raced for, so a newcomer cannot overtake the line.

A load in a storm costs far more than alone (3.9 ms at p50 against 0.13: its queries let
go of the GIL and wait to get it back from the storm's other threads), so the holder of a
slot also loads the waiters next in line, up to `batch` streams in one `load_many` of two
queries, and hands each its state (`LoadGate.load`). A batch that fails for a reason other
than the database is loaded stream by stream, so a stream this version cannot read fails
only its own actor.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any


class _Waiter:
    __slots__ = ("who", "urgent", "granted", "event", "loaded", "result", "error")

    def __init__(self, who: Hashable, urgent: bool) -> None:
        self.who = who
        self.urgent = urgent
        self.granted = False
        self.event = threading.Event()
        self.loaded = False  # by the holder of a slot, for this waiter: `result` or `error`
        self.result: Any = None
        self.error: BaseException | None = None

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error, self.loaded = result, error, True
        self.event.set()


class LoadGate:
    """A counting semaphore with two lines, urgent loads first, each line in arrival order;
    whoever holds a slot loads the next `batch - 1` waiters' streams with its own."""

    def __init__(self, slots: int, batch: int = 1,
                 store_error: Callable[[BaseException], bool] = lambda exc: False) -> None:
        self.batch = batch  # streams one slot holder loads at once (itself and waiters)
        # Whether a failed `load_many` is the store's (down, say): every stream of the batch
        # would fail alike, so all fail at once. Any other error may be one stream's own
        # (an event this version cannot read): then each stream is loaded alone.
        self._store_error = store_error
        self._free = slots  # > 0 only while nobody waits: a release hands its slot on
        self._lock = threading.Lock()
        self._urgent: deque[_Waiter] = deque()
        self._normal: deque[_Waiter] = deque()  # may hold promoted waiters, skipped when reached
        self._waiting: dict[Hashable, _Waiter] = {}
        self.promoted = 0  # loads moved ahead after they had joined the line

    def _join(self, who: Hashable, urgent: Callable[[], bool]) -> _Waiter | None:
        """Take a free slot (None), or join the line (the waiter to wait on)."""
        with self._lock:
            if self._free > 0:
                self._free -= 1
                return None
            waiter = _Waiter(who, urgent())
            (self._urgent if waiter.urgent else self._normal).append(waiter)
            self._waiting[who] = waiter
            return waiter

    def load(self, who: Hashable, urgent: Callable[[], bool],
             load_many: Callable[[list[Hashable]], dict[Hashable, Any]]) -> Any:
        """`who`'s state, loaded in a slot: by this thread, which then also loads the next
        `batch - 1` waiters (`load_many` gets them all and returns each one's state), or by
        the holder of a slot for it while it waits in line. A store failure is raised in
        each of them; any other failure of a batch is found out stream by stream, so that
        only the stream that caused it fails."""
        waiter = self._join(who, urgent)
        if waiter is not None:
            waiter.event.wait()
            if waiter.loaded:
                if waiter.error is not None:
                    raise waiter.error
                return waiter.result
        try:
            others = self._next_waiters(who)
            try:
                states = load_many([who, *(w.who for w in others)])
            except Exception as exc:
                if not others or self._store_error(exc):
                    for w in others:
                        w.finish(error=exc)
                    raise
                return self._load_each(who, others, load_many)
            except BaseException as exc:
                for w in others:
                    w.finish(error=exc)
                raise
            for w in others:
                w.finish(states.get(w.who))
            return states.get(who)
        finally:
            self._release()

    @staticmethod
    def _load_each(who: Hashable, others: list[_Waiter],
                   load_many: Callable[[list[Hashable]], dict[Hashable, Any]]) -> Any:
        """The batch failed, maybe for one stream's sake: each loaded alone, as the journal
        falls back to a transaction per caller (a restart storm put one device whose
        stream this version could not read in a batch with 31 healthy ones)."""
        for w in others:
            try:
                w.finish(load_many([w.who]).get(w.who))
            except BaseException as exc:
                w.finish(error=exc)
        return load_many([who]).get(who)

    def _next_waiters(self, holder: Hashable) -> list[_Waiter]:
        """Take up to `batch - 1` waiters out of the line, urgent ones first, one per `who`."""
        taken: list[_Waiter] = []
        seen = {holder}
        with self._lock:
            for line in (self._urgent, self._normal):
                kept: deque[_Waiter] = deque()
                while line and len(taken) < self.batch - 1:
                    w = line.popleft()
                    if w.granted:
                        continue  # promoted: its entry in the urgent line was taken
                    if w.who in seen:
                        kept.append(w)
                        continue
                    w.granted = True
                    seen.add(w.who)
                    if self._waiting.get(w.who) is w:
                        del self._waiting[w.who]
                    taken.append(w)
                line.extendleft(reversed(kept))
        return taken

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
