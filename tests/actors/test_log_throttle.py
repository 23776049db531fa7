"""LogThrottle: the first line for a key, then one per interval with how many were left out."""

from __future__ import annotations

import threading

import pytest

from actors import log_throttle
from actors.log_throttle import LogThrottle


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(log_throttle.time, "monotonic", lambda: now[0])
    return now


def test_the_first_line_is_written_then_one_per_interval_with_what_was_left_out(clock: list[float]) -> None:
    throttle = LogThrottle(interval=60.0)
    assert throttle.admit("d1") == {}
    assert [throttle.admit("d1") for _ in range(5)] == [None] * 5
    assert throttle.admit("d2") == {}  # another key is not held back by the first
    clock[0] += 59.9
    assert throttle.admit("d1") is None
    clock[0] += 0.1
    assert throttle.admit("d1") == {"left_out": 6}  # the reminder: six left out since the first
    assert throttle.admit("d1") is None
    clock[0] += 60
    assert throttle.admit("d1") == {"left_out": 1}
    clock[0] += 60
    assert throttle.admit("d1") == {}  # nothing left out in between


def test_it_remembers_at_most_max_keys_the_oldest_forgotten_first(clock: list[float]) -> None:
    throttle = LogThrottle(interval=60.0, max_keys=3)
    for key in "abc":
        assert throttle.admit(key) == {}
    assert throttle.admit("d") == {}  # "a" is forgotten
    assert throttle.admit("a") == {} and throttle.admit("b") == {}  # both forgotten since, written again
    assert throttle.admit("d") is None
    assert len(throttle._keys) == 3


def test_threads_admitting_at_once_write_the_first_line_once() -> None:
    throttle = LogThrottle(interval=60.0)
    written: list[dict[str, int] | None] = []
    start = threading.Barrier(8)

    def admit() -> None:
        start.wait()
        written.extend(throttle.admit("k") for _ in range(1000))

    threads = [threading.Thread(target=admit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert written.count({}) == 1 and written.count(None) == 7999
