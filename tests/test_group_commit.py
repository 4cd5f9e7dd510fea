"""Group commit under pressure: shared transactions, a failing neighbour, an interrupted leader."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pytest

from moot.events import ChatMessage, LoopStarted
from moot.store import ConcurrencyError, MemoryEventLog, StoreError

if TYPE_CHECKING:
    from collections.abc import Iterator

T = 10


def started() -> list[Any]:
    return [LoopStarted(messages=(ChatMessage.text("user", "x"),))]


class Gated(MemoryEventLog):
    """The first transaction waits until ``queued`` more appends are waiting behind it."""

    def __init__(self, queued: int, interrupt: bool = False) -> None:
        super().__init__()
        self.queued = queued
        self.interrupt = interrupt
        self.transactions = 0
        self.armed = True
        self.first = threading.Event()

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        self.transactions += 1
        if self.armed and self.transactions == 1:
            self.first.set()
            with self._cond:
                assert self._cond.wait_for(lambda: len(self._queue) >= self.queued, T)
            if self.interrupt:
                raise KeyboardInterrupt
        with super()._transaction() as tx:
            yield tx


def run_all(log: Gated, calls: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def go(name: str, call: Any) -> None:
        try:
            out[name] = call()
        except BaseException as exc:
            out[name] = exc

    first, *rest = calls.items()
    leader = threading.Thread(target=go, args=first)
    leader.start()
    assert log.first.wait(T)  # the leader is inside its transaction: the rest queue up
    others = [threading.Thread(target=go, args=item) for item in rest]
    for t in others:
        t.start()
    for t in [leader, *others]:
        t.join(T)
    return out


def test_queued_appends_share_one_transaction() -> None:
    log = Gated(queued=3)
    out = run_all(log, {s: (lambda s=s: log.append(s, started())) for s in "abcd"})
    assert out == {"a": 1, "b": 1, "c": 1, "d": 1}
    assert log.transactions == 2  # the leader's own, then one for the three that queued


def test_a_refused_append_does_not_fail_its_batch() -> None:
    log = Gated(queued=2)
    log.armed = False
    log.append("s", started())
    log.armed, log.transactions = True, 0
    out = run_all(
        log,
        {
            "lead": lambda: log.append("x", started()),
            "stale": lambda: log.append("s", started(), expected_seq=0),
            "fine": lambda: log.append("y", started()),
        },
    )
    assert isinstance(out["stale"], ConcurrencyError)
    assert (out["lead"], out["fine"]) == (1, 1)
    assert log.transactions == 2


def test_an_interrupted_leader_passes_the_lead_on() -> None:
    log = Gated(queued=1, interrupt=True)
    out = run_all(
        log,
        {
            "a": lambda: log.append("a", started()),
            "b": lambda: log.append("b", started()),
        },
    )
    assert isinstance(out["a"], KeyboardInterrupt)
    assert out["b"] == 1 or isinstance(out["b"], StoreError)
    assert log.append("c", started()) == 1  # the log still works...
    assert not log._leading
    log.close()  # ...and closes
    with pytest.raises(StoreError):
        log.append("d", started())


class InterruptedBetweenRounds(Gated):
    """The leader's first batch commits with one more append queued behind it; the
    leader is interrupted (Ctrl-C) as it starts on that second batch."""

    def __init__(self) -> None:
        super().__init__(queued=1)
        self.batches: list[list[str]] = []

    def _commit_batch(self, batch: list[Any], committed: list[Any]) -> None:
        self.batches.append([r.stream for r in batch])
        if len(self.batches) == 2:
            raise KeyboardInterrupt
        super()._commit_batch(batch, committed)


def test_a_leader_interrupted_between_rounds_answers_the_batch_it_took() -> None:
    log = InterruptedBetweenRounds()
    out = run_all(
        log,
        {
            "a": lambda: log.append("a", started()),
            "b": lambda: log.append("b", started()),
        },
    )
    assert log.batches == [["a"], ["b"]]  # the leader took b's request from the queue
    assert isinstance(out["a"], KeyboardInterrupt)
    # b's caller is neither left waiting nor told that it succeeded: nothing was written.
    assert isinstance(out["b"], StoreError) and "interrupted" in str(out["b"])
    assert [h.stream for h in log.streams()] == ["a"]
    assert log._queue == [] and not log._leading
    assert log.append("b", started(), expected_seq=0) == 1  # the log still works


class Held(MemoryEventLog):
    """The first transaction waits for ``proceed``."""

    def __init__(self) -> None:
        super().__init__()
        self.proceed = threading.Event()
        self.inside = threading.Event()
        self.first = True

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        if self.first:
            self.first = False
            self.inside.set()
            assert self.proceed.wait(T)
        with super()._transaction() as tx:
            yield tx


def test_an_interrupted_waiting_caller_leaves_the_log_working() -> None:
    import signal

    log = Held()
    leader = threading.Thread(target=lambda: log.append("a", started()))
    leader.start()
    assert log.inside.wait(T)

    # A real SIGINT wakes the main thread's blocked wait, as Ctrl-C would. One that
    # lands in the instant before the thread blocks is only seen once it wakes, so
    # the signal is repeated until the handler has run; later ones are ignored.
    fired = threading.Event()

    def on_sigint(signum: int, frame: object) -> None:
        if not fired.is_set():
            fired.set()
            raise KeyboardInterrupt

    def interrupt_when_queued() -> None:
        with log._cond:
            assert log._cond.wait_for(lambda: len(log._queue) == 1, T)
        for _ in range(100):
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
            if fired.wait(0.1):
                return

    previous = signal.signal(signal.SIGINT, on_sigint)
    interrupter = threading.Thread(target=interrupt_when_queued)
    try:
        interrupter.start()
        with pytest.raises(KeyboardInterrupt):
            log.append("b", started())  # waits behind the leader, and is interrupted
        interrupter.join(T)
    finally:
        signal.signal(signal.SIGINT, previous)  # runs any pending handler first
    assert fired.is_set() and not interrupter.is_alive()
    log.proceed.set()
    leader.join(T)
    assert log._queue == [] and not log._leading
    assert log.append("c", started()) == 1
    assert [s.stream for s in sorted(log.streams(), key=lambda s: s.stream)] == ["a", "c"]
