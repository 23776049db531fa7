"""Commands across processes and restarts.

Two processes on one PostgreSQL log and one broker (shared subscription): the device's
answer to a command sent through A may reach B. B records the outcome; A's caller hears
it from the log (not a 504 for a command the device carried out). In process: two
Runtimes on one database, a link that hands A's commands' answers to B."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from actors.device import Device, DeviceActor, DeviceResponded, ReportTelemetry, SendCommand
from actors.errors import CommandTimedOut
from actors.ports import FutureReply
from tests.support import create_agent, make_runtime

P, D = "thermostat", "shared-cmd"


class AnsweredOnB:
    """A's DeviceLink: the device answers, and the broker gives the answer to B."""

    connected = True

    def __init__(self, b) -> None:
        self.b = b
        self.answer = True

    def publish_command(self, product_id: str, device_id: str, payload: dict[str, Any]) -> str:
        if self.answer:
            threading.Thread(target=lambda: self.b.system.tell(DeviceActor, (product_id, device_id), DeviceResponded(
                payload["requestId"], 0, "ok", {"applied": payload["params"]}, int(time.time() * 1000)))).start()
        return payload["requestId"]

    def withdraw(self, handle: str) -> None:
        pass


def logged(runtime, name: str, timeout: float = 5.0) -> None:
    """Wait until the device's stream holds an event of type `name`."""
    stream, deadline = Device.create_id(P, D), time.monotonic() + timeout
    while name not in [type(e).__name__ for e in runtime.log.read_stream(stream)]:
        assert time.monotonic() < deadline, f"no {name} in the log"
        time.sleep(0.02)


def ask(runtime, message) -> Any:
    runtime.system.tell(DeviceActor, (P, D), message)
    return message.reply.get(15)


@pytest.fixture
def pair(tmp_path, pg_database):
    a = make_runtime(tmp_path / "a", pg_database)
    b = make_runtime(tmp_path / "b", pg_database)
    a.attach_device_link(AnsweredOnB(b))
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_an_answer_recorded_by_the_other_process_reaches_the_caller(pair):
    a, b = pair
    create_agent(a)
    # B's actor is live and loaded before A writes CommandSent: it must catch up with the
    # log rather than drop the answer as unmatched.
    ask(b, ReportTelemetry("status", "online", None, None, int(time.time() * 1000), reply=FutureReply()))
    ask(a, ReportTelemetry("status", "online", None, None, int(time.time() * 1000), reply=FutureReply()))
    for i in range(3):
        start = time.monotonic()
        result = ask(a, SendCommand(f"shared-{i}", "set_target_temperature", {"target_temperature": i},
                                    5000, reply=FutureReply()))
        assert result["code"] == 0 and result["data"] == {"applied": {"target_temperature": i}}
        assert result["command"] == "set_target_temperature"
        assert time.monotonic() - start < 3.0  # from the log, not at the 5 s deadline
    names = [type(e).__name__ for e in a.log.read_stream(Device.create_id(P, D))]
    assert names.count("CommandSucceeded") == 3 and "CommandTimedOut" not in names
    assert a.system.inflight == {}


def test_a_timeout_is_still_a_timeout(pair):
    a, b = pair
    create_agent(a)
    a.system.device_link.answer = False
    ask(a, ReportTelemetry("status", "online", None, None, int(time.time() * 1000), reply=FutureReply()))
    with pytest.raises(CommandTimedOut):
        ask(a, SendCommand("shared-quiet", "set_target_temperature", {"target_temperature": 1}, 300,
                           reply=FutureReply()))


class Silent:
    connected = True

    def publish_command(self, *a) -> str:
        return "h"

    def withdraw(self, handle: str) -> None:
        pass


def test_a_command_in_flight_at_a_restart_times_out_on_time(tmp_path):
    """The process stopped while a command waited for its device. The next process arms its
    deadline at start: the timeout is an event at its time, not when the device next speaks
    or the liveness sweep next looks (up to 90 s late)."""
    first = make_runtime(tmp_path)
    create_agent(first)
    first.attach_device_link(Silent())
    ask(first, ReportTelemetry("status", "online", None, None, int(time.time() * 1000), reply=FutureReply()))
    first.system.tell(DeviceActor, (P, D), SendCommand("in-flight", "set_target_temperature",
                                                       {"target_temperature": 1}, 1500, reply=FutureReply()))
    logged(first, "CommandSent")
    assert first.projections.wait_for(first.log.max_position(), 5)
    first.close()  # the command is still pending in the log

    second = make_runtime(tmp_path)
    try:
        assert second.devices.with_pending_commands() == [(P, D)]
        logged(second, "CommandTimedOut")  # without any other message
        assert second.projections.wait_for(second.log.max_position(), 5)
        assert second.devices.with_pending_commands() == []
    finally:
        second.close()


