"""Dialogues on actors: orders, delivery, joiners, modes, failures, live state = replay."""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING

import pytest

from moot.actors._agents import AgentReply, CallableAgent, LlmAgent, Payload
from moot.actors._dialogue import Dialogue, Input, Participant
from moot.actors._errors import DialogueError
from moot.actors._scripted import ScriptedProvider, ScriptedReply
from moot.events import (
    DialogueMessage,
    DialogueState,
    JoiningStrategy,
    ParticipantFailed,
    PayloadDelivered,
    TurnCompleted,
    TurnStarted,
)
from moot.store import EventLog, LogBase, Subscription

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from moot.actors._session import TurnReply

TIMEOUT = 30


def scripted(name: str, *replies: str | tuple[str, int], role: str | None = None) -> Participant:
    """A participant answered by a scripted model; a tuple is (text, delay_ms)."""
    entries = [
        ScriptedReply(text=r) if isinstance(r, str) else ScriptedReply(text=r[0], delay_ms=r[1])
        for r in replies
    ]
    return Participant(name, LlmAgent(ScriptedProvider(entries, label=name)), role=role)


@pytest.fixture
def log(tmp_path: Path) -> Iterator[LogBase]:
    opened = EventLog(tmp_path / "moot.db")
    yield opened
    opened.close()


def events_of(log: LogBase, stream: str, kind: type) -> list:  # type: ignore[type-arg]
    return [r.event for r in log.read(stream) if isinstance(r.event, kind)]


def seqs_of(log: LogBase, stream: str, kind: type) -> list[tuple[int, object]]:
    return [(r.seq, r.event) for r in log.read(stream) if isinstance(r.event, kind)]


SLOW_FIRST = [("slow", 300), ("mid", 150), ("fast", 0)]


def three(order: str, names: tuple[str, ...] = ()) -> list[Participant]:
    return [scripted(n, (n.upper(), delay), (n + "2", delay)) for n, delay in SLOW_FIRST]


@pytest.mark.parametrize(
    ("order", "names", "expected"),
    [
        ("completion", (), ["fast", "mid", "slow"]),
        ("participant_order", (), ["slow", "mid", "fast"]),
        ("explicit", ("mid", "fast"), ["mid", "fast", "slow"]),
    ],
)
def test_broadcast_yield_orders(
    log: LogBase, order: str, names: tuple[str, ...], expected: list[str]
) -> None:
    d = Dialogue.create(log, participants=three(order), order=order, names=names)
    yielded = [r.participant for r in d.session("go")]
    assert yielded == expected
    assert [r.participant for r in d.run("again")] == expected  # run() honours it too
    d.close()
    # Whatever the yield order, the log has each reply once, in completion order.
    replies = seqs_of(log, d.stream, DialogueMessage)
    for turn in (1, 2):
        mine = [(s, m) for s, m in replies if m.turn == turn and m.origin == "agent"]
        assert [m.speaker.name for _, m in mine] == ["fast", "mid", "slow"]
        assert [m.completion_index for _, m in mine] == [0, 1, 2]
        assert [m.participant_index for _, m in mine] == [2, 1, 0]
    started = events_of(log, d.stream, TurnStarted)[0]
    assert list(started.speakers) == (
        expected if order != "completion" else ["slow", "mid", "fast"]
    )
    completed = events_of(log, d.stream, TurnCompleted)[0]
    assert list(completed.yielded) == expected


def event_at(log: LogBase, stream: str, seq: int) -> object:
    (record,) = log.read(stream, seq - 1, until_seq=seq)
    return record.event


def gated(name: str, gates: dict[str, threading.Event]) -> Participant:
    """A participant that answers its name in capitals once the test sets its gate."""

    def respond(payload: Payload) -> str:
        assert gates[name].wait(TIMEOUT)
        return name.upper()

    return Participant(name, CallableAgent(respond))


