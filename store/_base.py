"""What every event-log backend shares: the append funnel with group commit, the hash
chain, reading, replay, verify and subscriptions.

A backend supplies storage primitives (a write transaction, pages of rows, the rows
to replay or verify); everything with rules in it lives here once, so the SQLite and
in-memory backends behave the same and raise the same errors.

Group commit. Any number of threads may call :meth:`LogBase.append` at once. Each call
queues its request; the first caller that finds no commit in progress becomes the
leader, takes every queued request, and writes them all in one transaction (one fsync),
while later callers queue up for the next one. Each caller returns only after the
transaction holding its own events has committed, with its own result or error. A
single thread appending alone never waits for anyone.
"""

from __future__ import annotations

import _thread
import contextlib
import threading
import time
import typing
from collections import deque
from typing import TYPE_CHECKING, Any, Self

import msgspec

from moot.events import (
    EVENT_TYPES,
    STATUS_EVENTS,
    DialogueEvent,
    DialogueStarted,
    Event,
    EventBase,
    EventDecodeError,
    LoopStarted,
    State,
    Status,
    decode_event,
    encode_checked,
    evolve,
    next_status,
)

from ._chain import GENESIS, Hasher, body_hasher, chain_hash, encode_header
from ._errors import (
    ConcurrencyError,
    DatabaseError,
    IntegrityError,
    StoreError,
    UnknownStreamError,
)
from ._records import Anchor, Record, StoredEvent, StreamInfo, VerifyReport, to_record

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable, Iterator, Sequence
    from types import TracebackType

__all__ = ["LogBase", "StaleHeads", "Subscription", "Transaction"]

_DIALOGUE_TYPES = frozenset(cls.__name__ for cls in typing.get_args(DialogueEvent))
_FIRST_TYPES = frozenset(("DialogueStarted", "LoopStarted"))
_STATUS_NAMES = frozenset(cls.__name__ for cls in STATUS_EVENTS)

#: Per event type: (name, version, whether a dialogue event, whether a first event,
#: whether it moves the stream's status), looked up once per appended event.
_TYPE_FACTS = {
    cls: (
        name,
        cls.version,
        name in _DIALOGUE_TYPES,
        name in _FIRST_TYPES,
        cls in STATUS_EVENTS,
    )
    for name, cls in EVENT_TYPES.items()
}

_PAGE = 1000
#: Commits a leader may do in a row before handing the lead to a waiting caller.
_ROUNDS = 4


#: [(whole seconds, their ISO-8601 text)]: the part of ``recorded_at`` that changes
#: once a second, formatted once a second (one tuple, so threads see it whole).
_second: list[tuple[int, str]] = [(0, "1970-01-01T00:00:00")]


def utc_now() -> str:
    """ISO-8601 UTC with microseconds, the format of ``recorded_at``.

    Called once per commit; formats only the microseconds when the second is the last
    call's (a third of the cost of ``datetime.isoformat``).
    """
    micros = time.time_ns() // 1000
    seconds, fraction = divmod(micros, 1_000_000)
    cached, text = _second[0]
    if seconds != cached:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second[0] = (seconds, text)
    return f"{text}.{fraction:06d}Z"


class _Append:
    """One caller's append request, waiting in the group-commit queue.

    Everything that does not depend on the stream's head (encoding, hashing the body,
    the type checks) is done here, by the calling thread, so that it overlaps with the
    leader's commit instead of lengthening it.
    """

    __slots__ = (
        "dialogue",
        "done",
        "error",
        "events",
        "expected",
        "prepared",
        "result",
        "starts",
        "stream",
        "wake",
    )

    def __init__(
        self, stream: str, events: Sequence[EventBase], expected: int | None, key: bytes | None
    ) -> None:
        self.stream = stream
        self.events = events
        self.prepared: list[tuple[str, int, str, Hasher, bool]] = []
        add = self.prepared.append
        dialogue = starts = 0
        for event in events:
            data = encode_checked(event)  # raises unless it is one of the log's events
            name, version, in_dialogue, first, moves = _TYPE_FACTS[type(event)]
            dialogue += in_dialogue
            starts += first
            add((name, version, data.decode(), body_hasher(key, data), moves))
        #: How many of the events are dialogue events (the rest are tool-loop events),
        #: and how many are first events: the leader checks that they fit the stream
        #: from these, without a loop of its own.
        self.dialogue = dialogue
        self.starts = starts
        self.expected = expected
        self.result = 0
        self.error: BaseException | None = None
        self.done = False
        #: Held while the caller sleeps; released by the leader that commits it (or
        #: hands it the lead). A bare lock: ~0.1 us to make, where an Event costs ~3 us.
        self.wake: _thread.LockType | None = None


