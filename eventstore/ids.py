"""Deterministic stream ids, so any process finds a stream from a name."""

from uuid import NAMESPACE_URL, UUID, uuid5

PARLEY_NAMESPACE = uuid5(NAMESPACE_URL, "https://parley.dev/streams")


def stream_id(kind: str, *parts: str) -> UUID:
    """`stream_id("device", "thermostat", "t-1")` is uuid5 of `device:thermostat:t-1`."""
    return uuid5(PARLEY_NAMESPACE, ":".join((kind, *parts)))
