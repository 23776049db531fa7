"""Two `parley serve` processes on one PostgreSQL database and one broker (shared MQTT
subscription): one writes the views, both answer HTTP from them, and when the owner is
killed (-9) the other takes over and the views keep moving."""

from __future__ import annotations

import json
import signal

import httpx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from actors.device import Device
from eventstore import EventLog, StoreConfig
from tests.services import free_port, start_parley, stop_parley
from tests.support import wait_until

P, D = "thermostat", "shared-1"


def health(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5).json()


def device_state(port: int) -> dict | None:
    r = httpx.get(f"http://127.0.0.1:{port}/api/devices/{D}", timeout=5)
    return r.json()["state"] if r.status_code == 200 else None


def reports_in_log(database_url: str) -> int:
    log = EventLog(StoreConfig(database_url))
    try:
        return sum(isinstance(e, Device.StateReported) for e in log.read_stream(Device.create_id(P, D)))
    finally:
        log.close()


def test_one_process_writes_the_views_and_the_other_takes_over(tmp_path, sharing_broker, pg_database, monkeypatch):
    mqtt_broker = sharing_broker
    monkeypatch.setenv("PARLEY_MQTT_SHARED_GROUP", "parley")  # the broker splits device traffic
    port_a, port_b = free_port(), free_port()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = start_parley(tmp_path / "a", mqtt_broker.url, port_a, pg_database, client_id="parley-shared-a")
    b = start_parley(tmp_path / "b", mqtt_broker.url, port_b, pg_database, client_id="parley-shared-b")
    device = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{D}", protocol=paho.MQTTv311)
    device.connect(mqtt_broker.host, mqtt_broker.port)
    device.loop_start()
    try:
        assert (health(port_a)["projectionOwner"], health(port_b)["projectionOwner"]) == (True, False)

        def report(i: int) -> None:
            device.publish(f"v1/{P}/{D}/telemetry", json.dumps({"type": "state", "data": {"i": i}}),
                           qos=1).wait_for_publish(5)

        for i in range(20):  # spread over both processes by the shared subscription
            report(i)
        # Both processes committed into the one stream (optimistic concurrency), and both
        # answer from the one set of views. (Mosquitto hands shared-subscription messages out
        # round robin, so the reports of one device need not be committed in publish order.)
        assert wait_until(lambda: reports_in_log(pg_database) == 20, 15)
        assert wait_until(lambda: device_state(port_a) is not None and device_state(port_a) == device_state(port_b)
                          and health(port_a)["projectionPosition"] == health(port_a)["logPosition"], 15)

        a.send_signal(signal.SIGKILL)
        a.wait(10)
        assert wait_until(lambda: health(port_b)["projectionOwner"], 15), "b did not take over the views"
        before = health(port_b)["logPosition"]
        # a's persistent session keeps its share of the group's messages queued until a
        # comes back (nothing is lost); b commits its share, and now writes the views too.
        for i in range(20, 30):
            report(i)
        assert wait_until(lambda: health(port_b)["logPosition"] > before
                          and health(port_b)["projectionPosition"] == health(port_b)["logPosition"], 15)
        assert device_state(port_b)["i"] >= 20
    finally:
        device.disconnect()
        device.loop_stop()
        stop_parley(b)
        if a.poll() is None:
            stop_parley(a)
