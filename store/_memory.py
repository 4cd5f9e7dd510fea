"""A pure-Python, in-process event log with the same rules and errors as the SQLite one.

For tests and for programs that want moot's actors without a file. Nothing survives
the process.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Any

from ._base import LogBase
from ._records import StoredEvent, StreamInfo

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["MemoryEventLog"]


class _Tx:
    def __init__(self, log: MemoryEventLog) -> None:
        self._log = log

    def heads(self, streams: set[str]) -> tuple[int, dict[str, StreamInfo]]:
        known = self._log._streams
        return len(self._log._rows), {s: known[s] for s in streams if s in known}

    def write(self, rows: list[tuple[Any, ...]], heads: list[StreamInfo]) -> None:
        log = self._log
        for row in rows:
            stored = StoredEvent(*row)
            log._rows.append(stored)
            log._by_stream.setdefault(stored.stream, []).append(stored)
        for head in heads:
            log._streams[head.stream] = head


class MemoryEventLog(LogBase):
    """An event log held in memory (see :class:`moot.store.EventLog` for the API)."""

    def __init__(self, *, audit_key: bytes | str | None = None) -> None:
        super().__init__(audit_key)
        self.path = ":memory:"
        self._lock = threading.RLock()  # re-entrant: a snapshot holds it around reads
        self._write_lock = self._lock
        self._rows: list[StoredEvent] = []
        self._by_stream: dict[str, list[StoredEvent]] = {}
        self._streams: dict[str, StreamInfo] = {}

    def __repr__(self) -> str:
        return "MemoryEventLog()"

    def _snapshot(self) -> threading.RLock:
        return self._lock  # no append lands while it is held

    def _transaction(self) -> contextlib.nullcontext[_Tx]:
        return contextlib.nullcontext(_Tx(self))  # under self._lock (the write lock)

    def _page_stream(
        self, stream: str, after_seq: int, until_seq: int | None, limit: int
    ) -> list[StoredEvent]:
        with self._lock:
            rows = self._by_stream.get(stream, [])
            end = len(rows) if until_seq is None else max(0, min(until_seq, len(rows)))
            after_seq = max(0, after_seq)  # as SQLite: nothing is before seq 1
            return rows[after_seq : min(end, after_seq + limit)]

    def _page_all(self, after_position: int, limit: int, stream: str | None) -> list[StoredEvent]:
        with self._lock:
            if stream is None:
                after_position = max(0, after_position)
                return self._rows[after_position : after_position + limit]
            rows = self._by_stream.get(stream, [])
            return [r for r in rows if r.position > after_position][:limit]

    def _replay_rows(self, stream: str, until_seq: int | None) -> Iterable[tuple[str, int, str]]:
        rows = self._page_stream(stream, 0, until_seq, 1 << 62)
        return ((r.type, r.version, r.data) for r in rows)

    def _verify_rows(self, stream: str | None) -> Iterable[tuple[Any, ...]]:
        with self._lock:
            rows = list(self._rows if stream is None else self._by_stream.get(stream, []))
        return (
            (
                r.position,
                r.stream,
                r.seq,
                r.type,
                r.version,
                r.recorded_at,
                r.data,
                r.prev_hash,
                r.hash,
            )
            for r in rows
        )

    def _heads(self, stream: str | None) -> list[StreamInfo]:
        with self._lock:
            if stream is not None:
                head = self._streams.get(stream)
                return [] if head is None else [head]
            by_name = sorted(self._streams.values(), key=lambda h: h.stream)
            return sorted(by_name, key=lambda h: h.updated_at, reverse=True)

    def _missing_after(self, position: int, upto: int) -> int:
        return position + 1

    def _last_position(self) -> int:
        with self._lock:
            return len(self._rows)

    def _close(self) -> None:
        pass
