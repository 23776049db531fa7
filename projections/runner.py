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

A view that cannot apply a batch (the same error again when the batch is tried a second
time at the same position, not the database being down or busy) is halted: it stops at
the position its tables reflect, recorded in `parley_view_halts` in the same transaction
as the other views' next batch, and the others go on. A halted view's in-memory mirror
still follows the log (`follow`). It is tried again, from where it stopped, when a process
starts writing the views (at start, or taking over from another process): once the
cause is fixed (a new version), it catches up and rejoins the others.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from eventstore import EventLog, LoggedEvent, StoreUnavailable
from eventstore.breaker import is_data_error, is_database_error
from projections.db import Cursor, ViewDatabase
from projections.view import View

log = structlog.get_logger(__name__)

TRACKING = "CREATE TABLE IF NOT EXISTS parley_tracking (runner TEXT PRIMARY KEY, position BIGINT NOT NULL)"
# A halted view of a runner: its tables reflect the log up to `position`; `error` is what it
# failed with on the batch after it, `halted_ms` when (epoch ms).
HALTS = ("CREATE TABLE IF NOT EXISTS parley_view_halts (runner TEXT NOT NULL, view TEXT NOT NULL,"
         " position BIGINT NOT NULL, error TEXT NOT NULL, halted_ms BIGINT NOT NULL, PRIMARY KEY (runner, view))")


@dataclass(frozen=True)
class Halt:
    """A view that stopped applying events: its tables reflect the log up to `position`."""

    view: str
    position: int
    error: str
    halted_ms: int


