"""Commands for an AgentActor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from actors.ports import NO_REPLY, Reply


@dataclass(frozen=True, slots=True)
class CreateAgent:
    config: dict[str, Any]
    reply: Reply = field(default=NO_REPLY, compare=False)


@dataclass(frozen=True, slots=True)
class UpdateAgent:
    changes: dict[str, Any]
    reply: Reply = field(default=NO_REPLY, compare=False)


@dataclass(frozen=True, slots=True)
class DeleteAgent:
    reply: Reply = field(default=NO_REPLY, compare=False)
