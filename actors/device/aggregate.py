"""The Device aggregate: status, last state, pending commands. Events beside their commands.

Each event is a class of its own with one small `apply`, next to the command method that
triggers it. eventsourcing's `@event` decorator would build the same classes from the
method signatures, but it maps arguments to fields and back on every event: 8.1 µs per
telemetry report against 3.4 µs here, on the path every report takes. The class names
and fields are the ones the decorator made, so logs written before read back unchanged.
"""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate, datetime_now_with_tzinfo, event

from eventstore import stream_id

# A device's merged state may grow to this size, as `state_growth` counts it. Without a
# bound, a device sending a new key in every message would grow its state, every snapshot
# of it and its registry row (rewritten on each report) without end. DeviceActor enforces it.
# A device must always be able to report its whole state at once, so any state one MQTT
# message can carry (gateways/mqtt_codec.py MAX_PAYLOAD, 256 KiB of JSON) fits: the count
# is at most 3.8 times the JSON (`"":0,` is 5 bytes and counts 12; `1E15,` in an array is
# 5 and counts 19 as 1000000000000000.0). At 256 KiB a 165 KB message of 15,000 numeric
# keys was refused on a device's first report (found by audit).
MAX_STATE_BYTES = 4 * 256 * 1024

_FLAT = frozenset({int, float, bool, type(None)})
_ABSENT = object()


def value_size(value: Any) -> int:
    """About the size of `value` written as JSON: numbers, true, false and null count 8,
    strings their length plus quotes, arrays and objects their compact JSON."""
    t = type(value)
    if t in _FLAT:
        return 8
    if t is str:
        return len(value) + 2
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str))


def state_growth(state: dict[str, Any], update: dict[str, Any]) -> int:
    """How many bytes (as `value_size` counts them) merging `update` into `state` adds;
    negative if it shrinks. `state_growth({}, state)` is the size of `state`."""
    flat, absent, get = _FLAT, _ABSENT, state.get
    growth = 0
    for key, value in update.items():
        old = get(key, absent)
        t = type(value)
        if t is type(old):  # the usual case, settled without a call
            if t in flat:
                continue
            if t is str:
                growth += len(value) - len(old)
                continue
        if old is absent:
            growth += len(key) + 4 + value_size(value)  # "key": value,
        else:
            growth += value_size(value) - value_size(old)
    return growth


