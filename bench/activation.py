"""Activation: how long a DeviceActor takes to start from its stream, with a snapshot
(100k events) and without one (10k events, the baseline)."""

from __future__ import annotations

import time
from typing import Any

from eventsourcing.domain import Snapshot

from bench.common import Options, Result, console, ms, pct, quiet_logging, store

PRODUCT = "bench"


def write_stream(journal: Any, device_id: str, events: int, batch: int = 5000) -> Any:
    """A Device stream of `events` events written through the Journal in large batches."""
    from actors.device import Device

    device = Device(product_id=PRODUCT, device_id=device_id)
    now = int(time.time() * 1000)
    written = 1
    while written < events:
        for _ in range(min(batch, events - written)):
            written += 1
            device.report_state({"temperature": 20 + written % 50 / 10, "humidity": 50}, now, now + written, None)
        journal.commit(device.collect_events(), timeout=300)
    pending = device.collect_events()
    if pending:
        journal.commit(pending, timeout=300)
    return device


def probe() -> Any:
    """A message that needs the actor's state but writes nothing. (It was an unmatched
    response until those began to reload the stream, which another process may have
    written: that timed two loads.)"""
    from actors.device import Wake
    from actors.ports import FutureReply

    reply = FutureReply()
    return Wake(reply=reply), reply


def timed_asks(system: Any, key: tuple[str, str], runs: int, *, passivate: bool) -> list[float]:
    """Time tell + reply; with `passivate`, the actor is passivated (and gone) between runs,
    so every run is an activation from the log."""
    from actors.device import DeviceActor

    out = []
    for _ in range(runs):
        msg, reply = probe()
        t = time.perf_counter()
        system.tell(DeviceActor, key, msg)
        reply.get(60)
        out.append(time.perf_counter() - t)
        if passivate:
            system.passivate_idle(now=time.monotonic() + 1e9, wait=True)
    return out


def run(opts: Options) -> Result:
    quiet_logging()
    from actors.system import ActorSystem
    from eventstore import EventLog, Journal, StoreConfig

    big, small = 100_000, 10_000
    runs_snap, runs_full = (30, 3) if opts.quick else (100, 10)
    r = Result("activation", target="p99 <= 5 ms with snapshots (100k-event stream)")
    with store(opts, "activation") as (data_dir, url):
        log = EventLog(StoreConfig.resolve(data_dir, url))
        journal = Journal(log)
        system = ActorSystem(log, journal)
        try:
            console.print(f"  activation: writing a {big:,}-event stream through the Journal ...")
            t = time.perf_counter()
            device = write_stream(journal, "big", big)
            write_s = time.perf_counter() - t
            log.put_snapshot(Snapshot.take(device))
            console.print(f"  activation: writing a {small:,}-event stream (no snapshot) ...")
            write_stream(journal, "small", small)
            console.print(f"  activation: {runs_snap} activations of the {big:,}-event stream with its snapshot ...")
            snap = timed_asks(system, (PRODUCT, "big"), runs_snap, passivate=True)
            console.print(f"  activation: {runs_full} activations of the {small:,}-event stream without snapshot ...")
            full = timed_asks(system, (PRODUCT, "small"), runs_full, passivate=True)
            warm = timed_asks(system, (PRODUCT, "big"), 200, passivate=False)
        finally:
            system.shutdown()
            journal.close()
            log.close()
    r.add(f"writing the {big:,}-event stream", f"{write_s:.1f} s ({big / write_s:,.0f} events/s, 5,000 per commit)")
    r.add(f"activation, {big:,} events + snapshot, p50 / p99 ({runs_snap} runs)", f"{ms(pct(snap, 50))} / {ms(pct(snap, 99))}")
    r.add(f"baseline: activation, {small:,} events, no snapshot, p50 / p99 ({runs_full} runs)",
          f"{ms(pct(full, 50))} / {ms(pct(full, 99))}")
    r.add("already active actor: tell + reply p50 / p99 (200 runs)", f"{ms(pct(warm, 50))} / {ms(pct(warm, 99))}")
    r.met = pct(snap, 99) <= 0.005
    return r
