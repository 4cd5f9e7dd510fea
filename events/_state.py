"""The folds: ``state = evolve(state, event)``, the only way session state changes.

Live actors and :meth:`EventLog.replay` run exactly this code, so the state of a
live session equals the replay of its stream at every point. The folds are pure: no
I/O, no clocks, no randomness. For speed they update the state object in place and
return it; a caller that needs the old state keeps a copy (``msgspec.structs.replace``
or a fresh replay).

Each state counts the events folded into it (``seq``). Streams are gap-free and start
at 1, so the n-th event folded is the event at seq n, and a message's id is
``(stream, seq)``.

A dialogue's state does not keep its whole history: the log does. It keeps the
messages that some participant has not received yet (``messages``) and, for each
participant, the highest message seq it has been given or skipped (``delivered``).
Memory stays flat however long the dialogue runs.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal, TypeVar

import msgspec

from ._events import (
    ApprovalRequested,
    DialogueClosed,
    DialogueContext,
    DialogueMessage,
    DialogueStarted,
    Done,
    Event,
    IterationStart,
    JoiningStrategy,
    LlmResponse,
    LoopConfigInfo,
    LoopDetected,
    LoopFailed,
    LoopParent,
    LoopStarted,
    MessagesInjected,
    ObservationsMasked,
    ParticipantFailed,
    ParticipantJoined,
    ParticipantRemoved,
    PayloadDelivered,
    Termination,
    ToolCallDecided,
    ToolExecutionEnd,
    ToolExecutionStart,
    ToolSpec,
    TurnCompleted,
    TurnStarted,
)
from ._types import (
    ChatMessage,
    ContentBlock,
    Error,
    ParticipantInfo,
    ToolCallBlock,
    ToolResultBlock,
    Usage,
)

__all__ = [
    "MASKED_RESULT",
    "STATUS_EVENTS",
    "DialogueState",
    "LoopState",
    "State",
    "Status",
    "TurnState",
    "call_signature",
    "denied_result",
    "evolve",
    "fold",
    "next_status",
]

Status = Literal["open", "awaiting", "completed", "failed", "closed"]

#: What a masked tool result says instead of its content (ObservationsMasked).
MASKED_RESULT = "[older tool result masked to save context]"

_TERMINAL = frozenset(("completed", "failed", "closed"))


def next_status(current: Status, event: Event) -> Status:
    """The stream status after ``event`` (the ``status`` column of ``streams``).

    ``completed``, ``failed`` and ``closed`` are final. A loop is ``awaiting`` from its
    ``ApprovalRequested`` until the next event that is not a decision.
    """
    match event:
        case DialogueStarted() | LoopStarted():
            return "open"
        case _ if current in _TERMINAL:
            return current
        case ApprovalRequested():
            return "awaiting"
        case ToolCallDecided():
            return current
        case Done():
            return "completed"
        case LoopFailed():
            return "failed"
        case DialogueClosed():
            return "closed"
        case _:
            return "open"


#: Event types that can move an ``open`` stream to another status (see next_status);
#: any other event leaves an ``open`` stream open, so the call can be skipped.
STATUS_EVENTS: frozenset[type[Event]] = frozenset(
    (DialogueStarted, LoopStarted, ApprovalRequested, Done, LoopFailed, DialogueClosed)
)


# --------------------------------------------------------------------- dialogue


class TurnState(msgspec.Struct, kw_only=True):
    """The turn in progress (or the last one, once completed)."""

    turn: int = 0
    open: bool = False
    speakers: tuple[str, ...] = ()
    mode: str | None = None
    order: str | None = None
    #: The recorded payload of each participant that was given one this turn.
    payloads: dict[str, tuple[int, ...]] = {}
    #: The seq of each of those PayloadDelivered events.
    delivered_at: dict[str, int] = {}
    #: Participant name -> seq of its reply this turn.
    replies: dict[str, int] = {}
    failures: dict[str, Error] = {}
    #: seq of the turn's incoming messages.
    inputs: list[int] = []


class DialogueState(msgspec.Struct, kw_only=True):
    """Everything a dialogue's coordinator needs to go on, rebuilt from its events."""

    seq: int = 0
    status: Status = "open"
    mode: str = "broadcast"
    order: str = "completion"
    names: tuple[str, ...] = ()
    context: DialogueContext | None = None
    reaction: str | None = None
    metadata: dict[str, Any] | None = None
    mention_strategy: str | None = None
    #: Current participants, in the order they were added.
    participants: dict[str, ParticipantInfo] = {}
    #: Participants that joined late and have not had their first payload yet.
    pending_joiners: dict[str, JoiningStrategy] = {}
    #: Per participant, the highest message seq it has been given (or skipped when it
    #: joined): the participant has received every message up to this seq except its own.
    delivered: dict[str, int] = {}
    #: Messages that some participant has not received yet, by seq.
    messages: dict[int, DialogueMessage] = {}
    message_count: int = 0
    last_message_seq: int = 0
    #: The turn of the latest incoming message (ahead of ``current.turn`` while an
    #: input is stored but its turn has not started: a non-reacting input, or a crash).
    input_turn: int = 0
    #: The last turn that failed before it started (its moderator failed).
    failed_turn: int = 0
    #: The last turn that produced at least one agent reply.
    last_agent_turn: int = 0
    current: TurnState = msgspec.field(default_factory=TurnState)
    usage: Usage = Usage()
    close_reason: str | None = None

    @property
    def turn(self) -> int:
        return self.current.turn

    def undelivered(self, participant: str) -> list[int]:
        """Seqs of the messages ``participant`` has not received yet, in order (own excluded)."""
        return list(Backlog(self).of(participant)[0])


