"""Agents view: each live agent (product) with its numeric id, config and DeviceSpec.

An agent's numeric `id` is the log position of the event that created it: unique, and
known to every process that follows the log, without a counter to coordinate. The
view also keeps an in-memory mirror, so the MQTT gateway can ask "is this a known
product?" for every message without a query.

Stored specs are read as written (`DeviceSpec.stored`): what an older version accepted
loads, whatever the input rules are now. One that cannot be read at all is logged
(`agents.unreadable_spec`) and its agent has no spec, so it accepts no commands; the
view and the server carry on.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from pydantic import ValidationError

from actors.agent.aggregate import Agent
from actors.spec import DeviceSpec, error_summary
from eventstore import LoggedEvent
from projections.db import Cursor
from projections.view import View, dumps, loads

log = structlog.get_logger(__name__)


@dataclass
class AgentRecord:
    id: int
    agent_id: str
    config: dict[str, Any]
    running: bool
    inserted_at: str
    updated_at: str
    device_spec: DeviceSpec | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.device_spec = stored_spec(self.agent_id, self.config.get("device_spec"))


def stored_spec(agent_id: str, spec: Any) -> DeviceSpec | None:
    """An agent's stored spec, read as written; None (logged) if it cannot be read at all."""
    if not spec:
        return None
    try:
        return DeviceSpec.stored(spec)
    except ValidationError as exc:
        log.warning("agents.unreadable_spec", agent_id=agent_id, reason=error_summary(exc))
        return None


def _iso(ts: datetime) -> str:
    # Whole seconds with Z, as the platform's examples show ("2026-01-01T00:00:00Z").
    return ts.isoformat(timespec="seconds").replace("+00:00", "Z")


class Agents(View):
    name = "agents"
    event_types = frozenset({Agent.Created, Agent.Recreated, Agent.Updated, Agent.Deleted})
    schema = (
        "CREATE TABLE IF NOT EXISTS parley_agents (id BIGINT PRIMARY KEY, agent_id TEXT NOT NULL UNIQUE,"
        " config TEXT NOT NULL, running INTEGER NOT NULL, inserted_at TEXT NOT NULL, updated_at TEXT NOT NULL)",
    )

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._lock = threading.Lock()
        self._by_agent_id: dict[str, AgentRecord] = {}

    def create(self, cur: Cursor) -> None:
        super().create(cur)
        cur.execute("SELECT id, agent_id, config, running, inserted_at, updated_at FROM parley_agents")
        rows = cur.fetchall()
        with self._lock:
            self._by_agent_id = {r[1]: self._record(r) for r in rows}

    def apply(self, cur: Cursor, events: Sequence[LoggedEvent]) -> None:
        # Updated and Deleted do not name their agent, only its stream. Which row they touch
        # is resolved from the table as it stands at that event (this transaction), never
        # from the mirror: a process that takes over goes back to the tables' position while
        # its mirror may already reflect events past it (say the agent's deletion), and then
        # found no agent and skipped the event, leaving a deleted agent in the table. The
        # table has one row per product and these events are rare, so reading its agent ids
        # once per batch that has any costs nothing, needs no stream_id column (no migration
        # of existing databases), and leaves the mirror alone (reloading it at takeover
        # would make a product unknown to the MQTT gateway until the runner caught up).
        streams: dict[Any, str] | None = None  # stream id -> agent id, read at the first need
        for le in events:
            e = le.event
            if isinstance(e, (Agent.Created, Agent.Recreated)):
                at = _iso(e.timestamp)
                cur.execute("DELETE FROM parley_agents WHERE agent_id = ?", (e.agent_id,))
                cur.execute("INSERT INTO parley_agents (id, agent_id, config, running, inserted_at,"
                            " updated_at) VALUES (?, ?, ?, 1, ?, ?)",
                            (le.position, e.agent_id, dumps(e.config), at, at))
                if streams is not None:
                    streams[Agent.create_id(e.agent_id)] = e.agent_id
            elif isinstance(e, (Agent.Updated, Agent.Deleted)):
                if streams is None:
                    cur.execute("SELECT agent_id FROM parley_agents")
                    streams = {Agent.create_id(r[0]): r[0] for r in cur.fetchall()}
                agent_id = streams.get(le.stream_id)
                if agent_id is None:
                    continue
                if isinstance(e, Agent.Deleted):
                    cur.execute("DELETE FROM parley_agents WHERE agent_id = ?", (agent_id,))
                    del streams[le.stream_id]
                    continue
                cur.execute("SELECT config FROM parley_agents WHERE agent_id = ?", (agent_id,))
                row = cur.fetchone()
                if row is None:
                    continue
                cur.execute("UPDATE parley_agents SET config = ?, updated_at = ? WHERE agent_id = ?",
                            (dumps({**loads(row[0]), **e.changes}), _iso(e.timestamp), agent_id))

    def follow(self, events: Sequence[LoggedEvent]) -> None:
        for le in events:
            e = le.event
            if isinstance(e, (Agent.Created, Agent.Recreated)):
                at = _iso(e.timestamp)
                with self._lock:
                    self._by_agent_id[e.agent_id] = AgentRecord(le.position, e.agent_id, e.config, True, at, at)
            elif isinstance(e, (Agent.Updated, Agent.Deleted)):
                agent_id = self._agent_id_of(le)
                if agent_id is None:
                    continue
                with self._lock:
                    if isinstance(e, Agent.Deleted):
                        self._by_agent_id.pop(agent_id, None)
                        continue
                    old = self._by_agent_id[agent_id]
                    self._by_agent_id[agent_id] = AgentRecord(old.id, agent_id, {**old.config, **e.changes},
                                                              old.running, old.inserted_at, _iso(e.timestamp))

    def _agent_id_of(self, le: LoggedEvent) -> str | None:
        """The agent whose stream `le` is on, as the mirror knows it."""
        for agent_id in list(self._by_agent_id):
            if Agent.create_id(agent_id) == le.stream_id:
                return agent_id
        return None

    @staticmethod
    def _record(r: Sequence[Any]) -> AgentRecord:
        return AgentRecord(r[0], r[1], loads(r[2]), bool(r[3]), r[4], r[5])

    # -- queries: from the in-memory mirror, safe from any thread ---------------------
    def get(self, agent_id: str) -> AgentRecord | None:
        return self._by_agent_id.get(agent_id)

    def get_by_id(self, id: int) -> AgentRecord | None:
        return next((r for r in list(self._by_agent_id.values()) if r.id == id), None)

    def list(self) -> list[AgentRecord]:
        return sorted(self._by_agent_id.values(), key=lambda r: r.id)
