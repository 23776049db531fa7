"""The composition root: the log, the actor system and the projections, built from settings.

Servers (MQTT, HTTP) are added around a Runtime by `gateways/serve.py`; the CLI's
`replay` uses only the log.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import structlog

from actors.device import CatchUp, CommandSettled, Device, DeviceActor, ExpireLiveness, Wake
from actors.errors import Unavailable
from actors.ports import DeviceLink, FutureReply
from actors.system import ActorSystem, SystemSettings
from eventstore import EventLog, Journal, LoggedEvent, StoreConfig, StoreUnavailable
from projections.agents import Agents
from projections.db import ViewDatabase
from projections.device_events import DeviceEvents
from projections.device_registry import DeviceRegistry
from projections.runner import ProjectionRunner
from projections.view import View

log = structlog.get_logger(__name__)


@dataclass
class RuntimeSettings:
    data_dir: Path = Path("data")
    database_url: str | None = None
    liveness_window: float = 90.0  # seconds: 3 missed 30 s heartbeats
    liveness_check_interval: float = 5.0
    idle_timeout: float = 120.0
    max_active_actors: int = 50_000


# Python's cyclic collector runs a young-generation pass every 700 net allocations; ingest
# allocates some 30 objects per message (parsed JSON, messages, events, rows), almost all
# freed by reference counting, so those passes find next to nothing. Every 50,000, and
# with startup's objects frozen out of the old generation, the ingest benchmark spent
# 34 instead of 38 µs of CPU per message (docs/benchmarks.md).
GC_THRESHOLD = (50_000, 20, 20)


def tune_gc() -> None:
    """Set the collector for a long-running server (process-wide: call once, at start)."""
    gc.collect()
    gc.freeze()  # what exists now lives as long as the process: never scan it again
    gc.set_threshold(*GC_THRESHOLD)


class CommandOutcomes(View):
    """No table: follows the log for outcomes of commands this process's callers wait on.
    With several processes on one broker (a shared subscription), the device's answer may
    reach another process, whose actor records it; this tells our actor to settle its
    caller from the log instead of waiting for the deadline."""

    name = "command_outcomes"
    # After another process's command's deadline, how long to leave that process to record
    # the timeout itself before this one looks.
    GRACE_S = 2.0
    event_types = frozenset({Device.CommandSent, Device.CommandSucceeded, Device.CommandFailed,
                             Device.CommandTimedOut, Device.CommandUndelivered})

    def __init__(self, db: ViewDatabase, system: ActorSystem, devices: DeviceRegistry) -> None:
        super().__init__(db)
        self.system = system
        self.devices = devices

    def apply(self, cur: Any, events: Sequence[LoggedEvent]) -> None:
        pass  # nothing stored

    def follow(self, events: Sequence[LoggedEvent]) -> None:
        inflight, settled_here = self.system.inflight, self.system.settled_here
        for le in events:
            rid = le.event.request_id
            if isinstance(le.event, Device.CommandSent):
                # Sent by another process: if this process has the device's actor live,
                # it may hold a state from before; it catches up and arms the deadline,
                # so the command times out here should that process stop. (Not live: it
                # loads the command, and arms it, when it next activates.) Ours have
                # usually settled by the time the runner sees them: `settled_here`.
                if rid not in inflight and rid not in settled_here:
                    key = self.devices.device_of(le.stream_id)
                    if key is None:
                        continue
                    if self.system.is_active(DeviceActor, key):
                        self._tell(key, CatchUp(le.version))
                    else:
                        # Not live here: if the sending process stops, nothing here would
                        # time the command out before the device next speaks or a restart.
                        # Look once its deadline has passed (a load finds it settled, as
                        # it nearly always is, or arms and fires its timeout).
                        e = le.event
                        delay = max(0.0, (e.sent_ms + e.timeout_ms) / 1000 - time.time()) + self.GRACE_S
                        self.system.scheduler.call_later(delay, partial(self._tell, key, CatchUp(le.version)))
                continue
            key = inflight.get(rid)
            if key is not None:
                self._tell(key, CommandSettled(rid))

    def _tell(self, key: Any, message: Any) -> None:
        try:
            self.system.tell(DeviceActor, key, message)
        except Exception as exc:  # shutting down
            log.warning("runtime.settle_not_delivered", error=str(exc))


class Runtime:
    def __init__(self, settings: RuntimeSettings) -> None:
        self.settings = settings
        self.store = StoreConfig.resolve(settings.data_dir, settings.database_url)
        self.log = EventLog(self.store)
        self.journal = Journal(self.log)
        self.views_db = ViewDatabase(self.store, self.log.breaker)
        self.devices = DeviceRegistry(self.views_db)
        self.device_events = DeviceEvents(self.views_db, self.devices)
        self.agents = Agents(self.views_db)
        # Order matters: the registry maps streams to devices before device_events reads it.
        self.system = ActorSystem(self.log, self.journal, SystemSettings(
            idle_timeout=settings.idle_timeout, max_active=settings.max_active_actors,
            # An actor leaves within about idle_timeout, not idle_timeout + 5 s.
            sweep_interval=min(5.0, max(0.05, settings.idle_timeout / 4))))
        self.projections = ProjectionRunner(self.log, self.views_db, [
            self.devices, self.device_events, self.agents, CommandOutcomes(self.views_db, self.system, self.devices)])
        self._stop = threading.Event()
        self._liveness = threading.Thread(target=self._liveness_loop, name="liveness", daemon=True)

    def attach_device_link(self, link: DeviceLink) -> None:
        self.system.device_link = link

    def start(self) -> None:
        caught = self.projections.catch_up()
        # Commands in flight when the last process stopped: their actors load now, which
        # arms their deadlines, so each still gets its CommandTimedOut on time (not when the
        # device next speaks, or the liveness sweep next looks, up to 90 s late).
        woken = self.devices.with_pending_commands()
        for key in woken:
            self.system.tell(DeviceActor, key, Wake())
        tune_gc()
        self.projections.start()
        self._liveness.start()
        log.info("runtime.started", store=self.store.url.split("@")[-1], position=caught,
                 commands_in_flight_on=len(woken),
                 agents=len(self.agents.list()))

    def _liveness_loop(self) -> None:
        paused = ""
        while not self._stop.wait(self.settings.liveness_check_interval):
            now_ms = int(time.time() * 1000)
            why = self.liveness_paused(now_ms)
            if why != paused:
                if why:
                    log.info("liveness.paused", reason=why)
                else:
                    log.info("liveness.resumed")
                paused = why
            if why:
                continue
            try:
                self.expire_silent(now_ms)
            except StoreUnavailable:
                pass  # the breaker said so (store.down); the next sweep after it finds them
            except Exception:
                log.exception("liveness.sweep_failed")

    def liveness_paused(self, now_ms: int) -> str:
        """Why silent devices must not be taken offline now ("" if they may be): silence
        means something only while Parley could hear them, and for one liveness window
        after it could again. A 2-minute outage of the broker link otherwise took every
        device offline at once, though none had gone (52 of 52 in an audit); so does a
        server restart after a downtime, which the window after start covers too."""
        window_ms = self.settings.liveness_window * 1000
        breaker = self.log.breaker
        if breaker is not None:
            # While the store is down, reports are not stored: the devices' last_seen stands
            # still, and their retried QoS 1 reports come in only after it is back.
            if breaker.down:
                return "the store is down"
            if breaker.up_since * 1000 > now_ms - window_ms:
                return "the store is back for less than a liveness window: devices get one to be heard"
        link = self.system.device_link
        if link is None:
            return ""  # no gateway (tests, tools): nothing to wait for
        since = getattr(link, "listening_since", 0.0)  # test links always listen
        if since is None:
            return "the MQTT link is down: devices cannot be heard"
        if since * 1000 > now_ms - window_ms:
            return "the MQTT link is up for less than a liveness window: devices get one to be heard"
        return ""

    # Silent devices are told in rounds of this many, each round handled before the next:
    # told all at once, 5,000 silent devices (a broker outage, say) started ~4,000 actor
    # threads waiting for their loads, which run one at a time on SQLite.
    LIVENESS_ROUND = 256

    def expire_silent(self, now_ms: int) -> int:
        """Tell each device silent for longer than the liveness window to go offline;
        return how many were told."""
        window_ms = int(self.settings.liveness_window * 1000)
        keys = self.devices.stale(now_ms - window_ms)
        failed = 0
        for i in range(0, len(keys), self.LIVENESS_ROUND):
            replies = []
            for key in keys[i:i + self.LIVENESS_ROUND]:
                reply = FutureReply()
                try:
                    self.system.tell(DeviceActor, key, ExpireLiveness(now_ms, window_ms, reply))
                except Unavailable:  # shutting down
                    return len(keys)
                replies.append(reply)
            for reply in replies:
                try:
                    reply.get(60)
                except Exception:  # the store failed: the next sweep finds the device again
                    failed += 1
            if self._stop.is_set():
                break
        if failed:
            log.warning("liveness.not_expired", devices=failed, of=len(keys))
        return len(keys)

    def close(self) -> None:
        self._stop.set()
        self.system.shutdown()
        self.journal.close()
        self.projections.stop()
        self.views_db.close()
        self.log.close()
