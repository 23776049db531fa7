"""Follows the log and applies new events to the views, exactly once.

Each batch of events and the runner's position commit in one view transaction. The
runner wakes on in-process commits (the journal) and, on PostgreSQL, on NOTIFY from
other processes; it also polls once a second, so a SQLite log written by another
process (e.g. while `parley replay` reads) is followed too.

Several Parley processes may share one database. One of them owns the views (it holds
`ViewDatabase.claim`) and writes them; the others follow the log only to keep their
in-memory mirrors (`View.follow`: the agents, the device -> product index) and try to
take over once a second, so the views keep moving when the owner stops. Every view
transaction also checks that the stored position is the one this runner last wrote
(compare-and-set), so even two runners that both believe they own the views never apply
an event twice.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence

import structlog

from eventstore import EventLog, LoggedEvent, StoreUnavailable
from eventstore.breaker import is_database_error
from projections.db import ViewDatabase
from projections.view import View

log = structlog.get_logger(__name__)

TRACKING = "CREATE TABLE IF NOT EXISTS parley_tracking (runner TEXT PRIMARY KEY, position BIGINT NOT NULL)"


class ProjectionRunner:
    def __init__(self, event_log: EventLog, db: ViewDatabase, views: Sequence[View], *,
                 name: str = "views", batch: int = 2000, poll_interval: float = 1.0, coalesce: float = 0.05) -> None:
        self.log = event_log
        self.db = db
        self.views = list(views)
        self.name = name
        self.batch = batch
        self.poll_interval = poll_interval
        self.coalesce = coalesce
        self._wake = threading.Event()
        self._urgent = threading.Event()  # someone waits in wait_for(): skip the coalescing
        self._cond = threading.Condition()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing, self._failing_logged = "", 0.0  # the failure being retried, and when logged
        self._failed_at = -1  # the position the last failure happened at
        # The views cannot move on by themselves: the same failure again at the same position,
        # not one of the database's (`wait_for` then stops waiting). Cleared by any progress.
        self._stuck = False
        with db.transaction() as cur:
            cur.execute(TRACKING)
            # The row must exist before the first batch: `_write` locks it (compare-and-set).
            cur.execute("INSERT INTO parley_tracking (runner, position) VALUES (?, 0)"
                        " ON CONFLICT (runner) DO NOTHING", (name,))
            # The position first, then the mirrors (`create` loads them from the tables). On
            # PostgreSQL (READ COMMITTED) each statement sees the commits made before it, so
            # an owner's commit in between leaves the mirrors ahead of the position, never
            # behind: the runner follows those events again, which a view's `follow` takes
            # (it must be idempotent). Read the other way round, the position could be past
            # events the mirrors never saw, and nothing would ever follow them. Locking the
            # tracking row instead would hold up the owner's writes for this whole start-up.
            # (On SQLite the transaction is IMMEDIATE: both reads see the same state.)
            cur.execute("SELECT position FROM parley_tracking WHERE runner = ?", (name,))
            row = cur.fetchone()
            for view in self.views:
                view.create(cur)
        # What this process's views reflect: the tables and mirrors (owner), or the mirrors
        # (follower, whose tables are written by the owner).
        self.position: int = row[0] if row else 0
        # The last commit this process knows of: its own, and on PostgreSQL other
        # processes' (NOTIFY). A read that must see every acknowledged write waits for it.
        self.committed: int = self.position
        # The last position whose events this process's views were handed while following
        # another owner (set before `follow`, so before a view acts on them: CommandOutcomes
        # settles a command this process sent, whose 200 the owner's tables may not hold
        # yet). Reads wait for it too (wait_for_committed): read-your-writes across processes.
        self.learned: int = self.position
        self.owner = db.claim(name)
        self._next_claim = 0.0
        self.applied = 0  # events this runner wrote to the view tables
        self.followed = 0  # events applied to the in-memory mirrors
        self.read_back = 0  # events that had to be read from the store (not handed over)
        # Events committed by this process, handed over by the journal. Used while they
        # continue our position without a gap; anything else is read from the store.
        self._fed: deque[LoggedEvent] = deque()
        self._fed_lock = threading.Lock()

    FED_MAX = 100_000

    def start(self) -> None:
        self.log.on_committed_events(self._on_events)
        self.log.on_commit(self._on_commit)
        self._thread = threading.Thread(target=self._run, name=f"projection-{self.name}", daemon=True)
        self._thread.start()

    def _on_commit(self, position: int) -> None:
        if position > self.committed:
            self.committed = position  # one writer at a time calls this (the journal's lock)
        self._wake.set()

    def _on_events(self, events: list[LoggedEvent]) -> None:
        with self._fed_lock:
            if len(self._fed) + len(events) > self.FED_MAX:
                self._fed.clear()  # far behind: read from the store instead
            self._fed.extend(events)

    def _take_fed(self) -> list[LoggedEvent]:
        with self._fed_lock:
            fed = self._fed
            while fed and fed[0].position <= self.position:
                fed.popleft()  # already applied (read from the store)
            out: list[LoggedEvent] = []
            expected = self.position + 1
            while fed and len(out) < self.batch and fed[0].position == expected:
                out.append(fed.popleft())
                expected += 1
            return out

    def wait_for(self, position: int, timeout: float = 10.0) -> bool:
        """Block until the views (tables and this process's mirrors) reflect the log up to
        `position`. False at the timeout, and at once while the views are stuck on an event
        they cannot apply (the same error again on the retry at the same position, not a
        database's): every read would otherwise wait out its whole timeout (2 s for a GET)
        for a position they will not reach until someone fixes the view. A failure that
        the retry a second later gets past (a lock, a blip) is waited for as any lag."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                while self.position < position:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._stuck:
                        return False
                    self._urgent.set()
                    self._wake.set()
                    self._cond.wait(remaining)
            # An owner's position is its tables'. A follower's tables are written by the
            # owner, in another process. (A follower that takes over meanwhile goes back to
            # the tables' position, so check again from the top.)
            if self.owner and self.position >= position:
                return True
            if not self.owner and self.stored_position() >= position:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def wait_for_committed(self, timeout: float) -> bool:
        """Read-your-writes: block until the views reflect every commit this process knows
        of, i.e. everything acknowledged before the call (an MQTT ack, an HTTP 2xx), also
        what it learned from the log while following (a command's outcome). Returns
        at once when they do; otherwise the runner skips its gathering delay."""
        target = max(self.committed, self.learned)  # an owner past its takeover: learned <= position
        if self.position >= target and (self.owner or self.stored_position() >= target):
            return True
        return self.wait_for(target, timeout)

    def stored_position(self) -> int:
        """The position the view tables reflect (written by whichever process owns them)."""
        rows = self.db.query("SELECT position FROM parley_tracking WHERE runner = ?", (self.name,))
        return rows[0][0] if rows else 0

    def catch_up(self) -> int:
        """Apply everything committed so far (used at start and by tests)."""
        while self.step():
            pass
        return self.position

    def step(self) -> int:
        if not self.owner and time.monotonic() >= self._next_claim:
            self._take_over()
        events = self._take_fed()
        if not events:
            events = self.log.read_all(self.position, self.batch)
            if not events:
                return 0
            self.read_back += len(events)
        last = events[-1].position
        kinds = {type(le.event) for le in events}
        if self.owner and not self._write(events, kinds, last):
            self.owner = False  # another process wrote the views meanwhile: follow instead
            self._next_claim = time.monotonic() + self.poll_interval
            log.warning("projection.ownership_lost", runner=self.name, position=self.position)
        if not self.owner:
            for view in self.views:
                view.tables_at = None  # someone else writes the tables: memory says nothing
            if last > self.learned:
                self.learned = last  # what follow() may tell someone about: reads wait for it
        for view in self.views:
            mine = self._for(view, events, kinds)
            if mine:
                view.follow(mine)
        with self._cond:
            self.position = last
            self.followed += len(events)
            self._stuck = False
            self._cond.notify_all()
        return len(events)

    @staticmethod
    def _for(view: View, events: list[LoggedEvent], kinds: set[type]) -> list[LoggedEvent]:
        """The events of the batch `view` reads (most views read a few kinds only); `kinds`
        are the batch's event types, so that a batch of one kind (telemetry under load) is
        passed whole or not at all without a look at each event per view."""
        types = view.event_types
        if types is None or kinds <= types:
            return events
        if kinds.isdisjoint(types):
            return []
        return [le for le in events if type(le.event) in types]

    def _write(self, events: list[LoggedEvent], kinds: set[type], last: int) -> bool:
        """Apply `events` to the view tables, if the tables are still where we left them."""
        self.log.make_durable(last)  # a view must not record a position a power loss could undo
        with self.db.transaction() as cur:
            cur.execute("SELECT position FROM parley_tracking WHERE runner = ?"
                        + (" FOR UPDATE" if self.db.is_postgres else ""), (self.name,))
            row = cur.fetchone()
            if (row[0] if row else 0) != self.position:
                return False  # nothing written; the transaction ends without changes
            applied = []
            for view in self.views:
                mine = self._for(view, events, kinds)
                if mine:
                    view.apply(cur, mine)
                    applied.append(view)
            cur.execute(
                "INSERT INTO parley_tracking (runner, position) VALUES (?, ?) "
                "ON CONFLICT (runner) DO UPDATE SET position = excluded.position",
                (self.name, last),
            )
        for view in self.views:
            view.tables_at = last
        for view in applied:
            view.after_commit()
        self.applied += len(events)
        return True

    def _take_over(self) -> None:
        """Try to become the owner; an owner writes the tables from where they stand."""
        self._next_claim = time.monotonic() + self.poll_interval
        if not self.db.claim(self.name):
            return
        stored = self.stored_position()
        if self.position < stored:
            # Our mirrors are behind the tables: jumping ahead would skip events they need.
            # Follow up to the tables first, then try again.
            self.db.release(self.name)
            return
        with self._cond:
            # Our mirrors may be ahead of the tables (the old owner stopped behind us):
            # go back and write from the tables' position; following again is idempotent.
            self.position = stored
        self.owner = True
        log.info("projection.took_ownership", runner=self.name, position=stored)

    def _run(self) -> None:
        while not self._stopped.is_set():
            if self._wake.wait(self.poll_interval) and self.coalesce:
                # Views are eventually consistent: gather the commits of the next few ms
                # into one view transaction, and let the committing thread finish its
                # reply (an HTTP response, an MQTT ack) before we take the GIL. A caller
                # of wait_for() (read-your-writes) cuts this short.
                self._urgent.wait(self.coalesce)
            self._wake.clear()
            self._urgent.clear()
            try:
                while not self._stopped.is_set() and self.step():
                    pass
            except StoreUnavailable:
                # Known down (the breaker logged it once): follow again once it is up.
                breaker = self.log.breaker
                while not self._stopped.is_set() and not (breaker is not None and breaker.wait_up(1.0)):
                    self._stopped.wait(1.0)  # (wait_up is at once False once the log is closed)
                self._wake.set()
            except Exception as exc:
                # A view bug must not kill the runner silently: log, back off, retry. The
                # traceback once; the same failure again, a line a minute at most.
                now = time.monotonic()
                with self._cond:
                    if repr(exc) == self._failing and self.position == self._failed_at \
                            and not is_database_error(exc) and not self._stuck:
                        self._stuck = True  # readers waiting for the views stop waiting (wait_for)
                        self._cond.notify_all()
                    self._failed_at = self.position
                if repr(exc) != self._failing:
                    log.exception("projection.apply_failed", runner=self.name, position=self.position)
                    self._failing, self._failing_logged = repr(exc), now
                elif now - self._failing_logged >= 60:
                    log.warning("projection.still_failing", runner=self.name, position=self.position,
                                error=repr(exc))
                    self._failing_logged = now
                self._stopped.wait(1.0)
            else:
                self._failing = ""

    @property
    def stuck(self) -> bool:
        """The views cannot get past an event (see `wait_for`): reads do not wait for them."""
        return self._stuck

    @property
    def failing(self) -> str:
        """The error the views' last batch failed with, while it keeps failing (it is tried
        again every second: the views stop at `position` until it applies); else ""."""
        return self._failing

    def stop(self) -> None:
        self._stopped.set()
        self._urgent.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.owner:
            self.db.release(self.name)  # another process may take over at once
            self.owner = False