class Device(Aggregate):
    @staticmethod
    def create_id(product_id: str, device_id: str) -> UUID:
        return stream_id("device", product_id, device_id)

    @event("Registered")
    def __init__(self, product_id: str, device_id: str) -> None:
        self.product_id = product_id
        self.device_id = device_id
        self.online = False
        self.state: dict[str, Any] = {}
        self.last_seen_ms = 0
        self.pending: dict[str, dict[str, Any]] = {}

    def _report(self, event_class: type[Aggregate.Event], **fields: Any) -> None:
        """`trigger_event` for the events every MQTT report makes: 1.2 instead of 3.3 µs,
        some 6% of the CPU a report costs. The event is built the way the store builds one
        it reads (eventsourcing's `Mapper.to_domain_event`: `object.__new__` and its
        `__dict__`), not through the frozen dataclass's `__init__`, which sets each field
        by `object.__setattr__` and checks the id is a UUID; and it skips `mutate`'s
        checks of id and version, which hold here by construction. The fields are those
        `__init__` would set, in its order, so the stored bytes are the same
        (tests/actors/test_device_actor.py compares the two ways)."""
        version = self.version + 1
        timestamp = datetime_now_with_tzinfo()
        e = object.__new__(event_class)
        object.__setattr__(e, "__dict__", {"originator_id": self.id, "originator_version": version,
                                           "timestamp": timestamp, **fields})
        e.apply(self)
        self.version = version
        self.modified_on = timestamp
        self._pending_events.append(e)

    # -- telemetry -------------------------------------------------------------------
    def report_status(self, status: str, state: dict[str, Any] | None, device_ts: int | None,
                      received_ms: int, metadata: dict[str, Any] | None) -> None:
        self._report(self.StatusReported, status=status, state=state, device_ts=device_ts,
                     received_ms=received_ms, metadata=metadata)

    class StatusReported(Aggregate.Event):
        status: str
        state: dict[str, Any] | None
        device_ts: int | None
        received_ms: int
        metadata: dict[str, Any] | None

        def apply(self, device: Device) -> None:
            device.online = self.status == "online"
            if self.state:
                device.state = {**device.state, **self.state}
            device.last_seen_ms = self.received_ms

    def report_state(self, state: dict[str, Any], device_ts: int | None, received_ms: int,
                     metadata: dict[str, Any] | None) -> None:
        self._report(self.StateReported, state=state, device_ts=device_ts,
                     received_ms=received_ms, metadata=metadata)

    class StateReported(Aggregate.Event):
        state: dict[str, Any]
        device_ts: int | None
        received_ms: int
        metadata: dict[str, Any] | None

        def apply(self, device: Device) -> None:
            device.state = {**device.state, **self.state}
            device.last_seen_ms = self.received_ms
            # A device that reports state is alive, whatever it said last.
            device.online = True

    def go_silent(self, last_seen_ms: int, window_ms: int) -> None:
        self.trigger_event(self.WentSilent, last_seen_ms=last_seen_ms, window_ms=window_ms)

    class WentSilent(Aggregate.Event):
        last_seen_ms: int
        window_ms: int

        def apply(self, device: Device) -> None:
            device.online = False

    def is_silent(self, now_ms: int, window_ms: int) -> bool:
        return self.online and now_ms - self.last_seen_ms > window_ms

    # -- device events ---------------------------------------------------------------
    def report_event(self, name: str, data: dict[str, Any], device_ts: int | None,
                     received_ms: int, metadata: dict[str, Any] | None) -> None:
        self._report(self.EventReported, name=name, data=data, device_ts=device_ts,
                     received_ms=received_ms, metadata=metadata)

    class EventReported(Aggregate.Event):
        name: str
        data: dict[str, Any]
        device_ts: int | None
        received_ms: int
        metadata: dict[str, Any] | None

        def apply(self, device: Device) -> None:
            device.last_seen_ms = self.received_ms
            device.online = True  # any message: the device is there (after WentSilent too)

    # -- commands --------------------------------------------------------------------
    def send_command(self, request_id: str, command: str, params: dict[str, Any],
                     timeout_ms: int, sent_ms: int) -> None:
        self.trigger_event(self.CommandSent, request_id=request_id, command=command, params=params,
                           timeout_ms=timeout_ms, sent_ms=sent_ms)

    class CommandSent(Aggregate.Event):
        request_id: str
        command: str
        params: dict[str, Any]
        timeout_ms: int
        sent_ms: int

        def apply(self, device: Device) -> None:
            device.pending = {**device.pending, self.request_id: {
                "command": self.command, "sent_ms": self.sent_ms, "timeout_ms": self.timeout_ms}}

    def command_succeeded(self, request_id: str, code: int, msg: str, data: Any, received_ms: int) -> None:
        self.trigger_event(self.CommandSucceeded, request_id=request_id, code=code, msg=msg, data=data,
                           received_ms=received_ms)

    def command_failed(self, request_id: str, code: int, msg: str, data: Any, received_ms: int) -> None:
        self.trigger_event(self.CommandFailed, request_id=request_id, code=code, msg=msg, data=data,
                           received_ms=received_ms)

    class CommandAnswered(Aggregate.Event):
        """The device answered a pending command (its two outcomes below)."""

        request_id: str
        code: int
        msg: str
        data: Any
        received_ms: int

        def apply(self, device: Device) -> None:
            device.pending = {k: v for k, v in device.pending.items() if k != self.request_id}
            device.last_seen_ms = self.received_ms
            device.online = True  # it answered: it is there

    class CommandSucceeded(CommandAnswered):
        pass

    class CommandFailed(CommandAnswered):
        pass

    def command_timed_out(self, request_id: str, timeout_ms: int) -> None:
        self.trigger_event(self.CommandTimedOut, request_id=request_id, timeout_ms=timeout_ms)

    class CommandTimedOut(Aggregate.Event):
        request_id: str
        timeout_ms: int

        def apply(self, device: Device) -> None:
            device.pending = {k: v for k, v in device.pending.items() if k != self.request_id}

    def command_undelivered(self, request_id: str, reason: str) -> None:
        self.trigger_event(self.CommandUndelivered, request_id=request_id, reason=reason)

    class CommandUndelivered(Aggregate.Event):
        """Sent in the log, never handed to the broker (the link went down): it is not
        delivered later either, and the caller was told 503."""

        request_id: str
        reason: str

        def apply(self, device: Device) -> None:
            device.pending = {k: v for k, v in device.pending.items() if k != self.request_id}