_T = TypeVar("_T")
#: Messages after one delivery mark: seqs, messages, and where each speaker's ones are.
_After = tuple[tuple[int, ...], tuple["DialogueMessage", ...], dict[str, list[int]]]


class Backlog:
    """What each participant has not received yet, at one moment of a dialogue.

    Built once for all the payloads of a turn: participants that were given the same
    messages share one list, and each one's own messages are cut out of it by slicing,
    so a broadcast to n participants costs about n tuple copies instead of n scans of
    every kept message. The state must not change while the backlog is in use.
    """

    def __init__(self, state: DialogueState) -> None:
        self._state = state
        #: delivery mark -> (seqs, messages, positions of each speaker's messages)
        self._after: dict[int, _After] = {}

    def of(self, participant: str) -> tuple[tuple[int, ...], tuple[DialogueMessage, ...]]:
        """Seqs and messages ``participant`` has not received, in order (own excluded)."""
        mark = self._state.delivered.get(participant, 0)
        after = self._after.get(mark)
        if after is None:
            kept = [(seq, m) for seq, m in self._state.messages.items() if seq > mark]
            speakers: dict[str, list[int]] = {}
            for i, (_, m) in enumerate(kept):
                speakers.setdefault(m.speaker.name, []).append(i)
            seqs = tuple(seq for seq, _ in kept)
            after = self._after[mark] = (seqs, tuple(m for _, m in kept), speakers)
        seqs, messages, speakers = after
        own = speakers.get(participant)
        if not own:
            return seqs, messages
        return _cut(seqs, own), _cut(messages, own)


def _cut(items: tuple[_T, ...], positions: list[int]) -> tuple[_T, ...]:
    """``items`` without the items at ``positions`` (ascending)."""
    kept: list[_T] = []
    start = 0
    for i in positions:
        kept.extend(items[start:i])
        start = i + 1
    kept.extend(items[start:])
    return tuple(kept)


def _start_dialogue(ev: DialogueStarted) -> DialogueState:
    return DialogueState(
        seq=1,
        mode=ev.mode,
        order=ev.order,
        names=ev.names,
        context=ev.context,
        reaction=ev.reaction,
        metadata=ev.metadata,
        mention_strategy=ev.mention_strategy,
        participants={p.name: p for p in ev.participants},
        delivered={p.name: 0 for p in ev.participants},
    )


