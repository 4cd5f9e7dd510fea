"""A dialogue's life as a daemon sees it: asyncio forms, stops, slow stores, readers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

import pytest

from moot.actors._agents import CallableAgent, Payload
from moot.actors._coordinator import Ask
from moot.actors._dialogue import Dialogue, Participant
from moot.actors._errors import DialogueError
from moot.actors._session import Channel, Session, TurnReply
from moot.events import DialogueClosed
from moot.store import MemoryEventLog

T = 30


class GatedLog(MemoryEventLog):
    """A log whose appends wait while ``held`` is set, as a store held by another
    writer would; ``waiting`` is set once an append is held."""

    def __init__(self) -> None:
        super().__init__()
        self.held = threading.Event()
        self.waiting = threading.Event()
        self.go = threading.Event()

    def append(self, stream: str, events: Any, *, expected_seq: int | None = None) -> int:
        if self.held.is_set():
            self.waiting.set()
            assert self.go.wait(T)
        return super().append(stream, events, expected_seq=expected_seq)


def gated_agent(gate: threading.Event, running: threading.Event | None = None) -> CallableAgent:
    def agent(payload: Payload) -> str:
        if running is not None:
            running.set()
        assert gate.wait(T)
        return f"{payload.participant.name} done"

    return CallableAgent(agent)


def closes(log: MemoryEventLog, stream: str) -> int:
    return sum(isinstance(r.event, DialogueClosed) for r in log.read(stream))


# ------------------------------------------------------------- stops


def test_closing_a_dialogue_whose_actors_were_stopped_says_so() -> None:
    d = Dialogue.create(MemoryEventLog(), participants=[Participant("a", CallableAgent(str))])
    d._ref.stop()  # as if something stopped every actor in the process
    with pytest.raises(DialogueError, match="coordinator has stopped"):
        d.close()
    d.close()  # nothing left to close: not an error


def test_a_turn_asked_for_behind_a_stop_fails_its_session() -> None:
    log = GatedLog()
    d = Dialogue.create(log, participants=[Participant("a", CallableAgent(str))])
    log.held.set()
    first = d.session("one")  # the coordinator is held in this turn's first append
    assert log.waiting.wait(T)
    d._ref.stop(block=False)  # a stop, queued...
    second = d.session("two")  # ...and a turn queued after it, never to be received
    log.go.set()
    with pytest.raises(DialogueError, match="coordinator has stopped"):
        first.all(timeout=T)
    with pytest.raises(DialogueError, match="coordinator has stopped"):
        second.all(timeout=T)
    d.stop()


def test_a_coordinator_held_up_by_its_store_times_out_with_a_dialogue_error() -> None:
    log = GatedLog()
    d = Dialogue.create(log, participants=[Participant("a", CallableAgent(str))], timeout=0.2)
    log.held.set()
    session = d.session("one")
    assert log.waiting.wait(T)  # turn 1 is held in its first append
    queued = d.session("two")
    with pytest.raises(TimeoutError, match=r"no reply of turn 1 within 0\.1 s"):
        session.next_turn(timeout=0.1)
    with pytest.raises(TimeoutError, match=r"the turn did not start within 0\.1 s"):
        queued.next_turn(timeout=0.1)
    with pytest.raises(DialogueError, match=r"did not answer within 0\.2 s"):
        d.state()
    with pytest.raises(DialogueError, match=r"did not end within 0\.2 s"):
        d.join(Participant("b", CallableAgent(str)))  # stays queued
    log.held.clear()
    log.go.set()
    assert [r.participant for r in session.all(timeout=T)] == ["a"]
    assert [r.participant for r in queued.all(timeout=T)] == ["a"]
    d.timeout = T
    assert list(d.state().participants) == ["a", "b"]  # the join happened after the turn
    d.close()


def test_a_second_close_waits_for_the_first() -> None:
    gate, running = threading.Event(), threading.Event()
    log = MemoryEventLog()
    d = Dialogue.create(log, participants=[Participant("a", gated_agent(gate, running))])
    session = d.session("go")
    assert running.wait(T)
    closers = [threading.Thread(target=d.close) for _ in range(2)]
    for c in closers:
        c.start()
    for c in closers:
        c.join(0.2)
        assert c.is_alive()  # both wait for the turn, then for the close
    gate.set()
    for c in closers:
        c.join(T)
        assert not c.is_alive()
    assert closes(log, d.stream) == 1
    assert not d._ref.is_alive()
    assert [r.content for r in session.all(timeout=T)] == ["a done"]


# ----------------------------------------------------------- sessions


def test_a_session_has_one_reader() -> None:
    gate = threading.Event()
    d = Dialogue.create(MemoryEventLog(), participants=[Participant("a", gated_agent(gate))])

    async def main() -> list[TurnReply]:
        session = d.session("go")
        first = asyncio.create_task(session.all_async(T))
        await asyncio.sleep(0)  # the first reader is waiting inside the session now
        with pytest.raises(DialogueError, match="one reader"):
            await session.next_turn_async(T)
        with pytest.raises(DialogueError, match="one reader"):
            session.next_turn(T)
        gate.set()
        return await first

    replies = asyncio.run(asyncio.wait_for(main(), T))
    assert [r.content for r in replies] == ["a done"]
    d.close()


def test_a_whole_turn_timeout_counts_from_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """``all(timeout)`` bounds the whole turn: each wait gets what is left of it."""
    channel = Channel()
    channel.started(1, ("a", "b", "c"), "completion")
    for name in ("a", "b"):
        channel.reply(TurnReply(turn=1, participant=name, content=name))
    waits: list[float | None] = []
    get = channel.get

    def recording_get(timeout: float | None) -> Any:
        waits.append(timeout)
        return get(timeout)

    monkeypatch.setattr(channel, "get", recording_get)
    clock = iter(range(100))  # each look at the clock: one more second
    monkeypatch.setattr("moot.actors._session.time.monotonic", lambda: float(next(clock)))
    session = Session(channel)
    with pytest.raises(TimeoutError, match=r"turn 1 did not end within 5\.0 s"):
        session.all(timeout=5.0)
    assert [r.content for r in session.replies] == ["a", "b"]
    assert waits[0] is not None and waits[0] < 5.0
    assert waits == sorted(waits, reverse=True) and waits[-1] == 0.0


# -------------------------------------------------------------- asyncio


def test_membership_state_and_close_have_forms_that_never_block_the_event_loop() -> None:
    gate, running = threading.Event(), threading.Event()
    log = MemoryEventLog()
    d = Dialogue.create(log, participants=[Participant("a", gated_agent(gate, running))])

    async def main() -> None:
        async with d:
            session = d.session("go")
            assert await asyncio.to_thread(running.wait, T)
            join = asyncio.create_task(d.join_async(Participant("b", CallableAgent(str))))
            remove = asyncio.create_task(d.remove_async("nobody"))
            for _ in range(3):  # the loop runs: both wait for the turn without blocking it
                await asyncio.sleep(0)
            assert not join.done() and not remove.done()
            assert list((await d.state_async()).participants) == ["a"]
            gate.set()
            await join
            with pytest.raises(DialogueError, match="no such participant"):
                await remove
            assert [r.content for r in await session.all_async(T)] == ["a done"]
            assert list((await d.state_async()).participants) == ["a", "b"]
        assert closes(log, d.stream) == 1
        assert not d._ref.is_alive()

    asyncio.run(asyncio.wait_for(main(), T))


def test_giving_up_an_async_join_leaves_it_queued() -> None:
    gate, running = threading.Event(), threading.Event()
    log = MemoryEventLog()
    d = Dialogue.create(log, participants=[Participant("a", gated_agent(gate, running))])

    async def main() -> None:
        session = d.session("go")
        assert await asyncio.to_thread(running.wait, T)
        with pytest.raises(DialogueError, match=r"did not end within 0\.05 s"):
            await d.join_async(Participant("b", CallableAgent(str)), timeout=0.05)
        join = asyncio.create_task(d.join_async(Participant("c", CallableAgent(str))))
        await asyncio.sleep(0)
        join.cancel()
        with pytest.raises(asyncio.CancelledError):
            await join
        gate.set()
        await session.all_async(T)
        assert list((await d.state_async()).participants) == ["a", "b", "c"]
        await d.close_async()

    asyncio.run(asyncio.wait_for(main(), T))
    assert closes(log, d.stream) == 1


def test_a_malformed_request_is_refused_and_the_dialogue_goes_on() -> None:
    agent = CallableAgent(lambda payload: "yes")
    d = Dialogue.create(MemoryEventLog(), participants=[Participant("a", agent)])
    with pytest.raises(DialogueError, match="name is text"):
        d.remove(None)  # type: ignore[arg-type]
    with pytest.raises(DialogueError, match="invalid request"):
        d._wait(d._send("remove", 42))  # past the facade's checks: the coordinator says so
    with pytest.raises(DialogueError, match="reason is text"):
        d.close(reason=None)  # type: ignore[arg-type]
    assert [r.content for r in d.run("still here?", timeout=T)] == ["yes"]
    d.close()


def test_closing_after_giving_a_close_up_with_stop_is_quiet() -> None:
    gate, running = threading.Event(), threading.Event()
    log = MemoryEventLog()
    with Dialogue.create(log, participants=[Participant("a", gated_agent(gate, running))]) as d:
        d.session("go")
        assert running.wait(T)
        with pytest.raises(DialogueError, match=r"stop\(\) to give it up"):
            d.close(timeout=0.05)
        stopper = threading.Thread(target=d.stop)
        stopper.start()
        gate.set()
        stopper.join(T)
        assert not stopper.is_alive()
    # leaving the block closed nothing more, and said nothing
    assert closes(log, d.stream) == 0
    assert not d._ref.is_alive()


def test_a_crashed_coordinator_fails_its_turn_and_gives_the_stream_back() -> None:
    gate, running = threading.Event(), threading.Event()
    log = MemoryEventLog()
    d = Dialogue.create(log, participants=[Participant("a", gated_agent(gate, running))])
    session = d.session("go")
    assert running.wait(T)
    queued = d.session("next")
    d._ref.tell(object())  # a stray message is ignored, not a crash
    assert list(d.state().participants) == ["a"]
    # A request whose handling raises: pykka's crash path.
    d._ref.tell(Ask(_Crash(), (), concurrent.futures.Future()))  # type: ignore[arg-type]
    with pytest.raises(DialogueError, match="coordinator has stopped"):
        session.all(timeout=T)
    with pytest.raises(DialogueError, match="coordinator has stopped"):
        queued.all(timeout=T)
    gate.set()
    assert d._stopped.wait(T)
    again = Dialogue.resume(log, d.stream, {"a": CallableAgent(str)})
    again.stop()


class _Crash:
    """Breaks the coordinator's match statement: comparing it raises."""

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("boom")

    __hash__ = object.__hash__