def _transient(exc: BaseException) -> bool:
    """A failure of the database itself, which the same batch may get past later."""
    return is_database_error(exc) and not is_data_error(exc)


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
        # The view whose `apply` raised in the batch being written (None outside `apply`),
        # and the one to halt with the next batch, with its error.
        self._applying: View | None = None
        self._halting: tuple[View, str] | None = None
        with db.transaction() as cur:
            cur.execute(TRACKING)
            cur.execute(HALTS)
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
            halts = self._read_halts(cur)
        # Views that stopped applying events (`Halt`), by name; tried again by `_resume`.
        self.halted: dict[str, Halt] = halts
        self._resume_due = bool(halts)
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
        # Set while the tables hold a batch the mirrors failed to follow (a `follow` raised
        # after the batch's commit): its last position. That batch is followed again, not
        # written again (its compare-and-set would fail: this process would stop owning).
        self._unfollowed: int | None = None
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
        """Apply everything committed so far (used at start and by tests). A view that
        cannot apply a batch is halted here as in the runner's thread (tried twice); any
        other failure is raised."""
        failures = 0
        while True:
            try:
                if not self.step():
                    self._failing = ""
                    return self.position
                failures = 0
            except Exception as exc:
                failures += 1
                outcome = self._failed(exc)
                if outcome == "halt" or (outcome == "retry" and failures < 3 and not _transient(exc)):
                    continue
                raise

    def step(self) -> int:
        if not self.owner and time.monotonic() >= self._next_claim:
            self._take_over()
        if self._resume_due:  # halted views: at start, and after taking the views over
            self._resume()
        events = self._take_fed()
        if not events:
            events = self.log.read_all(self.position, self.batch)
            if not events:
                return 0
            self.read_back += len(events)
        written = self._unfollowed is not None and self._unfollowed > self.position
        if written:
            events = [le for le in events if le.position <= self._unfollowed]  # follow only
        last = events[-1].position
        kinds = {type(le.event) for le in events}
        if self.owner and not written and not self._write(events, kinds, last):
            self.owner = False  # another process wrote the views meanwhile: follow instead
            self._next_claim = time.monotonic() + self.poll_interval
            log.warning("projection.ownership_lost", runner=self.name, position=self.position)
        if not self.owner:
            for view in self.views:
                view.tables_at = None  # someone else writes the tables: memory says nothing
            if last > self.learned:
                self.learned = last  # what follow() may tell someone about: reads wait for it
        try:
            for view in self.views:
                mine = self._for(view, events, kinds)
                if mine:
                    view.follow(mine)
        except Exception:
            if self.owner:  # written, by this step or an earlier one
                self._unfollowed = max(last, self._unfollowed or 0)
            raise
        if self._unfollowed is not None and last >= self._unfollowed:
            self._unfollowed = None
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
        halting, halt = self._halting, None
        self._applying = None
        with self.db.transaction() as cur:
            cur.execute("SELECT position FROM parley_tracking WHERE runner = ?"
                        + (" FOR UPDATE" if self.db.is_postgres else ""), (self.name,))
            row = cur.fetchone()
            if (row[0] if row else 0) != self.position:
                return False  # nothing written; the transaction ends without changes
            applied = []
            for view in self.views:
                if view.name in self.halted:
                    continue
                if halting is not None and view is halting[0]:
                    # It stops before this batch; the others take it, in this transaction.
                    halt = Halt(view.name, self.position, halting[1], int(time.time() * 1000))
                    self._record_halt(cur, halt)
                    continue
                mine = self._for(view, events, kinds)
                if mine:
                    self._applying = view
                    view.apply(cur, mine)
                    self._applying = None
                    applied.append(view)
            cur.execute(
                "INSERT INTO parley_tracking (runner, position) VALUES (?, ?) "
                "ON CONFLICT (runner) DO UPDATE SET position = excluded.position",
                (self.name, last),
            )
        if halt is not None:
            self._halting, self._failing = None, ""
            self.halted[halt.view] = halt
            log.error("projection.view_halted", runner=self.name, view=halt.view, position=halt.position,
                      error=halt.error, next_batch=f"{self.position + 1}-{last}",
                      hint="the other views go on; this one is tried again from its position at the next start")
        for view in self.views:
            # What a halted view kept in memory says nothing about its tables any more.
            view.tables_at = None if view.name in self.halted else last
        for view in applied:
            view.after_commit()
        self.applied += len(events)
        return True

    def _record_halt(self, cur: Cursor, halt: Halt) -> None:
        cur.execute("INSERT INTO parley_view_halts (runner, view, position, error, halted_ms)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (runner, view) DO UPDATE SET"
                    " position = excluded.position, error = excluded.error, halted_ms = excluded.halted_ms",
                    (self.name, halt.view, halt.position, halt.error[:2000], halt.halted_ms))

    def _read_halts(self, cur: Cursor | None = None) -> dict[str, Halt]:
        sql, params = "SELECT view, position, error, halted_ms FROM parley_view_halts WHERE runner = ?", (self.name,)
        if cur is None:
            rows = self.db.query(sql, params)
        else:
            cur.execute(sql, params)
            rows = cur.fetchall()
        names = {view.name for view in self.views}
        # (A halt of a view this version no longer has stays in the table, unused.)
        return {row[0]: Halt(*row) for row in rows if row[0] in names}

    def _failed(self, exc: Exception) -> str:
        """Decide what a failed step means: "halt" (a view cannot apply this batch: the same
        error at the same position as the last failure; it is halted with the next batch),
        "stuck" (the same, outside a view's `apply`: a read, a mirror), or "retry"."""
        view = self._applying
        self._applying = None
        if repr(exc) != self._failing:  # the traceback once
            log.exception("projection.apply_failed", runner=self.name, position=self.position,
                          view=view.name if view is not None else None)
        with self._cond:
            again = repr(exc) == self._failing and self.position == self._failed_at
            self._failed_at = self.position
            if not again:
                self._failing, self._failing_logged = repr(exc), time.monotonic()
            if not again or _transient(exc):
                return "retry"
            if view is not None and self.owner:
                self._halting = (view, repr(exc))
                return "halt"
            if not self._stuck:
                self._stuck = True  # readers waiting for the views stop waiting (wait_for)
                self._cond.notify_all()
            return "stuck"

    def _resume(self) -> None:
        """At start, and when this process takes the views over: bring each halted view from
        the position its tables reflect up to the other views'. Its in-memory mirror was
        loaded from its tables (at start) and follows those events again (idempotent). The
        owner also applies them, trying the view again: one that gets there rejoins the
        others; one that fails again stays halted where it got to."""
        target, owner = self.position, self.owner
        for name, halt in list(self.halted.items()):
            view = next(v for v in self.views if v.name == name)
            if owner:
                view.tables_at = None  # memory says nothing about its tables: read them
            position = cursor = halt.position  # where its tables are; where reading is
            error: Exception | None = None
            while True:
                got = self.log.read_all(cursor, self.batch) if cursor < target else []
                events = [le for le in got if le.position <= target]
                done = len(events) < len(got) or len(got) < self.batch
                last = target if done else events[-1].position
                mine = self._for(view, events, {type(le.event) for le in events})
                if owner and error is None:
                    try:
                        self._apply_halted(view, position, last, mine, done)
                        position = last
                        # Where its tables are now, should this be interrupted (the
                        # database gone, a mirror failing) and begun again.
                        if done:
                            del self.halted[name]
                        else:
                            self.halted[name] = Halt(name, position, halt.error, halt.halted_ms)
                    except Exception as exc:
                        if _transient(exc):
                            raise  # the database, not the view: retried as any step is
                        error = exc
                        log.exception("projection.view_still_halted", runner=self.name, view=name,
                                      position=position, views_at=target)
                if mine:
                    view.follow(mine)
                cursor = last
                if done:
                    break
            if not owner:
                continue
            if error is None:
                view.tables_at = target
                log.info("projection.view_resumed", runner=self.name, view=name, from_position=halt.position,
                         position=target)
            else:
                self.halted[name] = Halt(name, position, repr(error), halt.halted_ms)
        self._resume_due = False  # (left set if this raised: begun again at the next step)

    def _apply_halted(self, view: View, position: int, last: int, events: list[LoggedEvent], done: bool) -> None:
        """Apply a halted view's next `events` (after `position`, up to `last`) in a transaction
        of its own that moves its halt, or ends it (`done`: up to the other views)."""
        with self.db.transaction() as cur:
            cur.execute("SELECT position FROM parley_view_halts WHERE runner = ? AND view = ?"
                        + (" FOR UPDATE" if self.db.is_postgres else ""), (self.name, view.name))
            row = cur.fetchone()
            if row is None or row[0] != position:
                raise RuntimeError(f"view {view.name} was moved on by another process "
                                   f"(at {row[0] if row else 'no halt'}, not {position})")
            if events:
                view.apply(cur, events)
            if done:
                cur.execute("DELETE FROM parley_view_halts WHERE runner = ? AND view = ?", (self.name, view.name))
            else:
                cur.execute("UPDATE parley_view_halts SET position = ? WHERE runner = ? AND view = ?",
                            (last, self.name, view.name))
        if events:
            view.after_commit()

    def _take_over(self) -> None:
        """Try to become the owner; an owner writes the tables from where they stand."""
        self._next_claim = time.monotonic() + self.poll_interval
        if not self.db.claim(self.name):
            # Another process writes the tables: what it halted is shown here too (health).
            self.halted = self._read_halts()
            return
        stored = self.stored_position()
        if self.position < stored:
            # Our mirrors are behind the tables: jumping ahead would skip events they need.
            # Follow up to the tables first, then try again.
            self.db.release(self.name)
            return
        halts = self._read_halts()
        with self._cond:
            # Our mirrors may be ahead of the tables (the old owner stopped behind us):
            # go back and write from the tables' position; following again is idempotent.
            self.position = stored
            self._unfollowed = None
        self.halted, self._halting, self._resume_due = halts, None, bool(halts)
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
                # A view bug must not kill the runner silently: log, back off, retry; the
                # same failure again: halt the view that failed, or say the views are stuck.
                # The traceback once; the same failure again, a line a minute at most.
                outcome = self._failed(exc)
                if outcome == "halt":
                    self._wake.set()  # the other views go on at once
                    continue
                now = time.monotonic()
                if now - self._failing_logged >= 60:
                    log.warning("projection.still_failing", runner=self.name, position=self.position,
                                error=repr(exc))
                    self._failing_logged = now
                self._stopped.wait(1.0)
            else:
                self._failing = ""

    def halts(self) -> list[Halt]:
        """The halted views, by name (any thread: a copy)."""
        return sorted(dict(self.halted).values(), key=lambda h: h.view)

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