def _release(callers: list[_Append]) -> None:
    """Wake the callers of a committed batch; the list is emptied.

    Safe to repeat (an interruption half-way through is finished by a second call):
    waking a caller twice is harmless.
    """
    for r in callers:
        if r.wake is not None:
            try:  # noqa: SIM105  (contextlib.suppress costs a microsecond per caller)
                r.wake.release()
            except RuntimeError:  # released before, and not yet taken by its caller
                pass
    callers.clear()


#: The largest seq or position SQLite can hold; a cursor past it reads nothing (one below
#: its negative reads everything).
_MAX_CURSOR = 2**63 - 1


def _cursor(name: str, value: object) -> int:
    """A seq or position given by a caller, as both backends take it.

    Raises:
        TypeError: it is not an int.
    """
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return max(-_MAX_CURSOR, min(value, _MAX_CURSOR))


def check_stream_id(stream: object) -> None:
    """Refuse a stream id the database could not store (appends check it in the
    caller's thread; a program may check an id it is given before anything runs).

    Raises:
        ValueError: not a non-empty str, or holds NUL or a lone surrogate.
    """
    if not isinstance(stream, str) or not stream or "\x00" in stream:
        raise ValueError(f"invalid stream id {stream!r}")
    try:
        stream.encode()
    except UnicodeEncodeError:
        raise ValueError(f"invalid stream id {stream!r} (not valid Unicode text)") from None


def _started_as(first: object) -> tuple[str, str | None] | None:
    """The kind and parent a stream's first event gives it; None if it is no start.

    Appends set a new stream's head from this, and verify checks heads against it."""
    if isinstance(first, DialogueStarted):
        return "dialogue", None
    if isinstance(first, LoopStarted):
        return "loop", first.parent.stream if first.parent else None
    return None


def _interrupted() -> StoreError:
    """What a caller hears when the leader committing its request was interrupted."""
    return StoreError("interrupted while committing; the events may not be written")


def _against(
    anchor: Anchor,
    stream: str | None,
    expect: dict[str, tuple[int, str, int, Status, str]],
    at_anchor: dict[str, tuple[str, int]],
    checked: int,
) -> VerifyReport | None:
    """What a verified log lacks of an earlier anchor (None: it holds all of it)."""
    for s, (seq, digest) in anchor.heads.items():
        if stream is not None and s != stream:
            continue
        if not isinstance(seq, int) or seq < 1:  # an anchor made by hand, or damaged
            raise ValueError(f"the anchor's seq {seq!r} for stream {s!r} is not a seq")
        now = expect.get(s)
        if now is None or now[0] < seq:
            ends = "has no such stream" if now is None else f"ends at seq {now[0]}"
            reason = f"stream {s!r}: the anchor has seq {seq} but the log {ends} (events removed)"
            return VerifyReport(False, checked, None, reason, s)
        found, position = at_anchor[s]
        if found != digest:
            reason = f"stream {s!r}: the event at seq {seq} is not the one anchored (rewritten)"
            return VerifyReport(False, checked, position, reason, s)
    return None


class StaleHeads(Exception):
    """The heads a transaction gave out came from a cache that another writer has made
    stale; nothing was written, and the transaction now reads heads from the database.
    A signal between the store's own modules: it never reaches a caller."""


