"""Ingest: telemetry from simulated devices at QoS 0, committed and visible in the
device registry view, against a bare paho subscriber on the same publish stream."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import (Options, Result, consumer_cpus, console, cpu_by_group, pinned, quiet_logging, store,
                          thread_cpu, wait_until)
from bench.processes import PublisherProcess
from gateways.demo import THERMOSTAT
from gateways.simulate import Simulator

DEVICES = 200
# The publisher is not paced: it sends as fast as it can, so each consumer's rate is its
# own capacity, not the publisher's. (Paced at 25k msg/s, as an earlier version was, the
# bare subscriber simply kept up and the ratio looked twice as good as it is.)
PUBLISH_RATE = None


def make_stream(count: int) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """(warm-up: one status online per device, measured: `count` state messages)."""
    sim = Simulator(THERMOSTAT["device_spec"], "thermostat", devices=DEVICES, prefix="bench", seed=1)
    warm = [(sim.telemetry_topic(d.device_id), sim.status(d, with_state=True)) for d in sim.devices]
    msgs = []
    for i in range(count):
        d = sim.devices[i % DEVICES]
        sim.step_state(d)
        msgs.append((sim.telemetry_topic(d.device_id), sim.state(d)))
    return warm, msgs


def baseline(opts: Options, msgs: list[tuple[str, bytes]]) -> dict[str, float]:
    b = opts.broker
    count = [0]
    last = [0.0]
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{uuid.uuid4().hex[:6]}")

    def on_message(c: Any, u: Any, m: paho.MQTTMessage) -> None:
        count[0] += 1
        last[0] = time.perf_counter()

    ready = threading.Event()
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: ready.set()
    sub.connect(b.host, b.port)
    sub.loop_start()
    sub.subscribe("v1/+/+/telemetry", 1)
    ready.wait(5)
    pub = PublisherProcess(b.host, b.port, msgs, PUBLISH_RATE)
    try:
        cpu0 = thread_cpu()
        t0 = time.perf_counter()
        pub.run()
        n = len(msgs)
        prev = -1
        while count[0] < n and count[0] != prev:  # stop when done, or when nothing arrives for 2 s
            prev = count[0]
            wait_until(lambda: count[0] >= n, 2.0)
        cpu = cpu_by_group(cpu0, thread_cpu(), lambda name: "paho" if name.startswith("paho") else "other")
        return {"received": count[0], "rate": count[0] / (last[0] - t0), "publish_rate": pub.finish(),
                "cpu": cpu}
    finally:
        sub.disconnect()
        sub.loop_stop()


def parley(opts: Options, warm: list[tuple[str, bytes]], msgs: list[tuple[str, bytes]]) -> dict[str, float]:
    from gateways.demo import ensure_demo_agent
    from gateways.mqtt import MqttGateway
    from gateways.runtime import Runtime, RuntimeSettings

    with store(opts, "ingest") as (data_dir, url):
        runtime = Runtime(RuntimeSettings(data_dir=data_dir, database_url=url))
        runtime.start()
        gw = MqttGateway(runtime, opts.broker.url, client_id=f"bench-parley-{uuid.uuid4().hex[:6]}")
        runtime.attach_device_link(gw)
        gw.start()
        try:
            ensure_demo_agent(runtime)
            warm_pub = PublisherProcess(opts.broker.host, opts.broker.port, warm, PUBLISH_RATE)
            warm_pub.run()
            warm_pub.finish()
            proj = runtime.projections
            assert wait_until(lambda: runtime.devices.count("thermostat") >= DEVICES
                              and proj.position >= runtime.log.max_position(), 60), "warm-up did not finish"
            applied0, received0, batches0 = proj.applied, gw.stats["received"], runtime.journal.batches
            n = len(msgs)
            pub = PublisherProcess(opts.broker.host, opts.broker.port, msgs, PUBLISH_RATE)
            cpu0 = thread_cpu()
            t0 = time.perf_counter()
            pub.run()
            done = [0.0]

            def visible() -> bool:
                got = proj.applied - applied0
                if got >= n:
                    done[0] = time.perf_counter()
                    return True
                return False

            prev = -1
            while not visible() and proj.applied != prev:  # progress, or give up after 5 s idle
                prev = proj.applied
                wait_until(visible, 5.0, 0.002)
            applied = proj.applied - applied0
            end = done[0] or time.perf_counter()
            _after = thread_cpu()
            cpu = cpu_by_group(cpu0, _after, _thread_group)
            t_pub = pub.finish()
            return {"received": gw.stats["received"] - received0, "applied": applied,
                    "rate": applied / (end - t0), "publish_seconds": t_pub,
                    "journal_batches": runtime.journal.batches - batches0, "active_actors": runtime.system.active_count(),
                    "cpu": cpu}
        finally:
            gw.stop()
            runtime.close()


def _thread_group(name: str) -> str:
    if name.startswith("paho"):
        return "network thread (paho + gateway)"
    if name.startswith(("DeviceActor", "AgentActor")):
        return "actor threads"
    if name == "journal-writer":
        return "journal writer"
    if name.startswith("projection"):
        return "projection runner"
    return "other threads"


def _per_message(cpu: dict[str, float], n: int) -> str:
    parts = [f"{k} {v / n * 1e6:.1f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v / n >= 0.5e-6]
    return f"{sum(cpu.values()) / n * 1e6:.1f} µs ({'; '.join(parts)})" if cpu else "n/a (no /proc)"


def run(opts: Options) -> Result:
    quiet_logging()
    count = 20_000 if opts.quick else 100_000
    r = Result("ingest", target="Parley / bare subscriber >= 0.5")
    warm, msgs = make_stream(count)
    console.print(f"  ingest: {count} state messages from {DEVICES} devices, QoS 0, publisher process unpaced")
    console.print("  ingest: baseline (bare paho subscriber) ...")
    with pinned(consumer_cpus()):  # each consumer gets core 0, the publisher the last core
        base = baseline(opts, msgs)
    console.print("  ingest: Parley (gateway -> actors -> journal -> registry view) ...")
    with pinned(consumer_cpus()):
        par = parley(opts, warm, msgs)
    ratio = par["rate"] / base["rate"]
    r.add("messages", f"{count} from {DEVICES} devices; publisher unpaced on its own core, consumer on core 0, "
          "mosquitto unpinned")
    r.add("publisher achieved", f"{base['publish_rate']:,.0f} msg/s")
    r.add("bare subscriber", f"{base['rate']:,.0f} msg/s ({base['received']}/{count} received)")
    r.add("Parley committed + visible in registry view",
          f"{par['rate']:,.0f} msg/s ({par['applied']}/{count} applied, {par['received']} received by gateway)")
    r.add("ratio", f"{ratio:.2f}")
    r.add("Parley journal transactions", f"{par['journal_batches']:,} ({par['applied'] / max(par['journal_batches'], 1):.0f} "
          "events each on average)")
    r.add("CPU per message, bare subscriber (µs)", _per_message(base["cpu"], count))
    r.add("CPU per message, Parley (µs, by thread)", _per_message(par["cpu"], count))
    r.met = ratio >= 0.5 and par["applied"] >= count
    if base["received"] < count:
        r.notes.append(f"the bare subscriber lost {count - base['received']} QoS 0 messages (broker queue limits)")
    if par["applied"] < count:
        r.notes.append(f"Parley applied only {par['applied']} of {count}")
    return r