def wait_for_reply(follow: Subscription, name: str) -> None:
    """Follow the log until ``name``'s reply is appended (the subscription is woken by
    each append; ``TIMEOUT`` only bounds a failure)."""
    while (record := follow.next(timeout=TIMEOUT)) is not None:
        event = record.event
        if (
            isinstance(event, DialogueMessage)
            and event.origin == "agent"
            and event.speaker.name == name
        ):
            return
    pytest.fail(f"{name}'s reply was never appended")


@pytest.mark.parametrize(
    ("order", "names", "yield_order"),
    [
        ("completion", (), ["fast", "slow", "mid"]),  # the release order
        ("participant_order", (), ["slow", "mid", "fast"]),
        ("explicit", ("mid", "fast"), ["mid", "fast", "slow"]),
    ],
)
def test_each_reply_is_on_record_when_it_completes_not_when_it_is_yielded(
    log: LogBase, order: str, names: tuple[str, ...], yield_order: list[str]
) -> None:
    release = ["fast", "slow", "mid"]
    gates = {n: threading.Event() for n in ("slow", "mid", "fast")}
    d = Dialogue.create(
        log,
        participants=[gated(n, gates) for n in ("slow", "mid", "fast")],
        order=order,
        names=names,
    )
    follow = log.subscribe(stream=d.stream)
    yielded: list[str] = []
    try:
        session = d.session("go")
        for i, name in enumerate(release):
            gates[name].set()
            done = release[: i + 1]
            # The yield order lets through its longest prefix of the replies completed.
            blocked = [k for k, n in enumerate(yield_order) if n not in done]
            prefix = yield_order[: blocked[0]] if blocked else yield_order
            for expected in prefix[len(yielded) :]:
                reply = session.next_turn(timeout=TIMEOUT)
                assert reply is not None and reply.participant == expected
                yielded.append(expected)
                # Whatever the session hands over is already on record, at its seq.
                assert reply.seq is not None
                on_record = event_at(log, d.stream, reply.seq)
                assert isinstance(on_record, DialogueMessage)
                assert (on_record.speaker.name, on_record.content) == (expected, expected.upper())
            if name not in yielded:  # held back by the yield order: appended all the same
                wait_for_reply(follow, name)
            # The log holds exactly the replies completed so far, once each, in the
            # order they completed; nothing of those still blocked.
            recorded = [
                (m.speaker.name, m.content, m.completion_index)
                for m in events_of(log, d.stream, DialogueMessage)
                if m.origin == "agent"
            ]
            assert recorded == [(n, n.upper(), k) for k, n in enumerate(done)]
            if i < len(release) - 1:  # the turn is open; the blocked ones have nothing
                assert events_of(log, d.stream, TurnCompleted) == []
                with pytest.raises(TimeoutError):
                    session.next_turn(timeout=0)
        assert session.next_turn(timeout=TIMEOUT) is None
    finally:
        for gate in gates.values():
            gate.set()
        follow.close()
    d.close()
    assert yielded == yield_order
    completed = events_of(log, d.stream, TurnCompleted)
    assert [(c.turn, list(c.yielded), c.failed) for c in completed] == [(1, yield_order, ())]
    replies = [m for m in events_of(log, d.stream, DialogueMessage) if m.origin == "agent"]
    assert [m.speaker.name for m in replies] == release  # still once each
    assert events_of(log, d.stream, ParticipantFailed) == []


def test_closing_a_session_early_loses_no_reply(log: LogBase) -> None:
    d = Dialogue.create(log, participants=three("completion"))
    session = d.session("go")
    first = session.next_turn(timeout=TIMEOUT)
    assert first is not None and first.participant == "fast"
    session.close()
    assert session.next_turn() is None
    d.close()  # waits for the turn to end
    contents = [m.content for m in events_of(log, d.stream, DialogueMessage)]
    assert contents == ["go", "FAST", "MID", "SLOW"]


