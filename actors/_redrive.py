"""Re-drive: run a scenario again against what a stream's log recorded, and compare.

The program runs again for real (coordinator, prompts, loops, scripted agents, the
tools that are safe to run again) into a scratch in-memory log, while everything that
reaches outside is served from the log:

- a live model (openai, anthropic, a factory) answers with the replies it gave then, in
  the order it gave them, whatever the request: identical prompts get their recorded
  answers in order. A request beyond what was recorded fails loudly with
  :class:`ReplayMissing`; nothing is ever sent to a real model;
- a tool that is not idempotent is not run: the result it gave then is served, by call;
  an idempotent tool runs again and its result is compared.

Then the new run's events are compared with the log's, stream by stream. Replies that
run concurrently may finish in another order, so a dialogue turn is compared as a
whole (payloads by the messages they name, replies by speaker), and a loop's tool
round by call id. The first event that differs is the divergence: its position in the
log, what the log holds, and what the new run did.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections import defaultdict, deque
from typing import TYPE_CHECKING, Any

import msgspec

from moot.events import (
    ApprovalRequested,
    ContentBlock,
    DialogueMessage,
    Done,
    Error,
    Event,
    IterationStart,
    LlmResponse,
    LoopFailed,
    LoopStarted,
    ParticipantFailed,
    PayloadDelivered,
    ReasoningBlock,
    TextBlock,
    ToolCallBlock,
    ToolCallDecided,
    ToolExecutionEnd,
    ToolExecutionStart,
    TurnCompleted,
    TurnStarted,
    Usage,
)
from moot.store import MemoryEventLog

from ._errors import DialogueError, ProviderError, ProviderTimeout
from ._loop import Approval, Failed, NestedLoop, Paused, ToolLoopHandle, started_from
from ._loop_agent import ToolLoopAgent, loop_stream_id
from ._model import (
    Delta,
    Finished,
    ModelRequest,
    ModelResponse,
    ReasoningDelta,
    TextDelta,
    ToolCallComplete,
    ToolCallStart,
    UsageDelta,
    assemble,
    request_digest,
)
from ._scenario import AgentSpec, LoopScenario, Scenario, run_dialogue, run_loop
from ._tools import ToolContext, ToolOutcome, ToolRegistry

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

    from moot.store import LogBase

    from ._agents import Agent

__all__ = [
    "Divergence",
    "RecordedProvider",
    "RecordedTools",
    "RedriveReport",
    "ReplayMissing",
    "redrive",
]


class ReplayMissing(ProviderError):
    """The new run asked for something the log does not hold (never a live call)."""

    kind = "replay_missing"


class RequestChanged(ProviderError):
    """The new run's request to a model differs from the one on record."""

    kind = "request_changed"


class Divergence(msgspec.Struct, frozen=True):
    """Where a re-driven run first differs from the log."""

    stream: str
    #: The position (in the log) of the first event that differs; None when the new run
    #: went further than the log.
    position: int | None
    expected: str
    actual: str


class RedriveReport(msgspec.Struct, frozen=True):
    ok: bool
    compared: int
    divergence: Divergence | None = None


# ------------------------------------------------------------- recorded model


#: A recorded model call: its reply (or error), and the digest of its request, if known.
Recorded = tuple[ModelResponse | Error, str | None]


