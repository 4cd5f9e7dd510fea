"""Dialogues when things go wrong: a failing store, membership changes mid-turn, moderators."""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from typing import TYPE_CHECKING, Any

import pytest

from moot.actors._agents import AgentReply, CallableAgent, LlmAgent, Payload
from moot.actors._dialogue import Dialogue, Input, Participant
from moot.actors._errors import DialogueError
from moot.actors._journal import Journal
from moot.actors._scripted import ScriptedProvider, ScriptedReply
from moot.events import (
    DialogueMessage,
    DialogueStarted,
    JoiningStrategy,
    ParticipantFailed,
    ParticipantInfo,
    PayloadDelivered,
    Speaker,
    TurnCompleted,
    TurnStarted,
)
from moot.store import ConcurrencyError, MemoryEventLog, StoreError

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from moot.store import Subscription

T = 30


class FlakyLog(MemoryEventLog):
    """Refuses the ``fail_at``-th append, as a locked or full database would."""

    def __init__(self) -> None:
        super().__init__()
        self.appends = 0
        self.fail_at: int | None = None

    def append(self, stream: str, events: Any, *, expected_seq: int | None = None) -> int:
        self.appends += 1
        if self.appends == self.fail_at:
            raise StoreError("database is locked")
        return super().append(stream, events, expected_seq=expected_seq)


def test_a_failed_append_fails_the_turn_not_the_dialogue() -> None:
    seen: list[tuple[int, list[str]]] = []

    def agent(payload: Payload) -> str:
        seen.append((payload.turn, [m.content for m in payload.messages]))
        return f"reply {len(seen)}"

    log = FlakyLog()
    d = Dialogue.create(log, participants=[Participant("a", CallableAgent(agent))])
    log.fail_at = log.appends + 1  # the turn's start (input, TurnStarted, payloads)
    with pytest.raises(DialogueError, match="database is locked"):
        d.run("first try", timeout=T)
    assert [r.content for r in d.run("second try", timeout=T)] == ["reply 1"]
    # The agent never saw an input that is not on record, and ran once.
    assert seen == [(1, ["second try"])]
    log.fail_at = log.appends + 2  # now the reply's append fails
    with pytest.raises(DialogueError, match="database is locked"):
        d.run("third", timeout=T)
    assert d.state() == log.replay(d.stream)  # the live state is the log's, nothing more
    d.close()
    contents = [r.event.content for r in log.read(d.stream) if isinstance(r.event, DialogueMessage)]
    assert contents == ["second try", "reply 1", "third"]


def test_membership_changes_wait_for_the_turn_and_report_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate = threading.Event()
    running = threading.Event()

    def slow(payload: Payload) -> str:
        running.set()
        assert gate.wait(T)
        return "done"

    log = MemoryEventLog()
    d = Dialogue.create(log, participants=[Participant("a", CallableAgent(slow))])
    # Dialogue.join/remove tell the coordinator a request with a future, which it
    # settles when the change has run; note each future as it is sent.
    held: queue.Queue[tuple[str, concurrent.futures.Future[None]]] = queue.Queue()
    send = d._send

    def noting(what: str, *args: Any) -> Any:
        future = send(what, *args)
        if what in ("join", "remove"):
            held.put((what, future))
        return future

    monkeypatch.setattr(d, "_send", noting)
    session = d.session("go")
    assert running.wait(T)  # the turn is in progress, held by a's gate
    outcome: dict[str, object] = {}

    def remove_nobody() -> None:
        try:
            d.remove("nobody")
        except DialogueError as exc:
            outcome["error"] = exc

    def join_b() -> None:
        d.join(Participant("b", CallableAgent(lambda p: "b!")))
        outcome["joined"] = True

    threads = [threading.Thread(target=remove_nobody), threading.Thread(target=join_b)]
    for t in threads:
        t.start()
    futures = dict(held.get(timeout=T) for _ in threads)
    assert sorted(futures) == ["join", "remove"]
    # The coordinator has both (state() is answered after them) and waits for the turn
    # in progress: neither has run, nothing is on record.
    assert not any(f.done() for f in futures.values())
    assert all(t.is_alive() for t in threads) and outcome == {}
    recorded = [type(r.event).__name__ for r in log.read(d.stream)]
    assert recorded == ["DialogueStarted", "DialogueMessage", "TurnStarted", "PayloadDelivered"]
    assert list(d.state().participants) == ["a"]
    gate.set()
    for t in threads:
        t.join(T)
        assert not t.is_alive()
    assert "no such participant" in str(outcome["error"])  # ...and then reports the error
    assert isinstance(futures["remove"].exception(0), DialogueError)
    assert outcome["joined"] is True and futures["join"].result(0) is None
    assert [r.content for r in session.all(T)] == ["done"]
    recorded = [type(r.event).__name__ for r in log.read(d.stream)]
    assert recorded[4:] == ["DialogueMessage", "TurnCompleted", "ParticipantJoined"]
    assert sorted(r.content or "" for r in d.run("again", timeout=T)) == ["b!", "done"]
    d.close()


