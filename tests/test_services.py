"""The real-service fixtures themselves: mqtt_broker (private mosquitto) and pg_url."""

from __future__ import annotations

import queue
import socket
import uuid

import psycopg
import pytest
from paho.mqtt.client import CallbackAPIVersion, Client, MQTTv311

from tests import services

TIMEOUT = 5.0


def _connected_client(broker, client_id: str) -> tuple[Client, queue.Queue]:
    messages: queue.Queue = queue.Queue()
    events: queue.Queue = queue.Queue()
    c = Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTv311)
    c.on_connect = lambda _c, _u, _f, rc, _p: events.put(("connack", rc))
    c.on_subscribe = lambda _c, _u, _mid, rcs, _p: events.put(("suback", rcs))
    c.on_message = lambda _c, _u, msg: messages.put(msg)
    c.connect(broker.host, broker.port, keepalive=30)
    c.loop_start()
    kind, rc = events.get(timeout=TIMEOUT)
    assert kind == "connack" and not rc.is_failure, rc
    c._test_events = events  # type: ignore[attr-defined]
    return c, messages


def test_mqtt_broker_attributes(mqtt_broker):
    assert mqtt_broker.host == "127.0.0.1"
    assert mqtt_broker.url == f"mqtt://127.0.0.1:{mqtt_broker.port}"
    assert mqtt_broker.kind in {"mosquitto", "builtin"}
    if services.forced_builtin_broker():
        assert mqtt_broker.kind == "builtin"
    elif services.find_mosquitto():
        assert mqtt_broker.kind == "mosquitto"
        assert mqtt_broker.port != 1883  # private instance, not the system broker
        assert mqtt_broker.log_path is not None and mqtt_broker.config_path.exists()
    with socket.create_connection((mqtt_broker.host, mqtt_broker.port), timeout=TIMEOUT):
        pass


@pytest.mark.parametrize("qos", [0, 1])
def test_mqtt_broker_pub_sub_roundtrip(mqtt_broker, qos):
    topic = f"v1/acme/{uuid.uuid4().hex[:8]}/telemetry"
    sub, messages = _connected_client(mqtt_broker, f"sub-{uuid.uuid4().hex[:8]}")
    pub, _ = _connected_client(mqtt_broker, f"pub-{uuid.uuid4().hex[:8]}")
    try:
        sub.subscribe("v1/+/+/telemetry", qos=qos)
        kind, rcs = sub._test_events.get(timeout=TIMEOUT)
        assert kind == "suback" and [rc.value for rc in rcs] == [qos]
        info = pub.publish(topic, b"ping", qos=qos)
        info.wait_for_publish(TIMEOUT)
        msg = messages.get(timeout=TIMEOUT)
        assert (msg.topic, msg.payload, msg.qos) == (topic, b"ping", qos)
    finally:
        for c in (sub, pub):
            c.disconnect()
            c.loop_stop()


@pytest.mark.postgres
def test_pg_url_is_a_fresh_empty_writable_database(pg_url):
    dbname = services._dbname(pg_url)
    assert dbname.startswith("parley_test_") and len(dbname) == len("parley_test_") + 8
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert conn.execute("SELECT current_database()").fetchone()[0] == dbname
        user_tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables"
            " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
        ).fetchone()[0]
        assert user_tables == 0
        conn.execute("CREATE TABLE IF NOT EXISTS _fixture_probe (id serial PRIMARY KEY, body text NOT NULL)")
        conn.execute("INSERT INTO _fixture_probe (body) VALUES (%s)", ("hello",))
        assert conn.execute("SELECT body FROM _fixture_probe").fetchall() == [("hello",)]
        conn.execute("DROP TABLE _fixture_probe")


def test_create_and_drop_database_helpers(pg_url):
    """create_database/drop_database work without pytest (as benchmarks use them).
    `pg_url` proves the server is there (or skips / fails as the session decided)."""
    admin = services.pg_admin_url()
    url = services.create_database(admin)
    name = services._dbname(url)
    # A lingering connection must not block the drop (WITH (FORCE)).
    lingering = psycopg.connect(url)
    try:
        services.drop_database(admin, url)
    finally:
        lingering.close()
    with psycopg.connect(admin, autocommit=True) as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None


def test_unreachable_postgres_is_reported_not_hung():
    port = services.free_port()  # nothing listens there
    with pytest.raises(services.ServiceUnavailable, match=rf"PostgreSQL not reachable at .*:{port}"):
        services.create_database(f"postgresql://postgres:secret@127.0.0.1:{port}/postgres")
    assert services.redact_url("postgresql://u:secret@h:1/db") == "postgresql://u:***@h:1/db"


def test_database_url_keeps_server_and_replaces_dbname():
    assert (
        services._database_url("postgresql://postgres@127.0.0.1:5432/postgres?sslmode=disable", "parley_test_0a1b2c3d")
        == "postgresql://postgres@127.0.0.1:5432/parley_test_0a1b2c3d?sslmode=disable"
    )
    kv = services._database_url("host=127.0.0.1 user=postgres dbname=postgres", "parley_test_0a1b2c3d")
    assert services._dbname(kv) == "parley_test_0a1b2c3d"
