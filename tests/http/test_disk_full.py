"""A log that cannot write. SQLite's own SQLITE_FULL ("database or disk is full"), made by
capping the writer connection's `max_page_count` at the pages the database has: a report
or a command is refused (503 in the API's shape, nothing sent to the device), /api/health
says `storeWritable: false` and why, the log says so once instead of once per message, and
all of it ends with the first commit after space is back. A real full disk behaves alike
(measured with a 30 MiB tmpfs: docs/architecture.md, "A log that cannot write")."""

from __future__ import annotations

import httpx
import structlog
import trio

from actors.errors import Unavailable
from gateways.runtime import Runtime
from tests.http.conftest import FakeLink, create_agent, set_status


def cap_pages(runtime: Runtime, pages: int | None) -> None:
    """Cap the log's database at its current size (None: lift the cap)."""
    datastore = runtime.log._app.recorder.datastore
    with datastore._writer_lock:
        conn = datastore._writer._sqlite_conn
        if pages is None:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count={pages}")


async def fill(runtime: Runtime) -> int:
    """Report new devices until a commit fails: the database's last page is then full."""
    for i in range(5000):
        try:
            await set_status(runtime, "thermostat", f"filler-{i:04d}")
        except Unavailable as exc:
            assert str(exc) == "could not commit: database or disk is full"
            return i
    raise AssertionError("the capped database never filled")


async def test_a_full_log_refuses_writes_once_says_so_in_health_and_recovers(
        client: httpx.AsyncClient, runtime: Runtime, link: FakeLink) -> None:
    await create_agent(client)
    await set_status(runtime, "thermostat", "t-001", "online")
    command = {"command": "set_target_temperature", "params": {"target_temperature": 21}}
    assert (await client.post("/api/devices/t-001/commands", json=command)).status_code == 200
    assert (await client.get("/api/health")).json()["storeWritable"] is True

    with structlog.testing.capture_logs() as logs:
        cap_pages(runtime, None)
        await fill(runtime)
        refused = []
        for _ in range(20):
            r = await client.post("/api/devices/t-001/commands", json=command)
            refused.append(r)
        health = (await client.get("/api/health")).json()
        reads = await client.get("/api/devices/t-001")  # reads go on

        cap_pages(runtime, 1_000_000_000)  # space is back
        r = await client.post("/api/devices/t-001/commands", json=command)
        assert r.status_code == 200 and r.json()["code"] == 0
        healthy = (await client.get("/api/health")).json()

    for r in refused:
        assert r.status_code == 503
        body = r.json()
        assert body == {"error": "could not commit: database or disk is full", "code": "unavailable",
                        "requestId": body["requestId"]}
    assert len(link.published) == 2  # the commands before and after; none while full
    assert health["storeWritable"] is False and health["storeError"] == "database or disk is full"
    assert health["status"] == "ok"  # the API is up: reads are served
    assert reads.status_code == 200 and reads.json()["online"] is True
    assert healthy["storeWritable"] is True and "storeError" not in healthy

    errors = [e for e in logs if e["log_level"] == "error"]
    assert [e["event"] for e in errors] == ["journal.commit_failed"], errors  # once, for 21+ failures
    recovered = [e for e in logs if e["event"] == "journal.recovered"]
    assert len(recovered) == 1 and recovered[0]["failed"] >= 21
