"""DeviceActor: drives one Device stream. Telemetry, events, and the command lifecycle
(sent -> succeeded / failed / timed out), each committed before it is acknowledged."""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

import structlog

from actors.base import AggregateActor, Key
from actors.device.aggregate import MAX_STATE_BYTES, Device, state_growth
from actors.device.messages import (
    AnswerRefused,
    CatchUp,
    CommandDeadline,
    CommandSettled,
    DeviceResponded,
    ExpireLiveness,
    ReportEvent,
    ReportTelemetry,
    SendCommand,
    Wake,
)
from actors.errors import CommandTimedOut, DeviceNotFound, DeviceOffline, StateTooLarge, Unavailable
from actors.log_throttle import LogThrottle
from actors.ports import Reply
from actors.scheduler import Timer


def now_ms() -> int:
    return int(time.time() * 1000)


def command_result(request_id: str, command: str | None, code: int, msg: str, data: Any) -> dict[str, Any]:
    """What a command's caller gets when the device answered (the HTTP 200 body)."""
    return {"requestId": request_id, "command": command, "code": code, "msg": msg, "data": data}


# A request id in a log line: a device may send one of any length (an audit's 200,000
# characters made one line of 200 KB).
REQUEST_ID_SHOWN = 200


def timed_out(request_id: str, timeout_ms: int, refused: str | None = None) -> CommandTimedOut:
    why = f" (an answer to it was dropped as malformed: {refused})" if refused else ""
    return CommandTimedOut(f"device did not answer {request_id} within {timeout_ms} ms{why}")


