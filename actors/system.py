"""The actor system: activation from the log, passivation (idle and LRU), supervision.

There is at most one live actor per stream in a process: `tell` and passivation both
hold `_lock`, and a new actor for a key loads (and so handles anything) only once the one
it replaces has stopped.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pykka
import structlog

from actors.base import AggregateActor, Key
from actors.errors import Unavailable
from actors.loading import LoadGate
from actors.ports import Burst, DeviceLink, Traced, untraced
from actors.scheduler import Scheduler
from actors.starter import ThreadStarter
from eventstore import EventLog, Journal
from eventstore.breaker import is_database_error

log = structlog.get_logger(__name__)


class Lease:
    """Shared between an actor and the system: when it was last used, and whether it may
    be passivated. A pin holds it: an actor holding in-flight replies pins itself, and a
    message of the kind's `pinning` types is pinned from the tell until it is handled (an
    LRU eviction between the two failed commands the device had carried out: 3.7% of them
    at 20 actors for 200 devices). Pins change on the actor's thread and the callers',
    hence the lock."""

    __slots__ = ("last_used", "pins", "_lock")

    def __init__(self) -> None:
        self.last_used = time.monotonic()
        self.pins = 0
        self._lock = threading.Lock()

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def pin(self, n: int = 1) -> None:
        with self._lock:
            self.pins += n


class RecentIds:
    """The last `size` ids added: a bounded set, safe to use from several threads."""

    def __init__(self, size: int) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def add(self, id_: str) -> None:
        with self._lock:
            self._ids[id_] = None
            if len(self._ids) > self._size:
                self._ids.popitem(last=False)

    def __contains__(self, id_: object) -> bool:
        return id_ in self._ids


@dataclass
class _Entry:
    ref: pykka.ActorRef[Any]
    lease: Lease = field(default_factory=Lease)


@dataclass
class SystemSettings:
    idle_timeout: float = 120.0
    max_active: int = 50_000
    sweep_interval: float = 5.0
    # The cap evicts only actors unused for this long (or idle_timeout, if shorter): one
    # used within it is the working set, and evicting it costs a load from the log at its
    # next message. With a cap below the working set (200 or 1,800 actors for 2,000 devices
    # reporting every second) every activation evicted one about to be used: ~2,000 loads
    # a second on SQLite's one load slot, commands 504 and reports 10-60 s late. Now the
    # cap is exceeded instead, and the sweep says so (`actors.over_cap`).
    evict_after: float = 60.0


class ActorSystem:
    def __init__(self, event_log: EventLog, journal: Journal, settings: SystemSettings | None = None,
                 device_link: DeviceLink | None = None) -> None:
        self.log = event_log
        self.journal = journal
        self.settings = settings or SystemSettings()
        self.device_link = device_link
        self.scheduler = Scheduler()
        self.starter = ThreadStarter(self._not_started)
        # request_id -> device key of the commands this process's callers wait on. Another
        # process may record their outcome (a shared subscription gave it the device's
        # answer): following the log, Runtime tells the actor to settle (CommandSettled).
        self.inflight: dict[str, Any] = {}
        # The commands that left `inflight` lately: following the log, Runtime sees a
        # CommandSent only after its command settled, and must not take ours for another
        # process's (tens of ms of commands at the least; more only costs a no-op message).
        self.settled_here = RecentIds(10_000)
        self._active: OrderedDict[tuple[type[AggregateActor], Key], _Entry] = OrderedDict()
        # Passivated actors still draining their queue: a new actor for the same key
        # waits (on its own thread) for the old one to end, so two never run for one stream.
        self._stopping: dict[tuple[type[AggregateActor], Key], pykka.ActorRef[Any]] = {}
        self._lock = threading.RLock()
        self._closed = False
        # Loads from the log at once. On SQLite a load is CPU under the GIL (the database
        # is in-process), and parallel loads only fight over it: 10,000 activations took
        # 26.2 s with 8 at once, 20.5 s with 2 and 14.6 s with 1 (a load's CPU 1.7 ms, 0.85,
        # 0.43; the process's system time 21.5 s, 14.4, 9.7). On PostgreSQL a load waits on
        # the server, and 8 at once (the pool's size) overlap those waits.
        self.loading = LoadGate(8 if event_log.config.is_postgres else 1, batch=self.LOAD_BATCH,
                                store_error=is_database_error)
        self.activations = 0
        self.passivations = 0
        self._over_cap_warned = -float("inf")
        self._stop_sweeper = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="actor-sweeper", daemon=True)
        self._sweeper.start()

    # -- sending ---------------------------------------------------------------------
    def tell(self, kind: type[AggregateActor], key: Key, message: Any) -> None:
        """Deliver a message to the actor for `key`, activating it from the log if needed."""
        self.tell_many(kind, key, (message,))

    def tell_many(self, kind: type[AggregateActor], key: Key, messages: Sequence[Any], *,
                  here: bool = False) -> None:
        """Deliver messages to the actor for `key`, in order, with one lookup. A gateway that
        hands over a device's whole burst at once lets the actor fold it into one commit.
        `here`: the caller may wait while a lone message of `kind.run_here` is handled on its
        own thread, if the actor is idle (it then commits here too)."""
        k = (kind, key)
        if len(messages) > 1 and all(isinstance(m, kind.batchable) for m in messages):
            # In bursts the actor may fold into one commit each (at most max_batch).
            n = kind.max_batch
            messages = [Burst(tuple(messages[i:i + n])) for i in range(0, len(messages), n)]
        context = structlog.contextvars.get_contextvars()
        if context:
            messages = [Traced(context, m) for m in messages]
        if here and len(messages) == 1 and isinstance(untraced(messages[0]), kind.run_here):
            # Handled on this thread if its actor is idle (Inbox.run_here): not waking the
            # actor's thread took 0.11-0.31 ms off a command's round trip (bench.ab).
            # Looked up under the lock; a passivation meanwhile queues a stop, and the
            # inbox then refuses, or the stop waits for this message.
            with self._lock:
                entry = self._active.get(k)
            if entry is not None and entry.ref.actor_inbox.run_here(messages[0]):
                return
        with self._lock:
            if self._closed:
                raise Unavailable("actor system is shutting down")
            entry = self._active.get(k)
            if entry is None or not entry.ref.is_alive():
                entry = self._activate(kind, key)
            else:
                self._active.move_to_end(k)
            entry.lease.touch()
            # Inside the lock: a passivation cannot slip between lookup and enqueue, nor
            # between a pin and its message.
            for i, message in enumerate(messages):
                try:
                    self._enqueue(kind, entry, message)
                except pykka.ActorDeadError:  # it crashed a moment ago: a new one gets the rest
                    entry = self._activate(kind, key)
                    for rest in messages[i:]:
                        self._enqueue(kind, entry, rest)
                    break
            if any(kind.is_urgent(m) for m in messages):
                # After the enqueue: its thread starts now if it waits to, and an actor
                # waiting to load now has it, and goes next.
                self.starter.expedite(entry.ref.actor_urn)
                self.loading.promote(k)

    @staticmethod
    def _enqueue(kind: type[AggregateActor], entry: _Entry, message: Any) -> None:
        pinned = isinstance(untraced(message), kind.pinning)  # (its actor unpins once it is handled)
        if pinned:
            entry.lease.pin()
        try:
            entry.ref.tell(message)
        except pykka.ActorDeadError:
            if pinned:
                entry.lease.pin(-1)  # a dead actor's lease: only for tidiness
            raise

    @property
    def closing(self) -> bool:
        return self._closed

    # Streams one load slot reads at once: the holder's and those of the waiters behind it.
    LOAD_BATCH = 32

    def load_states(self, whos: list[tuple[type[AggregateActor], Key]]) -> dict[Any, Any]:
        """The state of each (kind, key) from the log (None for an empty stream), in two
        queries for all of them: what `LoadGate.load` calls."""
        ids = {who: who[0].stream_id(who[1]) for who in whos}
        states = self.log.load_many(list(ids.values()))
        return {who: states.get(stream) for who, stream in ids.items()}

    def active_count(self) -> int:
        return len(self._active)

    def stopping_count(self) -> int:
        """Passivated actors whose threads still run: handling what they were told first."""
        with self._lock:
            return sum(not ref.actor_stopped.is_set() for ref in self._stopping.values())

    def is_active(self, kind: type[AggregateActor], key: Key) -> bool:
        entry = self._active.get((kind, key))
        return entry is not None and entry.ref.is_alive()

    # -- lifecycle -------------------------------------------------------------------
    def _activate(self, kind: type[AggregateActor], key: Key) -> _Entry:
        k = (kind, key)
        # The actors this one replaces: a crashed one, and one passivated a moment ago that
        # may still be handling what it was told. The new actor waits for them on its own
        # thread before it loads (AggregateActor._await_predecessors); its messages queue
        # meanwhile. Waiting here, under the lock, held every tell of every stream up to 10 s.
        replaced = [e.ref for e in (self._active.pop(k, None),) if e is not None]
        draining = self._stopping.pop(k, None)
        if draining is not None:
            # Passivated by a sweep that may not have told it to stop yet (passivate_idle
            # tells them after it lets go of the lock): told now, its successor waits less.
            draining.stop(block=False)
            replaced.append(draining)
        after = tuple(ref.actor_stopped for ref in replaced if not ref.actor_stopped.is_set())
        lease = Lease()
        ref = kind.start(self, key, lease, after)
        entry = _Entry(ref, lease)
        self._active[k] = entry
        self.activations += 1
        if len(self._active) > self.settings.max_active:
            self._evict_lru(len(self._active) - self.settings.max_active)
        return entry

    def _evict_lru(self, count: int, *, stop: bool = True) -> list[pykka.ActorRef]:
        # Only idle actors: one with messages waiting would have to handle them all before
        # it could stop, and the next message would start it again. Evicting busy actors is
        # how a cap of 20 over 200 busy devices left 2,438 threads (evicted before they had
        # loaded, waiting to, then draining) while the health said 20. Nor one used within
        # `evict_after`: the working set (SystemSettings). Over the cap with every actor
        # busy or recent, more stay in memory until they are neither: the sweep trims them.
        recent = time.monotonic() - min(self.settings.evict_after, self.settings.idle_timeout)
        victims = []
        # Least recently told first; never the last, which may be the one being activated.
        for k, entry in itertools.islice(self._active.items(), len(self._active) - 1):
            if len(victims) >= count or entry.lease.last_used > recent:
                break  # (last_used follows the order, but for receives: close enough)
            if not entry.lease.pins and entry.ref.actor_inbox.empty():
                victims.append((k, entry))
        return [self._passivate(k, entry, stop=stop) for k, entry in victims]

    def _passivate(self, k: tuple[type[AggregateActor], Key], entry: _Entry, *, stop: bool = True) -> pykka.ActorRef:
        # Out of `_active` under the lock, no tell reaches it any more: its stop message,
        # sent now or (`stop=False`) by the caller once it lets go of the lock, queues behind
        # whatever it was told before, so nothing sent to it is lost; `_activate` waits for
        # it to end.
        del self._active[k]
        if stop:
            entry.ref.stop(block=False)
        self._stopping[k] = entry.ref
        self.passivations += 1
        return entry.ref

    def passivate_idle(self, now: float | None = None, *, wait: bool = False) -> int:
        """Passivate actors idle since before `now - idle_timeout`; with `wait`, return only
        once their threads have ended (benchmarks, tests)."""
        now = time.monotonic() if now is None else now
        idle = self.settings.idle_timeout
        detached = []
        with self._lock:
            for k, entry in list(self._active.items()):
                if not entry.lease.pins and now - entry.lease.last_used > idle:
                    detached.append(self._passivate(k, entry, stop=False))
            excess = len(self._active) - self.settings.max_active
            if excess > 0:  # left over the cap while they were busy or recently used
                detached += self._evict_lru(excess, stop=False)
                self._warn_over_cap(now)
            for k, ref in list(self._stopping.items()):
                if ref.actor_stopped.is_set():
                    del self._stopping[k]
            stopping = list(self._stopping.values()) if wait else []
        self._stop_detached(detached)
        for ref in stopping:
            ref.actor_stopped.wait(10)
        return len(detached)

    # A sweep that finds thousands of actors idle (a fleet that went silent together) tells
    # them to stop this many at a time, pausing in between. Each stop wakes a thread that
    # wants the GIL; told all at once under the lock, 10,000 held every tell of every
    # stream (the HTTP loop's too) for 2.4-3.5 s.
    PASSIVATE_BATCH = 100
    PASSIVATE_PAUSE_S = 0.01

    def _stop_detached(self, refs: list[pykka.ActorRef]) -> None:
        for i, ref in enumerate(refs, 1):
            if self._closed:
                return  # shutdown stops the rest (they are in `_stopping`)
            ref.stop(block=False)
            if i % self.PASSIVATE_BATCH == 0 and i < len(refs):
                time.sleep(self.PASSIVATE_PAUSE_S)

    OVER_CAP_WARN_EVERY_S = 300.0

    def _warn_over_cap(self, now: float) -> None:
        active, cap = len(self._active), self.settings.max_active
        if active > cap and now - self._over_cap_warned >= self.OVER_CAP_WARN_EVERY_S:
            self._over_cap_warned = now
            log.warning("actors.over_cap", active=active, max_active_actors=cap,
                        used_within_s=min(self.settings.evict_after, self.settings.idle_timeout),
                        hint="max_active_actors is below the devices in use: raise it, or memory "
                             "and threads grow past it (evicting them would reload each at its next message)")

    def _sweep_loop(self) -> None:
        while not self._stop_sweeper.wait(self.settings.sweep_interval):
            try:
                n = self.passivate_idle()
                if n:
                    log.debug("actors.passivated", count=n, active=len(self._active))
            except Exception:
                log.exception("actors.sweep_failed")

    # How long shutdown waits, in all, for actors to finish what they were told.
    SHUTDOWN_WAIT_S = 10.0

    def _not_started(self, actor: AggregateActor) -> None:
        # Dead under the lock, so that no tell adds to its inbox after the drain below (a
        # tell then finds it dead and activates another); what it was told fails now.
        with self._lock:
            actor.actor_stopped.set()
            pykka.ActorRegistry.unregister(actor.actor_ref)
        actor._fail_queued("could not start its thread")

    def shutdown(self) -> None:
        """Stop every actor: each handles what it was told first (an actor not loaded yet
        answers Unavailable instead of loading), all within SHUTDOWN_WAIT_S together. An
        actor still busy after that is left; its thread is a daemon (AggregateActor), so it
        does not hold the process: nothing it was told can be acknowledged any more."""
        with self._lock:
            self._closed = True
            refs = [e.ref for e in self._active.values()] + list(self._stopping.values())
            self._active.clear()
            self._stopping.clear()
        self._stop_sweeper.set()
        # Each stop wakes its actor's thread, and every woken thread wants the GIL: this
        # loop then got it back only after its turn behind them (the 10,000-actor
        # benchmark's stop took 2.4-20 s, most of it in this loop). Held for the loop
        # instead (about 0.5 s for 10,000; nothing else runs by now: HTTP and MQTT have
        # stopped), then given back: 1.2-1.4 s in all.
        switch = sys.getswitchinterval()
        sys.setswitchinterval(max(switch, 1.0))
        try:
            for ref in refs:
                ref.stop(block=False)
        finally:
            sys.setswitchinterval(switch)
        deadline = time.monotonic() + self.SHUTDOWN_WAIT_S
        left = sum(not ref.actor_stopped.wait(max(0.0, deadline - time.monotonic())) for ref in refs)
        if left:
            log.warning("actors.not_stopped", actors=left, of=len(refs), waited_s=self.SHUTDOWN_WAIT_S)
        self.starter.close()
        self.scheduler.stop()
