"""Sessions: how a caller receives a turn's replies, in the order the dialogue asks for.

The coordinator pushes what happens in a turn into a :class:`Channel` as it happens;
a :class:`Session` reads the channel and yields replies in the turn's yield order,
holding back early ones when the order says so. The log never waits for the reader:
every reply is appended when it completes, read or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Self

import msgspec

from moot.events import DialogueMessage, Error

from ._errors import DialogueError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

__all__ = ["Channel", "Session", "TurnReply"]


class TurnReply(msgspec.Struct, frozen=True, kw_only=True):
    """One participant's part of a turn: its reply, or the error it failed with."""

    turn: int
    participant: str
    content: str | None = None
    error: Error | None = None
    #: The seq of the DialogueMessage (or ParticipantFailed) in the dialogue stream.
    seq: int | None = None
    completion_index: int | None = None
    participant_index: int | None = None
    message: DialogueMessage | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class _Started(msgspec.Struct, frozen=True):
    turn: int
    speakers: tuple[str, ...]
    order: str


class _Done(msgspec.Struct, frozen=True):
    reacted: bool = True


class _Failed(msgspec.Struct, frozen=True):
    message: str


class _Wake(msgspec.Struct, frozen=True):
    """Nothing new: the reader is woken to see that its session was closed."""


Item = _Started | TurnReply | _Done | _Failed | _Wake


