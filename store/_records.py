"""What the log hands out: stored rows, decoded records, stream heads, verify reports."""

from __future__ import annotations

from typing import Annotated

import msgspec

from moot.events import Event, EventDecodeError, Status, decode_event

__all__ = ["Anchor", "Record", "StoredEvent", "StreamInfo", "VerifyReport", "to_record"]


class StoredEvent(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One row of the ``events`` table, exactly as stored (``data`` is the JSON text)."""

    position: int
    stream: str
    seq: int
    type: str
    version: int
    recorded_at: str
    data: str
    prev_hash: str
    hash: str


class Record(msgspec.Struct, frozen=True, gc=False):
    """One event as read back: where it sits in the log, and the decoded event."""

    position: int
    stream: str
    seq: int
    type: str
    version: int
    recorded_at: str
    event: Event


def to_record(row: StoredEvent) -> Record:
    """Decode a stored row (upcasting old versions). The one mapper from rows to records.

    Raises:
        EventDecodeError: the row cannot be read; the message says where it is.
    """
    try:
        event = decode_event(row.type, row.version, row.data)
    except EventDecodeError as exc:
        raise EventDecodeError(f"{row.stream}#{row.seq} (position {row.position}): {exc}") from exc
    return Record(row.position, row.stream, row.seq, row.type, row.version, row.recorded_at, event)


class StreamInfo(msgspec.Struct, frozen=True):
    """One row of the ``streams`` table: a stream's kind, status and head."""

    stream: str
    kind: str
    parent: str | None
    status: Status
    created_at: str
    updated_at: str
    last_seq: int
    last_hash: str
    last_position: int


class Anchor(msgspec.Struct, frozen=True, kw_only=True):
    """What a log held when it was verified: each stream's last seq and hash, and the
    last position. Kept outside the database, it lets a later :meth:`EventLog.verify`
    tell that nothing it covers was removed or rewritten since, which the chain alone
    cannot: whole newest streams can be deleted without a trace, and without an audit
    key a forger can recompute every hash.

    Attributes:
        position: The highest position among the heads (the log's last position, for
            an anchor of the whole log).
        heads: stream -> (last seq, hash of that event).
        stream: The one stream the anchor covers, or None for the whole log.
        taken_at: When it was taken (ISO-8601 UTC), for people.
    """

    position: Annotated[int, msgspec.Meta(ge=0)]
    heads: dict[str, tuple[Annotated[int, msgspec.Meta(ge=1)], str]]
    stream: str | None = None
    taken_at: str = ""


class VerifyReport(msgspec.Struct, frozen=True):
    """The outcome of :meth:`EventLog.verify`.

    ``ok`` is true when every hash, seq and head checks out; otherwise ``first_bad`` is
    the position of the first event found wrong (or missing; None when the events of an
    anchored stream are gone and their positions are not known), and ``reason`` says
    why. A successful report carries the :class:`Anchor` of what it verified.
    """

    ok: bool
    checked: int
    first_bad: int | None = None
    reason: str | None = None
    stream: str | None = None
    anchor: Anchor | None = None
