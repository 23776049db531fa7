"""Device registry view: each device's status, current state and last seen time."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from actors.device.aggregate import Device
from eventstore import LoggedEvent
from projections.db import Cursor
from projections.view import View, dumps, loads

_TOUCHES = (Device.StatusReported, Device.StateReported, Device.WentSilent, Device.EventReported,
            Device.CommandSucceeded, Device.CommandFailed)
# Command events that open or close a pending command (no sign of life by themselves).
_OPENS, _CLOSES = (Device.CommandSent,), (Device.CommandTimedOut, Device.CommandUndelivered)
_SETTLES = (*_CLOSES, Device.CommandAnswered)  # each ends one pending command
_SELECT = "SELECT product_id, device_id, online, state, last_seen_ms, registered_ms, pending FROM parley_devices"
# Rows (and stream keys) a batch needs and memory lacks are read this many to a query.
_PREFETCH = 500


def _chunks(items: list[Any]) -> Iterator[list[Any]]:
    for i in range(0, len(items), _PREFETCH):
        yield items[i:i + _PREFETCH]


def _marks(n: int) -> str:
    return ", ".join("?" * n)  # the placeholders of an IN list


@dataclass
class DeviceRow:
    product_id: str
    device_id: str
    online: bool
    state: dict[str, Any]
    last_seen_ms: int
    registered_ms: int
    # Commands sent and not yet answered, timed out or closed: at start, the actors of
    # these devices are activated, so their deadlines are armed again (Runtime.start).
    pending: int = 0


class DeviceRegistry(View):
    name = "device_registry"
    event_types = frozenset({Device.Registered, *_TOUCHES, *_OPENS, *_CLOSES})
    schema = (
        "CREATE TABLE IF NOT EXISTS parley_devices ("
        " product_id TEXT NOT NULL, device_id TEXT NOT NULL, online INTEGER NOT NULL,"
        " state TEXT NOT NULL, last_seen_ms BIGINT NOT NULL, registered_ms BIGINT NOT NULL,"
        " pending INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (product_id, device_id))",
        "CREATE INDEX IF NOT EXISTS parley_devices_by_id ON parley_devices (device_id)",
        # No index on online or last_seen_ms, which every message changes: see `_keep_updates_hot`.
        # Most device events carry only their stream id: this maps it back to the device.
        "CREATE TABLE IF NOT EXISTS parley_device_streams (stream_id TEXT PRIMARY KEY,"
        " product_id TEXT NOT NULL, device_id TEXT NOT NULL)",
    )
    # On PostgreSQL: the share of each page of parley_devices that inserts fill, so that a
    # row's next version fits beside it (`_keep_updates_hot`).
    FILLFACTOR = 80
    _KEY_CACHE_MAX = 200_000
    _ROW_CACHE_MAX = 100_000

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._keys: dict[UUID, tuple[str, str]] = {}
        # The owner's copy of the rows it wrote last, so a batch reads no row back from the
        # table (a read and a JSON parse per device per batch were a third of the runner's
        # time under ingest). Valid only while this process wrote every batch since, which
        # the runner tells by `tables_at` (see `apply`).
        self._cache: dict[tuple[str, str], DeviceRow] = {}
        self._staged: dict[tuple[str, str], DeviceRow] | None = None
        # device id -> the products that have a device with that id. In memory so that a
        # command finds its device's product without a query (the HTTP loop may not block).
        self._products: dict[str, tuple[str, ...]] = {}

    def create(self, cur: Cursor) -> None:
        super().create(cur)
        self._add_pending_column(cur)
        self._keep_updates_hot(cur)
        cur.execute("SELECT device_id, product_id FROM parley_devices")
        products: dict[str, tuple[str, ...]] = {}
        for device_id, product_id in cur.fetchall():
            products[device_id] = (*products.get(device_id, ()), product_id)
        self._products = products

    def follow(self, events: Sequence[LoggedEvent]) -> None:
        for le in events:
            e = le.event
            if isinstance(e, Device.Registered):
                self._remember(le.stream_id, (e.product_id, e.device_id))
                known = self._products.get(e.device_id, ())
                if e.product_id not in known:
                    self._products[e.device_id] = (*known, e.product_id)

    def products_of(self, device_id: str) -> tuple[str, ...]:
        """The products that have a device with this id (usually one). Thread-safe, no query."""
        return self._products.get(device_id, ())

    def apply(self, cur: Cursor, events: Sequence[LoggedEvent]) -> None:
        # Fold the batch per device in memory, then write each touched device once:
        # a burst of telemetry costs one upsert per device, not one per event.
        if self.tables_at is None:
            self._cache.clear()  # another process may have written the table since our last batch
        self._staged = None
        rows: dict[tuple[str, str], DeviceRow] = {}
        fetched = self._prefetch(cur, events)
        for le in events:
            e = le.event
            if isinstance(e, Device.Registered):
                key = (e.product_id, e.device_id)
                self._remember(le.stream_id, key)  # a cache of facts: safe even if rolled back
                cur.execute("INSERT INTO parley_device_streams (stream_id, product_id, device_id)"
                            " VALUES (?, ?, ?) ON CONFLICT (stream_id) DO NOTHING",
                            (str(le.stream_id), *key))
                rows[key] = DeviceRow(*key, False, {}, 0, int(e.timestamp.timestamp() * 1000))
                continue
            row = self._row(cur, rows, le.stream_id, fetched)
            if row is None:
                continue
            if isinstance(e, _OPENS):
                row.pending += 1
                continue
            if isinstance(e, _SETTLES):
                row.pending = max(0, row.pending - 1)  # never below 0 (an answer after a timeout)
                if isinstance(e, _CLOSES):
                    continue
            if row.last_seen_ms == 0 and not isinstance(e, Device.WentSilent):
                # Its first message: registered when it arrived, not when the Registered
                # event was stamped (the commit, a little later), so registeredAt <= lastSeen.
                row.registered_ms = min(row.registered_ms, e.received_ms)
            if isinstance(e, Device.StatusReported):
                row.online = e.status == "online"
                if e.state:
                    row.state = {**row.state, **e.state}
                row.last_seen_ms = e.received_ms
            elif isinstance(e, Device.StateReported):
                row.state = {**row.state, **e.state}
                row.online = True
                row.last_seen_ms = e.received_ms
            elif isinstance(e, Device.WentSilent):
                row.online = False
            else:
                # As the aggregate folds it: the latest message's receive time, even when
                # the clock stepped back (liveness compares it with that same clock); any
                # message means the device is there.
                row.last_seen_ms = e.received_ms
                row.online = True
        if rows:
            cur.executemany(
                "INSERT INTO parley_devices (product_id, device_id, online, state, last_seen_ms,"
                " registered_ms, pending) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (product_id, device_id) DO"
                " UPDATE SET online = excluded.online, state = excluded.state,"
                " last_seen_ms = excluded.last_seen_ms, registered_ms = excluded.registered_ms,"
                " pending = excluded.pending",
                [(r.product_id, r.device_id, int(r.online), dumps(r.state), r.last_seen_ms,
                  r.registered_ms, r.pending) for r in rows.values()],
            )
        self._staged = rows

    def after_commit(self) -> None:
        rows, self._staged = self._staged, None
        if not rows:
            return
        if len(self._cache) + len(rows) > self._ROW_CACHE_MAX:
            self._cache.clear()
        self._cache.update(rows)

    def _remember(self, stream_id: UUID, key: tuple[str, str]) -> None:
        if len(self._keys) >= self._KEY_CACHE_MAX:
            self._keys.clear()
        self._keys[stream_id] = key

    def device_of(self, stream_id: UUID, cur: Cursor | None = None) -> tuple[str, str] | None:
        """(product, device) of a device stream, from memory or from the stream table (inside
        the view transaction `cur` if given); None for a stream that is no device's."""
        key = self._keys.get(stream_id)
        if key is None:
            sql, params = "SELECT product_id, device_id FROM parley_device_streams WHERE stream_id = ?", (str(stream_id),)
            if cur is not None:
                cur.execute(sql, params)
                found = cur.fetchone()
            else:
                found = next(iter(self.db.query(sql, params)), None)
            if found is None:
                return None
            key = (found[0], found[1])
            self._remember(stream_id, key)
        return key

    def _prefetch(self, cur: Cursor, events: Sequence[LoggedEvent]) -> dict[tuple[str, str], DeviceRow]:
        """Read what the batch needs and memory lacks (stream keys, then rows) in a few
        queries instead of one per device. After a restart, once other processes wrote the
        table, or with more devices than the row cache holds, most devices of a batch miss
        it; on PostgreSQL each miss was a round trip: at 150,000 devices an update cost
        about 175 µs against 29 µs with every row cached."""
        new = {le.stream_id for le in events if isinstance(le.event, Device.Registered)}
        streams = {le.stream_id for le in events} - new
        for chunk in _chunks([str(s) for s in streams if s not in self._keys]):
            cur.execute("SELECT stream_id, product_id, device_id FROM parley_device_streams"
                        f" WHERE stream_id IN ({_marks(len(chunk))})", chunk)
            for stream, product_id, device_id in cur.fetchall():
                self._remember(UUID(stream), (product_id, device_id))
        keys = {self._keys.get(s) for s in streams}
        keys.discard(None)
        missing = {k for k in keys if k not in self._cache}
        if self.db.is_postgres:
            # Row values: PostgreSQL joins them on the primary key (39 µs per update at
            # 150,000 devices; 91 by device id alone).
            queries = [(" WHERE (product_id, device_id) IN (VALUES " + ", ".join(["(?, ?)"] * len(chunk)) + ")",
                        [v for key in chunk for v in key]) for chunk in _chunks(sorted(missing))]
        else:
            # SQLite scans the whole table for row values: by device id alone (its index),
            # dropping other products' rows of the same id below.
            queries = [(f" WHERE device_id IN ({_marks(len(chunk))})", chunk)
                       for chunk in _chunks(sorted({device_id for _, device_id in missing}))]
        fetched: dict[tuple[str, str], DeviceRow] = {}
        for where, params in queries:
            cur.execute(_SELECT + where, params)
            for found in cur.fetchall():
                if (found[0], found[1]) in missing:
                    fetched[(found[0], found[1])] = self._to_row(found)
        return fetched

    def _row(self, cur: Cursor, rows: dict[tuple[str, str], DeviceRow], stream_id: UUID,
             fetched: dict[tuple[str, str], DeviceRow]) -> DeviceRow | None:
        key = self.device_of(stream_id, cur)
        if key is None:
            return None
        row = rows.get(key)
        if row is None:
            cached = self._cache.get(key)
            if cached is not None:
                # A copy: this transaction may still roll back. Shallow is enough, because
                # `apply` replaces `state`, never changes it in place.
                row = rows[key] = copy.copy(cached)
                return row
            row = fetched.pop(key, None)
            if row is not None:
                rows[key] = row
                return row
            cur.execute(_SELECT + " WHERE product_id = ? AND device_id = ?", key)
            found = cur.fetchone()
            if found is None:
                return None
            row = rows[key] = self._to_row(found)
        return row

    # -- queries (from worker threads, never on the trio loop) ------------------------
    def list_devices(self, product_id: str, online: bool | None = None) -> list[DeviceRow]:
        sql, params = _SELECT + " WHERE product_id = ?", [product_id]
        if online is not None:
            sql += " AND online = ?"
            params.append(int(online))
        # By code point, as SQLite orders: PostgreSQL's own order follows the database's
        # collation (an ICU or en_US database put "a_b" before "a-b", "Zeta" last).
        order = ' ORDER BY device_id COLLATE "C"' if self.db.is_postgres else " ORDER BY device_id"
        return [self._to_row(r) for r in self.db.query(sql + order, params)]

    def find(self, device_id: str, product_id: str | None = None) -> list[DeviceRow]:
        """Devices with this id (one per product), most recently seen first."""
        sql, params = _SELECT + " WHERE device_id = ?", [device_id]
        if product_id is not None:
            sql += " AND product_id = ?"
            params.append(product_id)
        return [self._to_row(r) for r in self.db.query(sql + " ORDER BY last_seen_ms DESC", params)]

    def stale(self, older_than_ms: int, limit: int = 10_000) -> list[tuple[str, str]]:
        # A scan of the whole table: no index serves it (`_keep_updates_hot`).
        rows = self.db.query("SELECT product_id, device_id FROM parley_devices WHERE online = 1"
                             " AND last_seen_ms < ? LIMIT ?", (older_than_ms, limit))
        return [(r[0], r[1]) for r in rows]

    def with_pending_commands(self, limit: int = 100_000) -> list[tuple[str, str]]:
        rows = self.db.query("SELECT product_id, device_id FROM parley_devices WHERE pending > 0 LIMIT ?",
                             (limit,))
        return [(r[0], r[1]) for r in rows]

    def _add_pending_column(self, cur: Cursor) -> None:
        """Views made before the column existed get it (0: such a device's commands in
        flight are found when its actor is next activated, as before)."""
        if self.db.is_postgres:
            # Asked first: ALTER TABLE locks the table against reads too (ACCESS EXCLUSIVE),
            # even when the column exists.
            cur.execute("SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema()"
                        " AND table_name = 'parley_devices' AND column_name = 'pending'")
            if cur.fetchone() is None:
                cur.execute("ALTER TABLE parley_devices ADD COLUMN pending INTEGER NOT NULL DEFAULT 0")
            return
        cur.execute("PRAGMA table_info(parley_devices)")
        if "pending" not in {r[1] for r in cur.fetchall()}:
            cur.execute("ALTER TABLE parley_devices ADD COLUMN pending INTEGER NOT NULL DEFAULT 0")

    def _keep_updates_hot(self, cur: Cursor) -> None:
        """Every message a device sends rewrites its row. On PostgreSQL that update is HOT
        (no new index entries; page pruning reclaims the old version without VACUUM) only if
        it changes no indexed column and the new version fits in the same page. Views made
        before had an index on (online, last_seen_ms) for the liveness sweep: it is dropped,
        and the table gets a fillfactor (it shapes new pages only; rows move into them as
        they are updated). Measured with 100,000 devices updated 20 times each, without
        VACUUM: 0% HOT and 335 MB, growing by 14 MB a round, with the index; 88% HOT and
        79 MB, level after 10 rounds, without it at fillfactor 80 (fillfactor 100: 7% HOT).
        The sweep (`stale`) then scans the table: about 25 ms at 100,000 devices, 2.5 ms at
        10,000. SQLite has no HOT, but there too the index cost updates (30% at 100,000
        devices) more than the sweep saves (10 ms a sweep)."""
        if self.db.is_postgres:
            # Asked first: DROP INDEX takes ACCESS EXCLUSIVE on the table and ALTER TABLE
            # SHARE UPDATE EXCLUSIVE, for the rest of the start-up transaction. Once, on the
            # first start after an upgrade; never when nothing needs changing.
            cur.execute("SELECT to_regclass('parley_devices_liveness')")
            if cur.fetchone()[0] is not None:
                cur.execute("DROP INDEX parley_devices_liveness")
            cur.execute("SELECT reloptions FROM pg_class WHERE oid = to_regclass('parley_devices')")
            # A fillfactor someone set by hand is theirs to keep.
            if not any(o.startswith("fillfactor=") for o in cur.fetchone()[0] or ()):
                cur.execute(f"ALTER TABLE parley_devices SET (fillfactor = {int(self.FILLFACTOR)})")
            return
        cur.execute("DROP INDEX IF EXISTS parley_devices_liveness")

    def count(self, product_id: str | None = None) -> int:
        if product_id is None:
            return self.db.query("SELECT COUNT(*) FROM parley_devices")[0][0]
        return self.db.query("SELECT COUNT(*) FROM parley_devices WHERE product_id = ?", (product_id,))[0][0]

    @staticmethod
    def _to_row(r: Sequence[Any]) -> DeviceRow:
        return DeviceRow(r[0], r[1], bool(r[2]), loads(r[3]), r[4], r[5], r[6])