def test_a_failing_moderator_is_on_record() -> None:
    log = MemoryEventLog()
    moderator = LlmAgent(
        ScriptedProvider([ScriptedReply(error="moderator down"), ScriptedReply(text="broadcast")])
    )
    d = Dialogue.create(
        log,
        mode="moderator",
        moderator=moderator,
        participants=[Participant("a", CallableAgent(lambda p: "a!"))],
    )
    with pytest.raises(DialogueError, match="moderator down"):
        d.run("first", timeout=T)
    failed = [r.event for r in log.read(d.stream) if isinstance(r.event, ParticipantFailed)]
    assert [(f.participant, f.error.message) for f in failed] == [("moderator", "moderator down")]
    assert not any(isinstance(r.event, TurnStarted | PayloadDelivered) for r in log.read(d.stream))
    assert [r.content for r in d.run("second", timeout=T)] == ["a!"]
    assert d.state() == log.replay(d.stream)
    d.close()


def test_an_interrupted_turn_must_be_finished_first() -> None:
    class FailFirstReply(MemoryEventLog):
        failed = False

        def append(self, stream: str, events: Any, *, expected_seq: int | None = None) -> int:
            replies = [e for e in events if isinstance(e, DialogueMessage) and e.origin == "agent"]
            if replies and not self.failed:
                self.failed = True
                raise StoreError("database is locked")
            return super().append(stream, events, expected_seq=expected_seq)

    log = FailFirstReply()
    d = Dialogue.create(log, participants=[Participant("a", CallableAgent(lambda p: f"a{p.turn}"))])
    with pytest.raises(DialogueError, match="database is locked"):
        d.run("one", timeout=T)
    with pytest.raises(DialogueError, match="turn 1 did not finish"):
        d.run("two", timeout=T)
    assert [r.content for r in d.finish_turn().all(T)] == ["a1"]  # asked again, recorded
    assert [r.content for r in d.run("two", timeout=T)] == ["a2"]
    d.close()
    assert log.verify().ok


@pytest.mark.parametrize("wait", [0, 0.05])  # 0: the coordinator cannot even answer
def test_a_close_that_times_out_stays_queued_and_loses_nothing(wait: float) -> None:
    gate = threading.Event()
    log = MemoryEventLog()
    d = Dialogue.create(
        log, participants=[Participant("a", CallableAgent(lambda p: (gate.wait(T), "late")[1]))]
    )
    session = d.session("one")
    with pytest.raises(DialogueError, match="did not"):
        d.close(timeout=wait)
    gate.set()
    assert [r.content for r in session.all(T)] == ["late"]  # the reply is recorded
    assert d._ref.actor_stopped.wait(T)  # and then the close, and the actors stop
    kinds = [type(r.event).__name__ for r in log.read(d.stream)]
    assert kinds[-3:] == ["DialogueMessage", "TurnCompleted", "DialogueClosed"]
    assert log.stream_info(d.stream).status == "closed"


def test_a_close_that_fails_or_is_given_up_stops_the_actors(tmp_path: Path) -> None:
    from moot.store import EventLog

    log = EventLog(tmp_path / "m.db")
    d = Dialogue.create(log, participants=[Participant("a", CallableAgent(lambda p: "hi"))])
    d.run("hello", timeout=T)
    log.append(d.stream, [Input("late").message()])  # someone else wrote: the close fails
    with pytest.raises(ConcurrencyError):
        d.close()
    assert not d._ref.is_alive()  # and its stream may be driven again
    again = Dialogue.resume(log, d.stream, {"a": CallableAgent(lambda p: "hi")})
    gate = threading.Event()
    stuck = Dialogue.create(
        log, participants=[Participant("a", CallableAgent(lambda p: (gate.wait(T), "x")[1]))]
    )
    stuck.session("go")
    with pytest.raises(DialogueError, match="stop\\(\\) to give it up"):
        stuck.close(timeout=0.05)
    stopper = threading.Thread(target=stuck.stop)  # gives the turn up
    stopper.start()
    gate.set()
    stopper.join(T)
    assert not stuck._ref.is_alive()
    again.close()
    log.close()