def test_each_payload_is_exactly_what_was_not_yet_received(log: LogBase) -> None:
    people = [scripted(n, f"{n}1", f"{n}2", f"{n}3") for n in ("a", "b", "c")]
    d = Dialogue.create(log, participants=people, order="participant_order")
    for text in ("t1", "t2", "t3"):
        d.run(text)
    d.close()
    by_seq = dict(seqs_of(log, d.stream, DialogueMessage))
    seen: dict[str, set[int]] = {"a": set(), "b": set(), "c": set()}
    for payload in events_of(log, d.stream, PayloadDelivered):
        messages = set(payload.messages)
        assert not messages & seen[payload.participant]  # never twice
        assert all(by_seq[s].speaker.name != payload.participant for s in messages)  # not own
        # ...and everything else already said is in it (nothing skipped).
        said = {s for s, m in by_seq.items() if m.turn <= payload.turn}
        said_now = {
            s for s in said if by_seq[s].turn < payload.turn or by_seq[s].origin == "incoming"
        }
        expected = {s for s in said_now if by_seq[s].speaker.name != payload.participant}
        assert messages == expected - seen[payload.participant]
        seen[payload.participant] |= messages
    b_saw = [
        {by_seq[s].content for s in p.messages}
        for p in events_of(log, d.stream, PayloadDelivered)
        if p.participant == "b"
    ]
    assert b_saw == [{"t1"}, {"a1", "c1", "t2"}, {"a2", "c2", "t3"}]


def test_sequential_chains(log: LogBase) -> None:
    got: dict[str, list[list[str]]] = {"a": [], "b": [], "c": []}

    def agent(name: str, fail_on: int | None = None) -> Participant:
        def respond(payload: Payload) -> str:
            got[name].append([m.content for m in payload.messages])
            if payload.turn == fail_on:
                raise RuntimeError("down")
            return f"{name}{payload.turn}"

        return Participant(name, CallableAgent(respond))

    d = Dialogue.create(
        log,
        participants=[agent("a", fail_on=2), agent("b", fail_on=2), agent("c", fail_on=2)],
        mode="sequential",
        order="explicit",
        names=("b", "a"),
    )
    assert [r.participant for r in d.run("t1")] == ["b", "a", "c"]
    assert got["b"][0] == ["t1"]
    assert got["a"][0] == ["t1", "b1"]  # same-turn outputs before it
    assert got["c"][0] == ["t1", "b1", "a1"]
    assert all(not r.ok for r in d.run("t2"))  # a turn that produced nothing
    d.run("t3")
    # The first of a turn sees the last turn's outputs of the others...
    assert got["b"][1] == ["a1", "c1", "t2"]
    # ...and turn 2 produced none, so turn 3 brings only what is new: nothing twice.
    assert got["b"][2] == ["t3"]
    assert got["a"][2] == ["t3", "b3"]
    d.close()


