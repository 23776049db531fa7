"""The store's circuit breaker against a private PostgreSQL server that goes away and comes
back (tests/test_store_outage.py runs the same through `parley serve`)."""

from __future__ import annotations

import time

import pytest
import structlog.testing

from eventstore.breaker import StoreBreaker, StoreUnavailable, store_down


def breaker_for(server) -> StoreBreaker:
    b = StoreBreaker({"host": "127.0.0.1", "port": server.port, "user": "postgres", "dbname": "postgres"},
                     f"127.0.0.1:{server.port}/postgres")
    b.arm()
    return b


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_failure_the_probe_does_not_confirm_changes_nothing(private_postgres):
    b = breaker_for(private_postgres)
    with structlog.testing.capture_logs() as logs:
        b.suspect()  # a lock timeout, say: the server answers the probe
        assert wait_for(lambda: b._prober is None)
    assert not b.down and logs == []
    b.check()  # no error


def test_down_fails_at_once_until_the_server_answers_again(private_postgres):
    b = breaker_for(private_postgres)
    recovered = []
    b.on_recovered(lambda: recovered.append(b.down))  # called before the store counts as up
    with structlog.testing.capture_logs() as logs:
        private_postgres.stop("immediate")
        b.suspect()
        b.suspect()  # one probe at a time
        assert wait_for(lambda: b.down)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="is not answering") as raised:
            b.check()
        assert time.monotonic() - started < 0.1
        assert not store_down(RuntimeError("a bug"))
        wrapped = RuntimeError("could not commit")
        wrapped.__cause__ = raised.value
        assert store_down(wrapped)
        assert not b.wait_up(0.3)
        private_postgres.start()
        assert b.wait_up(10)
    b.check()
    assert recovered == [True]
    assert [e["event"] for e in logs] == ["store.down", "store.up"]


def test_disarmed_or_closed_it_never_probes(private_postgres):
    b = StoreBreaker({"host": "127.0.0.1", "port": private_postgres.port, "user": "postgres"}, "x")
    private_postgres.stop("immediate")
    b.suspect()  # not armed: the log is still opening, and says why it cannot itself
    assert b._prober is None and not b.down
    b.arm()
    b.close()
    b.suspect()
    assert b._prober is None
    with pytest.raises(StoreUnavailable, match="closed"):
        b.check()


def test_the_first_use_to_meet_an_outage_hears_of_it_as_the_outage(private_postgres):
    """A pooled connection that died with the server fails raw; the guard waits for the
    probe it starts and, the outage confirmed, raises StoreUnavailable (logged at debug
    everywhere, as the outage is one line, store.down) instead of a raw error that each
    user logged as its own (a load failed, a message not committed)."""
    import psycopg

    b = breaker_for(private_postgres)
    conn = psycopg.connect(host="127.0.0.1", port=private_postgres.port, user="postgres", dbname="postgres",
                           autocommit=True)
    try:
        private_postgres.stop("immediate")
        with pytest.raises(StoreUnavailable, match="is not answering") as raised:
            with b.guard():
                conn.execute("SELECT 1")
        assert store_down(raised.value) and isinstance(raised.value.__cause__, psycopg.OperationalError)
        assert b.down
    finally:
        conn.close()
        private_postgres.start()
        assert b.wait_up(10)
        b.close()


def test_a_failure_the_probe_does_not_confirm_is_passed_on_as_it_was(private_postgres):
    """One dead connection while the server answers: the probe says up, the error is the
    query's own (not StoreUnavailable), and nothing is logged."""
    import psycopg

    b = breaker_for(private_postgres)
    conn = psycopg.connect(host="127.0.0.1", port=private_postgres.port, user="postgres", dbname="postgres",
                           autocommit=True)
    killer = psycopg.connect(host="127.0.0.1", port=private_postgres.port, user="postgres", dbname="postgres",
                             autocommit=True)
    try:
        killer.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        with structlog.testing.capture_logs() as logs, pytest.raises(psycopg.OperationalError):
            with b.guard():
                conn.execute("SELECT 1")
        assert not b.down and logs == []
    finally:
        conn.close()
        killer.close()
        b.close()


def test_a_use_that_runs_too_long_starts_the_probe_once(private_postgres, monkeypatch):
    """A hung server fails no query: a use still running after STALL_S starts the probe
    (tests/test_store_outage.py runs it against a frozen server). One that is merely slow
    while the server answers costs a probe and one log line, and changes nothing."""
    monkeypatch.setattr(StoreBreaker, "STALL_S", 0.3)
    b = breaker_for(private_postgres)
    try:
        with structlog.testing.capture_logs() as logs:
            with b.guard():
                time.sleep(2.5)  # the watchdog looks once a second
            assert wait_for(lambda: b._prober is None)
        stalled = [e for e in logs if e["event"] == "store.query_stalled"]
        assert len(stalled) == 1 and stalled[0]["uses"] == 1 and stalled[0]["running_s"] >= 0.3
        assert not b.down and not [e for e in logs if e["event"] == "store.down"]
        assert b._uses == {}  # the use is forgotten when it ends
        with structlog.testing.capture_logs() as logs:
            private_postgres.freeze()
            try:
                with b.guard():
                    assert wait_for(lambda: b.down, 10)  # the probe got no answer within 2 s
            finally:
                private_postgres.thaw()
        assert [e["event"] for e in logs][:2] == ["store.query_stalled", "store.down"]
        with pytest.raises(StoreUnavailable):
            b.check()
        assert b.wait_up(10)
    finally:
        b.close()
