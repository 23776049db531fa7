"""Session fixtures for real services; the service code itself lives in tests/services.py.

Fixtures:
  mqtt_broker -- a private mosquitto on a free 127.0.0.1 port (the built-in amqtt broker
                 if no mosquitto binary exists).  Attributes: host, port, url, kind
                 ("mosquitto" | "builtin"), version, describe(), and for mosquitto
                 binary/config_path/log_path.
  pg_url      -- URL of a fresh, empty PostgreSQL database parley_test_<8 hex>, dropped
                 at session end.  Skipped if PostgreSQL is unreachable.

PARLEY_REQUIRE_SERVICES=1 turns "no mosquitto binary" and "PostgreSQL unreachable"
into failures instead of a fallback / skip. PARLEY_TEST_BROKER=builtin uses the built-in
broker even where mosquitto exists (what a fresh machine runs on).
"""

from __future__ import annotations

import pytest

from tests import services

# Facts for the "Real services" terminal summary, filled in by the fixtures.
SERVICES_STATE: dict[str, str | None] = {"broker": None, "postgres": None}
NEEDS_MOSQUITTO: list[str] = []  # tests not run because the built-in broker cannot do what they check
NEEDS_PG_PROGRAMS: list[str] = []  # tests not run for want of PostgreSQL's server programs
_USERS: dict[str, int] = {"mqtt_broker": 0, "pg_url": 0}


@pytest.fixture(scope="session")
def mqtt_broker(tmp_path_factory):
    require = services.require_services()
    problem = None
    try:
        handle = services.start_test_broker(tmp_path_factory.mktemp("mosquitto"), require=require)
    except services.ServiceUnavailable as exc:
        problem = str(exc)
    except Exception as exc:
        SERVICES_STATE["broker"] = f"FAILED TO START: {exc}"
        raise
    if problem is not None:
        SERVICES_STATE["broker"] = f"NOT AVAILABLE: {problem}"
        pytest.fail(problem, pytrace=False)
    if handle.kind == "mosquitto":
        SERVICES_STATE["broker"] = handle.describe()
    else:
        why = "PARLEY_TEST_BROKER=builtin" if services.forced_builtin_broker() else "no mosquitto binary was found"
        SERVICES_STATE["broker"] = handle.describe() + f" -- because {why}"
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="session")
def pg_url():
    admin_url = services.pg_admin_url()
    problem = None
    try:
        url = services.create_database(admin_url)
    except services.ServiceUnavailable as exc:
        problem = str(exc)
    if problem is not None:  # outside the except block: no chained traceback noise
        if services.require_services():
            SERVICES_STATE["postgres"] = f"FAILED (PARLEY_REQUIRE_SERVICES=1): {problem}"
            pytest.fail(f"PARLEY_REQUIRE_SERVICES=1: {problem}", pytrace=False)
        SERVICES_STATE["postgres"] = f"NOT RUN (skipped): {problem}"
        pytest.skip(f"needs PostgreSQL (set PARLEY_TEST_PG_ADMIN_URL; CI requires it): {problem}")
    SERVICES_STATE["postgres"] = f"ran against fresh database {services.redact_url(url)}"
    try:
        yield url
    finally:
        services.drop_database(admin_url, url)


def pytest_collection_modifyitems(config, items):
    for item in items:
        for name in _USERS:
            if name in getattr(item, "fixturenames", ()):
                _USERS[name] += 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tr = terminalreporter
    tr.write_sep("=", "Real services")
    broker = SERVICES_STATE["broker"]
    if broker is None:
        broker = "not started (no selected test used mqtt_broker)" if not _USERS["mqtt_broker"] else "not started"
    tr.write_line(f"MQTT broker: {broker}")
    pg = SERVICES_STATE["postgres"]
    if pg is None:
        pg = "NOT RUN (no selected test used pg_url)" if not _USERS["pg_url"] else "NOT RUN (fixture never set up)"
    tr.write_line(f"PostgreSQL suites (tests using pg_url: {_USERS['pg_url']}): {pg}")
    if NEEDS_MOSQUITTO:
        tr.write_line(f"NOT RUN without Mosquitto ({len(NEEDS_MOSQUITTO)}): " + ", ".join(NEEDS_MOSQUITTO))
    if NEEDS_PG_PROGRAMS:
        tr.write_line(f"NOT RUN without PostgreSQL's initdb/pg_ctl ({len(NEEDS_PG_PROGRAMS)}): "
                      + ", ".join(NEEDS_PG_PROGRAMS))


def _mosquitto_only(request, broker, lacks: str):
    """The broker, unless it is the built-in one (without a mosquitto binary, or with
    PARLEY_TEST_BROKER=builtin, CI's second pass): then the test is skipped, named in the
    "Real services" summary, with what amqtt lacks."""
    if broker.kind == "builtin":
        NEEDS_MOSQUITTO.append(request.node.nodeid)
        # Never a missing service in CI: there PARLEY_REQUIRE_SERVICES=1 fails the run without
        # Mosquitto, and these tests run in its first pass, on Mosquitto.
        where = ("PARLEY_TEST_BROKER=builtin; CI runs it on Mosquitto in its other pass"
                 if services.forced_builtin_broker() else "no mosquitto binary on this machine")
        pytest.skip(f"needs Mosquitto ({where}): the built-in amqtt broker {lacks}")
    return broker


@pytest.fixture
def redelivering_broker(request, mqtt_broker):
    """A broker that redelivers unacknowledged QoS 1 messages after a disconnect."""
    return _mosquitto_only(request, mqtt_broker, "drops unacknowledged QoS 1 messages on disconnect")


@pytest.fixture
def mqtt5_broker(request, mqtt_broker):
    """A broker that takes MQTT 5 clients (and delivers between them and MQTT 3.1.1 ones)."""
    return _mosquitto_only(request, mqtt_broker, "speaks MQTT 3.1.1 only")


@pytest.fixture
def sharing_broker(request, mqtt_broker):
    """A broker with shared subscriptions (`$share/group/topic`)."""
    return _mosquitto_only(request, mqtt_broker, "has no shared subscriptions")


@pytest.fixture
def pg_database(pg_url):
    """A fresh PostgreSQL database for one test (the session's pg_url proves the server is there)."""
    admin = services.pg_admin_url()
    url = services.create_database(admin)
    try:
        yield url
    finally:
        services.drop_database(admin, url)


@pytest.fixture
def private_postgres(request):
    """A PostgreSQL server of this test's own, running, that it may stop and start again
    (an outage). Needs PostgreSQL's server programs: without them the test is skipped and
    named in the summary, or fails under PARLEY_REQUIRE_SERVICES=1 (CI)."""
    try:
        server = services.PrivateServer()
    except services.ServiceUnavailable as exc:
        problem = str(exc)
    else:
        problem = None
    if problem is not None:
        if services.require_services():
            pytest.fail(f"PARLEY_REQUIRE_SERVICES=1: {problem}", pytrace=False)
        NEEDS_PG_PROGRAMS.append(request.node.nodeid)
        pytest.skip(f"needs PostgreSQL's server programs: {problem}")
    try:
        server.start()
        yield server
    finally:
        server.destroy()