class DeviceActor(AggregateActor):
    kind = "device"
    # Device reports are folded: a burst of telemetry waiting in the inbox is one commit.
    batchable = (ReportTelemetry, ReportEvent)
    # Pinned from the tell: a command must not meet an eviction before its waiter pins it.
    pinning = (SendCommand,)
    # An HTTP caller waits on it: after a restart, its actor loads before those of reports.
    urgent = (SendCommand,)
    # A device's answer: the MQTT gateway's thread commits it itself when the actor and the
    # journal are idle, and wakes the HTTP caller from there.
    run_here = (DeviceResponded,)
    # Answers nobody waits for, logged the first time per device, then once a minute with how
    # many were left out (a device repeating stale answers could fill the log). Shared by
    # the class: a device's actor may be passivated and started again meanwhile.
    unmatched_logged = LogThrottle(60.0)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        # request_id -> the HTTP caller, its deadline, the link's handle of the publish
        self.waiters: dict[str, tuple[Reply, Timer, Any]] = {}
        # request_id -> the deadline armed for a command pending in the log, ours or not
        self.deadlines: dict[str, Timer] = {}
        # request_id -> why its device's answer was dropped (said in the caller's 504)
        self.refused: dict[str, str] = {}
        # At most how large the state has become since it was last measured (None: not
        # measured since loading). See _admit_state.
        self._state_bound: int | None = None

    @classmethod
    def stream_id(cls, key: Key) -> UUID:
        product_id, device_id = key
        return Device.create_id(product_id, device_id)

    def reload(self) -> None:
        super().reload()
        self._state_bound = None
        self._arm_pending()

    def on_loaded(self) -> None:
        self._arm_pending()

    def _arm_pending(self) -> None:
        """Every command pending in the log gets its timeout event, however the actor
        learned of it: commands in flight when the previous actor (or process) ended, and
        commands another process sent (found by any reload: a version conflict, catching
        up), which time out here should that process stop."""
        if self.aggregate is not None:
            for request_id, p in self.aggregate.pending.items():
                if request_id not in self.deadlines:
                    remaining = p["sent_ms"] + p["timeout_ms"] - now_ms()
                    self._arm_deadline(request_id, max(remaining, 0) / 1000)

    def _device(self) -> Device:
        if self.aggregate is None:
            self.aggregate = Device(product_id=self.key[0], device_id=self.key[1])
        return self.aggregate

    # Each JSON byte of a report adds at most this many to the state's size as value_size
    # counts it (a number of one digit counts 8; a key, a string or an object no more than
    # its JSON; a float's repr may be 4.5 times the text it was parsed from).
    GROWTH_PER_PAYLOAD_BYTE = 8

    def _admit_state(self, update: dict[str, Any] | None, payload_bytes: int) -> None:
        """Refuse a report whose state would grow the device's past MAX_STATE_BYTES; one
        that keeps it the same size or shrinks it is taken even if it is over already.
        Measuring costs a pass over the state, so it is done only when the reports since
        the last measure may, by their payloads' lengths, have taken the state near the
        bound: for most devices once in hundreds of reports (measuring every report
        cost ingest 1 µs of CPU per message)."""
        if not update:
            return
        bound = self._state_bound
        if bound is not None and payload_bytes:
            bound += payload_bytes * self.GROWTH_PER_PAYLOAD_BYTE
            if bound <= MAX_STATE_BYTES:
                self._state_bound = bound
                return
        # Not self._device(): a refused first report must not register the device either.
        state = self.aggregate.state if self.aggregate is not None else {}
        size = state_growth({}, state)
        growth = state_growth(state, update)
        if growth > 0 and size + growth > MAX_STATE_BYTES:
            self._state_bound = size
            advice = (f"report changed values under the keys it has ({len(state)}), not new keys "
                      f"each time" if state else "no message can carry that much")
            raise StateTooLarge(f"device state would grow to about {size + growth} bytes, over the "
                                f"limit of {MAX_STATE_BYTES}: {advice}")
        self._state_bound = size + growth

    # Batchable: these only apply events (or refuse, before any); the base class commits
    # the burst and replies.
    def handle_ReportTelemetry(self, msg: ReportTelemetry) -> None:
        self._admit_state(msg.state, msg.payload_bytes)
        device = self._device()
        if msg.kind == "status":
            device.report_status(msg.status, msg.state, msg.device_ts, msg.received_ms, msg.metadata)
        else:
            device.report_state(msg.state or {}, msg.device_ts, msg.received_ms, msg.metadata)

    def handle_ReportEvent(self, msg: ReportEvent) -> None:
        self._device().report_event(msg.name, msg.data, msg.device_ts, msg.received_ms, msg.metadata)

    def handle_ExpireLiveness(self, msg: ExpireLiveness) -> None:
        device = self.aggregate
        if device is not None and device.is_silent(msg.now_ms, msg.window_ms):
            device.go_silent(device.last_seen_ms, msg.window_ms)
            self.commit(sync=False)  # derived from silence; nobody is acknowledged
            self.log.info("device.went_silent", last_seen_ms=device.last_seen_ms)
        msg.reply.ok()

    def handle_SendCommand(self, msg: SendCommand) -> None:
        device = self.aggregate
        if device is None:
            raise DeviceNotFound(f"device {self.key[1]!r} not found in product {self.key[0]!r}")
        if not device.online:
            raise DeviceOffline(f"device {self.key[1]!r} is offline")
        link = self.system.device_link
        if link is None or not link.connected:
            # Refused before anything is written: 503, and nothing reaches the device later.
            raise Unavailable("no MQTT link to devices: the broker is not connected")
        if self._time_left(msg) <= 0:
            # It waited out its whole timeout in line (a slow store, a busy actor): its
            # caller has had its 504; sent now, a device would act on it unasked.
            raise CommandTimedOut(f"{msg.request_id} waited {msg.timeout_ms} ms in line and was not sent")
        sent = now_ms()
        device.send_command(msg.request_id, msg.command, msg.params, msg.timeout_ms, sent)
        # Written before publishing (a crash of the process cannot lose it), but not
        # flushed: the result's commit flushes both before the HTTP caller hears anything.
        self.commit(sync=False, urgent=True)
        left = self._time_left(msg)
        if left <= 0:  # the write itself took that long: close the command unsent
            self._close_unsent(msg.request_id, "its timeout passed before it could be sent")
            raise CommandTimedOut(f"{msg.request_id} was not sent: the store took longer than "
                                  f"its timeout of {msg.timeout_ms} ms")
        # Arm before publishing: a fast device must find the waiter in place.
        deadline = self._arm_deadline(msg.request_id, left)
        self.waiters[msg.request_id] = (msg.reply, deadline, None)
        self.system.inflight[msg.request_id] = self.key
        self.lease.pin()
        try:
            handle = link.publish_command(device.product_id, device.device_id, {
                "cmd": msg.command, "params": msg.params, "requestId": msg.request_id, "ts": sent,
            })
        except Unavailable as exc:
            # The link went down between the check above and now: close the command in
            # the log, so nobody waits for an answer that cannot come.
            self._take_waiter(msg.request_id)
            self._close_unsent(msg.request_id, str(exc))
            raise
        # Nothing can have answered it meanwhile: answers come through this thread.
        self.waiters[msg.request_id] = (msg.reply, deadline, handle)

    def _close_unsent(self, request_id: str, reason: str) -> None:
        """Record that a command in the log never went to the broker, and never will."""
        self.aggregate.command_undelivered(request_id, reason)
        self.commit(urgent=True)  # its caller waits

    def joins_commit(self, message: Any) -> bool:
        # A device's answer to a command this process waits on, right behind the reports the
        # device sent before answering (the generated SDK sends its state first): one commit.
        # Pending in the log too: an answer the actor does not know would make its handler
        # catch up with the log, and that reload would drop the reports' pending events.
        return isinstance(message, DeviceResponded) and self.aggregate is not None \
            and message.request_id in self.aggregate.pending and message.request_id in self.waiters

    def handle_DeviceResponded(self, msg: DeviceResponded) -> None:
        device = self.aggregate
        if device is None or msg.request_id not in device.pending:
            # Another process sharing the log may have sent it (a shared subscription
            # gave us its answer): catch up with the log before calling it unmatched.
            self.catch_up()
            device = self.aggregate
        if device is None or msg.request_id not in device.pending:
            fields = self.unmatched_logged.admit(self.key)
            if fields is not None:
                self.log.warning("device.response_unmatched", request_id=msg.request_id[:REQUEST_ID_SHOWN],
                                 code=msg.code, **fields)
            msg.reply.ok(None)
            return
        command = device.pending[msg.request_id]["command"]
        if msg.code == 0:
            device.command_succeeded(msg.request_id, msg.code, msg.msg, msg.data, msg.received_ms)
        else:
            device.command_failed(msg.request_id, msg.code, msg.msg, msg.data, msg.received_ms)
        positions = self.commit(urgent=msg.request_id in self.waiters)  # a caller here waits
        result = command_result(msg.request_id, command, msg.code, msg.msg, msg.data)
        waiter = self._take_waiter(msg.request_id)
        # The HTTP caller is woken last: once this thread is done with the message (`later`),
        # and after the MQTT ack, though nobody waits on that. Woken earlier, the HTTP loop
        # writing the response and this thread took turns at the GIL (bench.ab, per command:
        # the ack first 0.11 ms sooner; `later` another 0.09 ms, the median of nine rounds).
        msg.reply.ok(positions[-1])
        if waiter is not None:
            self.later(waiter.ok, result)

    def handle_AnswerRefused(self, msg: AnswerRefused) -> None:
        if msg.request_id in self.waiters:  # else settled meanwhile, or not ours to answer
            self.refused[msg.request_id] = msg.detail

    def handle_Wake(self, msg: Wake) -> None:
        # Activated: on_loaded has armed the deadlines.
        msg.reply.ok(self.aggregate.version if self.aggregate is not None else None)

    def handle_CatchUp(self, msg: CatchUp) -> None:
        if self.aggregate is None or self.aggregate.version < msg.version:
            self.reload()  # arms the deadline of what it finds pending
        # Else a reload since (a version conflict, say) brought the command in and armed it.

    def handle_CommandSettled(self, msg: CommandSettled) -> None:
        if msg.request_id in self.waiters:
            self.reload()  # what another process wrote
            if self.aggregate is None or msg.request_id not in self.aggregate.pending:
                self._settle_from_log(msg.request_id)

    def handle_CommandDeadline(self, msg: CommandDeadline) -> None:
        self.deadlines.pop(msg.request_id, None)
        device = self.aggregate
        if device is None or msg.request_id not in device.pending:
            # Settled meanwhile, perhaps by another process (then a version conflict
            # brought us here after a reload): its caller gets that outcome.
            if msg.request_id in self.waiters:
                self._settle_from_log(msg.request_id)
            return
        timeout_ms = device.pending[msg.request_id]["timeout_ms"]
        entry = self.waiters.get(msg.request_id)
        if entry is not None and entry[2] is not None and self.system.device_link is not None:
            self.system.device_link.withdraw(entry[2])  # expired: not sent after a reconnect
        device.command_timed_out(msg.request_id, timeout_ms)
        self.commit(urgent=msg.request_id in self.waiters)  # a caller here waits for its 504
        self.log.info("device.command_timed_out", request_id=msg.request_id, timeout_ms=timeout_ms)
        refused = self.refused.get(msg.request_id)
        waiter = self._take_waiter(msg.request_id)
        if waiter is not None:
            waiter.fail(timed_out(msg.request_id, timeout_ms, refused))

    @staticmethod
    def _time_left(msg: SendCommand) -> float:
        """Seconds of the command's timeout not yet spent since its caller asked."""
        return msg.timeout_ms / 1000 - (time.monotonic() - msg.requested_at)

    def _arm_deadline(self, request_id: str, delay: float) -> Timer:
        system, key = self.system, self.key
        context = structlog.contextvars.get_contextvars()  # e.g. the HTTP request's id

        def expire() -> None:
            with structlog.contextvars.bound_contextvars(**context):
                system.tell(DeviceActor, key, CommandDeadline(request_id))

        timer = system.scheduler.call_later(delay, expire)
        self.deadlines[request_id] = timer
        return timer

    # How far back in the stream to look for a command's outcome (its CommandSent is there
    # too, unless thousands of reports came in between: then the caller hears Unavailable).
    SETTLE_LOOKBACK = 1000

    def _settle_from_log(self, request_id: str) -> None:
        """Answer this process's caller with the outcome the log holds for `request_id`."""
        reply = self._take_waiter(request_id)
        if reply is None or self.aggregate is None:
            return
        command, outcome = None, None
        since = max(0, self.aggregate.version - self.SETTLE_LOOKBACK)
        for e in self.system.log.read_stream(self.aggregate.id, gt=since):
            if getattr(e, "request_id", None) != request_id:
                continue
            if isinstance(e, Device.CommandSent):
                command = e.command
            else:
                outcome = e
        self.log.info("device.command_settled_from_log", request_id=request_id,
                      outcome=type(outcome).__name__ if outcome else None)
        if isinstance(outcome, Device.CommandAnswered):
            reply.ok(command_result(request_id, command, outcome.code, outcome.msg, outcome.data))
        elif isinstance(outcome, Device.CommandTimedOut):
            reply.fail(timed_out(request_id, outcome.timeout_ms))
        else:
            reply.fail(Unavailable(f"the outcome of {request_id} is not in the log"))

    def _take_waiter(self, request_id: str) -> Reply | None:
        if self.system.inflight.pop(request_id, None) is not None:
            self.system.settled_here.add(request_id)
        self.refused.pop(request_id, None)
        entry = self.waiters.pop(request_id, None)
        if entry is None:
            return None
        reply, timer, _ = entry
        timer.cancel()
        if self.deadlines.get(request_id) is timer:
            del self.deadlines[request_id]
        self.lease.pin(-1)
        return reply

    def _fail_queued(self, why: str) -> None:
        super()._fail_queued(why)
        # Commands in flight: their callers would otherwise wait for their deadline.
        for request_id in list(self.waiters):
            reply = self._take_waiter(request_id)
            if reply is not None:
                reply.fail(Unavailable(f"device actor {why}"))
