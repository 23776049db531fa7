"""Identifiers the HTTP gateway makes per request: a command's requestId, a trace id.

From the random module, not `uuid4()` / `secrets`: those read the kernel's random source,
a system call on every request that lets the actor and MQTT threads take the GIL from the
trio loop halfway through it. Measured on the command round trip with two servers side by
side and requests alternating between them: 0.00-0.16 ms less at p50, 0.09 ms on average
over four runs of 1,000 pairs. Neither id is a secret: a requestId matches a device's
response to its command, a trace id joins log lines. The generator is seeded from the
kernel at start, and again in a forked child.
"""

from __future__ import annotations

import random
import uuid


def request_id() -> str:
    """A random (version 4) UUID as 32 hex digits, as `uuid4().hex` gives."""
    return uuid.UUID(int=random.getrandbits(128), version=4).hex


def trace_id() -> str:
    """16 random hex digits."""
    return f"{random.getrandbits(64):016x}"
