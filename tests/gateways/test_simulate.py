"""`gateways.simulate.Simulator` against a real broker, observed by bare paho clients."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any, Callable

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateways.demo import THERMOSTAT
from gateways.simulate import Simulator

SPEC = THERMOSTAT["device_spec"]


class Observer:
    """A paho client recording every telemetry, event and response message."""

    def __init__(self, url_host: str, port: int) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._cond = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"obs-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(url_host, port)
        self.client.loop_start()
        self.client.subscribe([("v1/+/+/telemetry", 1), ("v1/+/+/event", 1),
                               ("device-agent/+/device/+/responses", 1)])
        assert subscribed.wait(5)

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, json.loads(msg.payload)))
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[list[tuple[str, dict[str, Any]]]], Any], timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = pred(self.messages)
                if found:
                    return found
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"timed out; got {self.messages[-10:]}"
                self._cond.wait(remaining)

    def of(self, topic: str) -> list[dict[str, Any]]:
        with self._cond:
            return [p for t, p in self.messages if t == topic]

    def command(self, product: str, device: str, payload: dict[str, Any]) -> None:
        self.client.publish(f"device-agent/{product}/device/{device}/commands", json.dumps(payload), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def observer(mqtt_broker):
    obs = Observer(mqtt_broker.host, mqtt_broker.port)
    yield obs
    obs.close()


@pytest.fixture
def sim(mqtt_broker, observer):
    s = Simulator(SPEC, "thermostat", devices=3, interval=0.3, mqtt_url=mqtt_broker.url,
                  connections=2, prefix=f"t{uuid.uuid4().hex[:6]}", seed=7)
    s.start()
    yield s
    s.stop()


def telemetry(sim: Simulator, i: int = 0) -> str:
    return sim.telemetry_topic(sim.devices[i].device_id)


def response_for(obs: Observer, sim: Simulator, i: int, request_id: str) -> dict[str, Any]:
    topic = sim.response_topic(sim.devices[i].device_id)
    return obs.wait_for(lambda _: next((p for p in obs.of(topic) if p.get("requestId") == request_id), None))


def test_connect_sequence(sim, observer):
    for i in range(3):
        topic = telemetry(sim, i)
        msgs = observer.wait_for(lambda _: len(observer.of(topic)) >= 3 and observer.of(topic))
        first, second, third = msgs[:3]
        assert first["type"] == "status" and first["data"] == {"status": "online"}
        assert first["metadata"]["productId"] == "thermostat" and isinstance(first["ts"], int)
        assert second["type"] == "status" and second["data"]["status"] == "online"
        assert second["data"]["state"] == {"temperature": 22, "humidity": 50, "mode": "auto"}
        assert third["type"] == "state" and third["data"] == {"temperature": 22, "humidity": 50, "mode": "auto"}
    assert sim.counters()["connected_devices"] == 3


def test_heartbeat_and_drifting_state(sim, observer):
    topic = telemetry(sim)
    msgs = observer.wait_for(lambda _: len(observer.of(topic)) >= 5 and observer.of(topic))
    heartbeat, state = msgs[3], msgs[4]
    assert heartbeat["type"] == "status" and heartbeat["data"] == {"status": "online"}
    assert state["type"] == "state" and set(state["data"]) == {"temperature", "humidity", "mode"}
    assert abs(state["data"]["temperature"] - 22) < 5 and state["data"]["mode"] == "auto"


def test_alert_event_when_temperature_crosses_threshold(sim, observer):
    device = sim.devices[0]
    device.state["temperature"] = 30.0  # far above default + ALERT_DELTA: next tick alerts
    topic = sim.event_topic(device.device_id)
    events = observer.wait_for(lambda _: observer.of(topic))
    assert events[0]["type"] == "event" and events[0]["data"]["event"] == "temperature_alert"
    assert events[0]["data"]["level"] == "warning" and events[0]["data"]["temperature"] > 24
    assert events[0]["metadata"]["productId"] == "thermostat"


def test_valid_command_applied_and_answered(sim, observer):
    d = sim.devices[1]
    observer.command("thermostat", d.device_id, {"cmd": "set_target_temperature", "requestId": "r-ok",
                                                 "params": {"target_temperature": 24}, "ts": 1})
    resp = response_for(observer, sim, 1, "r-ok")
    assert resp["code"] == 0 and resp["msg"] == "ok" and resp["data"] == {"target_temperature": 24}
    assert resp["metadata"]["productId"] == "thermostat" and isinstance(resp["ts"], int)
    # status-with-state and state carrying the new value were published before the response
    order = [(t, p) for t, p in observer.messages if t in (telemetry(sim, 1), sim.response_topic(d.device_id))]
    idx = next(i for i, (t, p) in enumerate(order) if p.get("requestId") == "r-ok")
    before = [p for _, p in order[:idx]]
    assert any(p["type"] == "status" and p["data"].get("state", {}).get("target_temperature") == 24 for p in before)
    assert any(p["type"] == "state" and p["data"].get("target_temperature") == 24 for p in before)
    assert sim.counters()["answered"] == 1


def test_unknown_command_404(sim, observer):
    observer.command("thermostat", sim.devices[0].device_id, {"cmd": "self_destruct", "requestId": "r-404",
                                                              "params": {}, "ts": 1})
    resp = response_for(observer, sim, 0, "r-404")
    assert resp["code"] == 404 and resp["msg"] == "unknown command"


@pytest.mark.parametrize("params", [{"target_temperature": "hot"}, {}, {"target_temperature": 20, "x": 1}])
def test_invalid_params_400(sim, observer, params):
    observer.command("thermostat", sim.devices[2].device_id, {"cmd": "set_target_temperature",
                                                              "requestId": "r-400", "params": params, "ts": 1})
    resp = response_for(observer, sim, 2, "r-400")
    assert resp["code"] == 400 and resp["msg"] == "invalid params"
    assert "target_temperature" not in sim.devices[2].state or sim.devices[2].state["target_temperature"] != "hot"


def test_offline_on_stop(mqtt_broker, observer):
    s = Simulator(SPEC, "thermostat", devices=4, interval=60, mqtt_url=mqtt_broker.url,
                  connections=2, prefix=f"t{uuid.uuid4().hex[:6]}")
    s.start()
    s.stop()
    for d in s.devices:
        topic = s.telemetry_topic(d.device_id)
        msgs = observer.wait_for(lambda _: len(observer.of(topic)) >= 4 and observer.of(topic))
        assert msgs[-1]["type"] == "status" and msgs[-1]["data"] == {"status": "offline"}
    assert s.counters()["connected_devices"] == 0