def test_stopping_a_dialogue_tells_whoever_waits() -> None:
    gate = threading.Event()

    def stuck(payload: Payload) -> str:
        gate.wait(T)
        return "late"

    d = Dialogue.create(MemoryEventLog(), participants=[Participant("a", CallableAgent(stuck))])
    running = d.session("one")
    queued = d.session("two")
    # stop() waits for the stuck participant; whoever waits on a session hears first.
    stopper = threading.Thread(target=d.stop)
    stopper.start()
    with pytest.raises(DialogueError, match="coordinator has stopped"):
        running.all(T)
    with pytest.raises(DialogueError, match="coordinator has stopped"):
        queued.all(T)
    assert stopper.is_alive()  # still waiting for the participant stuck in its agent
    gate.set()
    stopper.join(T)
    assert not stopper.is_alive()


def test_an_async_reader_that_gives_up_costs_the_turn_nothing() -> None:
    """The reader times out and its event loop closes while the participants work; their
    replies are still recorded, the turn completes, and the next one runs."""
    gates = {"a": threading.Event(), "b": threading.Event()}

    def gated(name: str) -> Any:
        def answer(payload: Payload) -> str:
            assert gates[name].wait(T)
            return f"{name}{payload.turn}"

        return CallableAgent(answer)

    log = MemoryEventLog()
    d = Dialogue.create(log, participants=[Participant(n, gated(n)) for n in "ab"])

    async def impatient() -> None:
        with pytest.raises(TimeoutError):
            await d.run_async("first", timeout=0.05)

    asyncio.run(impatient())  # gone: its loop is closed
    gates["a"].set()
    gates["b"].set()
    assert sorted(r.content or "" for r in d.run("second", timeout=T)) == ["a2", "b2"]
    done = [r.event for r in log.read(d.stream) if isinstance(r.event, TurnCompleted)]
    assert [(e.turn, sorted(e.yielded), e.failed) for e in done] == [
        (1, ["a", "b"], ()),
        (2, ["a", "b"], ()),
    ]
    replies = [r.event.content for r in log.read(d.stream) if isinstance(r.event, DialogueMessage)]
    assert sorted(replies) == ["a1", "a2", "b1", "b2", "first", "second"]
    d.close()


def wait_for(follow: Subscription, wanted: Callable[[object], bool]) -> None:
    """Follow the log until an event ``wanted`` says yes to is on record."""
    while True:
        record = follow.next(T)
        assert record is not None, "the event did not come"
        if wanted(record.event):
            return


def test_a_closed_session_yields_nothing_more() -> None:
    gates = {"a": threading.Event(), "b": threading.Event()}

    def answer(payload: Payload) -> str:
        name = payload.participant.name
        assert gates[name].wait(T)
        return name

    log = MemoryEventLog()
    d = Dialogue.create(
        log,
        participants=[Participant(n, CallableAgent(answer)) for n in "ab"],
        order="participant_order",
    )
    with log.subscribe() as follow:
        session = d.session("go")
        gates["b"].set()  # b completes first and is held back for a
        wait_for(follow, lambda e: isinstance(e, DialogueMessage) and e.content == "b")
        gates["a"].set()
        first = session.next_turn(T)
        assert first is not None and first.participant == "a"
        session.close()
        wait_for(follow, lambda e: isinstance(e, TurnCompleted))
    assert session.next_turn(T) is None  # b's reply was held back: not yielded after close
    assert list(session) == []
    contents = [r.event.content for r in log.read(d.stream) if isinstance(r.event, DialogueMessage)]
    assert contents == ["go", "b", "a"]
    d.close()


