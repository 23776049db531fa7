"""LoadGate: a few load slots; urgent loads first; each line in arrival order."""

from __future__ import annotations

import threading
import time

from actors.loading import LoadGate
from tests.support import wait_until


class Line:
    """Threads that each take a slot of `gate` and record the order they got it in."""

    def __init__(self, gate: LoadGate) -> None:
        self.gate = gate
        self.order: list[str] = []
        self.release = threading.Event()
        self.threads: list[threading.Thread] = []

    def join(self, who: str, urgent: bool = False) -> None:
        def load_many(whos: list[str]) -> dict[str, None]:
            self.order.extend(whos)
            if who == "first":
                self.release.wait(10)
            return dict.fromkeys(whos)

        def run() -> None:
            self.gate.load(who, lambda: urgent, load_many)

        before = self.gate.waiting()
        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)
        if who != "first":  # in line before the next one joins: the order is the test's
            assert wait_until(lambda: self.gate.waiting() == before + 1, 5)

    def finish(self) -> list[str]:
        self.release.set()
        for t in self.threads:
            t.join(10)
        return self.order


def test_one_slot_holds_the_second_until_the_first_is_done():
    line = Line(LoadGate(1))
    line.join("first")
    assert wait_until(lambda: line.order == ["first"], 5)
    line.join("second")
    time.sleep(0.05)
    assert line.order == ["first"]  # still waiting
    assert line.finish() == ["first", "second"]
    assert line.gate.waiting() == 0


def test_waiters_get_the_slot_in_arrival_order_and_urgent_ones_before_the_others():
    line = Line(LoadGate(1))
    line.join("first")
    assert wait_until(lambda: line.order == ["first"], 5)
    for who, urgent in (("a", False), ("b", False), ("u1", True), ("c", False), ("u2", True)):
        line.join(who, urgent)
    assert line.finish() == ["first", "u1", "u2", "a", "b", "c"]


def test_a_waiter_promoted_later_goes_next_and_only_once():
    gate = LoadGate(1)
    line = Line(gate)
    line.join("first")
    assert wait_until(lambda: line.order == ["first"], 5)
    for who in ("a", "b", "c"):
        line.join(who)
    gate.promote("c")
    gate.promote("c")  # a second urgent message for the same actor changes nothing
    gate.promote("nobody")  # not waiting (loaded already, or not started): nothing to do
    assert gate.promoted == 1
    assert line.finish() == ["first", "c", "a", "b"]
    # Its stale place in the normal line was skipped, not given a slot: the slot is free again.
    assert gate.waiting() == 0 and gate.free == 1


def test_several_slots_are_used_at_once_and_all_come_back():
    gate = LoadGate(3)
    inside, most = [0], [0]
    lock = threading.Lock()

    def load_many(whos: list[int]) -> dict[int, None]:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.01)
        with lock:
            inside[0] -= 1
        return dict.fromkeys(whos)

    def load() -> None:
        gate.load(threading.get_ident(), lambda: False, load_many)

    threads = [threading.Thread(target=load) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert most[0] == 3
    assert gate.free == 3 and gate.waiting() == 0


def test_a_load_that_raises_gives_its_slot_back():
    gate = LoadGate(1)

    def load_many(whos: list[str]) -> dict[str, None]:
        raise RuntimeError("the store is down")

    try:
        gate.load("boom", lambda: False, load_many)
    except RuntimeError:
        pass
    assert gate.free == 1


def _loader(gate: LoadGate, calls: list[list[str]], hold: threading.Event | None = None):
    """A `load_many` for gate.load: records each call's streams; the state of `x` is
    `"state of x"`; the first call waits for `hold`."""
    def load_many(whos: list[str]) -> dict[str, str]:
        calls.append(list(whos))
        if hold is not None and len(calls) == 1:
            hold.wait(10)
        return {w: f"state of {w}" for w in whos}
    return load_many


def test_a_slot_holder_loads_the_waiters_behind_it_and_hands_each_its_state():
    """In a storm one holder serves up to `batch` streams with one `load_many`, urgent
    waiters first; each waiter returns its own state without taking a slot."""
    gate = LoadGate(1, batch=3)
    calls: list[list[str]] = []
    hold = threading.Event()
    results: dict[str, object] = {}

    def run(who: str, urgent: bool = False) -> None:
        results[who] = gate.load(who, lambda: urgent, _loader(gate, calls, hold=hold))

    threads = [threading.Thread(target=run, args=("first",), daemon=True)]
    threads[0].start()
    assert wait_until(lambda: calls, 5)  # "first" holds the slot, loading
    for who, urgent in (("a", False), ("b", False), ("c", False), ("cmd", True)):
        threads.append(threading.Thread(target=run, args=(who, urgent), daemon=True))
        threads[-1].start()
        assert wait_until(lambda: gate.waiting() == len(threads) - 1, 5)
    hold.set()
    for t in threads:
        t.join(10)
    assert calls == [["first"], ["cmd", "a", "b"], ["c"]]
    assert results == {w: f"state of {w}" for w in ("first", "a", "b", "c", "cmd")}
    assert (gate.free, gate.waiting()) == (1, 0)


def _failed_batch(gate: LoadGate, error: type[Exception]) -> tuple[list[list[str]], dict[str, object]]:
    """"first" holds the slot while "a" and "b" join the line; loading "b" raises `error`.
    Returns the `load_many` calls and each one's state or error."""
    calls: list[list[str]] = []
    hold = threading.Event()
    outcome: dict[str, object] = {}

    def load_many(whos: list[str]) -> dict[str, str]:
        calls.append(list(whos))
        if len(calls) == 1:
            hold.wait(10)
        if "b" in whos:
            raise error("b cannot be read")
        return {w: f"state of {w}" for w in whos}

    def run(who: str) -> None:
        try:
            outcome[who] = gate.load(who, lambda: False, load_many)
        except Exception as exc:
            outcome[who] = exc

    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in ("first", "a", "b")]
    threads[0].start()
    assert wait_until(lambda: calls, 5)
    for t in threads[1:]:
        t.start()
        assert wait_until(lambda: gate.waiting() == threads.index(t), 5)
    hold.set()
    for t in threads:
        t.join(10)
    assert (gate.free, gate.waiting()) == (1, 0)
    return calls, outcome


def test_a_store_failure_of_a_batch_is_raised_in_every_waiter_it_served():
    calls, outcome = _failed_batch(LoadGate(1, batch=4, store_error=lambda exc: isinstance(exc, OSError)), OSError)
    assert calls == [["first"], ["a", "b"]]  # not tried again stream by stream: all would fail
    assert outcome["first"] == "state of first"
    assert isinstance(outcome["a"], OSError) and isinstance(outcome["b"], OSError)


def test_any_other_failure_of_a_batch_is_found_out_stream_by_stream():
    """One stream this version cannot read (a renamed event class, say) fails only its own
    load, not the healthy streams batched with it."""
    calls, outcome = _failed_batch(LoadGate(1, batch=4, store_error=lambda exc: isinstance(exc, OSError)), KeyError)
    assert calls == [["first"], ["a", "b"], ["b"], ["a"]]  # the waiter alone, then the holder
    assert outcome["a"] == "state of a" and isinstance(outcome["b"], KeyError)
