"""Dialogues when things go wrong: a failing store, membership changes mid-turn, moderators."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from moot.actors._agents import CallableAgent, LlmAgent, Payload
from moot.actors._dialogue import Dialogue, Participant
from moot.actors._errors import DialogueError
from moot.actors._scripted import ScriptedProvider, ScriptedReply
from moot.events import DialogueMessage, ParticipantFailed, PayloadDelivered, TurnStarted
from moot.store import MemoryEventLog, StoreError

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


def test_membership_changes_wait_for_the_turn_and_report_errors() -> None:
    gate = threading.Event()

    def slow(payload: Payload) -> str:
        assert gate.wait(T)
        return "done"

    log = MemoryEventLog()
    d = Dialogue.create(log, participants=[Participant("a", CallableAgent(slow))])
    session = d.session("go")
    outcome: dict[str, object] = {}

    def remove_nobody() -> None:
        try:
            d.remove("nobody")
        except DialogueError as exc:
            outcome["error"] = exc

    t = threading.Thread(target=remove_nobody)
    t.start()
    t.join(0.2)
    assert t.is_alive()  # it waits for the turn in progress...
    gate.set()
    t.join(T)
    assert "no such participant" in str(outcome["error"])  # ...and then reports the error
    assert [r.content for r in session.all(T)] == ["done"]
    d.join(Participant("b", CallableAgent(lambda p: "b!")))
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


def test_stopping_a_dialogue_tells_whoever_waits() -> None:
    gate = threading.Event()

    def stuck(payload: Payload) -> str:
        gate.wait(T)
        return "late"

    d = Dialogue.create(MemoryEventLog(), participants=[Participant("a", CallableAgent(stuck))])
    running = d.session("one")
    queued = d.session("two")
    d.stop()
    gate.set()
    with pytest.raises(DialogueError, match="coordinator has stopped"):
        running.all(T)
    with pytest.raises(DialogueError, match="coordinator has stopped"):
        queued.all(T)