def test_closing_a_session_wakes_its_waiting_readers() -> None:
    gate = threading.Event()
    log = MemoryEventLog()
    d = Dialogue.create(
        log, participants=[Participant("a", CallableAgent(lambda p: (gate.wait(T), "a")[1]))]
    )
    waiting = d.session("one")
    read: concurrent.futures.Future[list[Any]] = concurrent.futures.Future()
    threading.Thread(target=lambda: read.set_result(list(waiting)), daemon=True).start()
    with log.subscribe() as follow:  # the agent is running: the reader is waiting
        wait_for(follow, lambda e: isinstance(e, PayloadDelivered))
    waiting.close()
    assert read.result(T) == []  # woken at once, not when the agent answers

    async def in_a_task() -> list[Any]:
        second = d.session("two")  # queued behind the first turn, still running

        async def read_all() -> list[Any]:
            return [r async for r in second]

        task = asyncio.create_task(asyncio.wait_for(read_all(), T))
        await asyncio.sleep(0)  # the task runs until it waits
        second.close()
        return await task

    assert asyncio.run(in_a_task()) == []
    gate.set()
    d.close()


def test_a_reply_with_wrong_field_types_is_a_failure_not_a_broken_log() -> None:
    log = MemoryEventLog()
    bad = AgentReply(content=123)  # type: ignore[arg-type]  # what an untyped agent may do
    d = Dialogue.create(
        log,
        participants=[
            Participant("bad", CallableAgent(lambda p: bad)),
            Participant("good", CallableAgent(lambda p: "fine")),
        ],
    )
    replies = {r.participant: r for r in d.run("go", timeout=T)}
    assert replies["good"].content == "fine"
    error = replies["bad"].error
    assert error is not None and error.kind == "bad_reply"
    assert "Expected `str`, got `int` - at `$.content`" in error.message
    assert log.replay(d.stream) == d.state()  # the stream still reads back
    d.close()


def test_values_of_the_wrong_type_are_refused_before_they_reach_the_log() -> None:
    """msgspec checks types when it reads, not when a Struct is made: a wrong value
    written once would leave the stream unreadable, so it is refused at the door."""
    log = MemoryEventLog()
    agent = CallableAgent(lambda p: "fine")
    wrong_role = r"invalid DialogueStarted: .* at `\$.participants\[0\].role`"
    with pytest.raises(DialogueError, match=wrong_role):
        Dialogue.create(log, participants=[Participant("a", agent, role=5)])  # type: ignore[arg-type]
    with pytest.raises(DialogueError, match=r"invalid DialogueStarted: .*unsupported"):
        Dialogue.create(log, participants=[Participant("a", agent)], metadata={"at": object()})
    assert log.streams() == []
    d = Dialogue.create(log, participants=[Participant("a", agent)])
    before = log.stream_info(d.stream).last_seq
    with pytest.raises(DialogueError, match=r"invalid DialogueMessage: .* at `\$.content`"):
        d.run(Input(content=5), timeout=T)  # type: ignore[arg-type]
    with pytest.raises(DialogueError, match=r"invalid ParticipantInfo: .* at `\$.capabilities`"):
        d.join(Participant("b", agent, capabilities="search"))  # type: ignore[arg-type]
    assert log.stream_info(d.stream).last_seq == before  # nothing recorded
    assert [r.content for r in d.run("go", timeout=T)] == ["fine"]  # and it goes on
    assert log.replay(d.stream) == d.state()
    d.close()


def test_a_reply_utf8_cannot_hold_fails_that_participant_alone() -> None:
    log = MemoryEventLog()
    odd = b"file-\xff.txt".decode("utf-8", "surrogateescape")  # what os.listdir may give
    d = Dialogue.create(
        log,
        participants=[
            Participant("good", CallableAgent(lambda p: "a fine reply")),
            Participant("bad", CallableAgent(lambda p: odd)),
        ],
    )
    for _ in range(2):  # and the dialogue goes on
        replies = {r.participant: r for r in d.run("hi", timeout=T)}
        assert replies["good"].content == "a fine reply"
        error = replies["bad"].error
        assert error is not None and error.kind == "bad_reply"
        assert "surrogates not allowed" in error.message
    assert log.replay(d.stream) == d.state()
    d.close()


