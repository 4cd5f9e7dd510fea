"""The events of a dialogue stream and of a tool-loop stream (DESIGN section 4).

Every event is a frozen msgspec Struct on one base, tagged by ``type``; the tag is
the ``type`` column of the log. ``version`` is a class variable: the schema version of
that event type. New fields always get defaults; a changed shape bumps ``version`` and
registers an upcaster in :mod:`moot.events._codec`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import msgspec

from ._types import ChatMessage, ContentBlock, Error, ParticipantInfo, Speaker, ToolCallBlock, Usage

__all__ = [
    "ApprovalRequested",
    "DialogueClosed",
    "DialogueContext",
    "DialogueEvent",
    "DialogueMessage",
    "DialogueStarted",
    "Done",
    "Event",
    "IterationStart",
    "JoiningStrategy",
    "LlmResponse",
    "LoopConfigInfo",
    "LoopDetected",
    "LoopDetectionInfo",
    "LoopEvent",
    "LoopFailed",
    "LoopParent",
    "LoopStarted",
    "MessagesInjected",
    "ObservationsMasked",
    "ParticipantFailed",
    "ParticipantJoined",
    "ParticipantRemoved",
    "PayloadDelivered",
    "Termination",
    "ToolCallDecided",
    "ToolExecutionEnd",
    "ToolExecutionStart",
    "ToolSpec",
    "TurnCompleted",
    "TurnStarted",
]

Mode = Literal["broadcast", "sequential", "mentioned", "moderator"]
Order = Literal["completion", "participant_order", "explicit", "as_added"]


class EventBase(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", omit_defaults=True):
    """Base of every event. The class name is the tag and the ``type`` column."""

    version: ClassVar[int] = 1


class _Part(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Base of the untagged parts of events."""


# --------------------------------------------------------------------- dialogue


class DialogueContext(_Part, frozen=True):
    """What every participant is told about the setting of the dialogue."""

    environment: str | None = None
    additional: str | None = None
    #: One of the built-in talk styles (see ``moot.actors.TALK_STYLES``) or None.
    talk_style: str | None = None
    #: A custom template for the talk style, used instead of the built-in text.
    template: str | None = None


class JoiningStrategy(_Part, frozen=True):
    """How much history a late joiner receives (DESIGN section 5).

    ``fresh``: none; ``full``: everything; ``recent``: the last ``turns`` turns
    (default 5); ``range``: turns ``start`` to ``end`` (exclusive).
    """

    kind: Literal["fresh", "full", "recent", "range"] = "fresh"
    turns: int | None = None
    start: int | None = None
    end: int | None = None

    @classmethod
    def fresh(cls) -> JoiningStrategy:
        return cls(kind="fresh")

    @classmethod
    def full(cls) -> JoiningStrategy:
        return cls(kind="full")

    @classmethod
    def recent(cls, turns: int = 5) -> JoiningStrategy:
        if turns < 0:
            raise ValueError("recent(turns) needs turns >= 0")
        return cls(kind="recent", turns=turns)

    @classmethod
    def range(cls, start: int, end: int | None = None) -> JoiningStrategy:
        if start < 0 or (end is not None and end < start):
            raise ValueError("range(start, end) needs 0 <= start <= end")
        return cls(kind="range", start=start, end=end)


class DialogueStarted(EventBase, frozen=True):
    mode: Mode
    order: Order
    names: tuple[str, ...] = ()
    participants: tuple[ParticipantInfo, ...] = ()
    context: DialogueContext | None = None
    reaction: str | None = None
    metadata: dict[str, Any] | None = None
    #: How ``@name`` is matched when a turn runs in mentioned mode (None: exact_word).
    mention_strategy: str | None = None


class ParticipantJoined(EventBase, frozen=True):
    participant: ParticipantInfo
    strategy: JoiningStrategy = JoiningStrategy()
    turn: int = 0


class ParticipantRemoved(EventBase, frozen=True):
    name: str
    turn: int = 0


class TurnStarted(EventBase, frozen=True):
    turn: int
    speakers: tuple[str, ...]
    #: How this turn runs, when it differs from the dialogue's (a moderator's choice).
    mode: str | None = None
    order: str | None = None


class DialogueMessage(EventBase, frozen=True):
    turn: int
    speaker: Speaker
    content: str
    origin: Literal["incoming", "agent"]
    message_type: str = "conversational"
    participant_index: int | None = None
    completion_index: int | None = None
    attachments: tuple[ContentBlock, ...] = ()
    usage: Usage | None = None
    model: str | None = None
    latency_ms: float | None = None
    loop: str | None = None
    metadata: dict[str, Any] | None = None
    #: A digest of the model request that produced this reply: re-drive compares it.
    request_digest: str | None = None


