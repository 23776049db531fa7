"""Group commit: one writer thread saves the pending events of many actors per transaction.

Callers block on a Future (actors run on their own threads, so they may); a version
conflict fails only the caller whose stream conflicted. A commit an HTTP caller waits on
(a command's) is `urgent`: it is written in a transaction of its own ahead of the queue,
which under telemetry from thousands of devices holds tens of milliseconds of batches
(a command's two commits waited 56 and 67 ms at p50 at 2,000 reports a second from 1,000
devices). A caller has at most one commit queued at a time (actors/base.py), so no
stream's events can overtake its own earlier ones. At idle, a caller that finds nothing
queued and nobody writing commits on its own thread instead: that saves the hand-off to the
writer and back (two thread wake-ups; a traced command commit went from 0.39 to 0.33 ms
p50 on 2 cores).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import structlog
from eventsourcing.persistence import IntegrityError, RecordConflictError

from eventstore.breaker import is_store_error
from eventstore.failures import RepeatedFailures
from eventstore.store import EventLog, StoreUnavailable

log = structlog.get_logger(__name__)


class JournalClosed(RuntimeError):
    """The journal is shut down; nothing more can be committed."""


class JournalTimeout(RuntimeError):
    """Not committed within the caller's timeout; it never will be (withdrawn)."""


@dataclass
class Queued:
    """Events handed to the journal: `future` has their positions once committed."""

    events: Sequence[Any]
    sync: bool = True  # someone is acknowledged after this commit: flush it to disk
    future: Future[list[int]] = field(default_factory=Future)
    # Taken once, by the writer (to write it) or by its caller (giving up on it): a batch
    # whose caller gave up is never written later, behind events committed since.
    _taken: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> bool:
        with self._lock:
            if self._taken:
                return False
            self._taken = True
            return True


_WAKE = ("wake",)  # on the queue after an urgent batch: the writer may be waiting there