def test_a_chain_brings_its_first_speaker_the_last_outputs_it_missed(log: LogBase) -> None:
    """Turn 2 runs without b and produces nothing; b, first in turn 3, gets turn 1's
    outputs, which it never received, and not only what turn 2 (nothing) added."""
    got: dict[str, list[tuple[int, list[str]]]] = {"a": [], "b": [], "c": []}

    def agent(name: str) -> Participant:
        def respond(payload: Payload) -> str:
            got[name].append((payload.turn, [m.content for m in payload.messages]))
            if payload.turn == 2:
                raise RuntimeError("down")
            return f"{name}{payload.turn}"

        return Participant(name, CallableAgent(respond))

    chain = '{"mode": "sequential", "order": "explicit", "names": ["b", "a"]}'
    moderator = LlmAgent(
        ScriptedProvider([ScriptedReply(text=t) for t in (chain, "mentioned", chain)])
    )
    d = Dialogue.create(
        log,
        mode="moderator",
        moderator=moderator,
        participants=[agent("a"), agent("b"), agent("c")],
    )
    assert [(r.participant, r.content) for r in d.run("t1")] == [
        ("b", "b1"),
        ("a", "a1"),
        ("c", "c1"),
    ]
    assert got["b"] == [(1, ["t1"])]  # the first of turn 1 saw none of its outputs
    second = d.run("@c t2")  # only c speaks, and fails: turn 2 produces nothing
    assert [(r.participant, r.ok) for r in second] == [("c", False)]
    assert got["b"] == [(1, ["t1"])] and got["a"] == [(1, ["t1", "b1"])]
    third = d.run("t3")
    d.close()
    assert [(r.participant, r.content) for r in third] == [("b", "b3"), ("a", "a3"), ("c", "c3")]
    # b gets everything said since its last payload, its own reply excepted: turn 1's
    # outputs of the others (the last turn that produced any), turn 2's input, turn 3's.
    assert got["b"][1] == (3, ["a1", "c1", "@c t2", "t3"])
    assert got["a"][1] == (3, ["c1", "@c t2", "t3", "b3"])
    assert got["c"] == [(1, ["t1", "b1", "a1"]), (2, ["@c t2"]), (3, ["t3", "b3", "a3"])]
    # ...and the log records exactly those payloads.
    by_seq = dict(seqs_of(log, d.stream, DialogueMessage))
    delivered = [
        (p.turn, p.participant, [by_seq[s].content for s in p.messages])
        for p in events_of(log, d.stream, PayloadDelivered)
    ]
    assert delivered == [
        (1, "b", ["t1"]),
        (1, "a", ["t1", "b1"]),
        (1, "c", ["t1", "b1", "a1"]),
        (2, "c", ["@c t2"]),
        (3, "b", ["a1", "c1", "@c t2", "t3"]),
        (3, "a", ["c1", "@c t2", "t3", "b3"]),
        (3, "c", ["t3", "b3", "a3"]),
    ]
    started = events_of(log, d.stream, TurnStarted)
    assert [(s.turn, s.mode, s.speakers) for s in started] == [
        (1, "sequential", ("b", "a", "c")),
        (2, "mentioned", ("c",)),
        (3, "sequential", ("b", "a", "c")),
    ]


def joiner_run(log: LogBase, strategy: JoiningStrategy | None) -> tuple[Dialogue, dict[str, list]]:  # type: ignore[type-arg]
    got: dict[str, list] = {}  # type: ignore[type-arg]

    def agent(name: str) -> Participant:
        def respond(payload: Payload) -> str:
            got.setdefault(name, []).append([m.content for m in payload.messages])
            return f"{name}{payload.turn}"

        return Participant(name, CallableAgent(respond))

    d = Dialogue.create(log, participants=[agent("a"), agent("b")], order="participant_order")
    for t in range(1, 5):
        d.run(f"t{t}")
    if strategy is not None:
        d.join(agent("late"), strategy)
    d.run("t5")
    d.run("t6")
    d.close()
    return d, got


@pytest.mark.parametrize(
    ("strategy", "history"),
    [
        (JoiningStrategy.fresh(), []),
        (
            JoiningStrategy.full(),
            ["t1", "a1", "b1", "t2", "a2", "b2", "t3", "a3", "b3", "t4", "a4", "b4"],
        ),
        (JoiningStrategy.recent(2), ["t3", "a3", "b3", "t4", "a4", "b4"]),
        (JoiningStrategy.range(2, 3), ["t2", "a2", "b2"]),
    ],
    ids=["fresh", "full", "recent", "range"],
)
def test_late_joiners(tmp_path: Path, strategy: JoiningStrategy, history: list[str]) -> None:
    with EventLog(tmp_path / "with.db") as log:
        d, got = joiner_run(log, strategy)
        late = events_of(log, d.stream, PayloadDelivered)
        others_with = [(p.participant, p.messages) for p in late if p.participant != "late"]
    # The history, then the current input (replies of one turn in completion order).
    assert sorted(got["late"][0]) == sorted([*history, "t5"])
    assert got["late"][0][-1] == "t5"
    assert sorted(got["late"][1]) == ["a5", "b5", "t6"]  # then only what is new
    with EventLog(tmp_path / "without.db") as log:
        d, _ = joiner_run(log, None)
        others_without = [
            (p.participant, p.messages) for p in events_of(log, d.stream, PayloadDelivered)
        ]
    # Nobody else's payloads changed (the joiner's own replies aside, which shift seqs).
    assert [(n, len(m)) for n, m in others_with[:8]] == [(n, len(m)) for n, m in others_without[:8]]
    with_texts = _payload_texts(tmp_path / "with.db", exclude="late")
    without_texts = _payload_texts(tmp_path / "without.db")
    assert [(n, sorted(t)) for n, t in with_texts] == [(n, sorted(t)) for n, t in without_texts]