def _evolve_dialogue(s: DialogueState, ev: Event) -> DialogueState:
    s.seq += 1
    match ev:
        case DialogueMessage():
            s.messages[s.seq] = ev
            s.message_count += 1
            s.last_message_seq = s.seq
            if ev.origin == "incoming":
                s.input_turn = max(s.input_turn, ev.turn)
                if ev.turn == s.current.turn:
                    s.current.inputs.append(s.seq)
            else:
                s.current.replies[ev.speaker.name] = s.seq
                s.last_agent_turn = ev.turn
                if ev.usage is not None:
                    s.usage = s.usage + ev.usage
        case PayloadDelivered():
            s.current.payloads[ev.participant] = ev.messages
            s.current.delivered_at[ev.participant] = s.seq
            s.pending_joiners.pop(ev.participant, None)
            if ev.messages:
                s.delivered[ev.participant] = max(
                    s.delivered.get(ev.participant, 0), ev.messages[-1]
                )
            _prune(s)
        case TurnStarted():
            inputs = [
                q for q, m in s.messages.items() if m.origin == "incoming" and m.turn == ev.turn
            ]
            s.current = TurnState(
                turn=ev.turn,
                open=True,
                speakers=ev.speakers,
                mode=ev.mode,
                order=ev.order,
                inputs=inputs,
            )
        case ParticipantFailed():
            if ev.turn == s.current.turn:
                s.current.failures[ev.participant] = ev.error
            else:  # a moderator fails before its turn starts: that turn is over
                s.failed_turn = max(s.failed_turn, ev.turn)
        case TurnCompleted():
            s.current.open = False
        case ParticipantJoined():
            s.participants[ev.participant.name] = ev.participant
            s.pending_joiners[ev.participant.name] = ev.strategy
            # History before the join is the strategy's business (read from the log
            # when the first payload is built), so it does not pin messages in memory.
            s.delivered[ev.participant.name] = s.last_message_seq
        case ParticipantRemoved():
            s.participants.pop(ev.name, None)
            s.pending_joiners.pop(ev.name, None)
            s.delivered.pop(ev.name, None)
            _prune(s)
        case DialogueClosed():
            s.close_reason = ev.reason
        case _:
            raise TypeError(f"{type(ev).__name__} does not belong in a dialogue stream")
    if s.status != "open" or type(ev) in STATUS_EVENTS:  # skip the call for the rest
        s.status = next_status(s.status, ev)
    return s


def _prune(s: DialogueState) -> None:
    """Forget messages every current participant has received."""
    if not s.messages:
        return
    low = min(s.delivered.values(), default=s.last_message_seq)
    if next(iter(s.messages)) > low:
        return
    s.messages = {seq: m for seq, m in s.messages.items() if seq > low}


# -------------------------------------------------------------------- tool loop


class LoopState(msgspec.Struct, kw_only=True):
    """A tool loop rebuilt from its events: the history the next model call sees, and more."""

    seq: int = 0
    status: Status = "open"
    parent: LoopParent | None = None
    depth: int = 0
    config: LoopConfigInfo = LoopConfigInfo()
    tools: tuple[ToolSpec, ...] = ()
    model: str | None = None
    #: The chat history exactly as the next model call will see it.
    messages: list[ChatMessage] = []
    #: The last iteration started (1-based).
    iteration: int = 0
    #: The last iteration whose model call answered (less than ``iteration`` while a
    #: call is in flight, or was when the process stopped).
    answered: int = 0
    usage: Usage = Usage()
    #: Calls of the last response that are still waiting for their results, in call order.
    round_calls: list[ToolCallBlock] = []
    #: Results received so far for ``round_calls``, by call id.
    results: dict[str, ToolResultBlock] = {}
    #: Calls waiting for a person's decision.
    awaiting: list[ToolCallBlock] = []
    #: Decisions taken this round, by call id.
    decisions: dict[str, ToolCallDecided] = {}
    #: Tools started and not ended (what a crash interrupted), by call id.
    running: dict[str, ToolExecutionStart] = {}
    last_response: tuple[ContentBlock, ...] = ()
    stop_reason: str | None = None
    #: Loop detection: the signature of the last set of tool calls, and how many
    #: responses in a row asked for exactly that set (reset by an injected warning).
    repeat_signature: str = ""
    repeat_count: int = 0
    detections: int = 0
    #: Results fed back to the model so far, and those of the last complete round.
    calls_executed: int = 0
    last_results: tuple[ToolResultBlock, ...] = ()
    #: A loop detection whose warning is still to be injected after its round.
    warning_due: LoopDetected | None = None
    masked_results: int = 0
    tokens_saved: int = 0
    termination: Termination | None = None
    response: tuple[ContentBlock, ...] = ()
    error: Error | None = None

    @property
    def finished(self) -> bool:
        return self.status in _TERMINAL


def denied_result(call_id: str, reason: str | None) -> ToolResultBlock:
    """The error result a denied call sends back to the model."""
    text = "Tool call denied" + (f": {reason}" if reason else "")
    return ToolResultBlock(tool_call_id=call_id, content=text, is_error=True)


def _start_loop(ev: LoopStarted) -> LoopState:
    return LoopState(
        seq=1,
        parent=ev.parent,
        depth=ev.depth,
        config=ev.config,
        tools=ev.tools,
        model=ev.model,
        messages=list(ev.messages),
    )


