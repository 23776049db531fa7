"""msgpack transcoder for eventsourcing.

Aware datetimes (every event's timestamp) use msgpack's own Timestamp type, encoded in C
and decoded as UTC. Naive datetimes (events carry none) and UUIDs travel as extension
types; a naive datetime is read back as UTC. Older logs stored every datetime as ISO text
in extension 2, which still decodes.
Events come out about a third smaller than JSON and encode faster (REFERENCE.md).
"""

from __future__ import annotations

import threading
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

import msgpack
from eventsourcing.persistence import Transcoder

_EXT_UUID = 1
_EXT_DATETIME = 2  # ISO 8601 text: naive datetimes, and every datetime in older logs


def _default(obj: Any) -> Any:
    if isinstance(obj, UUID):
        return msgpack.ExtType(_EXT_UUID, obj.bytes)
    if isinstance(obj, datetime):  # naive: msgpack's Timestamp needs an aware one
        return msgpack.ExtType(_EXT_DATETIME, obj.isoformat().encode())
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"msgpack transcoder cannot encode {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_UUID:
        return UUID(bytes=data)
    if code == _EXT_DATETIME:
        value = datetime.fromisoformat(data.decode())
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return msgpack.ExtType(code, data)


class UnencodableValue(ValueError):
    """An event holds a value msgpack cannot store (an integer beyond 64 bits, a lone
    surrogate, an unknown type, nesting too deep). The edges refuse such input; this is the
    log's own guard, so the message is refused instead of retried as if the store failed."""


class MsgpackTranscoder(Transcoder):
    def __init__(self) -> None:
        # One Packer per thread (a Packer keeps a buffer, so threads cannot share one):
        # `msgpack.packb` builds a new Packer per call, half the cost of encoding an event
        # (1.1 against 0.5 µs). A Packer resets its buffer when a pack fails.
        self._local = threading.local()

    def _packer(self) -> msgpack.Packer:
        packer = getattr(self._local, "packer", None)
        if packer is None:
            # datetime=True: an aware datetime becomes a msgpack Timestamp without calling
            # back into Python (the callback for each event's timestamp was ~10% of ingest CPU).
            packer = self._local.packer = msgpack.Packer(default=_default, use_bin_type=True, datetime=True)
        return packer

    def encode(self, obj: Any) -> bytes:
        try:
            return self._packer().pack(obj)
        except (TypeError, ValueError, OverflowError) as exc:  # UnicodeEncodeError is a ValueError
            raise UnencodableValue(f"cannot store event: {exc}") from exc

    def decode(self, data: bytes) -> Any:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False, timestamp=3)
