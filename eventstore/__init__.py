"""The log: eventsourcing + msgpack on SQLite or PostgreSQL, snapshots, group commit.

This room knows nothing of devices, agents or gateways.
"""

from eventstore.ids import stream_id
from eventstore.journal import Journal, JournalClosed, JournalTimeout
from eventstore.store import EventLog, LoggedEvent, StoreConfig, StoreUnavailable
from eventstore.transcoder import UnencodableValue

__all__ = ["EventLog", "Journal", "JournalClosed", "JournalTimeout", "LoggedEvent", "StoreConfig", "StoreUnavailable", "UnencodableValue", "stream_id"]
