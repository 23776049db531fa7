"""Helpers shared by the benchmarks: percentiles, a Parley runtime in-process, stores."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console

console = Console(stderr=True, width=max(Console(stderr=True).width, 140))


@dataclass
class Result:
    name: str
    rows: list[tuple[str, str]] = field(default_factory=list)  # (metric, value)
    target: str = ""
    met: bool | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, metric: str, value: str) -> None:
        self.rows.append((metric, value))
        console.print(f"  [dim]{self.name}[/dim] {metric}: [bold]{value}[/bold]")


@dataclass
class Options:
    quick: bool
    broker: Any  # tests.services.BrokerHandle
    admin_database_url: str | None
    workdir: Path


def fail(message: str, prog: str = "python -m bench") -> NoReturn:
    """One line on stderr, then exit 1 (a service the benchmarks need is missing)."""
    print(f"{prog}: {message}", file=sys.stderr)
    raise SystemExit(1)


def check_services(admin_database_url: str | None, prog: str = "python -m bench") -> None:
    """Stop with one line per missing service, before anything starts: the benchmarks need
    a mosquitto binary, and with --database-url a PostgreSQL role that may create databases."""
    from tests.services import (MOSQUITTO_FALLBACK_PATHS, ServiceUnavailable, create_database, drop_database,
                                find_mosquitto, redact_url)

    problems = []
    if find_mosquitto() is None:
        problems.append(
            "the benchmarks run on a private Mosquitto and no mosquitto binary was found (on PATH or in "
            f"{', '.join(MOSQUITTO_FALLBACK_PATHS)}); install it (Debian/Ubuntu: sudo apt install mosquitto; "
            "macOS: brew install mosquitto) and run this again.")
    if admin_database_url:
        try:
            drop_database(admin_database_url, create_database(admin_database_url, prefix="parley_bench_check_"))
        except Exception as exc:  # unreachable, bad credentials, no CREATEDB, malformed URL
            detail = " ".join(str(exc).split())
            if not isinstance(exc, ServiceUnavailable):  # its message names the URL already
                detail = f"--database-url {redact_url(admin_database_url)}: {detail}"
            problems.append(
                f"{detail} (--database-url takes an admin URL, a role that may CREATE DATABASE, e.g. "
                "postgresql://postgres@127.0.0.1:5432/postgres: each benchmark creates and drops its own database)")
    if problems:
        for problem in problems[:-1]:
            print(f"{prog}: {problem}", file=sys.stderr)
        fail(problems[-1], prog)


def start_broker(workdir: Path, prog: str = "python -m bench") -> Any:
    """The private Mosquitto the benchmarks run on (tests.services.BrokerHandle), or one line and exit 1."""
    from tests.services import start_private_mosquitto

    try:
        return start_private_mosquitto(workdir / "mosquitto")
    except RuntimeError as exc:  # ServiceUnavailable included
        fail(f"could not start a private Mosquitto: {exc}", prog)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rss_kib(pid: int | str = "self") -> int:
    """The resident set size of a process (this one by default), from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@contextlib.contextmanager
def store(opts: Options, label: str) -> Iterator[tuple[Path, str | None]]:
    """A fresh data dir (and, with --database-url, a fresh PostgreSQL database)."""
    data_dir = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=opts.workdir))
    url = None
    if opts.admin_database_url:
        from tests.services import create_database

        url = create_database(opts.admin_database_url, prefix="parley_bench_")
    try:
        yield data_dir, url
    finally:
        if url:
            from tests.services import drop_database

            with contextlib.suppress(Exception):
                drop_database(opts.admin_database_url, url)


def quiet_logging() -> None:
    from gateways.logs import configure_logging

    configure_logging("console", "error")


def wait_until(pred, timeout: float, interval: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def cpu_count() -> int:
    return os.cpu_count() or 0


@contextlib.contextmanager
def pinned(cpus: set[int]) -> Iterator[None]:
    """Run the calling thread (and the threads it starts meanwhile) on `cpus` only. The
    ingest benchmark gives the consumer one core and the publisher another, so the bare
    subscriber and Parley each get the same CPU, whatever the publisher does with its own."""
    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def publisher_cpus() -> set[int] | None:
    """The core the load generator gets when consumers are pinned (see `pinned`)."""
    n = os.cpu_count() or 1
    return {n - 1} if n >= 2 and hasattr(os, "sched_setaffinity") else None


def consumer_cpus() -> set[int]:
    return {0}


def thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds used so far by each thread of this process: {native id: (name, seconds)}.
    Read from /proc (Linux); empty elsewhere. Sampling profilers misread idle actor threads
    as busy here, so per-thread CPU time is what the benchmarks report."""
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[int, tuple[str, float]] = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            # schedstat: nanoseconds on the CPU, exact (stat's utime is sampled at clock
            # ticks and misses threads that run in short bursts, like actors)
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
        out[int(tid)] = (names.get(int(tid), "?"), ns / 1e9)
    return out


def cpu_by_group(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                 group: Any) -> dict[str, float]:
    """CPU seconds per thread group between two `thread_cpu()` readings; `group(name)`
    names the group a thread belongs to."""
    totals: dict[str, float] = {}
    for tid, (name, t1) in after.items():
        t0 = before.get(tid, (name, 0.0))[1]
        key = group(name)
        totals[key] = totals.get(key, 0.0) + t1 - t0
    return totals
