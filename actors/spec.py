"""DeviceSpec: what a product's devices can do (commands, telemetry, events).

Format from EMQX Device Agent; older specs say `properties` instead of `telemetry`.
Command parameters are checked with a JSON Schema built from the spec.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Literal

import jsonschema
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from actors.errors import InvalidCommand

ParamType = Literal["string", "number", "integer", "boolean", "object", "array"]


class Parameter(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: ParamType = "string"
    description: str = ""
    required: bool = False
    enum: list[Any] | None = None


class Command(BaseModel):
    model_config = ConfigDict(extra="allow")
    description: str = ""
    parameters: dict[str, Parameter] = Field(default_factory=dict)


class Telemetry(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = "string"
    description: str = ""
    defaultValue: Any = None


class EventDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    description: str = ""
    eventType: Literal["alert", "info"] = "info"
    outputData: dict[str, Any] = Field(default_factory=dict)


class DeviceSpec(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = ""
    description: str = ""
    commands: dict[str, Command] = Field(default_factory=dict)
    telemetry: dict[str, Telemetry] = Field(
        default_factory=dict, validation_alias=AliasChoices("telemetry", "properties")
    )
    events: dict[str, EventDef] = Field(default_factory=dict)

    @cached_property
    def _validators(self) -> dict[str, jsonschema.protocols.Validator]:
        out = {}
        for name, cmd in self.commands.items():
            props = {}
            for p, spec in cmd.parameters.items():
                schema: dict[str, Any] = {"type": spec.type}
                if spec.enum is not None:
                    schema["enum"] = spec.enum
                props[p] = schema
            schema = {
                "type": "object",
                "properties": props,
                "required": [p for p, s in cmd.parameters.items() if s.required],
                "additionalProperties": False,
            }
            out[name] = jsonschema.Draft202012Validator(schema)
        return out

    def check_command(self, command: str, params: dict[str, Any]) -> None:
        """Raise InvalidCommand unless the command exists and its params fit the spec."""
        validator = self._validators.get(command)
        if validator is None:
            known = ", ".join(sorted(self.commands)) or "none"
            raise InvalidCommand(f"unknown command {command!r} (this product's commands: {known})")
        errors = sorted(validator.iter_errors(params), key=lambda e: list(e.path))
        if errors:
            details = "; ".join(
                f"{'.'.join(map(str, e.path)) or 'params'}: {e.message}" for e in errors
            )
            raise InvalidCommand(f"invalid params for {command!r}: {details}")

    def event_type(self, name: str) -> str:
        event = self.events.get(name)
        return event.eventType if event else "info"
