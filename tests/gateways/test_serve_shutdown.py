"""SIGTERM to `parley serve` while a command waits on its device: the caller gets 503
`unavailable` as JSON (docs/http-api.md), not a connection closed without a response, and
the server then stops normally. A real process, the private broker, HTTP over real sockets."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.services import free_port, start_parley, stop_parley

P, D = "thermostat", "shutdown-1"


def test_a_waiting_command_gets_503_json_on_sigterm(tmp_path, mqtt_broker) -> None:
    port = free_port()
    server = start_parley(tmp_path, mqtt_broker.url, port, client_id="parley-shutdown-test")
    commands: list[dict] = []
    got_command = threading.Event()
    subscribed = threading.Event()
    device = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{D}", protocol=paho.MQTTv311)
    device.on_subscribe = lambda *a: subscribed.set()
    # A device that hears its commands and never answers them.
    device.on_message = lambda c, u, m: (commands.append(json.loads(m.payload)), got_command.set())
    try:
        device.connect("127.0.0.1", mqtt_broker.port)
        device.loop_start()
        device.subscribe(f"device-agent/{P}/device/{D}/commands", qos=1)
        assert subscribed.wait(5)
        device.publish(f"v1/{P}/{D}/telemetry", json.dumps(
            {"type": "status", "data": {"status": "online"}}), qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while not httpx.get(f"http://127.0.0.1:{port}/api/devices/{D}", timeout=5).json().get("online"):
            assert time.monotonic() < deadline, "the device never came online"
            time.sleep(0.05)

        answer: list[httpx.Response | BaseException] = []

        def command() -> None:
            try:
                answer.append(httpx.post(
                    f"http://127.0.0.1:{port}/api/devices/{D}/commands", timeout=30,
                    json={"command": "set_target_temperature", "params": {"target_temperature": 5},
                          "timeoutMs": 60_000}))
            except BaseException as exc:  # e.g. RemoteProtocolError: no response at all
                answer.append(exc)

        caller = threading.Thread(target=command)
        caller.start()
        assert got_command.wait(10), "the command never reached the device"

        start = time.monotonic()
        server.send_signal(signal.SIGTERM)
        caller.join(15)
        answered = time.monotonic() - start
        assert server.wait(15) == 0  # stopped normally
        log = (tmp_path / "server.log").read_text()
    finally:
        device.loop_stop()
        device.disconnect()
        stop_parley(server)

    assert len(answer) == 1 and isinstance(answer[0], httpx.Response), f"{answer!r}\n{log[-2000:]}"
    r = answer[0]
    assert r.status_code == 503
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"error": "server is shutting down", "code": "unavailable",
                        "requestId": commands[0]["requestId"]}
    assert answered < 1.0, answered  # at SIGTERM, not when hypercorn's 2 s drain runs out
