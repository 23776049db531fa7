"""An agent's configuration, validated as the platform's agent API documents it.

An agent is a product: its `agent_id` is the `productId` devices use on MQTT, and its
`device_spec` says what those devices can do. Start/stop, MCP tool connections, data
definitions and auth arrive later; their fields are already carried here.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from actors.spec import DeviceSpec

AGENT_ID = re.compile(r"^[A-Za-z0-9_-]+$")


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=255)
    description: str = ""
    transport: Literal["streamable_http", "sse"] = "streamable_http"
    endpoint: str = Field(min_length=1)
    http_headers: dict[str, str] = Field(default_factory=dict)
    enabled: bool = True


class DataDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")
    topic_filter: str = Field(min_length=1)
    description: str = ""
    data_prompts: str = ""
    json_schema: dict[str, Any] = Field(default_factory=dict)
    push_data_analysis_via_voice: bool = False


class _Fields(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=3, max_length=255)
    agent_type: Literal["single", "multi"]
    voice_type: str = Field(max_length=255)
    is_custom_agent: bool
    sys_prompt: str | None = Field(default=None, max_length=2000)
    welcome_message: str | None = Field(default=None, max_length=500)
    custom_agent_endpoint: str | None = None
    custom_agent_http_headers: dict[str, str] = Field(default_factory=dict)
    emqx_config_id: int | None = None
    mqtt_opts: dict[str, Any] = Field(default_factory=dict)
    tools: list[Tool] = Field(default_factory=list)
    data_definitions: list[DataDefinition] = Field(default_factory=list)
    device_spec: DeviceSpec | None = None

    @field_validator("custom_agent_endpoint")
    @classmethod
    def _ws_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("ws://", "wss://")):
            raise ValueError("must start with ws:// or wss://")
        return v


class AgentConfig(_Fields):
    """A whole agent, as created."""

    agent_id: str = Field(min_length=3, max_length=255)

    @field_validator("agent_id")
    @classmethod
    def _agent_id(cls, v: str) -> str:
        if not AGENT_ID.match(v):
            raise ValueError("may contain only letters, digits, underscores and hyphens")
        return v

    @model_validator(mode="after")
    def _custom_endpoint(self) -> "AgentConfig":
        if self.is_custom_agent and not self.custom_agent_endpoint:
            raise ValueError("custom_agent_endpoint: can't be blank for a custom agent")
        return self

    def to_record(self) -> dict[str, Any]:
        """Plain data for the event (msgpack), without unset optional noise."""
        return self.model_dump(mode="json", by_alias=False)


class AgentPatch(BaseModel):
    """An update: only the fields given; `agent_id` cannot change."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, min_length=3, max_length=255)
    agent_type: Literal["single", "multi"] | None = None
    voice_type: str | None = Field(default=None, max_length=255)
    is_custom_agent: bool | None = None
    sys_prompt: str | None = Field(default=None, max_length=2000)
    welcome_message: str | None = Field(default=None, max_length=500)
    custom_agent_endpoint: str | None = None
    custom_agent_http_headers: dict[str, str] | None = None
    emqx_config_id: int | None = None
    mqtt_opts: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    data_definitions: list[DataDefinition] | None = None
    device_spec: DeviceSpec | None = None
    agent_id: str | None = None

    _ws_url = field_validator("custom_agent_endpoint")(_Fields._ws_url.__func__)  # type: ignore[attr-defined]

    def changes(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude_unset=True)
        data.pop("agent_id", None)
        return data


def validation_errors(exc: Exception) -> dict[str, list[str]]:
    """pydantic errors in the agent API's shape: `{field: [message, ...]}`."""
    from pydantic import ValidationError

    out: dict[str, list[str]] = {}
    if isinstance(exc, ValidationError):
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            msg = err["msg"].removeprefix("Value error, ")
            if not loc and ":" in msg:  # model-level rule that names its field
                field, msg = msg.split(":", 1)
                loc, msg = [field.strip()], msg.strip()
            if err["type"] == "missing":
                msg = "can't be blank"
            out.setdefault(".".join(loc) or "agent", []).append(msg)
    else:
        out["agent"] = [str(exc)]
    return out
