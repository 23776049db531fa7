"""Commands for an AgentActor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from actors.ports import NO_REPLY, Reply


@dataclass(frozen=True, slots=True)
class CreateAgent:
    config: dict[str, Any]
    reply: Reply = field(default=NO_REPLY, compare=False)


# `agent_position`: the `id` of the agent the caller means (the log position of its
# Created or Recreated event), or None for whichever agent has this agent_id now. An agent
# deleted and created again keeps its agent_id (its stream) but gets a new id: a PUT or
# DELETE by the old id, decided on before the agent was recreated, must not reach the new one.


@dataclass(frozen=True, slots=True)
class UpdateAgent:
    changes: dict[str, Any]
    agent_position: int | None = None
    reply: Reply = field(default=NO_REPLY, compare=False)


@dataclass(frozen=True, slots=True)
class DeleteAgent:
    agent_position: int | None = None
    reply: Reply = field(default=NO_REPLY, compare=False)
