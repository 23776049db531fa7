"""AgentActor: drives one Agent stream (create, update, delete)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from actors.agent.aggregate import Agent
from actors.agent.config import AgentConfig, validation_errors
from actors.agent.messages import CreateAgent, DeleteAgent, UpdateAgent
from actors.base import AggregateActor, Key
from actors.errors import AgentAlreadyExists, AgentNotFound, InvalidAgent


class AgentActor(AggregateActor):
    kind = "agent"
    # Each is an HTTP request waiting (POST, PUT, DELETE /api/agents).
    urgent = (CreateAgent, UpdateAgent, DeleteAgent)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        # The log position of the live agent's Created/Recreated event (its HTTP `id`), once
        # known: read from the stream when first needed, kept from our own commits.
        self._born_at: int | None = None

    @classmethod
    def stream_id(cls, key: Key) -> UUID:
        return Agent.create_id(key[0])

    def reload(self) -> None:
        super().reload()
        self._born_at = None  # another process may have deleted and recreated it

    def handle_CreateAgent(self, msg: CreateAgent) -> None:
        agent = self.aggregate
        if agent is None:
            self.aggregate = Agent(agent_id=self.key[0], config=msg.config)
        elif agent.deleted:
            agent.recreate(self.key[0], msg.config)
        else:
            raise AgentAlreadyExists("has already been taken")
        self._born_at = self.commit()[-1]
        msg.reply.ok(self._born_at)

    def handle_UpdateAgent(self, msg: UpdateAgent) -> None:
        agent = self._live(msg.agent_position)
        try:
            AgentConfig.updated(agent.config, msg.changes, agent.agent_id)  # still a whole agent
        except Exception as exc:  # checked by the HTTP route too, but against what it read
            raise InvalidAgent(validation_errors(exc)) from exc  # (a concurrent PUT may differ)
        agent.update(msg.changes)
        msg.reply.ok(self.commit()[-1])

    def handle_DeleteAgent(self, msg: DeleteAgent) -> None:
        self._live(msg.agent_position).delete()
        self._born_at = None
        msg.reply.ok(self.commit()[-1])

    def _live(self, position: int | None) -> Agent:
        """The live agent, if it is the one at `position` (any, for None)."""
        if self.aggregate is None or self.aggregate.deleted:
            raise AgentNotFound("Agent not found")
        if position is not None and position != self._birth():
            raise AgentNotFound("Agent not found")  # deleted since, and its agent_id taken again
        return self.aggregate

    def _birth(self) -> int:
        if self._born_at is None:
            # Up to the version we hold: what another process wrote since is found by the
            # version conflict our commit would meet, which reloads (and forgets this).
            stream, born, version, held = self.stream_id(self.key), 0, 0, self.aggregate.version
            while version < held and (page := self.system.log.read_stream_logged(stream, gt=version, limit=500)):
                for logged in page:
                    if logged.version <= held and isinstance(logged.event, (Agent.Created, Agent.Recreated)):
                        born = logged.position
                version = page[-1].version
            self._born_at = born
        return self._born_at