class RecordedProvider:
    """Plays back recorded replies (or errors), in order, for one agent."""

    name = "recorded"

    def __init__(
        self,
        replies: list[Recorded],
        *,
        label: str,
        model: str | None = None,
    ) -> None:
        self.label = label
        self.model = model
        self._replies = deque(replies)
        self._served = 0
        self._lock = threading.Lock()

    def skip(self, count: int) -> None:
        """Resuming agents skip what is on record; a re-drive starts from the start."""

    def stream(self, request: ModelRequest, *, deadline: float | None = None) -> Iterator[Delta]:
        with self._lock:
            if not self._replies:
                raise ReplayMissing(
                    f"{self.label}: no recorded reply for model call #{self._served + 1} "
                    "(the log has fewer calls)"
                )
            reply, digest = self._replies.popleft()
            self._served += 1
        if digest is not None and request_digest(request) != digest:
            raise RequestChanged(
                f"{self.label}: the request of model call #{self._served} differs from the "
                f"recording (digest {request_digest(request)}, recorded {digest})"
            )
        if isinstance(reply, Error):
            if reply.kind == _CUT_BY_DEADLINE:  # as then: the loop's deadline passes
                if deadline is not None:
                    threading.Event().wait(max(0.0, deadline - time.monotonic()))
                raise ProviderTimeout(reply.message)
            raise _replayed_error(reply)  # as recorded, at once (a read timeout, say)
        yield from response_deltas(reply)

    def complete(self, request: ModelRequest, *, deadline: float | None = None) -> ModelResponse:
        return assemble(self.stream(request, deadline=deadline))


#: A recorded model call the loop's deadline cut short (it ended in Done, not an error):
#: re-drive waits for the deadline again, where a recorded error is raised at once.
_CUT_BY_DEADLINE = "cut_by_deadline"


def _replayed_error(error: Error) -> ProviderError:
    exc = (
        ProviderTimeout(error.message) if error.kind == "timeout" else ProviderError(error.message)
    )
    exc.kind = error.kind
    exc.retryable = error.retryable
    return exc


def response_deltas(reply: ModelResponse) -> Iterator[Delta]:
    """A recorded reply as the deltas a provider would stream."""
    index = 0
    for block in reply.content:
        match block:
            case ToolCallBlock():
                yield ToolCallStart(index=index, id=block.id, name=block.name)
                yield ToolCallComplete(index=index, call=block)
                index += 1
            case TextBlock():
                yield TextDelta(text=block.text)
            case ReasoningBlock():
                yield ReasoningDelta(
                    text=block.text, signature=block.signature, redacted=block.redacted
                )
    yield UsageDelta(usage=reply.usage)
    yield Finished(stop_reason=reply.stop_reason, model=reply.model)


# ------------------------------------------------------------ recorded tools


class RecordedTools(ToolRegistry):
    """The same tools; results of the ones that are not idempotent come from the log."""

    def __init__(
        self, tools: ToolRegistry, results: dict[tuple[str, str], ToolExecutionEnd]
    ) -> None:
        super().__init__(tools)
        self._results = results

    def execute(
        self,
        call: ToolCallBlock,
        *,
        context: ToolContext | None = None,
        deadline: float | None = None,
        arguments_override: Mapping[str, Any] | None = None,
    ) -> ToolOutcome:
        tool = self.get(call.name)
        if tool is not None and tool.idempotent:
            return super().execute(
                call, context=context, deadline=deadline, arguments_override=arguments_override
            )
        stream = context.stream if context is not None else ""
        recorded = self._results.get((stream, call.id))
        if recorded is None:
            return ToolOutcome(
                content=f"no recorded result for {call.name} ({call.id})", is_error=True, attempts=0
            )
        return ToolOutcome(
            content=recorded.content,
            is_error=recorded.is_error,
            attempts=recorded.attempts,
            duration_ms=recorded.duration_ms,
        )


# --------------------------------------------------------------- collecting


