"""`python -m bench.soak`: a server under device churn and steady commands for a while,
watched for what should level off: memory, threads, file descriptors, active actors.

A leak shows in a long run, not in a benchmark of seconds. Here `parley serve --demo` runs
on a private Mosquitto while simulated thermostats come and go: every `--churn` seconds a
new batch of `--devices` devices (new ids) starts reporting every 2 s and the batch before
the last stops, so devices keep going silent, offline (after `--liveness-window`) and
passivated (after `--idle-timeout`, both shortened so that this happens within the run).
A bare responder answers a command every 0.2 s. Every 30 s a row: the server's RSS,
threads (one per active actor) and open files, /api/health's active actors and projection
lag, the commands' p50 and worst since the last row. At the end: how much RSS grew over the
run's second half, and the server's log lines at warning or above.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from rich.table import Table

from bench.commands import COMMAND, HttpClient
from bench.common import check_services, console, quiet_logging, rss_kib, start_broker
from bench.processes import ResponderProcess, SimulatorProcess
from tests.services import create_database, drop_database, free_port, start_parley, stop_parley

PROG = "python -m bench.soak"
SAMPLE_S = 30
PROBE = "soak-probe-1"


def process_usage(pid: int) -> tuple[int, int, int]:
    """(RSS in MiB, threads, open file descriptors) of a process, from /proc."""
    return rss_kib(pid) // 1024, len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


def main() -> None:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10, help="how long (default 10)")
    p.add_argument("--devices", type=int, default=300, help="devices per batch (default 300)")
    p.add_argument("--churn", type=float, default=60, help="seconds between batches (default 60)")
    p.add_argument("--liveness-window", type=float, default=20, help="the server's, in s (default 20; serve's 90)")
    p.add_argument("--idle-timeout", type=float, default=30, help="the server's, in s (default 30; serve's 120)")
    p.add_argument("--database-url", default=None, metavar="ADMIN_URL",
                   help="run on PostgreSQL: an admin URL through which a fresh database is made and dropped")
    args = p.parse_args()
    check_services(args.database_url, prog=PROG)
    quiet_logging()
    work = Path(tempfile.mkdtemp(prefix="parley-soak-"))
    broker = start_broker(work, prog=PROG)
    database = create_database(args.database_url, prefix="parley_soak_") if args.database_url else None
    data_dir = work / "data"
    data_dir.mkdir()
    os.environ.update(PARLEY_LIVENESS_WINDOW=str(args.liveness_window), PARLEY_IDLE_TIMEOUT=str(args.idle_timeout))
    port = free_port()
    table = Table(title=f"soak: batches of {args.devices} devices every {args.churn:g} s (two reporting at once), "
                        f"a command every 0.2 s; {'PostgreSQL' if database else 'SQLite'}")
    for column in ("min", "RSS MiB", "threads", "fds", "active actors", "log position", "projection lag",
                   "command p50 ms", "command max ms", "failed commands"):
        table.add_column(column, justify="right")
    rss_by_minute: list[tuple[float, int]] = []
    failed = 0
    server = start_parley(data_dir, broker.url, port, database, client_id=f"soak-{port}")
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(ResponderProcess(broker.host, broker.port, "device-agent/thermostat/device/+/commands",
                                                 online_topics=(f"v1/thermostat/{PROBE}/telemetry",)))
            batches: collections.deque[SimulatorProcess] = collections.deque()
            client = HttpClient(port)
            start = time.monotonic()
            last_batch, last_row = start - args.churn, start
            latencies: list[float] = []
            console.print(f"{PROG}: {args.minutes:g} min; a row every {SAMPLE_S} s")
            while (now := time.monotonic()) - start < args.minutes * 60:
                if now - last_batch >= args.churn:
                    batch = SimulatorProcess(devices=args.devices, interval=2, mqtt_url=broker.url, connections=4,
                                             prefix=f"soak{uuid.uuid4().hex[:4]}")
                    batch.__enter__()
                    batches.append(batch)
                    last_batch = now
                    if len(batches) > 2:
                        batches.popleft().__exit__(None, None, None)
                t = time.perf_counter()
                try:
                    status, answer = client.request("POST", f"/api/devices/{PROBE}/commands", COMMAND)
                    if status == 200 and answer.get("code") == 0:
                        latencies.append(time.perf_counter() - t)
                    else:
                        failed += 1
                except OSError:
                    failed += 1
                    client.close()
                    client = HttpClient(port)
                if now - last_row >= SAMPLE_S:
                    last_row = now
                    _, h = client.request("GET", "/api/health")
                    rss, threads, fds = process_usage(server.pid)
                    minute = (now - start) / 60
                    rss_by_minute.append((minute, rss))
                    table.add_row(f"{minute:.1f}", str(rss), str(threads), str(fds), str(h["activeActors"]),
                                  str(h["logPosition"]), str(h["logPosition"] - h["projectionPosition"]),
                                  f"{statistics.median(latencies) * 1e3:.2f}" if latencies else "-",
                                  f"{max(latencies) * 1e3:.1f}" if latencies else "-", str(failed))
                    console.print(f"  {minute:4.1f} min: RSS {rss} MiB, {threads} threads, {fds} fds, "
                                  f"{h['activeActors']} active actors, {failed} failed commands")
                    latencies = []
                time.sleep(0.2)
            client.close()
            while batches:
                batches.popleft().__exit__(None, None, None)
    finally:
        stop_parley(server)
        broker.stop()
        if database:
            with contextlib.suppress(Exception):
                drop_database(args.database_url, database)
    console.print(table)
    if len(rss_by_minute) >= 4:
        half = rss_by_minute[len(rss_by_minute) // 2]
        end = rss_by_minute[-1]
        growth = end[1] - half[1]
        console.print(f"RSS over the second half ({half[0]:.1f} to {end[0]:.1f} min): {half[1]} -> {end[1]} MiB "
                      f"({growth:+d} MiB, {growth / max(end[0] - half[0], 1e-9):+.1f} MiB/min)")
    warnings = collections.Counter()
    log = data_dir / "server.log"
    for line in log.read_text(errors="replace").splitlines() if log.exists() else ():
        try:
            warnings[json.loads(line).get("event", line[:80])] += 1
        except ValueError:  # not a JSON line (a traceback's, say): counted as it reads
            warnings[line[:80]] += 1
    console.print(f"server log lines at warning or above: {sum(warnings.values())}"
                  + "".join(f"\n  {n} {event}" for event, n in warnings.most_common(10)))


if __name__ == "__main__":
    main()
