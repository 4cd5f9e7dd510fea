"""The journal: how an actor writes its stream. The one funnel for live state.

An actor stages events (folding them at once into its state with ``evolve``, the fold
replay uses), commits them with one append that expects no other writer, and only
then acts on them. A failed append rebuilds the state from the log, so the state never
holds an event the log does not. Events appended by someone else (a decision from
``moot approve``) are folded in by :meth:`Journal.catch_up`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Generic, TypeVar

from moot.events import DialogueState, LoopState, evolve

if TYPE_CHECKING:
    from collections.abc import Sequence

    from moot.events import Event
    from moot.store import LogBase

__all__ = ["Journal"]

S = TypeVar("S", DialogueState, LoopState)


class Journal(Generic[S]):
    """A stream's writer: stage, commit, fold. Thread-safe."""

    def __init__(self, log: LogBase, stream: str, state: S) -> None:
        self.log = log
        self.stream = stream
        self.state: S = state
        self._staged: list[Event] = []
        self._lock = threading.RLock()
        #: Set when a reload failed: the state may hold events the log does not, so
        #: nothing is written until a reload succeeds.
        self._stale = False

    def stage(self, events: Sequence[Event]) -> int:
        """Fold ``events`` into the state now; :meth:`commit` appends them.

        Returns the seq the first of them will have.
        """
        with self._lock:
            if self._stale:
                self.reload()
            first = self.state.seq + 1
            state = self.state
            kind = type(state)
            try:
                for event in events:
                    folded = evolve(state, event)
                    assert isinstance(folded, kind)
                    state = folded
            except BaseException:
                # The fold may have changed the state before it failed: what was staged
                # before is dropped too, and the state is the log's again.
                self._staged = []
                self.reload()
                raise
            self.state = state
            self._staged.extend(events)
            return first

    def commit(self) -> None:
        """Append everything staged in one transaction, expecting no other writer.

        Raises:
            ConcurrencyError: someone else appended to the stream; the state is
                rebuilt from the log before the error is raised.
        """
        with self._lock:
            if not self._staged:
                return
            events, self._staged = self._staged, []
            try:
                self.log.append(self.stream, events, expected_seq=self.state.seq - len(events))
            except BaseException:
                self.reload()
                raise

    def append(self, events: Sequence[Event]) -> int:
        """Stage and commit at once; returns the seq of the first event."""
        with self._lock:
            first: int = self.stage(events)
            self.commit()
            return first

    def discard(self) -> None:
        """Drop what is staged (the state is rebuilt from the log)."""
        with self._lock:
            if self._staged:
                self._staged = []
                self.reload()

    def reload(self) -> None:
        """Rebuild the state from the log (if that fails, the journal stays stale)."""
        with self._lock:
            self._stale = True
            replayed = self.log.replay(self.stream)
            assert isinstance(replayed, type(self.state))
            self.state = replayed
            self._stale = False

    def catch_up(self) -> list[Event]:
        """Fold in events other writers appended since; returns them."""
        with self._lock:
            assert not self._staged, "catch_up with uncommitted events"
            new = [r.event for r in self.log.read(self.stream, self.state.seq)]
            state = self.state
            for event in new:
                folded = evolve(state, event)
                assert isinstance(folded, type(self.state))
                state = folded
            self.state = state
            return new
