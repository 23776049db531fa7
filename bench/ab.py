"""`python -m bench.ab --base REF`: the command round trip of this checkout against a git
ref, measured side by side.

On a shared machine the command round trip moves by a millisecond or more from one run to
the next (docs/benchmarks.md), far more than most changes are worth, so two runs one after
the other cannot tell a 0.1 ms change from noise. Here two `parley serve` processes run at
once, each on its own copy of the code (this checkout, and REF checked out in a temporary
git worktree) with its own bare device, and the client alternates between them request by
request: whatever the machine does meanwhile slows both alike. The result is the median of
the per-pair differences.

Which server starts first matters: on some hosts the one started second is slower by up to
0.13 ms a command (2026-12-07: two identical servers +0.11 ms with the second one as B,
-0.07 with it as A), as much as the changes measured. So the rounds take turns: odd rounds
start A first, even rounds B first (four by default), and the result is the mean of the
two orders' medians of rounds.

Both servers use this checkout's virtualenv, so REF must run on the same dependencies.
`--device sdk` answers with a simulated SDK-like thermostat (state, state and an event
before each answer) instead of the benchmark's bare responder.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from rich.table import Table

from bench.commands import COMMAND, HttpClient, _online, device_process
from bench.common import console, pct, wait_until
from tests.services import free_port, start_parley, stop_parley

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def worktree(ref: str) -> Iterator[Path]:
    """`ref` checked out in a temporary directory (a git worktree), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="parley-ab-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), ref],
                   check=True, capture_output=True, text=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                       capture_output=True)


@contextlib.contextmanager
def server(code: Path, broker_url: str, work: Path, label: str, sdk_device: bool = False) -> Iterator[tuple[HttpClient, str]]:
    """`parley serve --demo` running `code`, with one device online; (client, device). The
    device is a bare responder, or (`sdk_device`) a simulated thermostat that sends its
    state, state and an event before each answer, as the generated SDK does."""
    port = free_port()
    data = work / label
    data.mkdir()
    # `python -m gateways.cli` imports from its working directory first: run it in `code`.
    with contextlib.chdir(code):
        proc = start_parley(data, broker_url, port, client_id=f"ab-{label}-{port}")
    process, device = device_process(broker_url, f"ab{label}{uuid.uuid4().hex[:4]}", sdk_device)
    client = HttpClient(port)
    try:
        with process:
            if not wait_until(lambda: _online(client, device), 15):
                raise RuntimeError(f"{label}: the device never showed up online")
            yield client, device
    finally:
        client.close()
        stop_parley(proc)


def measure(a: tuple[HttpClient, str], b: tuple[HttpClient, str], n: int, warmup: int = 100) -> tuple[list[float], list[float]]:
    """n pairs of requests, alternating which server goes first."""
    times: tuple[list[float], list[float]] = ([], [])
    sides = ((0, a), (1, b))
    for i in range(n + warmup):
        for side, (client, device) in sides if i % 2 else sides[::-1]:
            t = time.perf_counter()
            status, answer = client.request("POST", f"/api/devices/{device}/commands", COMMAND)
            dt = time.perf_counter() - t
            if status != 200 or answer.get("code") != 0:
                raise RuntimeError(f"{'AB'[side]}: command failed: {status} {str(answer)[:200]}")
            if i >= warmup:
                times[side].append(dt)
        if i and i % 500 == 0:
            console.print(f"  {i}/{n + warmup} pairs")
    return times


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="HEAD", help="git ref to compare with (default HEAD: "
                   "this checkout's uncommitted changes against its last commit)")
    p.add_argument("-n", type=int, default=1000, help="request pairs per round (default 1000)")
    p.add_argument("--rounds", type=int, default=4,
                   help="rounds, each with fresh servers, taking turns at which starts first (default 4)")
    p.add_argument("--device", choices=("bare", "sdk"), default="bare",
                   help="the device answering: a bare responder (the benchmark's, default) or an SDK-like "
                        "simulated thermostat (state, state and an event before each answer)")
    args = p.parse_args()
    from bench.common import check_services, quiet_logging, start_broker

    check_services(None, prog="python -m bench.ab")  # one line, not a traceback, without Mosquitto
    quiet_logging()
    work = Path(tempfile.mkdtemp(prefix="parley-ab-work-"))
    broker = start_broker(work / "mosquitto", prog="python -m bench.ab")
    table = Table(title=f"command round trip: this checkout (B) against {args.base} (A)")
    # p99 too: a stall every so often leaves the p50 and the paired median untouched.
    for column in ("round", "first", "A p50 (ms)", "B p50 (ms)", "A p99 (ms)", "B p99 (ms)", "median of B - A per pair (ms)"):
        table.add_column(column, justify="right")
    diffs: dict[bool, list[float]] = {True: [], False: []}  # by whether A started first
    try:
        with worktree(args.base) as base_code:
            for r in range(1, args.rounds + 1):
                console.print(f"round {r}/{args.rounds}: two servers, {args.n} request pairs ...")
                round_dir = work / f"round{r}"
                round_dir.mkdir()
                sdk = args.device == "sdk"
                a_first = r % 2 == 1
                order = [("a", base_code), ("b", ROOT)][::1 if a_first else -1]
                with contextlib.ExitStack() as stack:
                    up = {label: stack.enter_context(server(code, broker.url, round_dir, label, sdk))
                          for label, code in order}  # started in this order
                    ta, tb = measure(up["a"], up["b"], args.n)
                d = statistics.median(y - x for x, y in zip(ta, tb))
                diffs[a_first].append(d)
                table.add_row(str(r), "A" if a_first else "B", *(f"{pct(t, q) * 1e3:.3f}" for q in (50, 99) for t in (ta, tb)),
                              f"{d * 1e3:+.3f}")
    finally:
        broker.stop()
    orders = [statistics.median(d) for d in diffs.values() if d]
    if len(orders) == 2:
        # Each order's median, then their mean: the start-order effect cancels.
        table.add_row("all", "", "", "", "", "", f"{statistics.mean(orders) * 1e3:+.3f} "
                      f"(A first {orders[0] * 1e3:+.3f}, B first {orders[1] * 1e3:+.3f}: their mean)")
    else:
        console.print("[yellow]one round only: the start order's effect is in the result[/yellow]")
        table.add_row("all", "", "", "", "", "", f"{orders[0] * 1e3:+.3f}")
    console.print(table)


if __name__ == "__main__":
    main()
