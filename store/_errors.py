"""Errors of the event log. All derive from :class:`moot.events.MootError` via StoreError.

::

    StoreError                 the event log refused or failed
    ├── ConcurrencyError       a stale expected_seq: another writer appended first
    ├── IntegrityError         a stream's events do not fit it (wrong kind, bad first event)
    ├── UnknownStreamError     no such stream
    └── DatabaseError          the file is not a moot log, is newer, is unreadable, or is closed
"""

from __future__ import annotations

from moot.events import MootError

__all__ = [
    "ConcurrencyError",
    "DatabaseError",
    "IntegrityError",
    "StoreError",
    "UnknownStreamError",
]


class StoreError(MootError):
    """The event log refused an operation or failed to carry it out."""


class ConcurrencyError(StoreError):
    """The stream's last seq is not the one the caller expected; nothing was written."""

    def __init__(self, stream: str, expected: int, actual: int) -> None:
        super().__init__(f"stream {stream!r}: expected last seq {expected}, found {actual}")
        self.stream = stream
        self.expected = expected
        self.actual = actual


class IntegrityError(StoreError):
    """The events do not fit the stream (wrong kind, or a stream not started properly)."""


class UnknownStreamError(StoreError, KeyError):
    """There is no stream by that id."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown stream"


class DatabaseError(StoreError):
    """The database cannot be used: not SQLite, not a moot log, a newer schema, or closed."""