class _Recording:
    """What a stream and its loops recorded, sorted for playback."""

    def __init__(self, log: LogBase, stream: str) -> None:
        self.log = log
        self.stream = stream
        self.streams = [stream, *descendants(log, stream)]
        self.events = {s: list(log.read(s)) for s in self.streams}

    def nested(
        self, results: dict[tuple[str, str], ToolExecutionEnd]
    ) -> Callable[[NestedLoop], NestedLoop]:
        """A :attr:`ToolLoopConfig.nested` hook: each loop a tool starts gets the stream
        id, the model replies and the tool results its recording holds."""

        def place(plan: NestedLoop) -> NestedLoop:
            recorded = started_from(self.log, plan.parent)
            if plan.index >= len(recorded):
                raise ReplayMissing(
                    f"{plan.parent.stream}: no recorded nested loop #{plan.index + 1} "
                    f"for the tool call at seq {plan.parent.seq}"
                )
            child = recorded[plan.index]
            return dataclasses.replace(
                plan,
                stream=child,
                provider=RecordedProvider(
                    self.loop_replies([child]), label=child, model=self.loop_model([child])
                ),
                tools=RecordedTools(plan.tools or ToolRegistry(), results),
            )

        return place

    def with_nested(self, streams: list[str]) -> list[str]:
        """These streams and the loops nested in them."""
        out = list(streams)
        for s in streams:
            out.extend(d for d in descendants(self.log, s) if d in self.events)
        return out

    def tool_results(self) -> dict[tuple[str, str], ToolExecutionEnd]:
        return {
            (s, r.event.call_id): r.event
            for s, records in self.events.items()
            for r in records
            if isinstance(r.event, ToolExecutionEnd)
        }

    def loop_replies(self, streams: list[str]) -> list[Recorded]:
        """The model calls of these loops: each response, and each call that failed
        (a LoopFailed while a call was in flight; other failures are not the model's)."""
        out: list[Recorded] = []
        for s in streams:
            in_flight = False
            for r in self.events.get(s, []):
                e = r.event
                if isinstance(e, IterationStart):
                    in_flight = True
                elif isinstance(e, LlmResponse):
                    in_flight = False
                    response = ModelResponse(
                        content=e.content, usage=e.usage, stop_reason=e.stop_reason, model=e.model
                    )
                    out.append((response, e.request_digest))
                elif isinstance(e, LoopFailed) and in_flight:
                    out.append((e.error, None))
                elif isinstance(e, Done) and in_flight:  # the loop's deadline cut the call
                    out.append(
                        (Error(kind=_CUT_BY_DEADLINE, message="cut off by the deadline"), None)
                    )
        return out

    def decisions(self, streams: list[str]) -> _RecordedDecisions:
        """Who decided what in these loops: asked calls are asked again, and answered
        with the person's recorded decision; the policy's own decisions repeat."""
        decided: dict[str, deque[ToolCallDecided]] = defaultdict(deque)
        asked: dict[str, str | None] = {}
        for s in streams:
            for r in self.events.get(s, []):
                if isinstance(r.event, ToolCallDecided):
                    decided[r.event.call_id].append(r.event)
                elif isinstance(r.event, ApprovalRequested):
                    asked.update((c.id, r.event.reason) for c in r.event.calls)
        return _RecordedDecisions(decided, asked)

    def loop_model(self, streams: list[str]) -> str | None:
        """The model the loops recorded (what LoopStarted says), for a faithful replay."""
        for s in streams:
            for r in self.events.get(s, [])[:1]:
                if isinstance(r.event, LoopStarted):
                    return r.event.model
        return None

    def participant_replies(self, name: str) -> list[Recorded]:
        out: list[Recorded] = []
        for r in self.events[self.stream]:
            e = r.event
            if isinstance(e, DialogueMessage) and e.origin == "agent" and e.speaker.name == name:
                response = ModelResponse(
                    content=_text(e.content), usage=e.usage or Usage(), model=e.model
                )
                out.append((response, e.request_digest))
            elif isinstance(e, ParticipantFailed) and e.participant == name:
                out.append((e.error, None))
        return out

    def participant_loops(self, name: str) -> list[str]:
        prefix = loop_stream_id(self.stream, name, 0)[:-1]
        return sorted(
            (s for s in self.streams if s.startswith(prefix)),
            key=lambda s: int(s[len(prefix) :] or 0),
        )

    def moderator_replies(self) -> list[Recorded]:
        """The moderator's choices, as recorded in each TurnStarted, and its failures."""
        out: list[Recorded] = []
        for r in self.events[self.stream]:
            e = r.event
            if isinstance(e, TurnStarted):
                choice = {"mode": e.mode, "order": e.order, "names": list(e.speakers)}
                out.append(
                    (ModelResponse(content=_text(msgspec.json.encode(choice).decode())), None)
                )
            elif isinstance(e, ParticipantFailed) and e.participant == "moderator":
                out.append((e.error, None))
        return out


