"""10k actors: start N device actors (short streams) vs N bare pykka ThreadingActors.

Each side runs in a fresh child process (`python -m bench.actors10k bare|parley N ...`),
so RSS deltas do not leak into each other."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from bench.common import Options, Result, console, rss_kib, store


def child_bare(n: int) -> dict[str, Any]:
    import pykka

    class Ping(pykka.ThreadingActor):
        def on_receive(self, message: Any) -> Any:
            return message

    rss0 = rss_kib()
    t = time.perf_counter()
    refs = [Ping.start() for _ in range(n)]
    futures = [ref.ask("ping", block=False) for ref in refs]
    for f in futures:
        f.get(timeout=60)
    start_s = time.perf_counter() - t
    rss1 = rss_kib()
    t = time.perf_counter()
    pykka.ActorRegistry.stop_all()
    return {"start_s": start_s, "rss_kib": rss1 - rss0, "stop_s": time.perf_counter() - t}


def child_parley(n: int, data_dir: str, url: str | None) -> dict[str, Any]:
    from actors.device import Device, DeviceActor
    from actors.system import ActorSystem
    from bench.activation import PRODUCT, probe
    from eventstore import EventLog, Journal, StoreConfig
    from gateways.logs import configure_logging

    configure_logging("console", "error")
    log = EventLog(StoreConfig.resolve(data_dir, url))
    journal = Journal(log)
    now = int(time.time() * 1000)
    batch: list[Any] = []
    for i in range(n):
        d = Device(product_id=PRODUCT, device_id=f"d{i:05d}")
        d.report_status("online", {"temperature": 21}, now, now, None)
        d.report_state({"temperature": 21.5, "humidity": 50}, now, now, None)
        batch.extend(d.collect_events())
        if len(batch) >= 3000:
            journal.commit(batch, timeout=120)
            batch = []
    if batch:
        journal.commit(batch, timeout=120)
    system = ActorSystem(log, journal)
    rss0 = rss_kib()
    t = time.perf_counter()
    replies = []
    for i in range(n):
        msg, reply = probe()
        system.tell(DeviceActor, (PRODUCT, f"d{i:05d}"), msg)
        replies.append(reply)
    deadline = time.monotonic() + 120
    failed: dict[str, int] = {}
    for reply in replies:
        try:
            reply.get(max(0.01, deadline - time.monotonic()))
        except Exception as exc:  # no reply: the actor died (e.g. on_start failed) or timed out
            failed[type(exc).__name__] = failed.get(type(exc).__name__, 0) + 1
    start_s = time.perf_counter() - t
    rss1 = rss_kib()
    active = system.active_count()
    t = time.perf_counter()
    system.shutdown()
    stop_s = time.perf_counter() - t
    journal.close()
    log.close()
    return {"start_s": start_s, "rss_kib": rss1 - rss0, "stop_s": stop_s, "active": active,
            "failed": failed}


def _spawn(args: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "bench.actors10k", *args], capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(opts: Options) -> Result:
    n = 2_000 if opts.quick else 10_000
    r = Result("10k actors", target="(no target: compared with bare pykka actors)")
    console.print(f"  actors: {n:,} bare pykka ThreadingActors (child process) ...")
    bare = _spawn(["bare", str(n)])
    with store(opts, "actors") as (data_dir, url):
        console.print(f"  actors: {n:,} DeviceActors activated from their streams (child process) ...")
        par = _spawn(["parley", str(n), str(data_dir), url or ""])
    r.add("actors", f"{n:,}")
    r.add("bare pykka: start + first ask", f"{bare['start_s']:.2f} s, RSS +{bare['rss_kib'] / 1024:.0f} MiB "
          f"({bare['rss_kib'] / n:.1f} KiB/actor); stop {bare['stop_s']:.2f} s")
    r.add("Parley DeviceActors: activation + first reply",
          f"{par['start_s']:.2f} s, RSS +{par['rss_kib'] / 1024:.0f} MiB ({par['rss_kib'] / n:.1f} KiB/actor); "
          f"stop {par['stop_s']:.2f} s; active {par['active']:,}")
    if par.get("failed"):
        r.notes.append(f"{sum(par['failed'].values())} of {n:,} activations got no reply within 120 s "
                       f"({par['failed']}): the time above includes that wait")
        r.met = False
        r.target = "every actor activates and replies"
    r.add("ratio (Parley / bare)", f"time x{par['start_s'] / bare['start_s']:.2f}, RSS x{par['rss_kib'] / max(bare['rss_kib'], 1):.2f}")
    return r


if __name__ == "__main__":
    kind, count = sys.argv[1], int(sys.argv[2])
    if kind == "bare":
        result = child_bare(count)
    else:
        result = child_parley(count, sys.argv[3], sys.argv[4] or None)
    print(json.dumps(result))