def _evolve_loop(s: LoopState, ev: Event) -> LoopState:  # noqa: PLR0915  one case per event
    s.seq += 1
    match ev:
        case IterationStart():
            s.iteration = ev.iteration
        case LlmResponse():
            s.usage = s.usage + ev.usage
            s.messages.append(ChatMessage(role="assistant", content=ev.content))
            s.last_response = ev.content
            s.stop_reason = ev.stop_reason
            s.answered = ev.iteration
            s.round_calls = [b for b in ev.content if isinstance(b, ToolCallBlock)]
            s.results = {}
            s.decisions = {}
            if s.round_calls:
                signature = call_signature(s.round_calls)
                same = signature == s.repeat_signature
                s.repeat_signature = signature
                s.repeat_count = s.repeat_count + 1 if same else 1
        case ToolExecutionStart():
            s.running[ev.call_id] = ev
        case ToolExecutionEnd():
            s.running.pop(ev.call_id, None)
            _add_result(s, ToolResultBlock(ev.call_id, ev.content, ev.is_error))
        case ApprovalRequested():
            s.awaiting = list(ev.calls)
        case ToolCallDecided():
            s.awaiting = [c for c in s.awaiting if c.id != ev.call_id]
            s.decisions[ev.call_id] = ev
            if ev.decision == "deny":
                _add_result(s, denied_result(ev.call_id, ev.reason))
        case LoopDetected():
            s.detections += 1
            if ev.action == "inject_warning":
                s.repeat_count = 0
                s.warning_due = ev
        case MessagesInjected():
            s.messages.extend(ev.messages)
            if ev.source == "loop_detection":
                s.warning_due = None
        case ObservationsMasked():
            _mask(s, ev.masked_count)
            s.tokens_saved += ev.tokens_saved
        case Done():
            s.termination = ev.termination
            s.response = ev.response
            s.awaiting = []  # a loop stopped while paused waits for nobody
        case LoopFailed():
            s.error = ev.error
            s.awaiting = []
        case _:
            raise TypeError(f"{type(ev).__name__} does not belong in a loop stream")
    if s.status != "open" or type(ev) in STATUS_EVENTS:
        s.status = next_status(s.status, ev)
    return s


def call_signature(calls: list[ToolCallBlock] | tuple[ToolCallBlock, ...]) -> str:
    """The names and arguments of a set of tool calls, whatever the order of calls or keys.

    Two responses asking for the same set of calls have the same signature.
    """
    parts = sorted(
        msgspec.json.encode([c.name, c.arguments], order="sorted").decode() for c in calls
    )
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _add_result(s: LoopState, result: ToolResultBlock) -> None:
    """Collect a result; once the round is complete, feed all of them back in call order."""
    s.results[result.tool_call_id] = result
    if s.round_calls and all(c.id in s.results for c in s.round_calls):
        content = tuple(s.results[c.id] for c in s.round_calls)
        s.messages.append(ChatMessage(role="tool", content=content))
        s.calls_executed += len(content)
        s.last_results = content
        s.round_calls = []
        s.results = {}


def _mask(s: LoopState, count: int) -> None:
    """Replace the oldest ``count`` unmasked results with :data:`MASKED_RESULT`.

    Error results are never masked: the model needs to know what went wrong.
    """
    left = count
    for i, msg in enumerate(s.messages):
        if left <= 0:
            break
        if msg.role != "tool":
            continue
        blocks = list(msg.content)
        for j, block in enumerate(blocks):
            if (
                left > 0
                and isinstance(block, ToolResultBlock)
                and not block.is_error
                and block.content != MASKED_RESULT
            ):
                blocks[j] = msgspec.structs.replace(block, content=MASKED_RESULT)
                left -= 1
        s.messages[i] = ChatMessage(role="tool", content=tuple(blocks))
    s.masked_results += count - left


# ------------------------------------------------------------------------ both

State = DialogueState | LoopState


def evolve(state: State | None, event: Event) -> State:
    """Fold one event into a state. ``state`` is None before the stream's first event.

    Raises:
        TypeError: the event does not fit the stream (a loop event in a dialogue, or a
            first event other than DialogueStarted / LoopStarted).
    """
    if state is None:
        if isinstance(event, DialogueStarted):
            return _start_dialogue(event)
        if isinstance(event, LoopStarted):
            return _start_loop(event)
        raise TypeError(
            f"a stream must start with DialogueStarted or LoopStarted, not {type(event).__name__}"
        )
    if isinstance(state, DialogueState):
        return _evolve_dialogue(state, event)
    return _evolve_loop(state, event)


def fold(events: Any) -> State | None:
    """Fold an iterable of events from the start of a stream."""
    state: State | None = None
    for event in events:
        state = evolve(state, event)
    return state
