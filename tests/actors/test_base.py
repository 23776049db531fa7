"""actors/base.py: what every actor kind shares (here: `later`, work deferred until the
actor is done with its message)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog.testing

from actors.device import DeviceActor, ReportTelemetry
from actors.ports import FutureReply
from actors.system import ActorSystem
from eventstore import EventLog, Journal, StoreConfig
from tests.support import now_ms, wait_until

KEY = ("p", "d1")


class Step:
    """A test-only message: its handler runs `do(actor)`, then records `name`."""

    def __init__(self, name: str, trail: list[str], do: Callable[[DeviceActor], None] = lambda actor: None) -> None:
        self.name, self.trail, self.do = name, trail, do


def _handle_step(self: DeviceActor, msg: Step) -> None:
    msg.do(self)
    msg.trail.append(f"{msg.name} handled")


DeviceActor.handle_Step = _handle_step  # type: ignore[attr-defined]


@pytest.fixture
def system(tmp_path: Any) -> Iterator[ActorSystem]:
    log = EventLog(StoreConfig.resolve(tmp_path, None))
    journal = Journal(log)
    system = ActorSystem(log, journal)
    yield system
    system.shutdown()
    journal.close()
    log.close()


def test_later_runs_once_the_message_is_done_and_before_the_next(system: ActorSystem) -> None:
    trail: list[str] = []
    gate = threading.Event()
    system.tell(DeviceActor, KEY, Step("first", trail, lambda actor: (
        actor.later(trail.append, "deferred"), gate.wait(5))))
    system.tell(DeviceActor, KEY, Step("second", trail))
    gate.set()
    assert wait_until(lambda: len(trail) == 3, 5)
    assert trail == ["first handled", "deferred", "second handled"]


def test_later_runs_when_the_actor_ends_with_the_message(system: ActorSystem) -> None:
    """An actor that stops inside a message (pykka's stop after a failure) never takes
    another: what it deferred runs as its thread ends."""
    trail: list[str] = []
    system.tell(DeviceActor, KEY, Step("last", trail, lambda actor: (
        actor.later(trail.append, "deferred"), actor._stop())))
    assert wait_until(lambda: "deferred" in trail, 5)
    assert trail == ["last handled", "deferred"]


def test_a_deferred_call_that_fails_is_logged_and_the_actor_goes_on(system: ActorSystem) -> None:
    def broken() -> None:
        raise RuntimeError("deferred on fire")

    trail: list[str] = []
    with structlog.testing.capture_logs() as logs:
        system.tell(DeviceActor, KEY, Step("first", trail, lambda actor: (
            actor.later(broken), actor.later(trail.append, "deferred after it"))))
        reply = FutureReply()
        system.tell(DeviceActor, KEY, ReportTelemetry("status", "online", None, None, now_ms(), reply=reply))
        reply.get(5)
    assert trail == ["first handled", "deferred after it"]
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["actor.deferred_failed"]