@pytest.mark.parametrize("b_learns", ["following the log", "from a version conflict"])
def test_a_command_of_a_process_that_stopped_times_out_in_the_other(tmp_path, pg_database, b_learns):
    """A sent a command and stopped before its deadline; B has the device's actor live (the
    device talks to B), so nothing would load the command there until that actor went idle.
    B's actor learns of the command by following the log (CatchUp), or sooner, when the
    device's telemetry reaches it and its commit conflicts with A's CommandSent; either way
    it arms the deadline: the timeout is an event on time."""
    a = make_runtime(tmp_path / "a", pg_database)
    b = make_runtime(tmp_path / "b", pg_database)
    try:
        create_agent(a)
        a.attach_device_link(Silent())
        ask(b, ReportTelemetry("status", "online", None, None, int(time.time() * 1000), reply=FutureReply()))
        assert a.projections.wait_for(a.log.max_position(), 5)
        a.system.tell(DeviceActor, (P, D), SendCommand("orphan", "set_target_temperature",
                                                       {"target_temperature": 1}, 1500, reply=FutureReply()))
        logged(b, "CommandSent")
        if b_learns == "from a version conflict":
            # Within B's runner's 50 ms gathering: B's actor still holds the state before
            # CommandSent, reloads on the conflict, and its CatchUp then finds nothing new.
            ask(b, ReportTelemetry("state", None, {"temperature": 1}, None, int(time.time() * 1000),
                                   reply=FutureReply()))
        a.close()
        a = None
        logged(b, "CommandTimedOut", timeout=6)  # B timed the orphaned command out
    finally:
        if a is not None:
            a.close()
        b.close()


@pytest.fixture
def silent_pair(tmp_path, pg_database, monkeypatch):
    """A and B on one log; the device talks only to A (B has no actor for it) and never
    answers; B looks at another process's command 0.3 s after its deadline. Yields a list
    [a, b]: a test may close A and set it to None."""
    from gateways.runtime import CommandOutcomes

    monkeypatch.setattr(CommandOutcomes, "GRACE_S", 0.3)
    pair = [make_runtime(tmp_path / "a", pg_database), make_runtime(tmp_path / "b", pg_database)]
    try:
        a = pair[0]
        create_agent(a)
        a.attach_device_link(Silent())
        ask(a, ReportTelemetry("status", "online", None, None, int(time.time() * 1000), reply=FutureReply()))
        yield pair
    finally:
        for rt in pair:
            if rt is not None:
                rt.close()


def test_a_command_of_a_process_that_stopped_times_out_where_its_device_is_not_live(silent_pair):
    """As above, but B has no actor for the device (it never heard from it): B looks once
    the command's deadline has passed (plus a grace for A to do it), and times it out. It
    stayed pending until A came back (found by audit: 25 s late, unbounded if A never did)."""
    a, b = silent_pair
    a.system.tell(DeviceActor, (P, D), SendCommand("orphan-2", "set_target_temperature",
                                                   {"target_temperature": 1}, 1000, reply=FutureReply()))
    logged(b, "CommandSent")
    assert b.projections.wait_for(a.log.max_position(), 5)
    assert not b.system.is_active(DeviceActor, (P, D))
    a.close()
    silent_pair[0] = None
    logged(b, "CommandTimedOut", timeout=6)
    names = [type(e).__name__ for e in b.log.read_stream(Device.create_id(P, D))]
    assert names.count("CommandTimedOut") == 1


def test_a_command_settled_by_its_own_process_is_left_alone_where_its_device_is_not_live(silent_pair):
    """The usual case: A answers its caller and records the outcome; B's look after the
    deadline finds the command settled and writes nothing."""
    a, b = silent_pair
    with pytest.raises(CommandTimedOut):
        ask(a, SendCommand("own-timeout", "set_target_temperature", {"target_temperature": 1}, 300,
                           reply=FutureReply()))
    wait = time.monotonic() + 5
    while not b.system.is_active(DeviceActor, (P, D)):  # B looked
        assert time.monotonic() < wait
        time.sleep(0.02)
    time.sleep(0.3)
    names = [type(e).__name__ for e in b.log.read_stream(Device.create_id(P, D))]
    assert names.count("CommandTimedOut") == 1 and names[-1] == "CommandTimedOut"


def test_the_log_follower_leaves_this_process_s_own_commands_alone(tmp_path, monkeypatch):
    """The runner sees a CommandSent only after its command settled here: no CatchUp for
    it (one per command woke the device's actor for nothing, and once reloaded its stream)."""
    caught_up: list[int] = []
    handle = DeviceActor.handle_CatchUp
    monkeypatch.setattr(DeviceActor, "handle_CatchUp", lambda self, msg: caught_up.append(msg.version) or handle(self, msg))
    rt = make_runtime(tmp_path)
    try:
        create_agent(rt)
        rt.attach_device_link(AnsweredOnB(rt))  # answered in the same process
        ask(rt, ReportTelemetry("status", "online", None, None, int(time.time() * 1000), reply=FutureReply()))
        for i in range(20):
            result = ask(rt, SendCommand(f"own-{i}", "set_target_temperature", {"target_temperature": i},
                                         5000, reply=FutureReply()))
            assert result["code"] == 0
        assert rt.projections.wait_for(rt.log.max_position(), 5)
        assert rt.system.inflight == {} and "own-19" in rt.system.settled_here
        assert caught_up == []
    finally:
        rt.close()
