"""moot.events: the codec, the upcasters, and the folds."""

from __future__ import annotations

import copy

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moot.events
from moot.events import (
    CURRENT_VERSIONS,
    MASKED_RESULT,
    ApprovalRequested,
    Backlog,
    ChatMessage,
    DialogueMessage,
    DialogueStarted,
    DialogueState,
    Done,
    Error,
    EventDecodeError,
    IterationStart,
    JoiningStrategy,
    LlmResponse,
    LoopFailed,
    LoopStarted,
    LoopState,
    MessagesInjected,
    ObservationsMasked,
    ParticipantInfo,
    ParticipantJoined,
    ParticipantRemoved,
    PayloadDelivered,
    Speaker,
    Termination,
    TextBlock,
    ToolCallBlock,
    ToolCallDecided,
    ToolExecutionEnd,
    ToolExecutionStart,
    ToolResultBlock,
    TurnCompleted,
    TurnStarted,
    Usage,
    decode_event,
    encode_event,
    evolve,
    fold,
)
from moot.store import EventLog
from tests.samples import dialogue_events, loop_events


def test_exported_names_are_pinned() -> None:
    assert sorted(moot.events.__all__) == sorted(set(moot.events.__all__))
    assert "evolve" in moot.events.__all__
    assert "EventLog" not in moot.events.__all__
    for name in moot.events.__all__:
        assert hasattr(moot.events, name), name


@pytest.mark.parametrize("event", dialogue_events() + loop_events(), ids=lambda e: type(e).__name__)
def test_every_event_round_trips_through_the_codec(event: object) -> None:
    name = type(event).__name__
    data = encode_event(event)  # type: ignore[arg-type]
    assert msgspec.json.decode(data)["type"] == name
    assert decode_event(name, CURRENT_VERSIONS[name], data) == event
    assert decode_event(name, CURRENT_VERSIONS[name], data.decode()) == event


def test_done_v1_is_read_back_as_v2() -> None:
    v1 = b'{"type":"Done","termination":"max_iterations","iterations":3,"response":[]}'
    event = decode_event("Done", 1, v1)
    assert event == Done(termination=Termination(reason="max_iterations"), iterations=3)
    assert CURRENT_VERSIONS["Done"] == 2


def test_decode_errors_are_clear() -> None:
    with pytest.raises(EventDecodeError, match="unknown event type 'Teleported'"):
        decode_event("Teleported", 1, b"{}")
    with pytest.raises(EventDecodeError, match="newer than this moot"):
        decode_event("TurnStarted", 9, b"{}")
    with pytest.raises(EventDecodeError, match="TurnStarted"):
        decode_event("TurnStarted", 1, b'{"type":"TurnStarted","turn":"one"}')
    with pytest.raises(EventDecodeError, match="body is"):
        decode_event("TurnStarted", 1, encode_event(TurnCompleted(turn=1)))


def user(text: str, turn: int = 1, kind: str = "user") -> DialogueMessage:
    return DialogueMessage(
        turn=turn,
        speaker=Speaker(kind=kind, name="user"),  # type: ignore[arg-type]
        content=text,
        origin="incoming",
    )


def reply(name: str, text: str, turn: int = 1) -> DialogueMessage:
    return DialogueMessage(
        turn=turn, speaker=Speaker(kind="agent", name=name), content=text, origin="agent"
    )


def start(*names: str) -> DialogueStarted:
    return DialogueStarted(
        mode="broadcast",
        order="completion",
        participants=tuple(ParticipantInfo(name=n) for n in names),
    )


def test_dialogue_fold_tracks_delivery_and_forgets_what_everyone_has() -> None:
    events = [
        start("a", "b"),  # 1
        TurnStarted(turn=1, speakers=("a", "b")),  # 2
        user("hi"),  # 3
        PayloadDelivered(turn=1, participant="a", messages=(3,)),  # 4
        PayloadDelivered(turn=1, participant="b", messages=(3,)),  # 5
        reply("a", "A1"),  # 6
        reply("b", "B1"),  # 7
        TurnCompleted(turn=1, yielded=("a", "b")),  # 8
    ]
    state = fold(events)
    assert isinstance(state, DialogueState)
    assert state.seq == 8
    assert state.message_count == 3
    assert state.last_agent_turn == 1
    assert list(state.messages) == [6, 7]  # "hi" reached everyone and is forgotten
    assert state.undelivered("a") == [7]
    assert state.undelivered("b") == [6]
    assert state.current.replies == {"a": 6, "b": 7}
    assert not state.current.open
    state = evolve(state, ParticipantJoined(participant=ParticipantInfo(name="c")))
    assert state.pending_joiners == {"c": JoiningStrategy()}
    assert state.delivered["c"] == 7
    assert state.undelivered("c") == []
    state = evolve(state, ParticipantRemoved(name="b"))
    assert "b" not in state.participants
    assert state.status == "open"