def _text(text: str) -> tuple[ContentBlock, ...]:
    return (TextBlock(text=text),) if text else ()


def _answering(agent: Agent, decisions: _RecordedDecisions | None) -> Agent:
    """A tool-loop agent whose pauses are answered from the recording."""
    if decisions is not None and isinstance(agent, ToolLoopAgent):
        agent.on_pause = decisions.on_pause
    return agent


def _live(spec: AgentSpec) -> bool:
    return spec.kind != "scripted"


class _RecordedDecisions:
    """Approvals as the log recorded them: the policy, and the person while paused."""

    def __init__(
        self, decided: dict[str, deque[ToolCallDecided]], asked: dict[str, str | None]
    ) -> None:
        self._decided = decided
        self._asked = asked

    def policy(self, call: ToolCallBlock) -> Approval:
        if call.id in self._asked:
            return Approval("ask", self._asked[call.id])
        if self._decided[call.id]:
            d = self._decided[call.id].popleft()
            return Approval(d.decision, d.reason, d.arguments)
        return Approval("approve")

    def on_pause(self, handle: ToolLoopHandle, paused: Paused) -> None:
        """Decide each paused call as the person did; a call never decided is denied
        (the new run must not wait, and the difference shows as a divergence)."""
        for call in paused.calls:
            if self._decided[call.id]:
                d = self._decided[call.id].popleft()
                handle.decide(call.id, d.decision, reason=d.reason, arguments=d.arguments)
            else:
                handle.decide(call.id, "deny", reason="no decision on record")


# ------------------------------------------------------------------ running


def redrive(scenario: Scenario | LoopScenario, log: LogBase, stream: str) -> RedriveReport:
    """Run ``scenario`` again against ``stream``'s recording and compare.

    The original log is only read. Returns a report whose ``divergence`` says where the
    new run first differs.
    """
    recording = _Recording(log, stream)
    scratch = MemoryEventLog()
    try:
        if isinstance(scenario, LoopScenario):
            _run_loop(scenario, recording, scratch)
        else:
            _run_dialogue(scenario, recording, scratch)
        return compare(log, scratch, stream)
    finally:
        scratch.close()


#: How long a re-driven reply waits for the replies the log has before it (a reply that
#: never comes shows as a divergence anyway; waiting longer would only slow the report).
_ORDER_WAIT = 10.0


class _RecordedOrder:
    """Hands a turn's replies to the coordinator in the order the log recorded them.

    Concurrent replies finish in any order, and the order they are recorded in is part
    of what later prompts see (a late joiner's history, say): left to chance, a
    re-drive would diverge where nothing changed. Each reply therefore waits until the
    replies recorded before it in its turn are in the new run's log (those of the
    turn's speakers; a failure counts as a reply).
    """

    def __init__(self, recording: _Recording, scratch: LogBase) -> None:
        self.scratch = scratch
        self.stream = recording.stream
        self.order: dict[int, list[str]] = defaultdict(list)
        for r in recording.events[recording.stream]:
            name = _outcome_of(r.event)
            if name is not None:
                self.order[r.event.turn].append(name)  # type: ignore[union-attr]

    def wait_for_earlier(self, turn: int, name: str) -> None:
        recorded = self.order.get(turn, [])
        if name not in recorded:
            return
        earlier = set(recorded[: recorded.index(name)])
        if not earlier:
            return
        deadline = time.monotonic() + _ORDER_WAIT
        with self.scratch.subscribe(stream=self.stream) as followed:
            speakers: set[str] = set()
            done: set[str] = set()
            while True:
                record = followed.next(timeout=max(0.0, deadline - time.monotonic()))
                if record is None:
                    return  # never came: the comparison will say so
                event = record.event
                if isinstance(event, TurnStarted) and event.turn == turn:
                    speakers = set(event.speakers)
                elif getattr(event, "turn", None) == turn and _outcome_of(event) is not None:
                    done.add(_outcome_of(event))  # type: ignore[arg-type]
                if speakers and not (earlier & speakers) - done:
                    return


