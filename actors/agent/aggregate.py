"""The Agent aggregate: a product's configuration and DeviceSpec."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from eventstore import stream_id


class Agent(Aggregate):
    @staticmethod
    def create_id(agent_id: str) -> UUID:
        return stream_id("agent", agent_id)

    @event("Created")
    def __init__(self, agent_id: str, config: dict[str, Any]) -> None:
        self.agent_id = agent_id
        self.config = config
        self.deleted = False
        self.running = True

    @event("Updated")
    def update(self, changes: dict[str, Any]) -> None:
        self.config = {**self.config, **changes}

    @event("Deleted")
    def delete(self) -> None:
        self.deleted = True

    @event("Recreated")
    def recreate(self, agent_id: str, config: dict[str, Any]) -> None:
        """The agent_id was deleted and is taken again: a new agent on the same stream."""
        self.config = config
        self.deleted = False
        self.running = True
