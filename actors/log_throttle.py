"""Which of many alike log lines to write.

A device that sends garbage, or answers with request ids nobody asked for, can do so
hundreds of times a second, and a log line for each one buries everything else (an audit
sent 3,000 unmatched answers and got 3,000 warnings). The counters (`GET /api/health`)
count every one; the log needs the first of them, and then a reminder now and then with
how many were left out. Lives in `actors/` because both the actors and the gateways use it
(gateways may import actors, not the other way round).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable


class LogThrottle:
    """The first line for a key is written; after it, one per `interval` seconds, which
    says how many like lines were left out since (`left_out`). At most
    `max_keys` keys are remembered (the oldest forgotten first), so keys made of what
    devices send (a product id, a topic) cannot grow it without bound. Thread-safe."""

    def __init__(self, interval: float = 60.0, max_keys: int = 1024) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._keys: OrderedDict[Hashable, list[float | int]] = OrderedDict()  # key: [written at, left out]
        self._lock = threading.Lock()

    def admit(self, key: Hashable) -> dict[str, int] | None:
        """None: leave this line out. Otherwise the fields to write it with: `left_out`, how
        many like lines were left out before it, when there were any."""
        now = time.monotonic()
        with self._lock:
            entry = self._keys.get(key)
            if entry is None:
                self._keys[key] = [now, 0]
                if len(self._keys) > self.max_keys:
                    self._keys.popitem(last=False)
                return {}
            if now - entry[0] < self.interval:
                entry[1] += 1
                return None
            left_out = int(entry[1])
            entry[0], entry[1] = now, 0
            self._keys.move_to_end(key)
            return {"left_out": left_out} if left_out else {}
