"""The base class of a view: create its tables, apply a batch of logged events."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import orjson

from eventstore import LoggedEvent
from projections.db import Cursor, ViewDatabase


class View(ABC):
    name: ClassVar[str]
    schema: ClassVar[Sequence[str]] = ()
    # The event classes this view reads (exact types); the runner passes it only those,
    # in log order, to `apply` and `follow`. None: every event.
    event_types: ClassVar[frozenset[type] | None] = None

    def __init__(self, db: ViewDatabase) -> None:
        self.db = db
        # Set by the runner: the log position this process last committed to the view
        # tables, as long as it knows nobody else wrote them since; None when it does not
        # know (before its first commit, while following another owner). What a view kept
        # in memory from its last commit describes the tables only while this is not None.
        self.tables_at: int | None = None

    def create(self, cur: Cursor) -> None:
        for statement in self.schema:
            if not (self.db.is_postgres and _exists(cur, statement)):
                cur.execute(statement)

    @abstractmethod
    def apply(self, cur: Cursor, events: Sequence[LoggedEvent]) -> None:
        """Apply a batch of logged events to this view's tables, inside `cur`'s transaction.
        Only the process that owns the views calls this."""

    def after_commit(self) -> None:
        """The transaction of the last `apply` committed (it may also roll back, and then
        this is not called): a view may now trust what it kept in memory from it."""

    def follow(self, events: Sequence[LoggedEvent]) -> None:
        """Update this process's in-memory mirror (if the view keeps one) with a batch of
        logged events. Every process calls this, the owner after its commit; it must be
        idempotent, since a process that becomes the owner may follow a batch twice."""


_CREATES = re.compile(r"IF NOT EXISTS (\w+)")


def _exists(cur: Cursor, statement: str) -> bool:
    """Whether what `CREATE ... IF NOT EXISTS name` would create exists. On PostgreSQL that
    statement locks the table even when there is nothing to create (an index: SHARE, which
    holds up every write), so a process starting would hold up the one writing the views
    for as long as its start-up transaction runs."""
    m = _CREATES.search(statement)
    if m is None:
        return False
    cur.execute("SELECT to_regclass(?)", (m.group(1),))
    return cur.fetchone()[0] is not None


def dumps(value: Any) -> str:
    # orjson: 10x faster than json here, and the registry writes one per device per batch.
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def loads(text: str | bytes | None) -> Any:
    return None if text is None else orjson.loads(text)
