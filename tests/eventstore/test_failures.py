"""RepeatedFailures: a failure said once, counted while it goes on, and its end said."""

from __future__ import annotations

import sqlite3

import structlog

from eventstore.failures import RepeatedFailures


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_first_failure_is_logged_the_rest_counted_and_the_recovery_said():
    clock = Clock()
    failures = RepeatedFailures("journal.commit_failed", "journal.still_failing", "journal.recovered", every_s=30, clock=clock)
    full = sqlite3.OperationalError("database or disk is full")
    with structlog.testing.capture_logs() as logs:
        failures.succeeded()  # nothing was failing: nothing to say
        failures.failed(full, events=3)
        assert failures.failing and failures.error == "database or disk is full"
        for _ in range(500):
            clock.now += 0.01
            failures.failed(full, events=1)
        clock.now = 131.0  # past every_s since the first line
        failures.failed(full, events=1)
        failures.failed(full, events=1)
        clock.now = 140.0
        assert failures.succeeded() == (503, 40.0)
        assert failures.succeeded() is None
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("journal.commit_failed", "error"), ("journal.still_failing", "error"), ("journal.recovered", "warning")]
    first, still, recovered = logs
    assert first["error"] == "database or disk is full" and first["error_type"] == "OperationalError"
    assert first["events"] == 3
    assert still["failed"] == 501 and still["seconds"] == 31.0
    assert recovered["failed"] == 503 and recovered["seconds"] == 40.0
    assert not failures.failing and failures.error is None


def test_a_different_error_gets_its_own_line_and_a_new_episode_starts_afresh():
    clock = Clock()
    failures = RepeatedFailures("journal.commit_failed", "journal.still_failing", "journal.recovered", every_s=30, clock=clock)
    with structlog.testing.capture_logs() as logs:
        failures.failed(sqlite3.OperationalError("database or disk is full"), events=1)
        failures.failed(sqlite3.OperationalError("disk I/O error"), events=1)
        failures.failed(sqlite3.OperationalError("disk I/O error"), events=1)
        failures.succeeded()
        clock.now += 5
        failures.failed(OSError(), "journal.snapshot_failed", snapshots=2)  # no message: its type is the error
        failures.succeeded()
    assert [(e["event"], e.get("error"), e.get("failed")) for e in logs] == [
        ("journal.commit_failed", "database or disk is full", None),
        ("journal.commit_failed", "disk I/O error", None),
        ("journal.recovered", None, 3),
        ("journal.snapshot_failed", "OSError", None),
        ("journal.recovered", None, 1),
    ]