def _outcome_of(event: Event) -> str | None:
    """The participant whose turn outcome ``event`` is (a reply or a failure), if any."""
    if isinstance(event, DialogueMessage) and event.origin == "agent":
        return event.speaker.name
    if isinstance(event, ParticipantFailed) and event.participant != "moderator":
        return event.participant
    return None


class _InRecordedOrder:
    """An agent whose answers are handed over in the recorded order (see above)."""

    def __init__(self, agent: Agent, name: str, order: _RecordedOrder) -> None:
        self.agent = agent
        self.name = name
        self.order = order

    def respond(self, payload: Any) -> Any:
        try:
            answer = self.agent.respond(payload)
        except BaseException:
            self.order.wait_for_earlier(payload.turn, self.name)
            raise
        self.order.wait_for_earlier(payload.turn, self.name)
        return answer

    def __getattr__(self, attribute: str) -> Any:  # restore, loops, ...: the agent's own
        return getattr(self.agent, attribute)


def _run_dialogue(scenario: Scenario, recording: _Recording, scratch: LogBase) -> None:
    results = recording.tool_results()
    nested = recording.nested(results)
    order = _RecordedOrder(recording, scratch)

    def make(spec: AgentSpec) -> Agent:
        agent = build(spec)
        if spec is scenario.moderator:
            return agent
        return _InRecordedOrder(agent, str(spec.table.get("name", "")), order)

    def build(spec: AgentSpec) -> Agent:
        tools = spec.tools()
        replay_tools = RecordedTools(tools, results) if tools is not None else None
        name = str(spec.table.get("name", ""))
        config = None
        decisions = None
        if tools is not None:  # decisions come from the log: nobody is asked again
            decisions = recording.decisions(
                recording.with_nested(recording.participant_loops(name))
            )
            config = dataclasses.replace(
                spec.loop_config(), approval=decisions.policy, nested=nested
            )
        if not _live(spec):
            return _answering(spec.build(scratch, tools=replay_tools, config=config), decisions)
        model = None
        if spec is scenario.moderator:
            replies = recording.moderator_replies()
        elif tools is not None:
            loops = recording.participant_loops(name)
            replies, model = recording.loop_replies(loops), recording.loop_model(loops)
        else:
            replies = recording.participant_replies(name)
        provider = RecordedProvider(replies, label=name, model=model)
        built = spec.build(scratch, provider=provider, tools=replay_tools, config=config)
        return _answering(built, decisions)

    # A turn that could not run then cannot now either: compare what there is.
    with contextlib.suppress(DialogueError):
        run_dialogue(scenario, scratch, stream=recording.stream, make_agent=make)


def _run_loop(scenario: LoopScenario, recording: _Recording, scratch: LogBase) -> None:
    spec = scenario.agent
    results = recording.tool_results()
    tools = RecordedTools(spec.tools() or ToolRegistry(), results)
    provider = None
    if _live(spec):
        provider = RecordedProvider(
            recording.loop_replies([recording.stream]),
            label="loop",
            model=recording.loop_model([recording.stream]),
        )
    decisions = recording.decisions(recording.streams)
    config = dataclasses.replace(
        spec.loop_config(), approval=decisions.policy, nested=recording.nested(results)
    )
    outcome = run_loop(
        scenario,
        scratch,
        stream=recording.stream,
        provider=provider,
        tools=tools,
        config=config,
        on_pause=decisions.on_pause,
    )
    assert isinstance(outcome, Failed) or outcome.stream == recording.stream


# ---------------------------------------------------------------- comparing


