"""GET /api/health: is the HTTP API up, and how far behind the log are the views?"""

from __future__ import annotations

from typing import Any

from quart import Blueprint

from gateways.http.app import get_runtime, in_thread
from gateways.http.devices import iso_ms

bp = Blueprint("health", __name__)


@bp.get("/api/health")
async def health() -> dict[str, Any]:
    runtime = get_runtime()
    link = runtime.system.device_link
    log_position = await in_thread(runtime.log.max_position)  # a query on the event store
    failures = runtime.journal.failures
    store: dict[str, Any] = {"storeWritable": not failures.failing}
    if failures.failing:
        store["storeError"] = failures.error  # e.g. "database or disk is full"
    stuck = runtime.projections.failing
    views: dict[str, Any] = {"projectionError": stuck} if stuck else {}  # failing now, tried again
    halted = runtime.projections.halts()
    if halted:  # views that stopped at an event they cannot apply; the others go on
        views["haltedViews"] = [
            {"view": h.view, "position": h.position, "error": h.error, "since": iso_ms(h.halted_ms)}
            for h in halted]
    return {
        "status": "ok",
        # Views lag the log by a few ms normally; a growing gap means a stuck projection.
        "projectionPosition": runtime.projections.position,
        # Whether this process writes the views (one process per database does; the
        # others follow the log for their in-memory mirrors and take over if it stops).
        "projectionOwner": runtime.projections.owner,
        **views,
        "logPosition": log_position,
        # False while the log's commits fail (a full disk, an I/O error): reports are then
        # not stored and commands are 503s. True again at the next commit that succeeds.
        **store,
        "activeActors": runtime.system.active_count(),
        # Of those, still waiting for a slot to load (thousands just after a restart).
        "loadingActors": runtime.system.loading.waiting(),
        # Passivated, their threads still running: draining what they were told.
        "stoppingActors": runtime.system.stopping_count(),
        # Whether commands can go out now (connected to the broker and subscribed): the
        # HTTP API is up either way, but while this is false a command is a 503.
        "mqttConnected": link.connected if link is not None else None,
        # MQTT gateway counters: received, acked, dropped.<reason> (e.g. unknown_product).
        "mqtt": dict(getattr(link, "stats", {})),
    }