def _payload_texts(path: Path, exclude: str | None = None) -> list[tuple[str, list[str]]]:
    with EventLog(path, readonly=True) as log:
        stream = log.streams()[0].stream
        by_seq = {s: m.content for s, m in seqs_of(log, stream, DialogueMessage)}
        return [
            (p.participant, [by_seq[s] for s in p.messages if not by_seq[s].startswith("late")])
            for p in events_of(log, stream, PayloadDelivered)
            if p.participant != exclude
        ]


def test_mentioned_mode(log: LogBase) -> None:
    got: dict[str, list[list[str]]] = {}

    def agent(name: str, reply: Callable[[int], str]) -> Participant:
        def respond(payload: Payload) -> str:
            got.setdefault(name, []).append([m.content for m in payload.messages])
            return reply(payload.turn)

        return Participant(name, CallableAgent(respond))

    d = Dialogue.create(
        log,
        mode="mentioned",
        participants=[
            agent("Alice", lambda t: "I think @Bob should decide" if t == 1 else f"A{t}"),
            agent("Bob", lambda t: f"B{t}"),
            agent("花子", lambda t: f"H{t}"),
        ],
    )
    assert [r.participant for r in d.run("@Alice what now?")] == ["Alice"]
    # Nobody mentioned in the input, but Alice's reply hands over to Bob.
    assert [r.participant for r in d.run("go on")] == ["Bob"]
    assert got["Bob"][0] == ["@Alice what now?", "I think @Bob should decide", "go on"]
    assert [r.participant for r in d.run("@花子 さん、どう?")] == ["花子"]
    assert got["花子"][0][0] == "@Alice what now?"  # unsent replies still arrive
    assert sorted(r.participant for r in d.run("anyone?")) == ["Alice", "Bob", "花子"]
    d.close()


def test_mention_strategies_are_checked_recorded_and_kept_on_resume(log: LogBase) -> None:
    def people() -> list[Participant]:
        return [Participant(n, CallableAgent(lambda p, n=n: n)) for n in ("alice", "al", "bob")]

    with pytest.raises(DialogueError, match="not a string"):
        Dialogue.create(log, order="explicit", names="al", participants=people())
    with pytest.raises(DialogueError, match="unknown mention strategy 'fuzzy'"):
        Dialogue.create(log, mode="mentioned", participants=people(), mention_strategy="fuzzy")  # type: ignore[arg-type]
    assert log.streams() == []
    d = Dialogue.create(log, mode="mentioned", participants=people(), mention_strategy="partial")
    assert [r.participant for r in d.run("@al hi")] == ["al"]  # the name it is wins
    assert [r.participant for r in d.run("@ali hi")] == ["alice"]
    d.stop()
    assert log.replay(d.stream).mention_strategy == "partial"  # type: ignore[union-attr]
    agents = {p.name: p.agent for p in people()}
    again = Dialogue.resume(log, d.stream, agents)
    assert [r.participant for r in again.run("@ali hi")] == ["alice"]  # still partial
    again.close()
    plain = Dialogue.create(log, participants=people())
    assert log.replay(plain.stream).mention_strategy is None  # the default is not written
    plain.close()


