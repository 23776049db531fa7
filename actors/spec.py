"""DeviceSpec: what a product's devices can do (commands, telemetry, events).

Format from EMQX Device Agent; older specs say `properties` instead of `telemetry`.
Command parameters are checked with a JSON Schema built from the spec.

Two readings: input (the HTTP API) is checked strictly, `DeviceSpec.model_validate(data)`;
a spec read back from the log or the views was checked by whichever version wrote it, and
is loaded as written, `DeviceSpec.stored(data)`: lax types and none of the input rules, so
an older version's spec never stops a newer server (a command is still checked against
whatever the spec allows).
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any, Literal

import jsonschema
from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler,
                      ValidationError, ValidationInfo, model_serializer, model_validator)

from actors.errors import InvalidCommand

ParamType = Literal["string", "number", "integer", "boolean", "object", "array"]
# JSON types as they arrive: "required": "yes" is refused, not read as true.
STRICT = ConfigDict(extra="allow", strict=True)
# The integers the log can store: msgpack's int64 and uint64 (as gateways/json_input.py).
INT_MIN, INT_MAX = -(2**63), 2**64 - 1
# The validation context of stored data (with strict=False): input rules do not apply.
STORED: dict[str, Any] = {"stored": True}


def is_stored(info: ValidationInfo) -> bool:
    """Whether this validation reads stored data (see STORED) rather than input."""
    return isinstance(info.context, dict) and bool(info.context.get("stored"))


def json_text(value: Any, limit: int = 100) -> str:
    """A value for a message, as JSON writes it (true, null, not Python's True, None);
    strings quoted as before ('hot'); cut at `limit` characters."""
    if isinstance(value, str):
        text = repr(value)
    elif isinstance(value, list):
        text = "[" + ", ".join(json_text(v, limit) for v in value) + "]"
    else:
        text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "…"


def schema_message(error: jsonschema.ValidationError) -> str:
    """jsonschema's message, with the value as JSON writes it: its own reads
    `True is not of type 'number'` for `true`."""
    if error.validator == "type":
        types = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        return f"{json_text(error.instance)} is not of type {', '.join(map(repr, types))}"
    if error.validator == "enum":
        return f"{json_text(error.instance)} is not one of {json_text(error.validator_value, 300)}"
    python = repr(error.instance)
    if error.message.startswith(python):
        return json_text(error.instance) + error.message[len(python):]
    return error.message


# pydantic's messages that name Python types or our classes ("a valid dictionary or
# instance of Tool"): said as the JSON a client sends.
_PYDANTIC_MESSAGES = {"model_type": "Input should be a JSON object",
                      "dict_type": "Input should be a JSON object",
                      "list_type": "Input should be a JSON array"}


def pydantic_message(error: Any) -> str:
    """One of pydantic's `errors()` entries, its message in JSON's words."""
    if error["type"] == "too_long" and "max_length" in error.get("ctx", {}):
        # pydantic's says "List should have at most 128 items after validation, not 300"
        return f"Input should have at most {error['ctx']['max_length']} items, not {error['ctx']['actual_length']}"
    return _PYDANTIC_MESSAGES.get(error["type"], error["msg"])


def error_summary(exc: ValidationError, limit: int = 1000) -> str:
    """pydantic's errors on one line, `path: message; ...`, cut at `limit` characters."""
    text = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {pydantic_message(e)}" for e in exc.errors())
    return text if len(text) <= limit else text[:limit] + "…"


class Parameter(BaseModel):
    model_config = STRICT
    type: ParamType = "string"
    description: str = ""
    required: bool = False
    enum: list[Any] | None = None  # `enum?` in the format: absent unless given

    @model_validator(mode="after")
    def _enum_fits_type(self, info: ValidationInfo) -> "Parameter":
        # A value of another type could never pass check_command: the command would be
        # unusable. Say so when the spec is written, not when a device is commanded.
        # (Stored specs from before this rule may have such values; they never match.)
        if is_stored(info):
            return self
        if self.enum is not None and not self.enum:
            raise ValueError("enum lists no value: no call could ever pass")
        for value in self.enum or ():
            if not jsonschema.Draft202012Validator({"type": self.type}).is_valid(value):
                raise ValueError(f"enum value {json_text(value)} is not of type {self.type}")
        return self

    @model_serializer(mode="wrap")
    def _without_absent_enum(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data.get("enum") is None:
            data.pop("enum", None)  # a spec reads back as it was written
        return data


class Command(BaseModel):
    model_config = STRICT
    description: str = ""
    parameters: dict[str, Parameter] = Field(default_factory=dict)


class Telemetry(BaseModel):
    model_config = STRICT
    type: str = "string"
    description: str = ""
    defaultValue: Any = None


class EventDef(BaseModel):
    model_config = STRICT
    description: str = ""
    eventType: Literal["alert", "info"] = "info"
    outputData: dict[str, Any] = Field(default_factory=dict)


class DeviceSpec(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)
    name: str = ""
    description: str = ""
    commands: dict[str, Command] = Field(default_factory=dict)
    telemetry: dict[str, Telemetry] = Field(
        default_factory=dict, validation_alias=AliasChoices("telemetry", "properties")
    )
    events: dict[str, EventDef] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _one_telemetry(cls, data: Any, info: ValidationInfo) -> Any:
        # A stored spec with both (older versions kept `properties` as an extra field)
        # reads `telemetry`, and keeps `properties` as written.
        if not is_stored(info) and isinstance(data, dict) and "telemetry" in data and "properties" in data:
            raise ValueError("give telemetry or properties (its older name), not both")
        if not is_stored(info) and isinstance(data, dict) and isinstance(data.get("commands"), dict):
            # HTTP refuses an empty command name: a command named so could never be sent.
            if any(not name.strip() for name in data["commands"] if isinstance(name, str)):
                raise ValueError("commands: a command needs a name")
        return data

    @classmethod
    def stored(cls, data: Any) -> "DeviceSpec":
        """A spec read back from the log or the views, loaded as written. Raises
        ValidationError only for data no version of Parley could have stored."""
        return cls.model_validate(data, strict=False, context=STORED)

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

    def as_sent(self, command: str, params: dict[str, Any]) -> dict[str, Any]:
        """The params of a checked command as the device gets them: an integer parameter
        given as a whole float (JSON Schema takes 2.0 as an integer) is sent as 2, which a
        device that reads it into an int can parse."""
        cmd = self.commands.get(command)
        if cmd is None:
            return params
        return {name: int(value) if isinstance(value, float) and value.is_integer()
                and name in cmd.parameters and cmd.parameters[name].type == "integer" else value
                for name, value in params.items()}

    def check_command(self, command: str, params: dict[str, Any]) -> None:
        """Raise InvalidCommand unless the command exists and its params fit the spec."""
        validator = self._validators.get(command)
        if validator is None:
            known = ", ".join(sorted(self.commands)) or "none"
            # A client's name, maybe huge: the message (and its log line) shows 100 characters.
            name = command if len(command) <= 100 else command[:100] + "…"
            raise InvalidCommand(f"unknown command {name!r} (this product's commands: {known})")
        errors = sorted(validator.iter_errors(params), key=lambda e: list(e.path))
        if errors:
            details = "; ".join(
                f"{'.'.join(map(str, e.path)) or 'params'}: {schema_message(e)}" for e in errors
            )
            raise InvalidCommand(f"invalid params for {command!r}: {details}")
        for name, value in params.items():
            # JSON Schema takes 1e20 as an integer, and `as_sent` sends it as one: beyond
            # msgpack's 64 bits the log could not store the command (a 500, before this).
            if isinstance(value, float) and value.is_integer() and not INT_MIN <= value <= INT_MAX \
                    and self.commands[command].parameters[name].type == "integer":
                raise InvalidCommand(f"invalid params for {command!r}: {name}: {value:g} is beyond the "
                                     "64-bit integers a command can carry")

    def event_type(self, name: str) -> str:
        event = self.events.get(name)
        return event.eventType if event else "info"