@settings(max_examples=200, deadline=None)
@given(
    speakers=st.lists(st.sampled_from(["user", "a", "b", "c"]), max_size=30),
    marks=st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 35)),
)
def test_backlog_gives_each_participant_what_it_has_not_received(
    speakers: list[str], marks: dict[str, int]
) -> None:
    """The shared backlog of a turn equals filtering the kept messages one by one."""
    state = DialogueState(
        messages={
            seq: user(f"m{seq}") if who == "user" else reply(who, f"m{seq}")
            for seq, who in enumerate(speakers, start=5)
        },
        delivered=marks,
    )
    backlog = Backlog(state)
    for name in ["a", "b", "c", "d", "a"]:  # "a" twice: the cached list is not altered
        mark = marks.get(name, 0)
        expected = [
            (seq, m) for seq, m in state.messages.items() if seq > mark and m.speaker.name != name
        ]
        seqs, messages = backlog.of(name)
        assert list(zip(seqs, messages, strict=True)) == expected
        assert state.undelivered(name) == [seq for seq, _ in expected]


def call(i: str, name: str = "add") -> ToolCallBlock:
    return ToolCallBlock(id=i, name=name, arguments={"a": 1})


def test_loop_fold_feeds_results_back_in_call_order() -> None:
    events = [
        LoopStarted(messages=(ChatMessage.text("user", "go"),)),
        IterationStart(iteration=1, message_count=1),
        LlmResponse(iteration=1, content=(call("x"), call("y"), call("z")), stop_reason="tool_use"),
        ToolExecutionStart(call_id="z", tool_name="add"),
        ToolExecutionEnd(call_id="z", tool_name="add", content="Z"),
        ToolCallDecided(call_id="y", tool_name="add", decision="deny", reason="no"),
        ToolExecutionStart(call_id="x", tool_name="add"),
    ]
    state = fold(events)
    assert isinstance(state, LoopState)
    assert set(state.running) == {"x"}
    assert len(state.messages) == 2
    state = evolve(state, ToolExecutionEnd(call_id="x", tool_name="add", content="X"))
    results = state.messages[-1]
    assert results.role == "tool"
    assert [b.tool_call_id for b in results.content] == ["x", "y", "z"]  # type: ignore[union-attr]
    assert results.content[1] == ToolResultBlock(
        tool_call_id="y", content="Tool call denied: no", is_error=True
    )
    assert state.round_calls == []
    assert state.running == {}


def test_loop_fold_approval_masking_and_termination() -> None:
    state = fold(
        [
            LoopStarted(messages=(ChatMessage.text("user", "go"),)),
            LlmResponse(iteration=1, content=(call("a"),)),
            ToolExecutionEnd(call_id="a", tool_name="add", content="first"),
            LlmResponse(iteration=2, content=(call("b"),)),
            ApprovalRequested(calls=(call("b"),)),
        ]
    )
    assert isinstance(state, LoopState)
    assert state.status == "awaiting"
    assert [c.id for c in state.awaiting] == ["b"]
    state = evolve(state, ToolCallDecided(call_id="b", tool_name="add", decision="approve"))
    assert state.awaiting == []
    assert state.status == "awaiting"
    state = evolve(state, ToolExecutionEnd(call_id="b", tool_name="add", content="second"))
    assert state.status == "open"
    state = evolve(state, ObservationsMasked(masked_count=1, tokens_saved=3))
    tool_texts = [b.content for m in state.messages if m.role == "tool" for b in m.content]  # type: ignore[union-attr]
    assert tool_texts == [MASKED_RESULT, "second"]
    state = evolve(state, ObservationsMasked(masked_count=1, tokens_saved=3))
    tool_texts = [b.content for m in state.messages if m.role == "tool" for b in m.content]  # type: ignore[union-attr]
    assert tool_texts == [MASKED_RESULT, MASKED_RESULT]
    assert state.tokens_saved == 6
    state = evolve(state, MessagesInjected(messages=(ChatMessage.text("user", "more"),)))
    assert state.messages[-1] == ChatMessage.text("user", "more")
    final = (TextBlock(text="done"),)
    state = evolve(
        state, Done(termination=Termination(reason="complete"), iterations=2, response=final)
    )
    assert state.status == "completed"
    assert state.response == final
    assert state.finished


def test_events_that_do_not_fit_are_refused_by_the_fold() -> None:
    with pytest.raises(TypeError, match="must start"):
        evolve(None, TurnStarted(turn=1, speakers=()))
    with pytest.raises(TypeError, match="does not belong"):
        fold([start("a"), IterationStart(iteration=1, message_count=0)])
    with pytest.raises(TypeError, match="does not belong"):
        fold([LoopStarted(), TurnStarted(turn=1, speakers=())])


# ------------------------------------------------------------------ properties

NAMES = ["ann", "bo", "cy"]


