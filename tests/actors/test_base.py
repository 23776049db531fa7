"""actors/base.py: what every actor kind shares (here: `later`, work deferred until the
actor is done with its message)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog.testing

from actors.device import DeviceActor, ReportTelemetry, Wake
from actors.ports import FutureReply, NoReply
from actors.system import ActorSystem
from eventstore import EventLog, Journal, StoreConfig
from tests.actors.test_device_actor import _in_inbox
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


# -- Inbox.run_here: a message handled on the telling thread while its actor is idle ----

@pytest.fixture
def here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DeviceActor, "run_here", (Step,))


def _threads(trail: list[str]) -> Callable[[DeviceActor], None]:
    return lambda actor: trail.append(threading.current_thread().name)


def _tell_here(system: ActorSystem, message: Any) -> None:
    system.tell_many(DeviceActor, KEY, [message], here=True)


def _idle(system: ActorSystem) -> None:
    """The actor for KEY is active, loaded, and waits in its inbox."""
    reply = FutureReply()
    system.tell(DeviceActor, KEY, ReportTelemetry("status", "online", None, None, now_ms(), reply=reply))
    reply.get(5)
    thread = next(t for t in threading.enumerate() if t.name.startswith("DeviceActor-"))
    assert wait_until(lambda: _in_inbox(thread), 5)


def test_a_message_told_to_an_idle_actor_is_handled_on_the_telling_thread(system: ActorSystem, here: None) -> None:
    _idle(system)
    trail: list[str] = []
    _tell_here(system, Step("answer", trail, _threads(trail)))
    # Handled before tell returned, here, and what it deferred has run too.
    assert trail == [threading.current_thread().name, "answer handled"]


def test_only_a_teller_that_may_wait_has_it_handled_on_its_thread(system: ActorSystem, here: None) -> None:
    _idle(system)
    trail: list[str] = []
    system.tell(DeviceActor, KEY, Step("answer", trail, _threads(trail)))  # here=False
    assert wait_until(lambda: len(trail) == 2, 5)
    assert trail[0].startswith("DeviceActor-")


def test_told_while_the_actor_is_busy_it_waits_its_turn_on_the_actors_thread(
        system: ActorSystem, here: None) -> None:
    _idle(system)
    trail: list[str] = []
    gate = threading.Event()
    system.tell(DeviceActor, KEY, ReportTelemetry("status", "online", None, None, now_ms(), reply=FutureReply()))
    system.tell(DeviceActor, KEY, Step("held", trail, lambda actor: gate.wait(5)))
    _tell_here(system, Step("answer", trail, _threads(trail)))
    assert trail == []  # not run here: the actor is busy and has messages queued
    gate.set()
    assert wait_until(lambda: len(trail) == 3, 5)
    assert trail[0] == "held handled" and trail[1].startswith("DeviceActor-") and trail[2] == "answer handled"


def test_not_on_the_telling_thread_while_the_journal_is_busy(system: ActorSystem, here: None,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _idle(system)
    monkeypatch.setattr(type(system.journal), "idle", property(lambda self: False))
    trail: list[str] = []
    _tell_here(system, Step("answer", trail, _threads(trail)))
    assert wait_until(lambda: len(trail) == 2, 5)
    assert trail[0].startswith("DeviceActor-")


def test_one_thread_at_a_time_handles_an_actors_messages_in_the_order_told(
        system: ActorSystem, here: None) -> None:
    """Four threads tell the actor messages it may run on their thread, and Wakes it must
    run on its own, mostly as fast as they can: never two handlers at once, and each
    sender's messages handled in the order it told them."""
    _idle(system)
    inside, most, seen, where = [0], [0], [], set()
    lock = threading.Lock()

    def count(actor: DeviceActor, sender: int, n: int) -> None:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            seen.append((sender, n))
            where.add("actor" if threading.current_thread().name.startswith("DeviceActor-") else "teller")
        time.sleep(0)  # let go of the GIL: another thread could enter now, if anything let it
        with lock:
            inside[0] -= 1

    def sender(i: int) -> None:
        rng = random.Random(i)
        for n in range(150):
            if rng.random() < 0.5:
                time.sleep(rng.uniform(0, 0.004))  # the actor may go idle: the next may run here
            if n % 3:
                _tell_here(system, Step("s", [], lambda actor, i=i, n=n: count(actor, i, n)))
            else:
                system.tell(DeviceActor, KEY, Wake(reply=NoReply()))
                _tell_here(system, Step("s", [], lambda actor, i=i, n=n: count(actor, i, n)))

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wait_until(lambda: len(seen) == 600, 10)
    assert most[0] == 1
    assert where == {"actor", "teller"}  # both ways were taken
    for i in range(4):
        mine = [n for s, n in seen if s == i]
        assert mine == sorted(mine) == list(range(150))