def test_a_failure_quoting_text_utf8_cannot_hold_is_recorded_as_text_it_can() -> None:
    log = MemoryEventLog()
    odd = b"file-\xff.txt".decode("utf-8", "surrogateescape")

    def broken(payload: Payload) -> str:
        raise RuntimeError(f"cannot read {odd}")

    d = Dialogue.create(
        log,
        participants=[
            Participant("good", CallableAgent(lambda p: "a fine reply")),
            Participant("bad", CallableAgent(broken)),
        ],
    )
    for _ in range(2):
        replies = {r.participant: r for r in d.run("hi", timeout=T)}
        assert replies["good"].content == "a fine reply"
        error = replies["bad"].error
        assert error is not None and error.message == "cannot read file-\ufffd.txt"
    assert log.replay(d.stream) == d.state()
    d.close()


def test_an_event_that_cannot_be_folded_leaves_the_journal_as_the_log() -> None:
    log = MemoryEventLog()
    d = Dialogue.create(log, participants=[Participant("a", CallableAgent(lambda p: "a"))])
    d.run("go", timeout=T)
    d.close()
    journal = Journal(log, d.stream, log.replay(d.stream))
    before = log.replay(d.stream)  # a copy: folding changes the live state in place
    good = DialogueMessage(
        turn=2, speaker=Speaker(kind="user", name="u"), content="ok", origin="incoming"
    )
    broken = DialogueMessage(
        turn=2,
        speaker=Speaker(kind="agent", name="a"),
        content="a2",
        origin="agent",
        usage={"input_tokens": 1, "output_tokens": 1},  # type: ignore[arg-type]  # not a Usage
    )
    journal.stage([good])
    with pytest.raises(Exception):  # noqa: B017, PT011  whatever the fold raises
        journal.stage([broken])
    assert journal.state == log.replay(d.stream) == before  # what was staged went too
    journal.commit()  # nothing left to write
    assert log.replay(d.stream) == before


def test_an_agent_raising_a_base_exception_fails_alone() -> None:
    def cancelled(payload: Payload) -> str:
        raise asyncio.CancelledError

    log = MemoryEventLog()
    d = Dialogue.create(
        log,
        participants=[
            Participant("c", CallableAgent(cancelled)),
            Participant("ok", CallableAgent(lambda p: "ok")),
        ],
    )
    other = Dialogue.create(log, participants=[Participant("x", CallableAgent(lambda p: "x"))])
    replies = {r.participant: r for r in d.run("go", timeout=T)}
    assert replies["ok"].content == "ok"
    error = replies["c"].error
    assert error is not None and error.kind == "CancelledError"
    # Nothing else was stopped: both dialogues go on.
    assert [r.content for r in other.run("still there?", timeout=T)] == ["x"]
    assert {r.participant for r in d.run("again", timeout=T)} == {"c", "ok"}
    d.close()
    other.close()


def test_a_dialogue_whose_coordinator_is_gone_says_so() -> None:
    d = Dialogue.create(MemoryEventLog(), participants=[Participant("a", CallableAgent(str))])
    d._ref.stop()  # as if something stopped every actor in the process
    with pytest.raises(DialogueError, match="coordinator has stopped"):
        d.run("anyone?", timeout=T)
    with pytest.raises(DialogueError, match="coordinator has stopped"):
        d.state()
    d.stop()  # nothing left to stop: not an error


@pytest.mark.parametrize("strategy", [JoiningStrategy.fresh(), JoiningStrategy.full()])
def test_a_joiner_gets_the_input_of_a_turn_a_crash_left_unstarted(
    strategy: JoiningStrategy,
) -> None:
    """The log as a crash leaves it while the moderator decides: the turn's input is on
    record, the turn is not started. Whoever joins before it runs gets that input."""
    log = MemoryEventLog()
    log.append(
        "m",
        [
            DialogueStarted(
                mode="moderator", order="completion", participants=(ParticipantInfo(name="a"),)
            ),
            DialogueMessage(
                turn=1, speaker=Speaker(kind="user", name="user"), content="q", origin="incoming"
            ),
        ],
    )
    given: dict[str, list[str]] = {}

    def noting(payload: Payload) -> str:
        given[payload.participant.name] = [m.content for m in payload.messages]
        return payload.participant.name

    d = Dialogue.resume(
        log, "m", {"a": CallableAgent(noting)}, moderator=CallableAgent(lambda p: "broadcast")
    )
    d.join(Participant("x", CallableAgent(noting)), strategy)
    assert sorted(r.content or "" for r in d.finish_turn().all(T)) == ["a", "x"]
    assert given == {"a": ["q"], "x": ["q"]}
    assert log.replay("m") == d.state()
    d.close()