class Journal:
    # Under load (the last transaction served many callers), wait this long for more
    # callers before committing: bigger transactions, fewer fsyncs. Idle: commit at once,
    # so a lone command pays no extra latency.
    LINGER = 0.001
    BUSY_CALLERS = 8
    TIMEOUT = 30.0  # a commit not written by then is withdrawn (`wait`)

    def __init__(self, event_log: EventLog, max_batch_events: int = 1000) -> None:
        self.log = event_log
        self._max = max_batch_events
        self._last_callers = 0
        self._queue: queue.SimpleQueue[Queued | Any | None] = queue.SimpleQueue()
        self._urgent: queue.SimpleQueue[Queued] = queue.SimpleQueue()
        self._closed = False
        self._open = threading.Lock()  # `_closed` and what is put on the queues (`_enqueue`)
        self._writing = threading.Lock()  # one transaction at a time, whoever writes it
        self._thread = threading.Thread(target=self._run, name="journal-writer", daemon=True)
        self._thread.start()
        # What /api/health shows as storeWritable.
        self.failures = RepeatedFailures("journal.commit_failed", "journal.still_failing", "journal.recovered")
        self.batches = 0
        self.flushed = 0  # transactions flushed to disk (sync); the rest were only written
        self.committed = 0

    def submit(self, events: Sequence[Any], *, sync: bool = True) -> Queued:
        """Queue a commit and return at once; `wait` for it (or watch `.future`)."""
        return self._enqueue(events, sync)

    def _enqueue(self, events: Sequence[Any], sync: bool, urgent: bool = False) -> Queued:
        batch = Queued(events, sync)
        # Checked and put under one lock with `close`: a batch put behind the writer's
        # stop item would never be taken, and its future never resolved.
        with self._open:
            if self._closed:
                raise JournalClosed("journal is closed")
            if urgent:
                self._urgent.put(batch)
                self._queue.put(_WAKE)
            else:
                self._queue.put(batch)
        return batch

    def wait(self, batch: Queued, timeout: float | None = None) -> list[int]:
        """`batch`'s positions once committed (raises what its commit raised). Past `timeout`
        (default `TIMEOUT`) a batch still queued is withdrawn, never to be written behind
        events committed since, and JournalTimeout raised; one the writer has in a
        transaction by then is waited for to the end."""
        limit = self.TIMEOUT if timeout is None else timeout
        try:
            return batch.future.result(limit)
        except FutureTimeout:
            if batch.take():
                # Still queued (the store is stuck): withdrawn, so it is not committed
                # after the caller gave up and moved on (reloaded, retried, answered 503).
                raise JournalTimeout(f"not committed within {limit} s") from None
            # The writer has it in a transaction now: its outcome is the caller's.
            return batch.future.result()

    def commit(self, events: Sequence[Any], timeout: float | None = None, *, sync: bool = True,
               urgent: bool = False) -> list[int]:
        """Commit and wait; returns the events' global positions. `sync=False` for a commit
        nobody is acknowledged on: it is not flushed to disk by itself (recorders.py).
        `urgent` for one an HTTP caller waits on: written ahead of the queue."""
        if self._closed:
            raise JournalClosed("journal is closed")
        breaker = self.log.breaker
        if breaker is not None:
            # Known down: fail now. The writer may be stuck in a transaction a hung server
            # never answers, and a commit queued behind it would wait out TIMEOUT.
            breaker.check()
        # Not under load (the writer's last transaction served many callers): then a lone
        # transaction squeezed between group commits costs more than the hand-off saves
        # (ingest: actor threads 32 -> 21 µs of CPU per message, 11.7k -> 13.4k msg/s).
        if self.idle and self._writing.acquire(blocking=False):
            batch = Queued(events, sync)
            try:
                self._write([batch])
            finally:
                self._writing.release()
            return batch.future.result(0)
        return self.wait(self._enqueue(events, sync, urgent), timeout)

    @property
    def idle(self) -> bool:
        """Nothing queued and not under load: a `commit` now is written on the caller's
        thread at once, unless another caller is writing this moment."""
        return self._last_callers < self.BUSY_CALLERS and self._queue.empty() and self._urgent.empty()

    def snapshot(self, snapshot: Any) -> None:
        """Store a snapshot later, off the caller's path; losing one costs only replay time."""
        if not self._closed:
            self._queue.put(("snapshot", snapshot))

    def close(self, timeout: float = 10.0) -> None:
        with self._open:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            self._write_urgent()
            if item is None:
                return
            if item is _WAKE:
                continue
            batches: list[Queued] = []
            snapshots: list[Any] = []
            n = 0
            stop = False
            while True:
                if isinstance(item, Queued):
                    batches.append(item)
                    n += len(item.events)
                elif item is None:
                    stop = True
                    break
                elif item is _WAKE:
                    # An urgent batch is queued: written next (below), ahead of these, not
                    # after the gathering, which under load lasts until the queue has been
                    # quiet for LINGER or `_max` events came (a reviewer's test: 107-138 ms
                    # at p50 for an urgent commit behind a steady trickle, 0.5-1.4 ms so).
                    break
                else:
                    snapshots.append(item[1])
                if n >= self._max:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    if self._last_callers < self.BUSY_CALLERS:
                        break
                    try:
                        item = self._queue.get(timeout=self.LINGER)
                    except queue.Empty:
                        break
            # Those queued meanwhile, ahead of the gathered batches: their wake-up may have
            # been among the items just gathered (an urgent batch is queued before its
            # wake-up, so it is there by now), and nothing else would write them.
            self._write_urgent()
            # Taken only once the write lock is ours: a caller writing on its own thread may
            # hold it (for as long as its store hangs), and a batch taken while we waited
            # could no longer be withdrawn by its caller's timeout (`wait`).
            with self._writing:
                batches = [b for b in batches if b.take()]  # not those whose callers gave up
                self._last_callers = len(batches)
                if batches:
                    self._write(batches)
            if snapshots:
                self._put_snapshots(snapshots)
            if stop:
                return

    def _write_urgent(self) -> None:
        """The urgent batches queued by now, in a transaction of their own."""
        if self._urgent.empty():
            return
        with self._writing:  # then taken (see _run)
            batches = []
            while True:
                try:
                    batch = self._urgent.get_nowait()
                except queue.Empty:
                    break
                if batch.take():
                    batches.append(batch)
            if batches:
                self._write(batches)

    def _put_snapshots(self, snapshots: list[Any]) -> None:
        # One transaction for all of them: under ingest every device takes one per 100
        # events, and a transaction each cost 1-2 µs per message. If one fails (another
        # process stored the same version, say), store the others one by one.
        try:
            self.log.put_snapshots(snapshots)
            return
        except StoreUnavailable:
            return  # known down: the breaker said so (store.down)
        except Exception as exc:
            if isinstance(exc, IntegrityError):
                # Another process stored one of these versions already (its actor for the
                # same device stopped at the same version, say): nothing is missing. Not a
                # store failure, though eventsourcing raises it: the others are stored.
                if len(snapshots) == 1:
                    log.debug("journal.snapshot_exists", error=str(exc))
                    return
            elif is_store_error(exc):
                # (Not stored: a load replays a little more, and the next one takes it.)
                self.failures.failed(exc, "journal.snapshot_failed", snapshots=len(snapshots))
                return
            elif len(snapshots) == 1:
                log.warning("journal.snapshot_failed", error=str(exc), snapshots=len(snapshots))
                return
        for snapshot in snapshots:
            self._put_snapshots([snapshot])

    def _write(self, batches: list[Queued]) -> None:
        events = [e for b in batches for e in b.events]
        sync = any(b.sync for b in batches)
        try:
            positions = self.log.append(events, sync=sync)
        except StoreUnavailable as exc:
            # Known down (eventstore/breaker.py): each caller would fail alike, at once.
            for b in batches:
                b.future.set_exception(exc)
            return
        except Exception:
            # One stream conflicted (or one event could not be encoded): fall back to one
            # transaction per caller so that only the guilty caller fails.
            for b in batches:
                try:
                    pos = self.log.append(b.events, sync=b.sync)
                    if pos:
                        self.log.notify_committed(max(pos))  # before the caller hears (below)
                    b.future.set_result(pos)
                    self.failures.succeeded()
                except RecordConflictError as exc:
                    b.future.set_exception(exc)
                except StoreUnavailable as exc:
                    b.future.set_exception(exc)  # went down meanwhile: the breaker says so
                except Exception as exc:
                    if is_store_error(exc):
                        self.failures.failed(exc, events=len(b.events))  # once, then counted
                    else:
                        log.error("journal.commit_failed", error=repr(exc), events=len(b.events))
                    b.future.set_exception(exc)
            self.batches += len(batches)
            self.flushed += sum(b.sync for b in batches)
            return
        self.failures.succeeded()
        self.batches += 1
        self.flushed += sync
        self.committed += len(events)
        # The log's listeners first: a caller acknowledges as soon as it hears (an MQTT ack,
        # an HTTP 2xx), and a read after that must find the commit known (read-your-writes:
        # ProjectionRunner.committed).
        if positions:
            self.log.publish_committed(events, positions)
        i = 0
        for b in batches:
            k = len(b.events)
            b.future.set_result(positions[i:i + k])
            i += k
