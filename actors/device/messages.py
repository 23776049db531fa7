"""Commands for a DeviceActor (verbs), as the gateways send them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from actors.ports import NO_REPLY, Reply

# The messages every MQTT report becomes are not frozen: a frozen dataclass sets each field
# through object.__setattr__, 1.1 against 0.35 µs per message, on the path each telemetry
# message takes (docs/benchmarks.md). Nothing changes a message once it is sent; the
# others stay frozen.


@dataclass(slots=True)
class ReportTelemetry:
    """A `v1/{p}/{d}/telemetry` message: kind is "status" or "state"."""

    kind: str
    status: str | None
    state: dict[str, Any] | None
    device_ts: int | None
    received_ms: int
    metadata: dict[str, Any] | None = None
    reply: Reply = field(default=NO_REPLY, compare=False)
    # The MQTT payload's length (0: not known), which bounds how much the state can grow
    # by (DeviceActor's state budget).
    payload_bytes: int = field(default=0, compare=False)


@dataclass(slots=True)
class ReportEvent:
    name: str
    data: dict[str, Any]
    device_ts: int | None
    received_ms: int
    metadata: dict[str, Any] | None = None
    reply: Reply = field(default=NO_REPLY, compare=False)


@dataclass(frozen=True, slots=True)
class SendCommand:
    request_id: str
    command: str
    params: dict[str, Any]
    timeout_ms: int
    reply: Reply = field(default=NO_REPLY, compare=False)
    # When the caller asked (monotonic s): time spent in the actor's inbox, or waiting for a
    # slow store, counts against timeout_ms; a command past it is never sent.
    requested_at: float = field(default_factory=time.monotonic, compare=False)


@dataclass(frozen=True, slots=True)
class DeviceResponded:
    """A `/responses` message, matched to its command by requestId."""

    request_id: str
    code: int
    msg: str
    data: Any
    received_ms: int
    reply: Reply = field(default=NO_REPLY, compare=False)


@dataclass(frozen=True, slots=True)
class AnswerRefused:
    """A `/responses` message for a command in flight here that could not be used (a string
    code, say): dropped, and its command still times out, but its 504 then says why."""

    request_id: str
    detail: str


@dataclass(frozen=True, slots=True)
class CommandDeadline:
    request_id: str


@dataclass(frozen=True, slots=True)
class Wake:
    """Only activates the actor: loading re-arms the deadlines of its commands in flight
    (sent at start to the devices the registry says have some). Replies with the version
    it loaded (benchmarks time activations with it)."""

    reply: Reply = field(default=NO_REPLY, compare=False)


@dataclass(frozen=True, slots=True)
class CatchUp:
    """Another process wrote this device's stream (a command it sent): load what it wrote
    and arm the deadlines of its commands, so they time out here should it stop.
    `version` is that event's: an actor that holds it already (it wrote the event itself,
    or loaded it since) has nothing to catch up."""

    version: int


@dataclass(frozen=True, slots=True)
class CommandSettled:
    """The log holds an outcome of this command, perhaps written by another process."""

    request_id: str


@dataclass(frozen=True, slots=True)
class ExpireLiveness:
    """Sent by the liveness sweep: go offline if silent for longer than the window."""

    now_ms: int
    window_ms: int
    reply: Reply = field(default=NO_REPLY, compare=False)
