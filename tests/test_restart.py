"""Kill -9 the server and start it again on the same data: nothing acknowledged is lost.

Runs `parley serve` as a real process against the private broker, with paho devices and
HTTP over real sockets.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from actors.device import Device
from eventstore import EventLog, StoreConfig
from gateways.mqtt_client import no_delay
from tests.services import free_port, start_parley

P, D = "thermostat", "restart-1"


def start_server(data_dir: Path, broker_url: str, port: int, database_url: str | None = None) -> subprocess.Popen:
    return start_parley(data_dir, broker_url, port, database_url, client_id="parley-restart-test")


class Thermostat:
    """A device that answers commands like the generated SDK."""

    def __init__(self, port: int) -> None:
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{D}", protocol=paho.MQTTv311)
        self.c.on_connect = self._connected
        self.c.on_message = self._command
        self.ready = threading.Event()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.ready.wait(5)

    def _connected(self, c, u, f, rc, p) -> None:
        no_delay(c)
        c.subscribe(f"device-agent/{P}/device/{D}/commands", qos=1)
        self.ready.set()

    def _command(self, c, u, m) -> None:
        cmd = json.loads(m.payload)
        c.publish(f"device-agent/{P}/device/{D}/responses", json.dumps(
            {"code": 0, "msg": "ok", "requestId": cmd["requestId"], "data": cmd["params"]}), qos=1)

    def send(self, kind: str, payload: dict) -> None:
        self.c.publish(f"v1/{P}/{D}/{kind}", json.dumps(payload), qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class TestRestart:
    @pytest.fixture
    def database_url(self):
        return None

    def test_kill_minus_nine_loses_nothing_acknowledged(self, tmp_path, mqtt_broker, database_url):
        port = free_port()
        server = start_server(tmp_path, mqtt_broker.url, port, database_url)
        if database_url is None:  # serve warmed the WAL (eventstore/recorders.py), so the
            # commits below and the crash recovery after the kill happen in a warmed one
            assert (tmp_path / "events.sqlite-wal").stat().st_size >= 40 << 20
        device = Thermostat(mqtt_broker.port)
        try:
            device.send("telemetry", {"type": "status", "data": {"status": "online", "state": {"temperature": 20}}})
            for seq in range(30):
                device.send("event", {"type": "event", "data": {"event": "temperature_alert", "seq": seq}})
            # A command needs a device Parley knows and sees online.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                r = httpx.get(f"http://127.0.0.1:{port}/api/devices/{D}", timeout=5)
                if r.status_code == 200 and r.json()["online"]:
                    break
                time.sleep(0.05)
            results = []
            for target in (21, 22, 23):
                r = httpx.post(f"http://127.0.0.1:{port}/api/devices/{D}/commands", timeout=10, json={
                    "command": "set_target_temperature", "params": {"target_temperature": target}, "timeoutMs": 5000})
                assert r.status_code == 200, r.text
                results.append(r.json()["requestId"])
            server.send_signal(signal.SIGKILL)
            server.wait(10)
            server = start_server(tmp_path, mqtt_broker.url, port, database_url)
            # Events the old process had not acknowledged come back from the broker's
            # persistent session; committed ones are in the log.
            deadline = time.monotonic() + 15
            seqs: set[int] = set()
            while time.monotonic() < deadline and len(seqs) < 30:
                body = httpx.get(f"http://127.0.0.1:{port}/api/devices/{D}/events?limit=1000", timeout=5).json()
                seqs = {e["data"]["seq"] for e in body["events"]}
                time.sleep(0.2)
            assert seqs == set(range(30))
            detail = httpx.get(f"http://127.0.0.1:{port}/api/devices/{D}", timeout=5).json()
            assert detail["state"]["temperature"] == 20 and detail["online"]
        finally:
            device.close()
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
        log = EventLog(StoreConfig.resolve(tmp_path, database_url))
        try:
            done = {e.request_id for e in log.read_stream(Device.create_id(P, D))
                    if type(e).__name__ == "CommandSucceeded"}
            assert set(results) <= done  # every command answered 200 is in the log
        finally:
            log.close()


class TestRestartPostgres(TestRestart):
    @pytest.fixture
    def database_url(self, pg_database):
        return pg_database