class Channel:
    """A one-turn mailbox from the coordinator (writer) to a session (reader).

    Thread-safe for one writer and any readers; asyncio readers are woken through
    their loop, so waiting never blocks an event loop.
    """

    def __init__(self) -> None:
        self._items: deque[Item] = deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    # writer side (coordinator thread)
    def started(self, turn: int, speakers: tuple[str, ...], order: str) -> None:
        self._put(_Started(turn, speakers, order))

    def reply(self, reply: TurnReply) -> None:
        self._put(reply)

    def replies(self, replies: list[TurnReply]) -> None:
        """Several replies at once: the reader is woken once for all of them."""
        self._put(*replies)

    def done(self, *, reacted: bool = True) -> None:
        self._put(_Done(reacted))

    def failed(self, message: str) -> None:
        self._put(_Failed(message))

    # either side
    def wake(self) -> None:
        """Wake whoever waits, with nothing to read (their session was closed)."""
        self._put(_Wake())

    def _put(self, *items: Item) -> None:
        with self._cond:
            self._items.extend(items)
            waiters, self._waiters = self._waiters, []
            self._cond.notify_all()
        for loop, future in waiters:
            # A closed loop raises RuntimeError: its reader has gone, nobody to wake.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_wake, future)

    # reader side
    def get(self, timeout: float | None) -> Item | None:
        """The next item, or None when ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return self._items.popleft()

    async def get_async(self, timeout: float | None) -> Item | None:
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._items:
                    return self._items.popleft()
                future: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, future))
            try:
                await asyncio.wait_for(future, timeout)
            except TimeoutError:
                return None
            finally:  # given up (timeout, cancelled) or woken: no longer waiting
                with self._cond:
                    if (loop, future) in self._waiters:
                        self._waiters.remove((loop, future))


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Session:
    """The replies of one dialogue turn, yielded as soon as the turn's order allows.

    ``completion`` yields replies as they complete; ``participant_order`` and
    ``explicit`` (and sequential chains) yield them in the turn's speaker order,
    holding back early ones. A failed participant is yielded in its place as a
    :class:`TurnReply` whose ``error`` is set. Iterate it, call :meth:`next_turn`, or
    use ``async for`` / :meth:`next_turn_async` from asyncio code.

    Closing a session (or dropping it) only stops reading: the turn goes on and every
    reply is still recorded.
    """

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self.turn: int | None = None
        self.speakers: tuple[str, ...] = ()
        self.order = "completion"
        self._early: dict[str, TurnReply] = {}
        self._next_index = 0
        self._finished = False
        self._closed = False
        self._all_in = False
        self.reacted = True
        self.replies: list[TurnReply] = []
        self._reading = threading.Lock()

    def __repr__(self) -> str:
        return f"<Session turn={self.turn} speakers={self.speakers} finished={self._finished}>"

    @property
    def finished(self) -> bool:
        return self._finished

    def next_turn(self, timeout: float | None = None) -> TurnReply | None:
        """The next reply in order, or None once the turn is over.

        Raises:
            TimeoutError: nothing could be yielded within ``timeout`` seconds.
            DialogueError: the turn could not run (e.g. the moderator failed).
        """
        with self._reader():
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._closed:
                ready = self._ready()
                if ready is not None or self._finished:
                    return ready
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                item = self._channel.get(remaining)
                if item is None:
                    raise self._timed_out(timeout)
                self._take(item)
            return None

    async def next_turn_async(self, timeout: float | None = None) -> TurnReply | None:
        """Like :meth:`next_turn`, for asyncio: waits without blocking the event loop."""
        loop = asyncio.get_running_loop()
        with self._reader():
            deadline = None if timeout is None else loop.time() + timeout
            while not self._closed:
                ready = self._ready()
                if ready is not None or self._finished:
                    return ready
                remaining = None if deadline is None else max(0.0, deadline - loop.time())
                item = await self._channel.get_async(remaining)
                if item is None:
                    raise self._timed_out(timeout)
                self._take(item)
            return None

    @contextlib.contextmanager
    def _reader(self) -> Iterator[None]:
        """One reader at a time: two would each take items the other needs."""
        if not self._reading.acquire(blocking=False):
            raise DialogueError(
                "this session is being read elsewhere (a session has one reader; "
                "close() it from another thread or task to stop that reader)"
            )
        try:
            yield
        finally:
            self._reading.release()

    def _timed_out(self, timeout: float | None) -> TimeoutError:
        if self.turn is None:
            return TimeoutError(f"the turn did not start within {timeout} s")
        return TimeoutError(f"no reply of turn {self.turn} within {timeout} s")

    def _take(self, item: Item) -> None:
        match item:
            case _Started():
                self.turn, self.speakers, self.order = item.turn, item.speakers, item.order
            case TurnReply():
                self._early[item.participant] = item
            case _Done():
                self._all_in = True
                self.reacted = item.reacted
            case _Failed():
                self._finished = True
                raise DialogueError(item.message)
            case _Wake():
                pass

    def _ready(self) -> TurnReply | None:
        """The reply that may be yielded now, if any (and notes when the turn is over)."""
        reply: TurnReply | None = None
        if self.order == "completion":
            if self._early:
                reply = self._early.pop(next(iter(self._early)))
        else:
            while self._next_index < len(self.speakers):
                name = self.speakers[self._next_index]
                if name in self._early:
                    reply = self._early.pop(name)
                    self._next_index += 1
                    break
                if self._all_in:  # it never ran (removed, or no reply): skip it
                    self._next_index += 1
                    continue
                break
        if reply is None and self._all_in and not self._early:
            self._finished = True
        if reply is not None:
            self.replies.append(reply)
        return reply

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> TurnReply:
        reply = self.next_turn()
        if reply is None:
            raise StopIteration
        return reply

    def __aiter__(self) -> AsyncIterator[TurnReply]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[TurnReply]:
        while (reply := await self.next_turn_async()) is not None:
            yield reply

    def all(self, timeout: float | None = None) -> list[TurnReply]:
        """Every remaining reply of the turn, in order.

        Raises:
            TimeoutError: the turn did not end within ``timeout`` seconds (the turn goes
                on; the replies yielded so far are in :attr:`replies`).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[TurnReply] = []
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                reply = self.next_turn(remaining)
            except TimeoutError:
                raise self._turn_timed_out(timeout) from None
            if reply is None:
                return out
            out.append(reply)

    async def all_async(self, timeout: float | None = None) -> list[TurnReply]:
        """:meth:`all` for asyncio: waits without blocking the event loop."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        out: list[TurnReply] = []
        while True:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                reply = await self.next_turn_async(remaining)
            except TimeoutError:
                raise self._turn_timed_out(timeout) from None
            if reply is None:
                return out
            out.append(reply)

    def _turn_timed_out(self, timeout: float | None) -> TimeoutError:
        what = "the turn" if self.turn is None else f"turn {self.turn}"
        return TimeoutError(f"{what} did not end within {timeout} s")

    def close(self) -> None:
        """Stop reading: nothing more is yielded, also to a reader waiting now (in
        another thread or task). The turn itself goes on; its replies are recorded
        regardless."""
        if not self._closed:
            self._closed = self._finished = True
            self._channel.wake()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
