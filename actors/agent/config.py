"""An agent's configuration, validated as the platform's agent API documents it.

An agent is a product: its `agent_id` is the `productId` devices use on MQTT, and its
`device_spec` says what those devices can do. Start/stop, MCP tool connections, data
definitions and auth arrive later; their fields are already carried here.

Input from the HTTP API is read strictly (`AgentConfig.model_validate`, `AgentPatch`), with
the few conversions the platform's Ecto cast makes (`as_given`). An agent read back from the
log or the views is read as written (`STORED`, see actors.spec): an older version may have
accepted what input no longer may (`"voice_type": ""`).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Literal, get_args
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from actors.spec import INT_MAX, INT_MIN, STORED, DeviceSpec, is_stored, pydantic_message

AGENT_ID = re.compile(r"[A-Za-z0-9_-]+")  # whole string (fullmatch): `$` would let "id\n" in
# HTTP header names are tokens (RFC 9110 §5.1); values carry no control characters but tab
# (§5.5): a CR or LF in a stored header would split the request Parley sends with it.
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
HEADER_VALUE = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f]*")
REQUIRED = ("agent_id", "name", "agent_type", "voice_type", "is_custom_agent")
# Text fields that are null when not given: blank means not given.
OPTIONAL_TEXT = ("sys_prompt", "welcome_message", "custom_agent_endpoint")
# Fields the server sets and returns: sent back (GET, edit, PUT), they are ignored.
SERVER_SET = ("id", "running", "current_clients", "inserted_at", "updated_at")


# Integers as Ecto's cast reads them from a string (Integer.parse, all of it): ASCII only.
_ECTO_INTEGER = re.compile(r"[+-]?[0-9]+")
_ECTO_BOOLEAN = {"true": True, "1": True, "false": False, "0": False}


@functools.cache
def field_kinds(model: type[BaseModel]) -> tuple[dict[str, Any], dict[str, type]]:
    """What `as_given` needs of a model's fields: the optional ones that do not take null,
    each with its FieldInfo (null given for them means its default), and the fields that are
    booleans or integers (cast from a string as Ecto casts)."""
    defaults: dict[str, Any] = {}
    casts: dict[str, type] = {}
    for name, info in model.model_fields.items():
        types = get_args(info.annotation) or (info.annotation,)
        if not info.is_required() and type(None) not in types:
            defaults[name] = info
        for kind in (bool, int):  # bool first: it is an int too
            if kind in types:
                casts[name] = kind
                break
    return defaults, casts


def as_given(data: Any, required: tuple[str, ...], optional: tuple[str, ...] = (),
             server_set: tuple[str, ...] = (), stored: bool = False,
             model: type[BaseModel] | None = None) -> Any:
    """Read fields the way the platform does (Phoenix/Ecto's changeset casting):
    - in these fields a string that is empty or only whitespace is no value (`null`), and a
      required field without a value is missing: `"voice_type": ""` and `"name": null` are
      both "can't be blank", and a built-in agent's `"custom_agent_endpoint": ""` is no
      endpoint;
    - null for an optional field of `model` is no value too: its default (`"tools": null`
      is `[]`), where the model's type would refuse null;
    - a boolean or integer field of `model` given as a string takes what Ecto's cast takes:
      `"true"`/`"1"` and `"false"`/`"0"`, and whole decimal integers (`"42"`, `"-1"`).
    Stored values are read as written: they keep their blanks (older versions stored them);
    null is still missing."""
    if not isinstance(data, dict):
        return data
    defaults, casts = field_kinds(model) if model is not None and not stored else ({}, {})
    out = {}
    for key, value in data.items():
        if key in server_set:
            continue
        if not stored and isinstance(value, str) and not value.strip() \
                and (key in required or key in optional):
            value = None
        if value is None and key in required:
            continue
        if value is None and key in defaults:
            value = defaults[key].get_default(call_default_factory=True)
        elif isinstance(value, str) and key in casts:
            value = _ecto_cast(value, casts[key])
        out[key] = value
    return out


def _ecto_cast(value: str, kind: type) -> Any:
    """`value` as Ecto casts a string to `kind`, or unchanged (then refused by its type)."""
    if kind is bool:
        return _ECTO_BOOLEAN.get(value, value)
    if _ECTO_INTEGER.fullmatch(value) and len(value) <= 21:  # (no 10,000-digit int())
        number = int(value)
        if INT_MIN <= number <= INT_MAX:  # what the log can store, as for a JSON integer
            return number
    return value


def unknown_fields(data: Any, model: type[BaseModel]) -> list[str]:
    """The fields of `data` that `model` does not know and ignores (as Ecto's cast does)."""
    if not isinstance(data, dict):
        return []
    return [k for k in data if k not in model.model_fields and k not in SERVER_SET]


def check_headers(headers: dict[str, str] | None, info: ValidationInfo) -> dict[str, str] | None:
    if headers and not is_stored(info):
        for name, value in headers.items():
            if not HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is no HTTP header name (letters, digits and !#$%&'*+.^_`|~-)")
            if not HEADER_VALUE.fullmatch(value):
                raise ValueError(f"the value of {name!r} has a control character (CR, LF, ...)")
    return headers


def check_url(url: str | None, schemes: tuple[str, ...], info: ValidationInfo) -> str | None:
    """A URL Parley can connect to later: one of `schemes` and a host."""
    if url is not None and not is_stored(info):
        parsed = urlparse(url)
        if parsed.scheme not in schemes or not parsed.hostname:
            raise ValueError(f"must be a {' or '.join(s + '://' for s in schemes)} URL with a host")
    return url


# Tools and data definitions an agent may have: checking 100,000 of them (a 400 KB body)
# took the HTTP loop 1.2 s; pydantic refuses a longer list before it checks its items.
MAX_ITEMS = 128


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str = Field(min_length=1, max_length=255)
    description: str = ""
    transport: Literal["streamable_http", "sse"] = "streamable_http"
    endpoint: str = Field(min_length=1)
    http_headers: dict[str, str] = Field(default_factory=dict)
    enabled: bool = True

    @model_validator(mode="before")
    @classmethod
    def _given(cls, data: Any, info: ValidationInfo) -> Any:
        return as_given(data, ("name", "endpoint"), server_set=("status",),  # status: the server's
                        stored=is_stored(info), model=cls)

    _headers = field_validator("http_headers")(check_headers)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str, info: ValidationInfo) -> str:
        return check_url(v, ("http", "https"), info) or v


class DataDefinition(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    topic_filter: str = Field(min_length=1)
    description: str = ""
    data_prompts: str = ""
    json_schema: dict[str, Any] = Field(default_factory=dict)
    push_data_analysis_via_voice: bool = False

    @model_validator(mode="before")
    @classmethod
    def _given(cls, data: Any, info: ValidationInfo) -> Any:
        return as_given(data, ("topic_filter",), stored=is_stored(info), model=cls)


class _Fields(BaseModel):
    # strict: JSON types as documented; "is_custom_agent": "yes" is refused, not guessed
    # (as_given casts the strings Ecto would). Unknown fields are ignored, as Ecto's cast
    # ignores what it is not told to take; the HTTP route logs them.
    model_config = ConfigDict(extra="ignore", strict=True)
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
    tools: list[Tool] = Field(default_factory=list, max_length=MAX_ITEMS)
    data_definitions: list[DataDefinition] = Field(default_factory=list, max_length=MAX_ITEMS)
    device_spec: DeviceSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _given(cls, data: Any, info: ValidationInfo) -> Any:
        return as_given(data, REQUIRED, OPTIONAL_TEXT, SERVER_SET, stored=is_stored(info), model=cls)

    @field_validator("custom_agent_endpoint")
    @classmethod
    def _ws_url(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and not v.startswith(("ws://", "wss://")):
            raise ValueError("must start with ws:// or wss://")
        return check_url(v, ("ws", "wss"), info)

    _headers = field_validator("custom_agent_http_headers")(check_headers)

    @field_validator("tools")
    @classmethod
    def _tool_names(cls, v: list[Tool] | None, info: ValidationInfo) -> list[Tool] | None:
        # A model calls a tool by its name: two of one name could never both be called.
        seen: set[str] = set()
        for tool in v or ():
            if tool.name in seen and not is_stored(info):
                raise ValueError(f"two tools are named {tool.name!r}")
            seen.add(tool.name)
        return v


class AgentConfig(_Fields):
    """A whole agent, as created."""

    agent_id: str = Field(min_length=3, max_length=255)

    @field_validator("agent_id")
    @classmethod
    def _agent_id(cls, v: str, info: ValidationInfo) -> str:
        # An agent_id is never changed, so a stored one stays (before fullmatch, "id\n" got in).
        if not is_stored(info) and not AGENT_ID.fullmatch(v):
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

    @classmethod
    def updated(cls, stored: dict[str, Any], changes: dict[str, Any], agent_id: str) -> "AgentConfig":
        """The agent after an update, which must still be whole (a custom agent keeps its
        endpoint, a required field set to null is "can't be blank"). `changes` are input,
        checked strictly (`AgentPatch`); the rest is the stored agent, read as written, so
        an agent an older version accepted can still be updated."""
        changes = AgentPatch.model_validate(changes).changes()
        return cls.model_validate({**stored, **changes, "agent_id": agent_id},
                                  strict=False, context=STORED)


class AgentPatch(BaseModel):
    """An update: only the fields given; `agent_id` cannot change. A required field given
    as null or blank stays in the patch, so the merged agent reports it as blank."""

    model_config = ConfigDict(extra="ignore", strict=True)
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
    tools: list[Tool] | None = Field(default=None, max_length=MAX_ITEMS)
    data_definitions: list[DataDefinition] | None = Field(default=None, max_length=MAX_ITEMS)
    device_spec: DeviceSpec | None = None
    agent_id: str | None = None

    _ws_url = field_validator("custom_agent_endpoint")(_Fields._ws_url.__func__)  # type: ignore[attr-defined]
    _headers = field_validator("custom_agent_http_headers")(check_headers)
    _tool_names = field_validator("tools")(_Fields._tool_names.__func__)  # type: ignore[attr-defined]

    @model_validator(mode="before")
    @classmethod
    def _given(cls, data: Any) -> Any:
        # Required fields stay when blank (as null): the merged agent reports them.
        return as_given(data, (), REQUIRED + OPTIONAL_TEXT, SERVER_SET, model=_Fields)

    def changes(self) -> dict[str, Any]:
        # The fields given, each dumped whole: `exclude_unset` would also leave out the
        # defaults inside a given tool or spec, which then read back other than created.
        data = self.model_dump(mode="json", include=self.model_fields_set)
        data.pop("agent_id", None)
        return data


# At most this many messages in a 422: a 400 KB body of 100,000 empty tools made a response
# of 8 MB (and a log line as long) with one message per missing field.
MAX_ERRORS = 20


def validation_errors(exc: Exception) -> dict[str, list[str]]:
    """pydantic errors in the agent API's shape: `{field: [message, ...]}`, the first
    MAX_ERRORS of them (and under `agent`, how many more there were)."""
    from pydantic import ValidationError

    out: dict[str, list[str]] = {}
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False, include_input=False)
        for err in errors[:MAX_ERRORS]:
            loc = [str(p) for p in err["loc"]]
            msg = pydantic_message(err).removeprefix("Value error, ")
            field, colon, rest = msg.partition(":")
            if err["type"] == "value_error" and colon and field.isidentifier():
                # A model-level rule that names its field (`commands: a command needs a
                # name` inside device_spec): reported under that field's path.
                loc, msg = [*loc, field], rest.strip()
            if err["type"] == "missing":
                msg = "can't be blank"
            out.setdefault(".".join(loc) or "agent", []).append(msg)
        if len(errors) > MAX_ERRORS:
            out.setdefault("agent", []).append(f"and {len(errors) - MAX_ERRORS} more errors not shown")
    else:
        out["agent"] = [str(exc)]
    return out
