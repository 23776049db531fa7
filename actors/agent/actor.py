"""AgentActor: drives one Agent stream (create, update, delete)."""

from __future__ import annotations

from uuid import UUID

from actors.agent.aggregate import Agent
from actors.agent.config import AgentConfig, validation_errors
from actors.agent.messages import CreateAgent, DeleteAgent, UpdateAgent
from actors.base import AggregateActor, Key
from actors.errors import AgentAlreadyExists, AgentNotFound, InvalidCommand


class AgentActor(AggregateActor):
    kind = "agent"

    @classmethod
    def stream_id(cls, key: Key) -> UUID:
        return Agent.create_id(key[0])

    def handle_CreateAgent(self, msg: CreateAgent) -> None:
        agent = self.aggregate
        if agent is None:
            self.aggregate = Agent(agent_id=self.key[0], config=msg.config)
        elif agent.deleted:
            agent.recreate(self.key[0], msg.config)
        else:
            raise AgentAlreadyExists("has already been taken")
        msg.reply.ok(self.commit()[-1])

    def handle_UpdateAgent(self, msg: UpdateAgent) -> None:
        agent = self._live()
        try:
            AgentConfig.updated(agent.config, msg.changes, agent.agent_id)  # still a whole agent
        except Exception as exc:
            errors = validation_errors(exc)
            raise InvalidCommand("; ".join(f"{k}: {', '.join(v)}" for k, v in errors.items())) from exc
        agent.update(msg.changes)
        msg.reply.ok(self.commit()[-1])

    def handle_DeleteAgent(self, msg: DeleteAgent) -> None:
        self._live().delete()
        msg.reply.ok(self.commit()[-1])

    def _live(self) -> Agent:
        if self.aggregate is None or self.aggregate.deleted:
            raise AgentNotFound("Agent not found")
        return self.aggregate
