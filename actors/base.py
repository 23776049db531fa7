"""The shape every actor kind shares: load from the log, decide, commit, reply.

A subclass names its aggregate class and a `handle_<Message>` method per message type.
Message types listed in `batchable` may be folded: when several are already waiting in
the inbox, they are all handled and committed in one journal transaction, and each is
replied to after that commit. Under load this turns one commit (and two thread
hand-offs) per message into one per burst.

A burst nobody waits on (QoS 0 telemetry) is handed to the journal and not waited for: the
actor is free at once, and learns how that commit went before it handles anything else
(`_settle_unawaited`). With thousands of devices reporting once each, every report woke
its actor twice, and the journal fell behind: commands waited seconds behind the reports
(docs/architecture.md, "Unawaited commits").
"""

from __future__ import annotations

import copy
import queue
import random
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, ClassVar
from uuid import UUID

import pykka
import structlog
from eventsourcing.domain import Snapshot
from eventsourcing.persistence import RecordConflictError

from actors.errors import ActorCrashed, HeldBack, ParleyError, Unavailable
from actors.ports import NO_REPLY, Burst, NoReply, Traced, unpacked, untraced
from actors.starter import actor_thread
from eventstore import JournalClosed, JournalTimeout, UnencodableValue
from eventstore.journal import Queued
from eventstore.breaker import is_store_error, store_down

if TYPE_CHECKING:
    from actors.system import ActorSystem, Lease

log = structlog.get_logger(__name__)

Key = tuple[str, ...]


class Inbox(queue.Queue):
    """An actor's inbox. Each time the actor's loop takes its next message (a blocking
    `get`; the handlers' own `get_nowait`, gathering a burst or emptying the inbox at a
    stop, do not), it first runs what the actor deferred with `AggregateActor.later`.

    It also lets another thread handle a message itself (`run_here`) while the actor is
    idle: its thread waits in `get` with nothing queued. The message is handled on the
    caller's thread under the inbox's claim, and the actor's thread takes nothing until
    the claim is released, so one thread at a time still handles the actor's messages,
    in the order they were told."""

    def __init__(self) -> None:
        super().__init__()
        self.deferred: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self.owner: Callable[[], AggregateActor | None] = lambda: None  # (a weak reference)
        self._busy = True  # the actor's thread handles a message (or has not started yet)
        self._claimed = False  # another thread handles one (`run_here`)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if not block:
            return super().get(False)
        if self.deferred:
            self.run_deferred()
        # queue.Queue.get, but it also waits while another thread holds a claim.
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.not_empty:
            self._busy = False
            while not self._qsize() or self._claimed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise queue.Empty
                self.not_empty.wait(remaining)
            item = self._get()
            self._busy = True
            self.not_full.notify()
            return item

    def run_deferred(self) -> None:
        deferred, self.deferred = self.deferred, []
        for fn, args in deferred:
            try:
                fn(*args)
            except Exception:
                log.exception("actor.deferred_failed", fn=getattr(fn, "__qualname__", repr(fn)))

    def run_here(self, message: Any) -> bool:
        """Handle `message` on this thread if the actor is idle and may (`may_run_here`);
        False if it did not, and the message must be told as usual."""
        actor = self.owner()
        with self.mutex:
            if actor is None or self._busy or self._claimed or self._qsize() \
                    or actor.actor_stopped.is_set() or not actor.may_run_here():
                return False
            self._claimed = True
        try:
            actor.on_receive(message)
        except Exception as exc:
            # Past the handlers' own error handling (a bug in the base class): on its own
            # thread pykka would stop the actor; here the message is answered, and the
            # actor's next message finds its state as this one left it or reloads.
            actor.log.exception("actor.run_here_failed", message=type(untraced(message)).__name__)
            getattr(untraced(message), "reply", NO_REPLY).fail(ActorCrashed(f"{actor.kind} failed: {exc}"))
        finally:
            self.run_deferred()
            with self.mutex:
                self._claimed = False
                if self._qsize():
                    self.not_empty.notify()  # told meanwhile: the actor's thread goes on
        return True


