"""One instance of every event type, with every optional field filled, for round-trip tests."""

from __future__ import annotations

from moot.events import (
    ApprovalRequested,
    ChatMessage,
    DialogueClosed,
    DialogueContext,
    DialogueMessage,
    DialogueStarted,
    Done,
    Error,
    EventBase,
    ImageBlock,
    IterationStart,
    JoiningStrategy,
    LlmResponse,
    LoopConfigInfo,
    LoopDetected,
    LoopDetectionInfo,
    LoopFailed,
    LoopParent,
    LoopStarted,
    MessagesInjected,
    ObservationsMasked,
    ParticipantFailed,
    ParticipantInfo,
    ParticipantJoined,
    ParticipantRemoved,
    PayloadDelivered,
    ReasoningBlock,
    Speaker,
    Termination,
    TextBlock,
    ToolCallBlock,
    ToolCallDecided,
    ToolExecutionEnd,
    ToolExecutionStart,
    ToolResultBlock,
    ToolSpec,
    TurnCompleted,
    TurnStarted,
    Usage,
)

ALICE = ParticipantInfo(
    name="alice", role="writer", description="Writes", capabilities=("draft",), agent="scripted"
)
BOB = ParticipantInfo(name="bob", role="critic")
USAGE = Usage(
    input_tokens=10, output_tokens=5, reasoning_tokens=2, cache_read_tokens=1, cache_write_tokens=0
)
CALL = ToolCallBlock(id="c1", name="add", arguments={"a": 2, "b": 3})


def dialogue_events() -> list[EventBase]:
    """A plausible dialogue stream using every dialogue event type and optional field."""
    return [
        DialogueStarted(
            mode="broadcast",
            order="explicit",
            names=("bob", "alice"),
            participants=(ALICE, BOB),
            context=DialogueContext(
                environment="a review", additional="be brief", talk_style="debate", template=None
            ),
            reaction="always",
            metadata={"k": [1, 2, {"x": None}]},
        ),
        TurnStarted(turn=1, speakers=("bob", "alice")),
        DialogueMessage(
            turn=1,
            speaker=Speaker(kind="user", name="user"),
            content="Name it — ünïcödé ✓",
            origin="incoming",
            message_type="context_info",
            attachments=(ImageBlock(media_type="image/png", data="aGk="),),
        ),
        PayloadDelivered(turn=1, participant="alice", messages=(3,), context="ctx"),
        PayloadDelivered(turn=1, participant="bob", messages=(3,)),
        DialogueMessage(
            turn=1,
            speaker=Speaker(kind="agent", name="alice", role="writer"),
            content="moot",
            origin="agent",
            participant_index=0,
            completion_index=0,
            usage=USAGE,
            model="m",
            latency_ms=12.5,
            loop="loop-1",
            metadata={"a": 1},
        ),
        ParticipantFailed(
            turn=1, participant="bob", error=Error(kind="timeout", message="slow", retryable=True)
        ),
        TurnCompleted(turn=1, yielded=("alice",), failed=("bob",)),
        ParticipantJoined(
            participant=ParticipantInfo(name="carol"), strategy=JoiningStrategy.recent(2), turn=2
        ),
        ParticipantRemoved(name="bob", turn=2),
        DialogueClosed(reason="done"),
    ]


def loop_events() -> list[EventBase]:
    """A plausible tool-loop stream using every loop event type and optional field."""
    return [
        LoopStarted(
            parent=LoopParent(stream="d1", seq=4, turn=1, participant="alice"),
            depth=1,
            config=LoopConfigInfo(
                max_iterations=5,
                parallel_tool_execution=False,
                timeout_s=30.0,
                max_depth=3,
                loop_detection=LoopDetectionInfo(threshold=3, action="inject_warning"),
                mask_keep_iterations=2,
            ),
            tools=(ToolSpec(name="add", description="Add.", parameters={"type": "object"}),),
            messages=(ChatMessage.text("system", "Be precise."), ChatMessage.text("user", "2+3?")),
            model="m",
        ),
        IterationStart(iteration=1, message_count=2),
        LlmResponse(
            iteration=1,
            content=(ReasoningBlock(text="think", signature="sig"), TextBlock(text="ok"), CALL),
            usage=USAGE,
            stop_reason="tool_use",
            model="m",
            latency_ms=3.0,
        ),
        ApprovalRequested(calls=(CALL,), reason="policy"),
        ToolCallDecided(
            call_id="c1", tool_name="add", decision="modify", reason="r", arguments={"a": 1}
        ),
        ToolExecutionStart(call_id="c1", tool_name="add", arguments={"a": 1}),
        ToolExecutionEnd(
            call_id="c1", tool_name="add", content="1", is_error=False, duration_ms=0.5, attempts=2
        ),
        LoopDetected(tool_name="add", consecutive_count=3, action="warn"),
        MessagesInjected(
            messages=(
                ChatMessage(role="tool", content=(ToolResultBlock(tool_call_id="x", content="y"),)),
            ),
            source="loop_detection",
        ),
        ObservationsMasked(masked_count=1, tokens_saved=10),
        Done(
            termination=Termination(reason="complete", detail="d"),
            iterations=1,
            usage=USAGE,
            response=(TextBlock(text="5"),),
        ),
        LoopFailed(error=Error(kind="x", message="y"), iterations=1, usage=USAGE),
    ]