class Transaction(typing.Protocol):
    """A backend's write transaction, as the group-commit leader uses it."""

    def heads(self, streams: set[str]) -> tuple[int, dict[str, StreamInfo]]:
        """The log's last position, and the heads of those of ``streams`` that exist
        (in a new dict, which the caller may change)."""
        ...

    def write(self, rows: list[tuple[Any, ...]], heads: list[StreamInfo]) -> None:
        """Write the rows and the new heads.

        Raises:
            StaleHeads: the heads given out were stale; plan again with fresh ones.
        """
        ...


class LogBase:
    """The backend-independent part of an event log (see the module docstring)."""

    def __init__(self, audit_key: bytes | str | None = None) -> None:
        self._key = audit_key.encode() if isinstance(audit_key, str) else audit_key
        if self._key is not None and not self._key:
            raise ValueError("an audit key must not be empty (None: no key)")
        #: Guards the queue and the lead. The condition on it is for whoever waits for
        #: a commit (subscriptions, close); the hot paths take the bare lock, whose
        #: ``with`` costs a tenth of the condition's.
        self._guard = threading.Lock()
        #: Held around each write transaction (a backend may share it with its reads).
        self._write_lock: typing.ContextManager[Any] = threading.Lock()
        self._cond = threading.Condition(self._guard)
        #: Who waits on the condition (CPython keeps them in a deque, changed only under
        #: the lock): notifying nobody costs three Python calls per notify_all.
        self._waiters: Collection[object] = getattr(self._cond, "_waiters", (True,))
        self._queue: list[_Append] = []
        self._leading = False
        #: The caller the lead was last handed to (until it takes it up).
        self._successor: _Append | None = None
        #: Commits seen by this process; subscriptions wait for it to change.
        self._commits = 0
        self._closed = False
        self.readonly = False
        #: Why appends are refused, if they are (set by a backend).
        self._refusal: str | None = None

    # ------------------------------------------------------------ backend hooks

    def _transaction(self) -> typing.ContextManager[Transaction]:
        raise NotImplementedError

    def _page_stream(
        self, stream: str, after_seq: int, until_seq: int | None, limit: int
    ) -> list[StoredEvent]:
        raise NotImplementedError

    def _page_all(self, after_position: int, limit: int, stream: str | None) -> list[StoredEvent]:
        raise NotImplementedError

    def _replay_rows(self, stream: str, until_seq: int | None) -> Iterable[tuple[str, int, str]]:
        """(type, version, data) of the stream's events in seq order, for :meth:`replay`."""
        raise NotImplementedError

    def _verify_rows(self, stream: str | None) -> Iterable[tuple[Any, ...]]:
        """Stored rows (StoredEvent field order) in position order, for :meth:`verify`."""
        raise NotImplementedError

    def _heads(self, stream: str | None) -> list[StreamInfo]:
        raise NotImplementedError

    def _missing_after(self, position: int, upto: int) -> int:
        """The first position in (position, upto] that holds no event (``upto`` if none)."""
        raise NotImplementedError

    def _last_position(self) -> int:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def _after_lead(self) -> None:
        """Called in a leader's thread once it has stepped down (housekeeping)."""

    # ------------------------------------------------------------------- append

    def append(
        self, stream: str, events: Sequence[EventBase], *, expected_seq: int | None = None
    ) -> int:
        """Append ``events`` to ``stream`` atomically and durably.

        Args:
            stream: The stream id. A new stream's first event must be DialogueStarted
                or LoopStarted, which sets its kind.
            events: The events, in order. All of them are written or none.
            expected_seq: The stream's last seq as the caller knows it (0 for a new
                stream); None appends whatever the stream holds.

        Returns:
            The stream's last seq after the append.

        Raises:
            ConcurrencyError: ``expected_seq`` is not the stream's last seq; nothing
                was written.
            IntegrityError: the events do not fit the stream's kind.
            ValueError: an invalid stream id, or an event with a field of the wrong
                type (it could not be read back); nothing was written.
            TypeError: ``expected_seq`` is not an int.
            DatabaseError: the log is closed or read-only.
            StoreError: the database failed to write.
        """
        check_stream_id(stream)
        if expected_seq is not None:
            _cursor("expected_seq", expected_seq)
        if self.readonly:
            raise DatabaseError("this event log is open read-only")
        if self._refusal is not None:
            raise DatabaseError(self._refusal)
        request = _Append(stream, events, expected_seq, self._key)
        self._submit(request)
        if request.error is not None:
            raise request.error
        return request.result

    def _submit(self, request: _Append) -> None:
        try:
            with self._guard:
                if self._closed:
                    raise DatabaseError("this event log is closed")
                self._queue.append(request)
                if self._waiters:  # whoever watches the queue
                    self._cond.notify_all()
                lead = not self._leading
                self._leading = True
                if lead:
                    self._successor = request  # the lead is ours until _lead takes it up
                else:
                    request.wake = wake = _thread.allocate_lock()
                    wake.acquire()
            if not lead:
                # Sleep until a leader has committed us, or has handed us the lead.
                wake.acquire()
                if request.done:
                    return
            self._lead()
            self._after_lead()
        except BaseException:
            # Interrupted (Ctrl-C) anywhere on the way: nobody may be left waiting for
            # this request, or for a lead it holds.
            self._withdraw(request)
            raise

    def _withdraw(self, request: _Append) -> None:
        """A caller was interrupted before its request was committed: take it out of
        the queue, and if it held the lead (not yet taken up), pass the lead on."""
        successor = None
        with self._guard:
            if request.done:
                return
            if request in self._queue:
                self._queue.remove(request)
            if self._successor is request:
                successor = self._queue[0] if self._queue else None
                self._successor = successor
                self._leading = successor is not None
            request.error = StoreError("interrupted while waiting; nothing was written")
            request.done = True
        if successor is not None and successor.wake is not None:
            successor.wake.release()

    def _lead(self) -> None:
        """Commit what is queued, batch after batch while more arrives, then step down.

        The callers of one batch are released just before the next batch's COMMIT,
        not right after their own: woken threads compete for the GIL, and the leader
        would lose it at each of its SQLite calls while they run; during the next
        fsync they cost nothing. Their events are durable either way. After a few
        rounds the lead goes to the first caller still waiting, so the leader's own
        caller returns.
        """
        guard = self._guard
        committed: list[_Append] = []  # done; their callers not yet woken
        batch: list[_Append] = []  # taken from the queue, not yet done
        ok = False  # whether batch's transaction has ended (committed, or failed cleanly)
        try:
            with guard:
                self._successor = None  # the lead is taken up
                batch, self._queue = self._queue, []
            rounds = 0
            while batch:
                self._commit_batch(batch, committed)
                ok = True
                if committed:  # the commit failed before it could release them
                    _release(committed)
                rounds += 1
                with guard:
                    for r in batch:
                        r.done = True
                    self._commits += 1
                    committed = batch
                    if self._queue and rounds < _ROUNDS:  # the next batch, in the same breath
                        batch, self._queue, ok = self._queue, [], False
                    else:
                        batch = []
                    if self._waiters:  # subscriptions and close() wait for commits
                        self._cond.notify_all()
        finally:
            # Also when interrupted (Ctrl-C) anywhere: every caller taken from the queue
            # hears how its request ended, and the lead is passed on (or given up), so a
            # queued caller never waits for a leader that is gone.
            with guard:
                for r in batch:
                    if not r.done:
                        if not ok and r.error is None:
                            r.error = _interrupted()
                        r.done = True
                successor = self._queue[0] if self._queue else None
                self._leading = successor is not None
                self._successor = successor
                if self._waiters:
                    self._cond.notify_all()
            if committed:
                _release(committed)
            if batch:
                _release(batch)
            if successor is not None and successor.wake is not None:
                successor.wake.release()

    def _commit_batch(self, batch: list[_Append], committed: list[_Append]) -> None:
        """Write the batch in one transaction; on failure every caller gets the error.

        The callers of the previous batch (``committed``) are released just before
        COMMIT (see :meth:`_lead`). An interruption (KeyboardInterrupt, SystemExit)
        rolls the transaction back, gives each caller a StoreError saying so, and goes
        on up in the leader.
        """
        try:
            with self._write_lock, self._transaction() as tx:
                try:
                    self._plan(tx, batch)
                except StaleHeads:  # nothing was written: plan again from the database
                    for r in batch:
                        r.error, r.result = None, 0
                    self._plan(tx, batch)
                if committed:
                    _release(committed)
        except Exception as exc:  # noqa: BLE001  routed to each caller, who raises it
            for r in batch:
                if r.error is None:
                    r.error = exc
        except BaseException:
            for r in batch:
                r.error = _interrupted()
            raise

    def _plan(self, tx: Transaction, batch: list[_Append]) -> None:
        """Turn the batch into rows and heads, and write them; refused requests get
        their error instead."""
        recorded_at = utc_now()
        header = encode_header
        position, heads = tx.heads({r.stream for r in batch})
        changed: dict[str, StreamInfo] = {}
        rows: list[tuple[Any, ...]] = []
        for r in batch:
            head = heads.get(r.stream)
            try:
                kind, parent = self._check(r, head)
            except StoreError as exc:
                r.error = exc
                continue
            if not r.events:
                r.result = head.last_seq if head else 0
                continue
            stream = r.stream
            seq = head.last_seq if head else 0
            prev = head.last_hash if head else GENESIS
            status: Status = head.status if head else "open"
            for event, (name, version, data, body, moves) in zip(r.events, r.prepared, strict=True):
                seq += 1
                position += 1
                h = body.copy()  # the body hashed by the caller, then the header
                h.update(header((prev, stream, seq, name, version, recorded_at)))
                digest = h.hexdigest()
                rows.append((position, stream, seq, name, version, recorded_at, data, prev, digest))
                prev = digest
                if moves or status != "open":
                    status = next_status(status, typing.cast("Event", event))
            heads[stream] = changed[stream] = StreamInfo(
                stream=stream,
                kind=kind,
                parent=parent,
                status=status,
                created_at=head.created_at if head else recorded_at,
                updated_at=recorded_at,
                last_seq=seq,
                last_hash=prev,
                last_position=position,
            )
            r.result = seq
        tx.write(rows, list(changed.values()))

    @staticmethod
    def _check(r: _Append, head: StreamInfo | None) -> tuple[str, str | None]:
        """Refuse a stale expectation or events that do not fit; returns (kind, parent)."""
        last = head.last_seq if head else 0
        if r.expected is not None and r.expected != last:
            raise ConcurrencyError(r.stream, r.expected, last)
        if (
            head is not None
            and not r.starts
            and r.dialogue == (len(r.events) if head.kind == "dialogue" else 0)
        ):
            return head.kind, head.parent  # the common case, checked without a loop
        if head is None:
            if not r.events:
                return "", None
            first = r.events[0]
            started = _started_as(first)
            if started is None:
                raise IntegrityError(
                    f"stream {r.stream!r} is new, so its first event must be DialogueStarted "
                    f"or LoopStarted, not {type(first).__name__}"
                )
            kind, parent = started
            rest = r.events[1:]
        else:
            kind, parent, rest = head.kind, head.parent, r.events
        for event in rest:
            name = type(event).__name__
            if name in ("DialogueStarted", "LoopStarted"):
                raise IntegrityError(
                    f"stream {r.stream!r} has already started; {name} is a first event"
                )
            if (name in _DIALOGUE_TYPES) != (kind == "dialogue"):
                raise IntegrityError(f"{name} does not belong in {kind} stream {r.stream!r}")
        return kind, parent

    # --------------------------------------------------------------------- read

    def read(
        self, stream: str, after_seq: int = 0, *, until_seq: int | None = None
    ) -> Iterator[Record]:
        """The stream's events after ``after_seq`` (up to ``until_seq``), in seq order.

        Rows are fetched a page at a time, so the iterator holds no lock between pages
        and may be consumed while other threads append.
        """
        self._check_open()
        after_seq = _cursor("after_seq", after_seq)
        if until_seq is not None:
            until_seq = _cursor("until_seq", until_seq)
        while True:
            page = self._page_stream(stream, after_seq, until_seq, _PAGE)
            for row in page:
                yield to_record(row)
            if len(page) < _PAGE:
                return
            after_seq = page[-1].seq

    def read_all(self, after_position: int = 0, *, stream: str | None = None) -> Iterator[Record]:
        """Every event after ``after_position`` (of one stream, if given), in position order."""
        for row in self.read_rows(after_position, stream=stream):
            yield to_record(row)

    def read_rows(
        self, after_position: int = 0, *, stream: str | None = None
    ) -> Iterator[StoredEvent]:
        """Like :meth:`read_all`, but the rows as stored (``data`` is the JSON text)."""
        self._check_open()
        after_position = _cursor("after_position", after_position)
        while True:
            page = self._page_all(after_position, _PAGE, stream)
            yield from page
            if len(page) < _PAGE:
                return
            after_position = page[-1].position

    def last_position(self) -> int:
        """The position of the newest event in the log (0 when it is empty)."""
        self._check_open()
        return self._last_position()

    def streams(self) -> list[StreamInfo]:
        """Every stream's head, most recently updated first."""
        self._check_open()
        return self._heads(None)

    def stream_info(self, stream: str) -> StreamInfo:
        """One stream's head.

        Raises:
            UnknownStreamError: there is no such stream.
        """
        self._check_open()
        heads = self._heads(stream)
        if not heads:
            raise UnknownStreamError(f"no stream {stream!r}")
        return heads[0]

    # ------------------------------------------------------------------- replay

    def replay(self, stream: str, until_seq: int | None = None) -> State:
        """Rebuild the stream's state by folding its events (up to ``until_seq``).

        Raises:
            ValueError: ``until_seq`` is less than 1 (a state needs the first event).
            UnknownStreamError: there is no such stream (or it has no events).
            EventDecodeError: a stored event cannot be read.
        """
        self._check_open()
        if until_seq is not None and _cursor("until_seq", until_seq) < 1:
            raise ValueError(f"until_seq must be at least 1, not {until_seq}")
        if until_seq is not None:
            until_seq = _cursor("until_seq", until_seq)
        state: State | None = None
        try:
            for type_name, version, data in self._replay_rows(stream, until_seq):
                state = evolve(state, decode_event(type_name, version, data))
        except EventDecodeError as exc:
            seq = 1 if state is None else state.seq + 1
            raise EventDecodeError(f"{stream}#{seq}: {exc}") from exc
        if state is None:
            raise UnknownStreamError(f"no stream {stream!r}")
        return state

    # ------------------------------------------------------------------- verify

    def verify(self, stream: str | None = None, *, anchor: Anchor | None = None) -> VerifyReport:
        """Recompute every hash and check seqs and heads (of one stream, or all).

        Finds the first changed, inserted, reordered or removed event, walking the log
        in position order, and a removed tail through the stream heads. Positions are
        given out without gaps, so over the whole log a missing position is a removed
        event too (a whole stream deleted with its head, say).

        With ``anchor`` (from an earlier report), it also checks that every anchored
        stream (of those verified) still holds its anchored event, unchanged: this
        finds what the chain alone cannot, the newest streams deleted whole, or a chain
        rewritten from its start.

        The events and the heads are read from one snapshot of the log, so appends
        made meanwhile (by this process or another) are neither seen nor mistaken for
        tampering. A successful report carries the anchor of what it verified.
        """
        self._check_open()
        with self._snapshot():
            return self._verify(stream, anchor)

    def _snapshot(self) -> typing.ContextManager[object]:
        """Hold one consistent view of the log for the reads made inside (backend hook)."""
        return contextlib.nullcontext()

    def _verify(self, stream: str | None, anchor: Anchor | None) -> VerifyReport:
        key = self._key
        anchored = anchor.heads if anchor is not None else {}
        # stream -> (hash, position) of its event at the anchored seq
        at_anchor: dict[str, tuple[str, int]] = {}
        # stream -> (last seq, last hash, its position, status so far, its recorded_at)
        expect: dict[str, tuple[int, str, int, Status, str]] = {}
        # stream -> (kind, parent, created_at): what its first event says
        started: dict[str, tuple[str, str | None, str]] = {}
        checked = 0
        previous = 0  # the last position seen, for the whole-log gap check
        for (
            position,
            s,
            seq,
            type_name,
            version,
            recorded_at,
            data,
            prev_hash,
            digest,
        ) in self._verify_rows(stream):
            if stream is None and position != previous + 1:
                reason = f"position {previous + 1} is missing (events removed)"
                return VerifyReport(False, checked, previous + 1, reason, s)
            previous = position
            last_seq, last_hash, _, status, _ = expect.get(s, (0, GENESIS, 0, "open", ""))
            problem = None
            if seq != last_seq + 1:
                problem = f"seq {seq} follows seq {last_seq}"
            elif prev_hash != last_hash:
                problem = "prev_hash does not match the previous event's hash"
            else:
                try:
                    body = data.encode()
                except AttributeError:  # a BLOB (or a number) where the JSON text was
                    problem = "data is not text"
                else:
                    again = chain_hash(
                        key, prev_hash, s, seq, type_name, version, recorded_at, body
                    )
                    if again != digest:
                        problem = "hash does not match the event's contents"
            # (Start events are status events: a stream's first event is looked at too.)
            if problem is None and (type_name in _STATUS_NAMES or status != "open"):
                # What the stream's head must say: its kind and parent from the first
                # event, its status folded by next_status (as appends fold it).
                try:
                    event = decode_event(type_name, version, data)
                except EventDecodeError as exc:
                    problem = f"the event cannot be read ({exc})"
                else:
                    if seq == 1:
                        kind_parent = _started_as(event)
                        if kind_parent is None:
                            problem = f"the first event is {type_name}, not a start"
                        else:
                            started[s] = (*kind_parent, recorded_at)
                    status = next_status(status, event)
            if problem is not None:
                return VerifyReport(False, checked, position, f"stream {s!r}: {problem}", s)
            expect[s] = (seq, digest, position, status, recorded_at)
            if anchored:
                mark = anchored.get(s)
                if mark is not None and mark[0] == seq:
                    at_anchor[s] = (digest, position)
            checked += 1
        return self._conclude(stream, anchor, expect, started, at_anchor, checked)

    def _conclude(
        self,
        stream: str | None,
        anchor: Anchor | None,
        expect: dict[str, tuple[int, str, int, Status, str]],
        started: dict[str, tuple[str, str | None, str]],
        at_anchor: dict[str, tuple[str, int]],
        checked: int,
    ) -> VerifyReport:
        """After the walk: the heads, then the anchor; the new anchor if all is well."""
        report = self._verify_heads(stream, expect, started, checked)
        if report.ok and anchor is not None:
            report = _against(anchor, stream, expect, at_anchor, checked) or report
        if not report.ok:
            return report
        last = max((e[2] for e in expect.values()), default=0)
        heads = {s: (e[0], e[1]) for s, e in expect.items()}
        now = Anchor(position=last, heads=heads, stream=stream, taken_at=utc_now())
        return VerifyReport(True, checked, anchor=now)

    def _verify_heads(
        self,
        stream: str | None,
        expect: dict[str, tuple[int, str, int, Status, str]],
        started: dict[str, tuple[str, str | None, str]],
        checked: int,
    ) -> VerifyReport:
        for head in self._heads(stream):
            try:  # a column of the wrong type (an altered file) is tampering, not a crash
                msgspec.convert(msgspec.to_builtins(head), StreamInfo)
            except (msgspec.ValidationError, TypeError) as exc:
                reason = f"stream {head.stream!r}: its head row is damaged ({exc})"
                return VerifyReport(False, checked, None, reason, str(head.stream))
            last_seq, last_hash, position, status, updated_at = expect.get(
                head.stream, (0, GENESIS, 0, "open", "")
            )
            if head.last_seq > last_seq:
                first = self._missing_after(position, head.last_position)
                reason = (
                    f"stream {head.stream!r}: head says seq {head.last_seq} but the log ends at "
                    f"seq {last_seq} (events removed from the end)"
                )
                return VerifyReport(False, checked, first, reason, head.stream)
            if head.last_seq < last_seq or head.last_hash != last_hash:
                reason = f"stream {head.stream!r}: head does not match its last event"
                return VerifyReport(False, checked, position, reason, head.stream)
            kind, parent, created_at = started.get(head.stream, ("", None, ""))
            said = {
                "kind": (head.kind, kind),
                "parent": (head.parent, parent),
                "status": (head.status, status),
                "created_at": (head.created_at, created_at),
                "updated_at": (head.updated_at, updated_at),
                "last_position": (head.last_position, position),
            }
            for column, (stored, derived) in said.items():
                if stored != derived:
                    reason = (
                        f"stream {head.stream!r}: head says {column} {stored!r} but its events "
                        f"say {derived!r}"
                    )
                    return VerifyReport(False, checked, position, reason, head.stream)
        orphans = set(expect) - {h.stream for h in self._heads(stream)}
        if orphans:
            s = min(orphans, key=lambda o: expect[o][2])
            reason = f"stream {s!r} has events but no head (inserted rows?)"
            return VerifyReport(False, checked, expect[s][2], reason, s)
        return VerifyReport(True, checked)

    # ---------------------------------------------------------------- subscribe

    def subscribe(
        self, after_position: int = 0, *, stream: str | None = None, poll_interval: float = 0.05
    ) -> Subscription:
        """Follow the log: every event after ``after_position``, then new ones as they come.

        Events appended through this object wake the subscription at once; events
        appended by other processes are found by polling every ``poll_interval`` seconds.
        """
        self._check_open()
        return Subscription(self, _cursor("after_position", after_position), stream, poll_interval)

    # ------------------------------------------------------------------ closing

    def _check_open(self) -> None:
        if self._closed:
            raise DatabaseError("this event log is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the log. Waits for a commit in progress; ends every subscription."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            while self._leading:
                self._cond.wait()
            self._cond.notify_all()
        self._close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Subscription:
    """An iterator over a log's events that waits for new ones. Close it when done.

    Iterating blocks until the next event arrives and ends when the subscription or
    the log is closed. :meth:`next` waits at most ``timeout`` seconds.
    """

    def __init__(
        self, log: LogBase, after_position: int, stream: str | None, poll_interval: float
    ) -> None:
        self._log = log
        self.position = after_position
        self._stream = stream
        self._poll = poll_interval
        self._buffer: deque[StoredEvent] = deque()
        self._closed = False

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Record:
        record = self.next(timeout=None)
        if record is None:
            raise StopIteration
        return record

    def next(self, timeout: float | None = None) -> Record | None:
        """The next record, or None after ``timeout`` seconds or once closed."""
        row = self.next_row(timeout)
        return None if row is None else to_record(row)

    def next_row(self, timeout: float | None = None) -> StoredEvent | None:
        """Like :meth:`next`, but the row as stored."""
        deadline = None if timeout is None else time.monotonic() + timeout
        log = self._log
        while True:
            if self._buffer:
                row = self._buffer.popleft()
                self.position = row.position
                return row
            if self._ended():
                return None
            with log._cond:
                seen = log._commits
            try:
                page = log._page_all(self.position, _PAGE, self._stream)
            except DatabaseError:
                if self._ended():
                    return None
                raise
            if page:
                self._buffer.extend(page)
                continue
            wait = self._poll
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                wait = min(wait, remaining)
            with log._cond:
                if log._commits == seen and not self._ended():
                    log._cond.wait(wait)

    def _ended(self) -> bool:
        return self._closed or self._log.closed

    def close(self) -> None:
        self._closed = True
        with self._log._cond:
            self._log._cond.notify_all()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
