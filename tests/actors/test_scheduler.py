"""The actors' timer thread (actors/scheduler.py)."""

from __future__ import annotations

import threading
import time

from actors.scheduler import Scheduler


def test_timers_fire_in_order_and_cancelled_ones_never() -> None:
    scheduler = Scheduler()
    try:
        fired: list[str] = []
        done = threading.Event()
        scheduler.call_later(0.2, lambda: (fired.append("late"), done.set()))
        scheduler.call_later(0.05, lambda: fired.append("early"))
        scheduler.call_later(0.1, lambda: fired.append("cancelled")).cancel()
        assert done.wait(5)
        assert fired == ["early", "late"]
    finally:
        scheduler.stop()


def test_cancelled_timers_do_not_wake_the_thread() -> None:
    """A command's timeout is nearly always cancelled (its device answered): 200 of them,
    cancelled while the thread waits for a live one, wake it no more than that one does."""
    scheduler = Scheduler()
    try:
        done = threading.Event()
        scheduler.call_later(0.5, done.set)
        time.sleep(0.05)  # the thread now waits for that one
        for i in range(200):
            scheduler.call_later(0.1 + i / 1000, lambda: None).cancel()  # later than none: no notify
        early = scheduler.call_later(0.05, lambda: None)  # earlier than the live one: the thread re-waits
        early.cancel()
        assert done.wait(5)
        assert scheduler.wakeups <= 3
    finally:
        scheduler.stop()


def test_a_new_earliest_timer_after_cancelled_ones_still_fires_on_time() -> None:
    scheduler = Scheduler()
    try:
        scheduler.call_later(0.3, lambda: None).cancel()
        scheduler.call_later(30, lambda: None)  # a live one far away: the thread waits for it
        time.sleep(0.05)
        done = threading.Event()
        started = time.monotonic()
        scheduler.call_later(0.1, done.set)
        assert done.wait(5)
        assert time.monotonic() - started < 2  # not the 30 s timer's wait
    finally:
        scheduler.stop()
