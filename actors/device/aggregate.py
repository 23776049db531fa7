"""The Device aggregate: status, last state, pending commands. Events beside their commands."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from eventstore import stream_id


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

    # -- telemetry -------------------------------------------------------------------
    @event("StatusReported")
    def report_status(self, status: str, state: dict[str, Any] | None, device_ts: int | None,
                      received_ms: int, metadata: dict[str, Any] | None) -> None:
        self.online = status == "online"
        if state:
            self.state = {**self.state, **state}
        self.last_seen_ms = received_ms

    @event("StateReported")
    def report_state(self, state: dict[str, Any], device_ts: int | None, received_ms: int,
                     metadata: dict[str, Any] | None) -> None:
        self.state = {**self.state, **state}
        self.last_seen_ms = received_ms
        # A device that reports state is alive, whatever it said last.
        self.online = True

    @event("WentSilent")
    def go_silent(self, last_seen_ms: int, window_ms: int) -> None:
        self.online = False

    def is_silent(self, now_ms: int, window_ms: int) -> bool:
        return self.online and now_ms - self.last_seen_ms > window_ms

    # -- device events ---------------------------------------------------------------
    @event("EventReported")
    def report_event(self, name: str, data: dict[str, Any], device_ts: int | None,
                     received_ms: int, metadata: dict[str, Any] | None) -> None:
        self.last_seen_ms = received_ms

    # -- commands --------------------------------------------------------------------
    @event("CommandSent")
    def send_command(self, request_id: str, command: str, params: dict[str, Any],
                     timeout_ms: int, sent_ms: int) -> None:
        self.pending = {**self.pending, request_id: {"command": command, "sent_ms": sent_ms,
                                                     "timeout_ms": timeout_ms}}

    @event("CommandSucceeded")
    def command_succeeded(self, request_id: str, code: int, msg: str, data: Any,
                          received_ms: int) -> None:
        self.pending = {k: v for k, v in self.pending.items() if k != request_id}
        self.last_seen_ms = received_ms

    @event("CommandFailed")
    def command_failed(self, request_id: str, code: int, msg: str, data: Any,
                       received_ms: int) -> None:
        self.pending = {k: v for k, v in self.pending.items() if k != request_id}
        self.last_seen_ms = received_ms

    @event("CommandTimedOut")
    def command_timed_out(self, request_id: str, timeout_ms: int) -> None:
        self.pending = {k: v for k, v in self.pending.items() if k != request_id}
