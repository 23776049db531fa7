"""msgpack transcoder for eventsourcing.

msgpack has no UUID or datetime, so both travel as extension types; events come out
about a third smaller than JSON and encode faster (REFERENCE.md).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any
from uuid import UUID

import msgpack
from eventsourcing.persistence import Transcoder

_EXT_UUID = 1
_EXT_DATETIME = 2  # ISO 8601 text: keeps the timezone exactly


def _default(obj: Any) -> Any:
    if isinstance(obj, UUID):
        return msgpack.ExtType(_EXT_UUID, obj.bytes)
    if isinstance(obj, datetime):
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


class MsgpackTranscoder(Transcoder):
    def encode(self, obj: Any) -> bytes:
        return msgpack.packb(obj, default=_default, use_bin_type=True, datetime=False)

    def decode(self, data: bytes) -> Any:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
