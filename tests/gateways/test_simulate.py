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


@pytest.fixture
def quiet_sim(mqtt_broker, observer):
    """One device whose heartbeat never fires during a test, so its messages after the
    connect sequence are exactly what a command made it send."""
    s = Simulator(SPEC, "thermostat", devices=1, interval=3600, mqtt_url=mqtt_broker.url,
                  connections=1, prefix=f"q{uuid.uuid4().hex[:6]}", seed=7)
    s.start()
    yield s
    s.stop()


def device_messages(obs: Observer, sim: Simulator, i: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """(kind, payload) for everything device i sent, in arrival order; kind is the topic's last part."""
    d = sim.devices[i].device_id
    topics = {sim.telemetry_topic(d): "telemetry", sim.event_topic(d): "event", sim.response_topic(d): "response"}
    with obs._cond:
        return [(topics[t], p) for t, p in obs.messages if t in topics]


def after_command(obs: Observer, sim: Simulator, request_id: str) -> list[tuple[str, dict[str, Any]]]:
    """What the quiet device sent after its 3-message connect sequence, up to the response."""
    response_for(obs, sim, 0, request_id)
    msgs = device_messages(obs, sim)
    assert [p["type"] for _, p in msgs[:3]] == ["status", "status", "state"]  # the connect sequence
    return msgs[3:]


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
    assert sim.devices[1].state["target_temperature"] == 24
    assert sim.counters()["answered"] == 1


def test_command_sequence_is_the_sdks(quiet_sim, observer):
    """REFERENCE.md: after a command the SDK publishes status-with-state, state, an event,
    then the response -- in exactly that order."""
    observer.command("thermostat", quiet_sim.devices[0].device_id,
                     {"cmd": "set_target_temperature", "requestId": "r-seq",
                      "params": {"target_temperature": 24}, "ts": 1})
    msgs = after_command(observer, quiet_sim, "r-seq")
    assert [k for k, _ in msgs] == ["telemetry", "telemetry", "event", "response"]
    status, state, event, resp = (p for _, p in msgs)
    expected_state = {"temperature": 22, "humidity": 50, "mode": "auto", "target_temperature": 24}
    assert status["type"] == "status" and status["data"] == {"status": "online", "state": expected_state}
    assert state["type"] == "state" and state["data"] == expected_state
    assert event["type"] == "event" and isinstance(event["ts"], int)
    assert event["metadata"] == {"productId": "thermostat", "modelId": "thermostat"}
    assert event["data"] == {"event": "set_target_temperature", "target_temperature": 24}
    assert set(resp) == {"code", "msg", "requestId", "ts", "metadata", "data"}
    assert (resp["code"], resp["msg"], resp["requestId"], resp["data"]) == (0, "ok", "r-seq", {"target_temperature": 24})
    c = quiet_sim.counters()
    assert (c["answered"], c["events"]) == (1, 1)


def test_without_state_on_command_only_the_response(mqtt_broker, observer):
    s = Simulator(SPEC, "thermostat", devices=1, interval=3600, mqtt_url=mqtt_broker.url, connections=1,
                  prefix=f"q{uuid.uuid4().hex[:6]}", state_on_command=False)
    s.start()
    try:
        observer.command("thermostat", s.devices[0].device_id,
                         {"cmd": "set_target_temperature", "requestId": "r-bare",
                          "params": {"target_temperature": 21}, "ts": 1})
        msgs = after_command(observer, s, "r-bare")
        assert [k for k, _ in msgs] == ["response"] and msgs[0][1]["code"] == 0
        assert s.counters()["events"] == 0
    finally:
        s.stop()


@pytest.mark.parametrize("cmd, params, code", [
    ("self_destruct", {}, 404),
    ("set_target_temperature", {"target_temperature": "hot"}, 400),
])
def test_rejected_command_sends_the_response_only(quiet_sim, observer, cmd, params, code):
    """Nothing was applied, so no telemetry and no command event: just the error response."""
    observer.command("thermostat", quiet_sim.devices[0].device_id,
                     {"cmd": cmd, "requestId": "r-bad", "params": params, "ts": 1})
    msgs = after_command(observer, quiet_sim, "r-bad")
    assert [k for k, _ in msgs] == ["response"] and msgs[0][1]["code"] == code
    c = quiet_sim.counters()
    assert (c["rejected"], c["answered"], c["events"]) == (1, 0, 0)


def test_command_event_never_renames_itself():
    sim = Simulator(SPEC, "thermostat", devices=1)  # payloads only: never started
    data = json.loads(sim.command_event("set_target_temperature", {"target_temperature": 24, "event": "x"}))["data"]
    assert data == {"event": "set_target_temperature", "target_temperature": 24}


def test_command_event_reaches_parleys_event_log(tmp_path, mqtt_broker):
    """End to end: a command through Parley's MQTT gateway to a simulated device, whose
    command event is stored where `GET /api/devices/:id/events` reads it."""
    from actors.device import DeviceActor, SendCommand
    from actors.ports import FutureReply
    from gateways.mqtt import MqttGateway
    from tests.support import create_agent, make_runtime, wait_until

    runtime = make_runtime(tmp_path)
    gw = MqttGateway(runtime, mqtt_broker.url, client_id=f"parley-test-{time.monotonic_ns()}")
    runtime.attach_device_link(gw)
    gw.start()
    s = Simulator(SPEC, "thermostat", devices=1, interval=3600, mqtt_url=mqtt_broker.url, connections=1,
                  prefix=f"e{uuid.uuid4().hex[:6]}")
    try:
        create_agent(runtime)
        s.start()
        d = s.devices[0].device_id
        wait_until(lambda: any(row.online for row in runtime.devices.find(d, "thermostat")))
        reply = FutureReply()
        runtime.system.tell(DeviceActor, ("thermostat", d), SendCommand(
            "req-e2e", "set_target_temperature", {"target_temperature": 25}, 5000, reply=reply))
        assert reply.get(5)["data"] == {"target_temperature": 25}
        (ev,) = wait_until(lambda: runtime.device_events.recent("thermostat", d, 10))
        assert (ev.name, ev.data) == ("set_target_temperature", {"target_temperature": 25})
    finally:
        s.stop()
        gw.stop()
        runtime.close()


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


def test_stop_is_bounded_when_a_network_thread_does_not_end(mqtt_broker, monkeypatch):
    """paho's loop_stop waits for its thread without a limit: a stuck one must not keep the
    simulator (and `parley simulate` on SIGTERM) from stopping."""
    import structlog.testing

    s = Simulator(SPEC, "thermostat", devices=1, interval=3600, mqtt_url=mqtt_broker.url, connections=1,
                  prefix=f"stuck-{uuid.uuid4().hex[:6]}")
    s.start()
    client = s._clients[0]
    release = threading.Event()
    real_loop_stop = client.loop_stop
    monkeypatch.setattr(client, "loop_stop", lambda: release.wait(30))
    started = time.monotonic()
    try:
        with structlog.testing.capture_logs() as logs:
            s.stop()
        assert time.monotonic() - started < 8
        assert [e["connections"] for e in logs if e["event"] == "simulate.stop_incomplete"] == [1]
    finally:
        release.set()
        real_loop_stop()