class PayloadDelivered(EventBase, frozen=True):
    turn: int
    participant: str
    messages: tuple[int, ...]
    context: str | None = None


class ParticipantFailed(EventBase, frozen=True):
    turn: int
    participant: str
    error: Error


class TurnCompleted(EventBase, frozen=True):
    turn: int
    yielded: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()


class DialogueClosed(EventBase, frozen=True):
    reason: str = "closed"


# -------------------------------------------------------------------- tool loop


class LoopParent(_Part, frozen=True):
    """Where a loop came from: the stream and event that started it."""

    stream: str
    seq: int
    turn: int | None = None
    participant: str | None = None


class LoopDetectionInfo(_Part, frozen=True):
    threshold: int = 3
    action: Literal["warn", "stop", "inject_warning"] = "warn"


class LoopConfigInfo(_Part, frozen=True):
    """The recorded part of a loop's configuration (hooks are code and live in code)."""

    max_iterations: int = 10
    parallel_tool_execution: bool = True
    timeout_s: float | None = None
    max_depth: int | None = 3
    loop_detection: LoopDetectionInfo | None = None
    #: Recent iterations whose tool results stay unmasked; None disables masking.
    mask_keep_iterations: int | None = None


class ToolSpec(_Part, frozen=True):
    """A tool as the model sees it."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = {}


class Termination(_Part, frozen=True):
    reason: Literal["complete", "stop_condition", "max_iterations", "loop_detected", "timeout"]
    detail: str | None = None


class LoopStarted(EventBase, frozen=True):
    parent: LoopParent | None = None
    depth: int = 0
    config: LoopConfigInfo = LoopConfigInfo()
    tools: tuple[ToolSpec, ...] = ()
    messages: tuple[ChatMessage, ...] = ()
    model: str | None = None


class IterationStart(EventBase, frozen=True):
    iteration: int
    message_count: int


StopReason = Literal["end_turn", "tool_use", "max_tokens", "stop_sequence"]


class LlmResponse(EventBase, frozen=True):
    iteration: int
    content: tuple[ContentBlock, ...]
    usage: Usage = Usage()
    stop_reason: StopReason = "end_turn"
    model: str | None = None
    latency_ms: float | None = None
    #: A digest of the model request this answers (see DialogueMessage.request_digest).
    request_digest: str | None = None


class ApprovalRequested(EventBase, frozen=True):
    calls: tuple[ToolCallBlock, ...]
    reason: str | None = None


class ToolCallDecided(EventBase, frozen=True):
    call_id: str
    tool_name: str
    decision: Literal["approve", "deny", "modify"]
    reason: str | None = None
    arguments: dict[str, Any] | None = None


class ToolExecutionStart(EventBase, frozen=True):
    call_id: str
    tool_name: str
    arguments: dict[str, Any] = {}


class ToolExecutionEnd(EventBase, frozen=True):
    call_id: str
    tool_name: str
    content: str
    is_error: bool = False
    duration_ms: float = 0.0
    attempts: int = 1


class LoopDetected(EventBase, frozen=True):
    tool_name: str
    consecutive_count: int
    action: Literal["warn", "stop", "inject_warning"]


class MessagesInjected(EventBase, frozen=True):
    messages: tuple[ChatMessage, ...]
    source: Literal["command", "loop_detection"] = "command"


class ObservationsMasked(EventBase, frozen=True):
    masked_count: int
    tokens_saved: int = 0


class Done(EventBase, frozen=True):
    """The loop finished. Version 2: ``termination`` became a struct (was a bare reason)."""

    version: ClassVar[int] = 2

    termination: Termination
    iterations: int
    usage: Usage = Usage()
    response: tuple[ContentBlock, ...] = ()


class LoopFailed(EventBase, frozen=True):
    error: Error
    iterations: int = 0
    usage: Usage = Usage()


DialogueEvent = (
    DialogueStarted
    | ParticipantJoined
    | ParticipantRemoved
    | TurnStarted
    | DialogueMessage
    | PayloadDelivered
    | ParticipantFailed
    | TurnCompleted
    | DialogueClosed
)

LoopEvent = (
    LoopStarted
    | IterationStart
    | LlmResponse
    | ApprovalRequested
    | ToolCallDecided
    | ToolExecutionStart
    | ToolExecutionEnd
    | LoopDetected
    | MessagesInjected
    | ObservationsMasked
    | Done
    | LoopFailed
)

Event = DialogueEvent | LoopEvent