def compare(log: LogBase, new: LogBase, stream: str) -> RedriveReport:
    """Compare ``stream`` and its loops in ``log`` with the same streams in ``new``.

    Each stream is compared on its own; of their first differences, the one earliest
    in the log is reported (a difference past the end of the log comes last).
    """
    compared = 0
    children = set(descendants(log, stream)) | set(descendants(new, stream))
    found: list[Divergence] = []
    for s in [stream, *sorted(children)]:
        old_groups = _groups(list(log.read(s)))
        new_groups = _groups(list(new.read(s)))
        for i in range(max(len(old_groups), len(new_groups))):
            old = old_groups[i] if i < len(old_groups) else []
            fresh = new_groups[i] if i < len(new_groups) else []
            divergence = _first_difference(s, old, fresh)
            if divergence is not None:
                found.append(divergence)
                break
            compared += len(old)
    if not found:
        return RedriveReport(ok=True, compared=compared)
    first = min(found, key=lambda d: (d.position is None, d.position or 0))
    return RedriveReport(ok=False, compared=compared, divergence=first)


def descendants(log: LogBase, stream: str) -> list[str]:
    """The loops ``stream`` started, the loops they started, and so on."""
    children: dict[str, list[str]] = defaultdict(list)
    for head in log.streams():
        if head.parent is not None:
            children[head.parent].append(head.stream)
    out: list[str] = []
    todo = [stream]
    while todo:
        found = sorted(children[todo.pop()])
        out.extend(found)
        todo.extend(found)
    return out


Group = list[tuple[int, Any]]  # (position, canonical form)


def _groups(records: list[Any]) -> list[Group]:
    """Events in comparable groups: a dialogue turn's concurrent part, a loop's tool round."""
    groups: list[Group] = []
    current: Group = []
    concurrent = False
    for record in records:
        event = record.event
        opens = isinstance(event, TurnStarted | ToolExecutionStart)
        closes = isinstance(event, TurnCompleted | LlmResponse | Done | LoopFailed)
        if opens and not concurrent:
            groups.append(current)
            current, concurrent = [], True
        elif closes and concurrent:
            groups.append(current)
            current, concurrent = [], False
        current.append((record.position, _canonical(event, records)))
    groups.append(current)
    return [g for g in groups if g]


_VOLATILE = {"latency_ms", "duration_ms", "completion_index", "type"}


def _canonical(event: Event, records: list[Any]) -> Any:
    """What must match: the event without timings, its payload by content not seq."""
    body = msgspec.to_builtins(event)
    for key in _VOLATILE:
        body.pop(key, None)
    if isinstance(event, PayloadDelivered):
        by_seq = {r.seq: r.event for r in records}
        body["messages"] = sorted(
            (m.turn, m.speaker.name, m.content)
            for m in (by_seq[s] for s in event.messages)
            if isinstance(m, DialogueMessage)
        )
    if isinstance(event, TurnCompleted):  # in completion order, which may differ
        body["yielded"] = sorted(body.get("yielded", ()))
        body["failed"] = sorted(body.get("failed", ()))
    return [type(event).__name__, body]


def _first_difference(stream: str, old: Group, new: Group) -> Divergence | None:
    """The first event of ``old`` (in log order) that ``new`` lacks, or an extra one."""
    unmatched_new = [item for _, item in new]
    for position, item in old:
        key = _key(item)
        match = next((i for i, n in enumerate(unmatched_new) if _key(n) == key), None)
        if match is not None:
            unmatched_new.pop(match)
            continue
        actual = _closest(item, unmatched_new)
        return Divergence(
            stream=stream,
            position=position,
            expected=key,
            actual=_key(actual) if actual is not None else "(nothing)",
        )
    if unmatched_new:
        return Divergence(
            stream=stream,
            position=None,
            expected="(nothing: the log ends)",
            actual=_key(unmatched_new[0]),
        )
    return None


def _key(item: Any) -> str:
    return msgspec.json.encode(item, order="sorted").decode()


def _closest(item: Any, candidates: list[Any]) -> Any:
    """The new event most like the expected one: same type, same speaker/call if any."""
    kind, body = item
    same = [c for c in candidates if c[0] == kind]
    for field in ("participant", "call_id", "speaker", "iteration"):
        narrowed = [c for c in same if c[1].get(field) == body.get(field)]
        if narrowed:
            same = narrowed
    if same:
        return same[0]
    return candidates[0] if candidates else None
