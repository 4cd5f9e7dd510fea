"""moot.store: the append-only, hash-chained event log.

``EventLog`` keeps it in SQLite (a file, or ``":memory:"``); ``MemoryEventLog`` keeps
it in a Python list with the same behaviour and errors.
"""

from __future__ import annotations

from ._base import LogBase, Subscription, check_stream_id
from ._chain import GENESIS, chain_hash
from ._errors import (
    ConcurrencyError,
    DatabaseError,
    IntegrityError,
    StoreError,
    UnknownStreamError,
)
from ._memory import MemoryEventLog
from ._records import Anchor, Record, StoredEvent, StreamInfo, VerifyReport
from ._schema import SCHEMA_VERSION
from ._sqlite import EventLog

__all__ = [
    "GENESIS",
    "Anchor",
    "SCHEMA_VERSION",
    "ConcurrencyError",
    "DatabaseError",
    "EventLog",
    "IntegrityError",
    "LogBase",
    "MemoryEventLog",
    "Record",
    "StoreError",
    "StoredEvent",
    "StreamInfo",
    "Subscription",
    "UnknownStreamError",
    "VerifyReport",
    "chain_hash",
    "check_stream_id",
]