class AggregateActor(pykka.ThreadingActor, ABC):
    """One actor per stream. Handles one message (or one folded burst) at a time."""

    kind: ClassVar[str]
    # A daemon thread: an actor still busy when shutdown has waited its time (a store that
    # hangs) must not hold the process open. Nothing it does then is acknowledged to anyone.
    use_daemon_thread = True
    snapshot_every: ClassVar[int] = 100
    # At stop (shutdown, passivation), snapshot a state that is at least this many events
    # past what this actor loaded: its next load reads one row instead of replaying them.
    # After a restart every device loads at once, one load at a time on SQLite.
    snapshot_at_stop_after: ClassVar[int] = 10
    # Another process appending to the same stream (several processes on one database, a
    # shared subscription spreading one device's messages across them): reload and decide
    # again, this many times, waiting a little longer, at random, after each conflict so two
    # processes stop colliding in step. Then Unavailable: tried again later, never dropped
    # (3 tries and then ActorCrashed, which the MQTT gateway acknowledged as poison, lost
    # 163 of 3,000 QoS 1 reports of one device at 300 msg/s over two processes).
    max_conflict_retries: ClassVar[int] = 8
    conflict_backoff_s: ClassVar[float] = 0.002
    batchable: ClassVar[tuple[type, ...]] = ()
    # Messages that pin the actor from the tell until they are handled (ActorSystem.tell_many;
    # Lease): what an eviction in between would fail though it was carried out.
    pinning: ClassVar[tuple[type, ...]] = ()
    # Messages someone waits on (an HTTP request): an actor with one queued loads ahead of
    # the actors activated by reports (actors/loading.py).
    urgent: ClassVar[tuple[type, ...]] = ()
    max_batch: ClassVar[int] = 256
    # How long a new actor waits for the ones it replaces to end (passivated a moment ago
    # and still handling what they were told, or crashed) before it answers Unavailable.
    predecessor_wait_s: ClassVar[float] = 10.0
    # Messages the thread that tells one may handle itself while the actor is idle, if it
    # says it may wait for that (`ActorSystem.tell_many`'s `here`; `Inbox.run_here`,
    # `may_run_here`): one thread wake-up less on their way.
    run_here: ClassVar[tuple[type, ...]] = ()

    def __init__(self, system: ActorSystem, key: Key, lease: Lease,
                 after: tuple[threading.Event, ...] = ()) -> None:
        super().__init__()
        self.actor_inbox.owner = weakref.ref(self)
        self.system = system
        self.key = key
        self.lease = lease
        self.aggregate: Any | None = None
        self._loaded = False
        # The `actor_stopped` of the actors this one replaces: it loads only once they are
        # set, so two actors never drive one stream. The wait is here, on this actor's own
        # thread, not in ActorSystem.tell under its lock, where every tell of every stream
        # (the HTTP loop's among them) would wait with it.
        self._after = after
        self._after_deadline = time.monotonic() + self.predecessor_wait_s
        # The last burst handed to the journal without waiting, and its messages: at most
        # one at a time, so a failed one is never followed by a later write of its stream.
        self._unawaited: tuple[Queued, list[Any]] | None = None
        self._loaded_version = 0  # the aggregate's version when last loaded from the log
        self.log = log.bind(actor=self.kind, key=":".join(key))

    @classmethod
    @abstractmethod
    def stream_id(cls, key: Key) -> UUID:
        """The stream this kind's actor for `key` drives."""

    @staticmethod
    def _create_actor_inbox() -> Inbox:
        return Inbox()

    def may_run_here(self) -> bool:
        """Whether a message may be handled on the telling thread now (`Inbox.run_here`, with
        this actor idle): loaded, no commit of its own outstanding, and the journal idle, so
        that the commit it makes is written at once on that thread and does not wait in the
        journal's queue (the MQTT gateway's thread, which reads every device's messages,
        must not wait there)."""
        return self._loaded and self._unawaited is None and not self.system.closing \
            and self.system.journal.idle

    def later(self, fn: Callable[..., None], *args: Any) -> None:
        """Call `fn(*args)` once this actor is done with the message it is handling, as its
        thread turns to the next (or ends). For waking another thread that then needs the
        GIL: woken earlier, it waited for this thread to finish the message anyway, and
        then for a second wake-up when it let go (the two took turns)."""
        self.actor_inbox.deferred.append((fn, args))

    def _actor_loop(self) -> None:
        try:
            super()._actor_loop()
        finally:
            self.actor_inbox.run_deferred()  # what the last message deferred (a stop, a crash)

    def _start_actor_loop(self) -> None:
        # Not here and now, as pykka does (on the activating thread, under the system's
        # lock, waiting until the thread runs): by the system's starter (actors/starter.py).
        self.system.starter.start(self, actor_thread(self._actor_loop, type(self).__name__, self.use_daemon_thread))

    # -- loading ---------------------------------------------------------------------
    def on_start(self) -> None:
        # A failure here must not kill the actor: pykka would drop the message that
        # activated it without a reply. Instead each message retries the load.
        self._ensure_loaded()

    def _ensure_loaded(self) -> Exception | None:
        if self._loaded:
            return None
        if self.system.closing:
            # Shutting down: what is queued for an actor not loaded yet fails at once (the
            # MQTT gateway has stopped; the broker redelivers what was not acknowledged),
            # instead of each loading now, from a store that may be down.
            return Unavailable("the server is shutting down")
        if self._after:
            error = self._await_predecessors()
            if error is not None:
                return error
        try:
            self.reload()
        except Exception as exc:
            # The store known down is one line of the breaker's (store.down), not one a message.
            (self.log.debug if store_down(exc) else self.log.error)("actor.load_failed", error=repr(exc))
            return exc
        self._loaded = True
        self.on_loaded()
        return None

    def _await_predecessors(self) -> Unavailable | None:
        """Wait (until `predecessor_wait_s` after activation) for the replaced actors to end.
        Past that, each message is answered Unavailable at once until they have: an MQTT
        message then comes again later, an HTTP caller gets 503."""
        for stopped in self._after:
            if not stopped.wait(max(0.0, self._after_deadline - time.monotonic())):
                if self._after_deadline > -1:  # say it once, not per message
                    self._after_deadline = -1
                    self.log.warning("actor.predecessor_still_running", waited_s=self.predecessor_wait_s)
                return Unavailable(f"the previous {self.kind} actor for this stream is still "
                                   "handling what it was told; try again")
        self._after = ()
        return None

    def reload(self) -> None:
        """(Re)build state from the latest snapshot plus the tail of the stream."""
        # Bounded: thousands of activations at once share a few slots, urgent ones first.
        self.aggregate = self.system.loading.load((type(self), self.key), self._urgent_queued,
                                                  self.system.load_states)
        self._loaded_version = self.aggregate.version if self.aggregate is not None else 0

    @classmethod
    def is_urgent(cls, message: Any) -> bool:
        return bool(cls.urgent) and isinstance(untraced(message), cls.urgent)

    def _urgent_queued(self) -> bool:
        # Only this thread takes from the inbox; others may append meanwhile (tuple() of a
        # deque copies it without letting another thread run).
        return any(self.is_urgent(e.message) for e in tuple(self.actor_inbox.queue))

    def catch_up(self) -> None:
        """Load what another process wrote to this stream since our state, if it wrote
        anything: a read of one row when it did not. A store outage is Unavailable (an MQTT
        message then stays unacknowledged and comes again), never a crash."""
        version = self.aggregate.version if self.aggregate is not None else 0
        try:
            if next(iter(self.system.log.read_stream(self.stream_id(self.key), gt=version, limit=1)), None):
                self.reload()
        except Exception as exc:
            raise Unavailable(f"could not read the log: {exc}") from exc

    def on_loaded(self) -> None:
        """Hook: runtime state to rebuild from the aggregate after the first load."""

    # -- receiving -------------------------------------------------------------------
    def on_receive(self, message: Any) -> Any:
        self.lease.touch()
        if isinstance(message, Traced):
            with structlog.contextvars.bound_contextvars(**message.context):
                return self._receive(message.message)
        return self._receive(message)

    def _receive(self, message: Any) -> Any:
        try:
            return self._receive_loaded(message)
        finally:
            if isinstance(message, self.pinning):
                self.lease.pin(-1)  # the tell's pin (a handler that keeps a waiter took its own)

    def _receive_loaded(self, message: Any) -> Any:
        # Before this message is decided on, and before more of a burst are taken from the
        # inbox (they keep coming meanwhile, so the next burst grows instead).
        try:
            self._settle_unawaited()
        except Exception:
            # A bug (the store's failures are dealt with inside): the state may be anything,
            # so it is forgotten, and this message loads it again below. Escaping, it would
            # stop the actor with this message, already out of the inbox, never answered.
            self.log.exception("actor.settle_failed")
            self.aggregate, self._loaded = None, False
        error = self._ensure_loaded()
        if error is not None:
            failed = list(unpacked(message))
            held = self._failing_reports(failed)
            for m in failed:
                failure = Unavailable(f"could not load {self.kind}: {error}")
                failure.__cause__ = error  # (store_down looks at the cause)
                getattr(m, "reply", NO_REPLY).fail(failure)
            self._hold_back(held)
            return None
        if isinstance(message, _Settle):
            return None
        if isinstance(message, (Burst, *self.batchable)):
            first = unpacked(message)
            return self._receive_batch([*first, *self._waiting_batchable(len(first))])
        return self._receive_one(message)

    def _waiting_batchable(self, have: int) -> list[Any]:
        """Pop the batchable messages (and bursts of them) queued right behind this one,
        never anything else: a stop or another command keeps its place in line."""
        inbox = self.actor_inbox
        out: list[Any] = []
        while have + len(out) < self.max_batch:
            head = self._inbox_head()
            if head is None or not self._foldable(head):
                break
            try:
                inbox.get_nowait()
            except queue.Empty:
                break
            out.extend(unpacked(untraced(head.message)))
        return out

    def _inbox_head(self) -> Any | None:
        """The inbox's next entry, left in place (only this thread takes from the inbox, so
        it stays put), or None."""
        try:
            return self.actor_inbox.queue[0]
        except IndexError:
            return None

    def _foldable(self, envelope: Any) -> bool:
        """Whether an inbox entry may join a burst: a batchable message (or a burst of them)
        nobody asked through pykka's `ask`."""
        return envelope.reply_to is None and isinstance(untraced(envelope.message), (Burst, *self.batchable))

    def _other_message_waits(self) -> bool:
        """Whether the inbox's next entry is a message a burst could not take (a device's
        answer to a command, a command, a stop), whose handling will begin by waiting for
        the burst's commit."""
        head = self._inbox_head()
        return head is not None and not self._foldable(head)

    def joins_commit(self, message: Any) -> bool:
        """Whether `message`, queued right behind a burst nobody is acknowledged on, may be
        handled at once, its commit taking the burst's events with its own (one commit
        instead of two). Its handler must then commit whatever is pending."""
        return False

    def _take_joining(self) -> Any | None:
        """The inbox's next entry, taken out, if `joins_commit` says it may."""
        head = self._inbox_head()
        if head is None or head.reply_to is not None or not self.joins_commit(untraced(head.message)):
            return None
        try:
            return self.actor_inbox.get_nowait()
        except queue.Empty:
            return None

    def _handle_joining(self, accepted: list[Any], envelope: Any) -> None:
        """Handle the joining message (its handler commits the burst's events with its own),
        then answer the burst: committed, or not. Not if the state was rebuilt from the log
        meanwhile (a failed commit, a version conflict: a new aggregate, without the
        burst's events) or the events are still pending (nothing committed them)."""
        before = self.aggregate
        self.on_receive(envelope.message)
        committed = self.aggregate is before and before is not None \
            and not getattr(before, "_pending_events", None)
        error = Unavailable(f"not committed: the {self.kind}'s next message failed")
        for m in accepted:
            if committed:
                m.reply.ok(None)
            else:
                m.reply.fail(error)

    def _handler(self, message: Any) -> Any:
        return getattr(self, "handle_" + type(message).__name__, None)

    def _receive_one(self, message: Any) -> Any:
        handler = self._handler(message)
        reply = getattr(message, "reply", NO_REPLY)
        if handler is None:
            self.log.error("actor.unknown_message", message=type(message).__name__)
            reply.fail(ActorCrashed(f"{self.kind} cannot handle {type(message).__name__}"))
            return None
        for attempt in range(self.max_conflict_retries):
            try:
                return handler(message)
            except ParleyError as exc:
                # A refused command: decided before any event was emitted, state unchanged.
                self._discard_pending()
                reply.fail(exc)
                return None
            except RecordConflictError:
                # Another process wrote this stream first: catch up and decide again.
                if not self._after_conflict(attempt):
                    reply.fail(self._reload_failed())
                    return None
            except Exception as exc:
                self._crashed(exc, [message])
                return None
        reply.fail(self._conflicts_exhausted(1))
        return None

    def _after_conflict(self, attempt: int, batch: int = 1) -> bool:
        """Catch up with the log after a version conflict; False if that failed (the state
        is then forgotten: the next message loads again)."""
        self.log.info("actor.version_conflict", attempt=attempt, batch=batch)
        if attempt:
            time.sleep(random.uniform(0, self.conflict_backoff_s * 2 ** attempt))
        return self._reload_or_unload()

    def _reload_failed(self) -> Unavailable:
        return Unavailable(f"could not read this {self.kind}'s stream from the log; try again")

    def _conflicts_exhausted(self, batch: int) -> Unavailable:
        self.log.warning("actor.version_conflicts_exhausted", attempts=self.max_conflict_retries, batch=batch)
        return Unavailable(f"{self.max_conflict_retries} version conflicts in a row: another process "
                           f"keeps writing this {self.kind}'s stream; try again")

    def _receive_batch(self, messages: list[Any], *, wait: bool = False) -> None:
        """Apply every message, commit once, then reply to each with the last position.
        A message its handler refuses (a ParleyError, raised before any event) is answered
        with that error, after the others' commit; the others are not held up by it. If
        nobody waits on any of them, the commit is not waited for either (`wait=False`)."""
        for attempt in range(self.max_conflict_retries):
            accepted: list[Any] = []
            refused: list[tuple[Any, ParleyError]] = []
            try:
                for m in messages:
                    try:
                        self._handler(m)(m)
                    except ParleyError as exc:
                        if isinstance(exc, Unavailable):
                            raise
                        refused.append((m, exc))
                    else:
                        accepted.append(m)
                # Flush to disk only if someone is acknowledged (a QoS 1 PUBACK, say);
                # a burst of QoS 0 telemetry is written and left to the next flush, and
                # not waited for, unless a message the burst could not take is queued
                # behind it (a device's answer to a command, say), whose handling would
                # begin by waiting for that commit anyway. Then it is committed here, on
                # this thread when the journal is idle, without the hand-over to the
                # journal's thread and the wake-up back: an SDK-like device's state,
                # event and answer took 0.30-0.53 ms less to reach the HTTP caller
                # (bench.ab, three rounds). More reports queued behind do not count:
                # their bursts go to the journal as before, grouped with other devices'
                # (committed here one device at a time, under thousands of reporting
                # devices the server fell behind in 3 of 5 runs). If that message may join
                # the burst's commit (`joins_commit`: a device's answer to a command a caller
                # here waits for), it is handled now and its commit takes the burst's events
                # with its own: one commit, one flush (SDK-like device, bench.ab --device
                # sdk: -0.470, -0.433, -0.485 ms).
                acknowledged = any(_acknowledged(m) for m in accepted)
                unawaited = not wait and not acknowledged
                joining = None
                if unawaited and not self._other_message_waits():
                    self._commit_unawaited(accepted)
                    positions = []
                elif unawaited and (joining := self._take_joining()) is not None:
                    positions = []  # committed by `joining`'s handler, with its own events
                else:
                    positions = self.commit(sync=acknowledged)
            except RecordConflictError:
                if self._after_conflict(attempt, len(messages)):
                    continue
                error = self._reload_failed()
                held = self._failing_reports(messages)
                for m in messages:
                    m.reply.fail(error)
                self._hold_back(held)
                return
            except Exception as exc:
                if len(messages) > 1 and not isinstance(exc, Unavailable):
                    # One bad message must not take the others down with it: rebuild the
                    # state, then handle and commit each message of the burst alone.
                    self.log.warning("actor.batch_failed", error=repr(exc), batch=len(messages))
                    self._restart()
                    for m in messages:  # each waited for: one unawaited commit at a time
                        self._receive_batch([m], wait=True)
                    return
                self._crashed(exc, messages)
                return
            for m, exc in refused:
                self.on_refused(m, exc)
            if joining is not None:
                self._handle_joining(accepted, joining)
                return
            position = positions[-1] if positions else None
            for m in accepted:
                m.reply.ok(position)
            return
        error = self._conflicts_exhausted(len(messages))
        held = self._failing_reports(messages)
        for m in messages:
            m.reply.fail(error)
        self._hold_back(held)

    def on_refused(self, message: Any, error: ParleyError) -> None:
        """A batchable message its handler refused (bad input, nothing stored): say why."""
        self.log.warning("actor.refused", message=type(message).__name__, code=error.code, error=str(error))
        message.reply.fail(error)

    def _crashed(self, exc: Exception, messages: list[Any]) -> None:
        # Supervision: the commands that crashed get an error reply; state is rebuilt from
        # the log so nothing half-applied survives.
        if isinstance(exc, Unavailable):
            # A store that is down or cannot write is reported by the breaker or the journal,
            # once; said here too it was a line per message (12,000 in 30 s on a full disk).
            cause = exc.__cause__
            reported = store_down(exc) or (cause is not None and is_store_error(cause))
            (self.log.debug if reported else self.log.error)("actor.commit_failed", error=str(exc))
            error: ParleyError = exc
        else:
            self.log.exception("actor.crashed", message=type(messages[0]).__name__)
            # The caller (an HTTP client) hears what failed, not why: that is a bug of ours,
            # and its details (the exception, the traceback) are in the line above.
            error = ActorCrashed(f"the {self.kind} actor failed on {type(messages[0]).__name__}; "
                                 "the server log has the details")
        held = self._failing_reports(messages) if isinstance(exc, Unavailable) else []
        for m in messages:
            getattr(m, "reply", NO_REPLY).fail(error)
        self._hold_back(held)
        self._restart()

    # -- reports that will be tried again keep their order -----------------------------
    def _failing_reports(self, messages: Sequence[Any]) -> list[Any]:
        """Call before answering `messages` with a failure. If one of them is a report that
        will be tried again (someone acknowledges it: MQTT QoS 1), the reports of the same
        kind queued behind it (up to an ask or a stop) were told before anyone knew of the
        failure; those someone acknowledges are taken out of the inbox here, to be handed
        back with `_hold_back` once the failure is answered. Committed instead, they would
        land ahead of the failed one's retry if the store were back a moment later, and the
        older report would then overwrite the newer state. Taken before the failure is
        answered: a report sent after that is its sender's to order (the MQTT gateway puts
        the device's later messages behind the failed one itself). Unacknowledged reports
        (QoS 0, never tried again) and other messages keep their places."""
        if not any(isinstance(m, self.batchable) and _acknowledged(m) for m in messages):
            return []
        inbox = self.actor_inbox
        held: list[Any] = []
        with inbox.mutex:  # others append meanwhile; only this thread takes
            kept = []
            for i, envelope in enumerate(inbox.queue):
                if envelope.reply_to is not None:  # an ask or a stop: it and all after keep their place
                    kept.extend(list(inbox.queue)[i:])
                    break
                message = untraced(envelope.message)
                if isinstance(message, (Burst, *self.batchable)):
                    inner = unpacked(message)
                    held.extend(m for m in inner if _acknowledged(m))
                    others = tuple(m for m in inner if not _acknowledged(m))
                    if not others:
                        continue
                    if len(others) < len(inner):
                        rest: Any = Burst(others)
                        envelope.message = Traced(envelope.message.context, rest) \
                            if isinstance(envelope.message, Traced) else rest
                kept.append(envelope)
            inbox.queue.clear()
            inbox.queue.extend(kept)
        return held

    def _hold_back(self, held: list[Any]) -> None:
        """Hand back the reports `_failing_reports` took: their sender tries them again after
        the failed ones (`HeldBack`)."""
        if held:
            self.log.debug("actor.held_back", reports=len(held))
            error = HeldBack("an earlier report of this device failed to commit; tried again after it")
            for m in held:
                m.reply.fail(error)

    def _discard_pending(self) -> None:
        if self.aggregate is not None and getattr(self.aggregate, "_pending_events", None):
            self.reload()

    def _restart(self) -> None:
        try:
            self.reload()
            self.on_restarted()
        except Exception as exc:
            if store_down(exc):
                self.log.debug("actor.restart_failed", error=repr(exc))
            else:
                self.log.exception("actor.restart_failed")
            self._loaded = False  # the next message tries again

    def on_restarted(self) -> None:
        """Hook for kinds that hold runtime state besides the aggregate."""

    def _stop(self) -> None:
        # Passivated (or shut down) with a write in flight: a new actor for this stream
        # loads once `actor_stopped` is set, which pykka's _stop does before on_stop. It
        # must find the write in the log (tests/actors/test_device_actor.py).
        try:
            self._settle_unawaited()
            self._snapshot_at_stop()
        except Exception:
            self.log.exception("actor.stop_failed")  # it stops all the same
        finally:
            super()._stop()

    def _snapshot_at_stop(self) -> None:
        """Snapshot the state (stored by the journal before it closes) if this actor took it
        `snapshot_at_stop_after` events past its load, unless a snapshot every
        `snapshot_every` events has just been taken of it. Nothing changes the state any
        more, so no copy is needed; a state with events not committed is never taken."""
        aggregate = self.aggregate
        if aggregate is None or not self._loaded or getattr(aggregate, "_pending_events", None) \
                or aggregate.version - self._loaded_version < self.snapshot_at_stop_after \
                or aggregate.version % self.snapshot_every == 0:
            return
        self.system.journal.snapshot(Snapshot.take(aggregate))

    def on_stop(self) -> None:
        self._fail_queued("stopped")

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        # An exception escaped on_receive (the handlers catch theirs, so this is a bug in
        # the base class): pykka has logged it and stops the actor without on_stop, and
        # would drop whatever is queued. The next message activates a new actor.
        self._fail_queued("failed")

    def _fail_queued(self, why: str) -> None:
        # Whatever is still queued will not be handled by this actor: say so to each sender
        # (the MQTT gateway then tries the message again, on a new actor).
        while True:
            try:
                envelope = self.actor_inbox.get_nowait()
            except queue.Empty:
                return
            for m in unpacked(envelope.message):
                getattr(m, "reply", NO_REPLY).fail(Unavailable(f"{self.kind} actor {why}"))

    # -- committing ------------------------------------------------------------------
    def commit(self, *, sync: bool = True, urgent: bool = False) -> list[int]:
        """Commit the aggregate's pending events (group commit); return global positions.
        `sync=False` only where nobody is acknowledged on this commit (eventstore/recorders.py);
        `urgent` where an HTTP caller waits on it (written ahead of the journal's queue)."""
        if self.aggregate is None:
            return []
        events = self.aggregate.collect_events()
        if not events:
            return []
        return self._commit_events(events, sync, urgent)

    def _commit_unawaited(self, messages: list[Any]) -> None:
        """Hand the burst's events to the journal and go on, without waiting for the commit
        (nobody is acknowledged on it). The next message waits for it if it is not written
        by then (rarely: a burst takes milliseconds to write, a device reports every few
        seconds). Waited for after all: the burst that reaches the next snapshot (a
        snapshot must never be stored ahead of the log)."""
        events = self.aggregate.collect_events() if self.aggregate is not None else []
        if not events:
            return
        if self._reaches_snapshot(events):
            self._commit_events(events, sync=False)
            return
        try:
            queued = self.system.journal.submit(events, sync=False)
        except JournalClosed:
            self._commit_events(events, sync=False)  # raises Unavailable, as a commit would
            return
        self._unawaited = (queued, messages)
        queued.future.add_done_callback(self._unawaited_done)

    def _unawaited_done(self, future: Future[list[int]]) -> None:
        # On the journal's thread. A failure is dealt with on the actor's own thread before
        # its next message; this one makes sure that comes soon, even for a quiet device.
        if future.exception() is not None:
            try:
                self.actor_ref.tell(_Settle())
            except pykka.ActorDeadError:
                pass  # stopped: _stop settled it

    def _settle_unawaited(self) -> None:
        """Learn how the last unawaited commit went (waiting for it if it is still queued).
        If it failed, nothing of it is in the log: rebuild the state from the log and handle
        its messages again, waiting for the commit this time, so each fails or is refused
        as it would have been then (a conflict is decided again, a value the log cannot
        encode is refused alone, a store that is down loses them: nobody was acknowledged).
        Waited for as long as a commit is (`Journal.TIMEOUT`): a stuck store withdraws it,
        and its messages are lost, not handled again ahead of the message in hand."""
        if self._unawaited is None:
            return
        (queued, messages), self._unawaited = self._unawaited, None
        try:
            self.system.journal.wait(queued)
            return
        except JournalTimeout as exc:
            self.log.warning("actor.unawaited_commit_withdrawn", error=str(exc), messages=len(messages))
            lost: Unavailable | None = Unavailable(f"could not commit: {exc}")
        except Exception as exc:
            (self.log.debug if store_down(exc) else self.log.info)(
                "actor.unawaited_commit_failed", error=repr(exc), messages=len(messages))
            lost = None
        if self._reload_or_unload() and lost is None:
            self._receive_batch(messages, wait=True)
            return
        # Lost (the gateway counts them; QoS 0: nobody waits for an answer).
        error = lost or self._reload_failed()
        for m in messages:
            m.reply.fail(error)

    def _reload_or_unload(self) -> bool:
        """Rebuild from the log after a failed commit; if that fails too (the store is still
        down), forget the state, so that the next message loads again. True if reloaded."""
        try:
            self.reload()
            return True
        except Exception as exc:
            if not store_down(exc):
                self.log.warning("actor.reload_failed", error=repr(exc))
            self.aggregate, self._loaded = None, False
            return False

    def _commit_events(self, events: list[Any], sync: bool, urgent: bool = False) -> list[int]:
        try:
            positions = self.system.journal.commit(events, sync=sync, urgent=urgent)
        except (RecordConflictError, UnencodableValue):
            # Not the store's fault: the caller reloads and decides again (a conflict) or
            # refuses the message (a value the log cannot encode).
            raise
        except Exception as exc:
            # The store failed (down, full, locked): nothing of this is committed. Either
            # way the caller hears Unavailable, so an MQTT message stays unacknowledged and
            # is tried again, never acknowledged as poison.
            self._reload_or_unload()
            raise Unavailable(f"could not commit: {exc}") from exc
        if self._reaches_snapshot(events):
            # Deep copy now, on our thread: the writer stores it later while we move on.
            self.system.journal.snapshot(Snapshot.take(copy.deepcopy(self.aggregate)))
        return positions

    def _reaches_snapshot(self, events: list[Any]) -> bool:
        """Whether these events (the aggregate's last) take it to the next multiple of
        `snapshot_every`, where it is snapshotted."""
        before = events[0].originator_version - 1
        return before // self.snapshot_every != self.aggregate.version // self.snapshot_every


class _Settle:
    """Told by the journal's thread when an unawaited commit failed: the actor deals with it
    (`AggregateActor._settle_unawaited`) now, not only when its device next reports."""


def _acknowledged(message: Any) -> bool:
    """Someone is acknowledged once this message is committed (an MQTT PUBACK, an HTTP
    reply), so a failure is not the end of it: it is tried again."""
    return not isinstance(getattr(message, "reply", NO_REPLY), NoReply)
