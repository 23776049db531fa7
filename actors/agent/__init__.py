from actors.agent.actor import AgentActor
from actors.agent.aggregate import Agent
from actors.agent.config import AgentConfig, AgentPatch
from actors.agent.messages import CreateAgent, DeleteAgent, UpdateAgent

__all__ = ["Agent", "AgentActor", "AgentConfig", "AgentPatch", "CreateAgent", "DeleteAgent", "UpdateAgent"]
