"""The root of moot's exceptions.

::

    MootError                      everything moot raises on purpose
    ├── EventDecodeError           a stored event cannot be read (moot.events)
    ├── StoreError                 the event log refused or failed (moot.store)
    │   ├── ConcurrencyError       a stale expected_seq: someone else appended first
    │   ├── IntegrityError         a broken hash chain or a stream in a bad state
    │   └── DatabaseError          not a moot log, newer schema, unreadable file
    └── (moot.actors adds its own branches: configuration, providers, tools)
"""

from __future__ import annotations

__all__ = ["EventDecodeError", "MootError"]


class MootError(Exception):
    """Base of every exception moot raises on purpose."""


class EventDecodeError(MootError):
    """A stored event body cannot be decoded (unknown type, newer version, bad shape)."""
