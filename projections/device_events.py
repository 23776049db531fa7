"""Device events view: events devices reported, newest first per device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from actors.device.aggregate import Device
from eventstore import LoggedEvent
from projections.db import Cursor
from projections.device_registry import DeviceRegistry
from projections.view import View, dumps, loads

# Positions are 64-bit (BIGINT); the log never reaches this one (eventstore/recorders.py):
# `position < MAX_POSITION` is every event.
MAX_POSITION = 2**63 - 1


@dataclass
class DeviceEventRow:
    position: int
    product_id: str
    device_id: str
    name: str
    data: dict[str, Any]
    device_ts: int | None
    received_ms: int


class DeviceEvents(View):
    name = "device_events"
    event_types = frozenset({Device.EventReported})
    schema = (
        "CREATE TABLE IF NOT EXISTS parley_device_events (position BIGINT PRIMARY KEY,"
        " product_id TEXT NOT NULL, device_id TEXT NOT NULL, name TEXT NOT NULL, data TEXT NOT NULL,"
        " device_ts BIGINT, received_ms BIGINT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS parley_device_events_by_device"
        " ON parley_device_events (device_id, product_id, position)",
    )

    def __init__(self, db: Any, registry: DeviceRegistry) -> None:
        super().__init__(db)
        self.registry = registry  # shares its stream -> device map

    def apply(self, cur: Cursor, events: Sequence[LoggedEvent]) -> None:
        rows = []
        for le in events:  # EventReported only (`event_types`)
            e = le.event
            key = self.registry.device_of(le.stream_id, cur)
            if key is None:
                continue
            name = e.name
            if "\x00" in name:  # a log from before the MQTT gateway refused these: PostgreSQL
                name = name.replace("\x00", "\ufffd")  # text cannot hold NUL (the view would stop)
            rows.append((le.position, key[0], key[1], name, dumps(e.data), e.device_ts, e.received_ms))
        if rows:
            cur.executemany(
                "INSERT INTO parley_device_events (position, product_id, device_id, name, data,"
                " device_ts, received_ms) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (position) DO NOTHING",
                rows,
            )

    def recent(self, product_id: str, device_id: str, limit: int,
               before: int | None = None) -> list[DeviceEventRow]:
        """The device's newest `limit` events, newest first; with `before`, the newest of
        those older than that position (the index on device, product, position serves it)."""
        rows = self.db.query(
            "SELECT position, product_id, device_id, name, data, device_ts, received_ms"
            " FROM parley_device_events WHERE device_id = ? AND product_id = ? AND position < ?"
            " ORDER BY position DESC LIMIT ?",
            (device_id, product_id, MAX_POSITION if before is None else before, limit))
        return [DeviceEventRow(r[0], r[1], r[2], r[3], loads(r[4]), r[5], r[6]) for r in rows]