@st.composite
def dialogue_streams(draw: st.DrawFn) -> list[object]:
    """Random but well-formed dialogue streams."""
    events: list[object] = [start(*NAMES[:2])]
    members = set(NAMES[:2])
    seq_of_messages: list[int] = []
    for turn in range(1, draw(st.integers(1, 6)) + 1):
        events.append(TurnStarted(turn=turn, speakers=tuple(sorted(members))))
        events.append(user(f"t{turn}", turn))
        seq_of_messages.append(len(events))
        for name in sorted(members):
            if draw(st.booleans()):
                events.append(
                    PayloadDelivered(turn=turn, participant=name, messages=(seq_of_messages[-1],))
                )
            if draw(st.booleans()):
                events.append(reply(name, draw(st.text(max_size=5)), turn))
                seq_of_messages.append(len(events))
        events.append(TurnCompleted(turn=turn))
        if draw(st.booleans()):
            joiner = draw(st.sampled_from(NAMES))
            if joiner in members:
                events.append(ParticipantRemoved(name=joiner, turn=turn))
                members.discard(joiner)
            else:
                events.append(
                    ParticipantJoined(participant=ParticipantInfo(name=joiner), turn=turn)
                )
                members.add(joiner)
    return events


@settings(max_examples=150, deadline=None)
@given(dialogue_streams())
def test_folding_is_deterministic_and_replay_equals_step_by_step(events: list[object]) -> None:
    once = fold(events)
    twice = fold(copy.deepcopy(events))
    assert once == twice
    assert msgspec.json.encode(once) == msgspec.json.encode(twice)
    # Step by step, every prefix equals a fresh fold of that prefix (what replay(until) does).
    state = None
    for k, event in enumerate(events, start=1):
        state = evolve(state, event)  # type: ignore[arg-type]
        assert state == fold(events[:k])
    assert state == once
    # And the log's replay, through the codec and SQLite, equals the same steps.
    with EventLog(":memory:") as log:
        log.append("d", events)  # type: ignore[arg-type]
        state = None
        for k, event in enumerate(events, start=1):
            state = evolve(state, event)  # type: ignore[arg-type]
            assert log.replay("d", until_seq=k) == state
        assert log.replay("d") == once


@st.composite
def loop_streams(draw: st.DrawFn) -> list[object]:
    """A plausible tool-loop stream: iterations of zero to three calls, run in any
    order, some asked about and denied, injections and masking, then an end or not."""
    usage = Usage(input_tokens=draw(st.integers(1, 50)), output_tokens=draw(st.integers(1, 50)))
    events: list[object] = [LoopStarted(messages=(ChatMessage.text("user", "go"),))]
    iterations = draw(st.integers(0, 5))
    for iteration in range(1, iterations + 1):
        events.append(IterationStart(iteration=iteration, message_count=len(events)))
        calls = [
            ToolCallBlock(id=f"c{iteration}_{i}", name="add", arguments={"a": draw(st.integers())})
            for i in range(draw(st.integers(0, 3)))
        ]
        text = draw(st.text(max_size=5))
        content = (TextBlock(text=text), *calls) if text else tuple(calls)
        stop = "tool_use" if calls else "end_turn"
        events.append(
            LlmResponse(iteration=iteration, content=content, usage=usage, stop_reason=stop)
        )
        denied = [c for c in calls if draw(st.booleans()) and draw(st.booleans())]
        if denied:
            events.append(ApprovalRequested(calls=tuple(denied)))
            for call in denied:
                events.append(
                    ToolCallDecided(call_id=call.id, tool_name="add", decision="deny", reason="no")
                )
        ran = [c for c in calls if c not in denied]
        for call in draw(st.permutations(ran)):
            events.append(ToolExecutionStart(call_id=call.id, tool_name="add", arguments={}))
            error = draw(st.booleans())
            events.append(
                ToolExecutionEnd(call_id=call.id, tool_name="add", content="r", is_error=error)
            )
        if draw(st.booleans()):
            events.append(
                MessagesInjected(messages=(ChatMessage.text("user", "more"),), source="command")
            )
        if draw(st.booleans()):
            events.append(ObservationsMasked(masked_count=draw(st.integers(0, 3)), tokens_saved=1))
    ending = draw(st.sampled_from(["done", "failed", "open"]))
    if ending == "done":
        events.append(
            Done(termination=Termination(reason="complete"), iterations=iterations, usage=usage)
        )
    elif ending == "failed":
        events.append(LoopFailed(error=Error(kind="x", message="y"), iterations=iterations))
    return events


@settings(max_examples=150, deadline=None)
@given(loop_streams())
def test_loop_folds_are_deterministic_and_replay_equals_step_by_step(events: list[object]) -> None:
    once = fold(events)
    assert once == fold(copy.deepcopy(events))
    with EventLog(":memory:") as log:
        log.append("l", events)  # type: ignore[arg-type]
        state = None
        for k, event in enumerate(events, start=1):
            state = evolve(state, event)  # type: ignore[arg-type]
            assert state == fold(events[:k])
            assert log.replay("l", until_seq=k) == state
        assert log.replay("l") == once == state


def test_the_samples_hold_every_event_type() -> None:
    """The round-trip tests use the samples: a new event type must be added to them."""
    sampled = {type(e).__name__ for e in [*dialogue_events(), *loop_events()]}
    assert sampled == set(moot.events.EVENT_TYPES)
