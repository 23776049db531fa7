"""The shape every actor kind shares: load from the log, decide, commit, reply.

A subclass names its aggregate class and a `handle_<Message>` method per message type.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, ClassVar
from uuid import UUID

import pykka
import structlog
from eventsourcing.domain import Snapshot
from eventsourcing.persistence import RecordConflictError

from actors.errors import ActorCrashed, ParleyError, Unavailable
from actors.ports import NO_REPLY

if TYPE_CHECKING:
    from actors.system import ActorSystem, Lease

log = structlog.get_logger(__name__)

Key = tuple[str, ...]


class AggregateActor(pykka.ThreadingActor):
    """One actor per stream. Handles one message at a time, on its own thread."""

    kind: ClassVar[str]
    snapshot_every: ClassVar[int] = 100
    max_conflict_retries: ClassVar[int] = 3

    def __init__(self, system: ActorSystem, key: Key, lease: Lease) -> None:
        super().__init__()
        self.system = system
        self.key = key
        self.lease = lease
        self.aggregate: Any | None = None
        self.log = log.bind(actor=self.kind, key=":".join(key))

    @classmethod
    def stream_id(cls, key: Key) -> UUID:
        raise NotImplementedError(f"{cls.__name__} must say which stream it drives")

    def on_start(self) -> None:
        self.reload()

    def reload(self) -> None:
        """(Re)build state from the latest snapshot plus the tail of the stream."""
        self.aggregate = self.system.log.load(self.stream_id(self.key))

    def on_receive(self, message: Any) -> Any:
        self.lease.touch()
        handler = getattr(self, "handle_" + type(message).__name__, None)
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
                self.log.info("actor.version_conflict", attempt=attempt)
                self.reload()
            except Exception as exc:
                # Supervision: the command that crashed gets an error reply; state is rebuilt
                # from the log so nothing half-applied survives.
                self.log.exception("actor.crashed", message=type(message).__name__)
                reply.fail(ActorCrashed(f"{self.kind} failed on {type(message).__name__}: {exc}"))
                self._restart()
                return None
        reply.fail(ActorCrashed("too many version conflicts"))
        return None

    def _discard_pending(self) -> None:
        if self.aggregate is not None and getattr(self.aggregate, "_pending_events", None):
            self.reload()

    def _restart(self) -> None:
        try:
            self.reload()
            self.on_restarted()
        except Exception:
            self.log.exception("actor.restart_failed")
            self.stop()

    def on_restarted(self) -> None:
        """Hook for kinds that hold runtime state besides the aggregate."""

    def commit(self) -> list[int]:
        """Commit the aggregate's pending events (group commit); return global positions."""
        if self.aggregate is None:
            return []
        events = self.aggregate.collect_events()
        if not events:
            return []
        try:
            positions = self.system.journal.commit(events)
        except RecordConflictError:
            raise
        except Exception as exc:
            self.reload()
            raise Unavailable(f"could not commit: {exc}") from exc
        before = events[0].originator_version - 1
        if before // self.snapshot_every != self.aggregate.version // self.snapshot_every:
            # Deep copy now, on our thread: the writer stores it later while we move on.
            self.system.journal.snapshot(Snapshot.take(copy.deepcopy(self.aggregate)))
        return positions