def test_moderator_mode(log: LogBase) -> None:
    moderator = LlmAgent(
        ScriptedProvider(
            [
                ScriptedReply(
                    text='{"mode": "sequential", "order": "explicit", "names": ["b", "a"]}'
                ),
                ScriptedReply(text="broadcast"),
                ScriptedReply(text="moderator"),
            ]
        )
    )
    d = Dialogue.create(
        log,
        mode="moderator",
        moderator=moderator,
        participants=[scripted("a", "a1", "a2", "a3"), scripted("b", "b1", "b2", "b3")],
    )
    assert [r.participant for r in d.run("t1")] == ["b", "a"]
    started = events_of(log, d.stream, TurnStarted)
    assert (started[0].mode, started[0].order, started[0].speakers) == (
        "sequential",
        "explicit",
        ("b", "a"),
    )
    assert sorted(r.participant for r in d.run("t2")) == ["a", "b"]
    with pytest.raises(DialogueError, match="recurse"):
        d.run("t3")
    d.close()
    with pytest.raises(DialogueError, match="needs a moderator"):
        Dialogue.create(log, mode="moderator", participants=[scripted("a", "x")])


def test_a_failing_participant_costs_nobody_else(log: LogBase) -> None:
    def broken(payload: Payload) -> str:
        raise ValueError("bad day")

    d = Dialogue.create(
        log,
        participants=[
            scripted("a", "a1", "a2"),
            Participant("x", CallableAgent(broken)),
            scripted("b", "b1", "b2"),
        ],
        order="participant_order",
    )
    first = d.run("t1")
    assert [(r.participant, r.ok) for r in first] == [("a", True), ("x", False), ("b", True)]
    assert first[1].error is not None and first[1].error.message == "bad day"
    assert first[1].error.kind == "ValueError"
    second = d.run("t2")
    assert [r.content for r in second if r.ok] == ["a2", "b2"]  # it goes on
    d.close()
    failed = events_of(log, d.stream, ParticipantFailed)
    assert [(f.turn, f.participant) for f in failed] == [(1, "x"), (2, "x")]
    assert [(f.error.kind, f.error.message) for f in failed] == [("ValueError", "bad day")] * 2
    assert [c.failed for c in events_of(log, d.stream, TurnCompleted)] == [("x",), ("x",)]
    # The others' replies are on record alongside the failure, and x's never is.
    replies = [
        (m.turn, m.speaker.name, m.content)
        for m in events_of(log, d.stream, DialogueMessage)
        if m.origin == "agent"
    ]
    assert sorted(replies) == [(1, "a", "a1"), (1, "b", "b1"), (2, "a", "a2"), (2, "b", "b2")]
    # Each reply handed out is the event at its seq: a message, or the failure.
    for reply in [*first, *second]:
        assert reply.seq is not None
        event = event_at(log, d.stream, reply.seq)
        if reply.ok:
            assert isinstance(event, DialogueMessage)
            assert (event.turn, event.speaker.name, event.content) == (
                reply.turn,
                reply.participant,
                reply.content,
            )
        else:
            assert isinstance(event, ParticipantFailed)
            assert (event.turn, event.participant, event.error) == (
                reply.turn,
                "x",
                reply.error,
            )


def test_live_state_equals_replay_after_every_turn(log: LogBase) -> None:
    d = Dialogue.create(
        log, participants=[scripted(n, *[f"{n}{i}" for i in range(5)]) for n in ("a", "b", "c")]
    )
    for i in range(4):
        d.run(f"t{i}")
        if i == 1:
            d.join(scripted("late", "l1", "l2"), JoiningStrategy.recent(1))
        if i == 2:
            d.remove("b")
        live = d.state()
        assert isinstance(live, DialogueState)
        assert live == log.replay(d.stream)
    d.close()
    assert log.replay(d.stream).status == "closed"


def test_inputs_that_do_not_react_wait_for_the_next_turn(log: LogBase) -> None:
    got: list[list[str]] = []

    def respond(payload: Payload) -> AgentReply:
        got.append([m.content for m in payload.messages])
        return AgentReply(content="ok")

    d = Dialogue.create(
        log, participants=[Participant("a", CallableAgent(respond))], reaction="user_only"
    )
    assert d.run(Input("note 1", message_type="context_info")) == []
    assert d.run(Input("system says hi", speaker="ops", kind="system")) == []
    assert [r.content for r in d.run("question")] == ["ok"]
    assert got == [["note 1", "system says hi", "question"]]
    d.close()


def test_async_sessions_do_not_block_the_loop(log: LogBase) -> None:
    gates = {1: threading.Event(), 2: threading.Event()}
    gate = gates[1]
    #: Per turn, what s calls before it waits for its gate.
    waiting: dict[int, Callable[[], object]] = {}

    def slow(payload: Payload) -> str:
        if payload.turn in waiting:
            waiting[payload.turn]()
        assert gates[payload.turn].wait(TIMEOUT)
        return "late" if payload.turn == 1 else f"late{payload.turn}"

    # f is yielded first whenever it completes; s only once released.
    d = Dialogue.create(
        log,
        participants=[Participant("s", CallableAgent(slow)), scripted("f", "fast", "fast2")],
        order="explicit",
        names=("f", "s"),
    )

    async def main() -> list[str]:
        out: list[str] = []
        got_fast = asyncio.Event()

        async def ticker() -> None:
            await got_fast.wait()
            for _ in range(100):
                await asyncio.sleep(0)
            gate.set()  # reachable only if the loop runs while the session is awaited

        task = asyncio.create_task(ticker())
        async for reply in d.session("go"):
            out.append(reply.content or "")
            if reply.content == "fast":
                got_fast.set()
        await task
        return out

    async def bounded() -> list[str]:
        return await asyncio.wait_for(main(), TIMEOUT)

    assert asyncio.run(bounded()) == ["fast", "late"]

    async def again() -> list[TurnReply]:
        loop = asyncio.get_running_loop()
        asked = asyncio.Event()
        waiting[2] = lambda: loop.call_soon_threadsafe(asked.set)

        async def release() -> None:
            await asked.wait()  # s is waiting for this loop...
            gates[2].set()  # ...which must run while run_async is awaited to let it go

        task = asyncio.create_task(release())
        replies = await d.run_async("again", timeout=TIMEOUT)
        await task
        return replies

    async def bounded_again() -> list[TurnReply]:
        return await asyncio.wait_for(again(), TIMEOUT)

    replies = asyncio.run(bounded_again())
    assert [(r.turn, r.participant, r.content, r.error) for r in replies] == [
        (2, "f", "fast2", None),
        (2, "s", "late2", None),
    ]
    d.close()


def test_bad_dialogues_are_refused_before_anything_is_recorded(log: LogBase) -> None:
    with pytest.raises(DialogueError, match="unknown participant"):
        Dialogue.create(log, participants=[scripted("a", "x")], order="explicit", names=("z",))
    with pytest.raises(DialogueError, match="unique"):
        Dialogue.create(log, participants=[scripted("a", "x"), scripted("a", "y")])
    assert log.streams() == []


def test_next_turn_times_out(log: LogBase) -> None:
    gate = threading.Event()

    def stuck(payload: Payload) -> str:
        assert gate.wait(TIMEOUT)
        return "finally"

    d = Dialogue.create(log, participants=[Participant("s", CallableAgent(stuck))])
    session = d.session("hello")
    with pytest.raises(TimeoutError):
        session.next_turn(timeout=0.05)
    gate.set()
    reply = session.next_turn(timeout=TIMEOUT)
    assert reply is not None and reply.content == "finally"
    d.close()


def test_replies_already_on_record_are_not_requested_again(log: LogBase) -> None:
    d = Dialogue.create(
        log, participants=[scripted("a", "a1", "a2", "a3"), scripted("b", "b1", "b2", "b3")]
    )
    d.run("t1")
    d.stop()  # as if the process died between turns
    agents = {
        "a": LlmAgent(ScriptedProvider([ScriptedReply(text=t) for t in ("a1", "a2")])),
        "b": LlmAgent(ScriptedProvider([ScriptedReply(text=t) for t in ("b1", "b2")])),
    }
    resumed = Dialogue.resume(log, d.stream, agents)
    assert resumed.finish_turn().all(TIMEOUT) == []
    assert sorted(r.content for r in resumed.run("t2")) == ["a2", "b2"]  # not a1/b1 again
    for agent in agents.values():
        provider = agent.provider
        assert isinstance(provider, ScriptedProvider) and provider.calls == 1
    resumed.close()
