"""Tool loops: call a model, run the tools it asks for, repeat until a reason to stop.

Each loop is a pykka actor writing its own stream. Every step is appended as it
happens, in causal order: ``IterationStart`` before the model call, ``LlmResponse``
after it, ``ToolExecutionStart`` before each tool runs and ``ToolExecutionEnd`` after,
and one terminal ``Done`` or ``LoopFailed``. (A response is committed together with
what follows from it, the tool starts or ``Done``, still before any tool runs.) The
history the next model call sees is ``LoopState.messages``, folded from those events:
there is no other copy.

A :class:`ToolLoopHandle` drives the loop from any thread: :meth:`~ToolLoopHandle.next_turn`
runs one iteration and returns what happened (tools ran, finished, failed, or paused for
a person's approval); between iterations the caller may continue, inject messages, or
stop. :meth:`~ToolLoopHandle.run` drives it to the end. A loop picks up after a crash
with :meth:`ToolLoop.resume`, and waits for approvals across restarts.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

import msgspec
import pykka

from moot.events import (
    MASKED_RESULT,
    ApprovalRequested,
    ChatMessage,
    ContentBlock,
    Done,
    Error,
    IterationStart,
    LlmResponse,
    LoopConfigInfo,
    LoopDetected,
    LoopDetectionInfo,
    LoopFailed,
    LoopParent,
    LoopStarted,
    LoopState,
    MessagesInjected,
    ObservationsMasked,
    Termination,
    ToolCallBlock,
    ToolCallDecided,
    ToolExecutionEnd,
    ToolExecutionStart,
    ToolResultBlock,
    Usage,
    checked,
    text_of,
)
from moot.store import StoreError

from ._errors import ProviderError, ProviderTimeout, ToolLoopError, error_record, storable_text
from ._journal import Journal
from ._lease import StreamBusy, lease
from ._model import (
    Delta,
    ModelRequest,
    ModelResponse,
    Provider,
    call_model,
    request_digest,
)
from ._tools import ToolContext, ToolRegistry

if TYPE_CHECKING:
    from moot.store import LogBase

__all__ = [
    "INTERRUPTED",
    "Approval",
    "Completed",
    "Failed",
    "LoopResult",
    "Paused",
    "Pricing",
    "StopContext",
    "ToolLoop",
    "ToolLoopConfig",
    "ToolLoopHandle",
    "Yielded",
    "approve",
    "ask_person",
    "decision_event",
    "deny",
    "modify",
]

logger = logging.getLogger("moot.actors.loop")

_R = typing.TypeVar("_R")

LOOP_WARNING = (
    "Warning: you have called {tool} with identical arguments {count} times in a row. "
    "This looks like a loop; try a different approach or tool."
)
INTERRUPTED = "Tool '{tool}' was interrupted (the process stopped) and was not run again."


# ------------------------------------------------------------------- policies


@dataclass(frozen=True)
class Approval:
    """A decision on one tool call: approve, deny, modify its arguments, or ask a person."""

    decision: Literal["approve", "deny", "modify", "ask"]
    reason: str | None = None
    arguments: dict[str, Any] | None = None


#: The decisions a ToolCallDecided records (its schema is the one list of them).
_DECIDED = frozenset(typing.get_args(typing.get_type_hints(ToolCallDecided)["decision"]))


def approve() -> Approval:
    return Approval("approve")


def deny(reason: str | None = None) -> Approval:
    return Approval("deny", reason)


def modify(arguments: dict[str, Any], reason: str | None = None) -> Approval:
    return Approval("modify", reason, arguments)


def ask_person(reason: str | None = None) -> Approval:
    """Pause the loop until a person decides (through the API or ``moot approve``)."""
    return Approval("ask", reason)


@dataclass(frozen=True)
class StopContext:
    """What a stop condition sees after each model response."""

    iteration: int
    response: ModelResponse
    #: Usage of the whole loop so far, this response included.
    usage: Usage
    #: Tool calls executed (or denied) in earlier iterations.
    calls_executed: int
    #: The results of the previous iteration's tool calls, in call order.
    last_results: tuple[ToolResultBlock, ...]


@dataclass(frozen=True)
class Pricing:
    """Prices per million tokens, by model name, for :meth:`LoopResult.cost`."""

    per_million: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def cost(self, model: str | None, usage: Usage) -> float:
        price_in, price_out = self.per_million.get(model or "", (0.0, 0.0))
        return (usage.input_tokens * price_in + usage.output_tokens * price_out) / 1_000_000


StopCondition = Callable[[StopContext], "bool | str | None"]
ApprovalPolicy = Callable[[ToolCallBlock], Approval]


@dataclass(frozen=True)
class ToolLoopConfig:
    """Everything that shapes a loop. Hooks are code; the rest is recorded in LoopStarted.

    Args:
        max_iterations: Model calls at most; hitting it ends with ``max_iterations``
            and keeps the last real response.
        parallel_tool_execution: Run the calls of one response at once.
        max_depth: How deep loops may nest (a loop started from a tool of a loop).
        timeout_s: A deadline for the whole loop; it also cuts a running model call or
            tool. None: no limit.
        stop_when: Sees each response (:class:`StopContext`); return True or a reason
            to stop before the tools run (any false value goes on).
        approval: Decides each tool call (see :func:`approve`, :func:`deny`,
            :func:`modify`, :func:`ask_person`). None approves everything.
        loop_detection: Threshold and action (warn, stop, inject_warning) for the same
            set of calls repeated.
        mask_keep_iterations: Keep this many recent rounds of tool results; older ones
            are replaced by a placeholder before the next model call. None: never.
        result_processor: ``(tool, content) -> content`` for every successful result.
        result_extractor: ``(tool, content, query) -> content | None`` for results above
            ``extract_above_tokens``; ``query`` is the last user message.
        result_cacher: ``(tool, content) -> summary | None`` for results above
            ``cache_above_tokens`` (store the content elsewhere, return a stand-in).
        stream: Use the streaming model API.
        pricing: For cost estimates.
        nested: Sees each loop a tool starts through ``ToolContext.runtime`` (a
            :class:`NestedLoop`) and returns it, changed or not: another provider,
            other tools, a stream id. Loops started from a nested loop inherit it.
            Re-drive uses it to serve nested loops from their recordings.
    """

    max_iterations: int = 10
    parallel_tool_execution: bool = True
    max_depth: int | None = 3
    timeout_s: float | None = None
    stop_when: StopCondition | None = None
    approval: ApprovalPolicy | None = None
    loop_detection: LoopDetectionInfo | None = None
    mask_keep_iterations: int | None = None
    result_processor: Callable[[str, str], str] | None = None
    result_extractor: Callable[[str, str, str], str | None] | None = None
    extract_above_tokens: int = 15_000
    result_cacher: Callable[[str, str], str | None] | None = None
    cache_above_tokens: int = 2_000
    stream: bool = True
    temperature: float | None = None
    max_tokens: int | None = None
    pricing: Pricing = field(default_factory=Pricing)
    nested: Callable[[NestedLoop], NestedLoop] | None = None

    @classmethod
    def from_record(cls, info: LoopConfigInfo, **hooks: Any) -> ToolLoopConfig:
        """The config a loop recorded in its LoopStarted, with ``hooks`` (and any other
        field given) added: what a resumed loop runs with when it is given no config."""
        recorded = {
            "max_iterations": info.max_iterations,
            "parallel_tool_execution": info.parallel_tool_execution,
            "timeout_s": info.timeout_s,
            "max_depth": info.max_depth,
            "loop_detection": info.loop_detection,
            "mask_keep_iterations": info.mask_keep_iterations,
        }
        return cls(**(recorded | hooks))

    def record(self) -> LoopConfigInfo:
        """The part of the config that goes into LoopStarted."""
        return LoopConfigInfo(
            max_iterations=self.max_iterations,
            parallel_tool_execution=self.parallel_tool_execution,
            timeout_s=self.timeout_s,
            max_depth=self.max_depth,
            loop_detection=self.loop_detection,
            mask_keep_iterations=self.mask_keep_iterations,
        )


def estimate_tokens(text: str) -> int:
    """A rough token count: a quarter of the UTF-8 length, at least 1 for non-empty text."""
    return 0 if not text else max(1, (len(text.encode()) + 3) // 4)


# -------------------------------------------------------------------- results


class LoopResult(msgspec.Struct, frozen=True, kw_only=True):
    """How a loop ended."""

    stream: str
    termination: Termination
    iterations: int
    usage: Usage
    response: tuple[ContentBlock, ...]
    model: str | None = None

    @property
    def text(self) -> str:
        return text_of(self.response)

    def cost(self, pricing: Pricing) -> float:
        return pricing.cost(self.model, self.usage)


class Yielded(msgspec.Struct, frozen=True, kw_only=True):
    """Tools ran; the loop waits for the caller (continue, inject, or stop)."""

    iteration: int
    calls: tuple[ToolCallBlock, ...]
    results: tuple[ToolResultBlock, ...]
    usage: Usage


class Completed(msgspec.Struct, frozen=True, kw_only=True):
    result: LoopResult


class Failed(msgspec.Struct, frozen=True, kw_only=True):
    """The loop failed; every later call returns this again."""

    error: Error
    iterations: int
    usage: Usage


class Paused(msgspec.Struct, frozen=True, kw_only=True):
    """The loop waits for a person to decide these calls."""

    calls: tuple[ToolCallBlock, ...]
    #: The stream's last seq when it paused: any event after it may be a decision.
    seq: int = 0


LoopTurn = Yielded | Completed | Failed | Paused


# ----------------------------------------------------------------- the engine


class _Command(msgspec.Struct, frozen=True):
    kind: Literal["continue", "inject", "stop"]
    messages: tuple[ChatMessage, ...] = ()
    reason: str | None = None


class _Engine:
    """One loop's logic, run in its actor's thread. Decides, appends, folds."""

    def __init__(
        self,
        journal: Journal[LoopState],
        provider: Provider,
        tools: ToolRegistry,
        config: ToolLoopConfig,
        *,
        on_delta: Callable[[Delta], None] | None,
        runtime: Any,
        deadline: float | None = None,
        release: Callable[[], None] = lambda: None,
    ) -> None:
        self.journal = journal
        #: Gives the stream's lease back (when the actor stops).
        self.release = release
        self.provider = provider
        self.tools = tools
        self.config = config
        self.on_delta = on_delta
        self.runtime = runtime
        self.started = time.monotonic()
        own = None if config.timeout_s is None else self.started + config.timeout_s
        #: The loop's own deadline, or an earlier one it was given (a nested loop's
        #: caller's): it cuts model calls and tools, and ends the loop with ``timeout``.
        self.deadline = min((d for d in (own, deadline) if d is not None), default=None)
        self.deadline_detail = (
            f"after {config.timeout_s} s"
            if self.deadline == own
            else "at the deadline of the loop that started it"
        )
        #: Handle commands since the last turn, in the order they came.
        self.commands: list[_Command] = []
        self.ask_reason: str | None = None
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        #: The tool-call ids in the first n messages of the history (see _unique_ids).
        self.call_ids: tuple[int, set[str]] = (0, set())

    @property
    def state(self) -> LoopState:
        return self.journal.state

    @property
    def stream(self) -> str:
        return self.journal.stream

    # ------------------------------------------------------------- one turn

    def next_turn(self) -> LoopTurn:
        """Run until the tools of one response have run, the loop ends, or it pauses.

        A user hook (stop condition, approval policy, result pipeline) that raises ends
        the loop with LoopFailed, on whatever path it runs; a store error propagates
        (the loop is not over: the log just could not be written).
        """
        try:
            return self._next_turn()
        except _HookFailed as failure:
            self.journal.commit()  # what happened before the hook failed is kept
            return self._fail(failure.error)
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001  a bug (ours, or a hook's bad value)
            self.journal.commit()
            return self._fail(exc)

    def _next_turn(self) -> LoopTurn:
        state = self.state
        if state.finished:
            return self._terminal()
        if state.awaiting:
            return self._after_decisions()
        if state.round_calls:  # a response whose tools have not all run (a restart)
            return self._run_round(state.round_calls)
        if state.answered < state.iteration:  # a model call in flight when it stopped
            return self._respond()
        return self._iterate()

    def _iterate(self) -> LoopTurn:
        state = self.state
        limit = self.config.max_depth
        if state.iteration == 0 and limit is not None and state.depth >= limit:
            return self._fail(
                ToolLoopError(f"max nesting depth exceeded (depth {state.depth}, limit {limit})")
            )
        stop = self._take_commands()
        if stop is not None:
            return self._done("stop_condition", stop.reason, state.last_response)
        if self._timed_out():
            return self._timeout(state.last_response)
        if state.warning_due is not None:  # a restart came between the round and its warning
            self._end_round(())
        if state.iteration >= self.config.max_iterations:
            return self._done(
                "max_iterations", f"limit {self.config.max_iterations}", state.last_response
            )
        events: list[Any] = [
            IterationStart(iteration=state.iteration + 1, message_count=len(state.messages))
        ]
        events.extend(self._masking(state.iteration + 1))
        self.journal.append(events)
        return self._respond()

    def _take_commands(self) -> _Command | None:
        """Record the messages the handle injected, in order, up to a stop; returns the
        stop, if one came (what came after it does not count)."""
        commands, self.commands = self.commands, []
        injected: list[ChatMessage] = []
        stop: _Command | None = None
        for command in commands:
            if command.kind == "stop":
                stop = command
                break
            injected.extend(command.messages)
        if injected:
            self.journal.append([MessagesInjected(messages=tuple(injected), source="command")])
        return stop

    def _respond(self) -> LoopTurn:
        """Call the model for the current iteration and act on its answer."""
        state = self.state
        request = self._request()
        try:
            response = call_model(
                self.provider,
                request,
                stream=self.config.stream,
                on_delta=self.on_delta,
                deadline=self.deadline,
            )
        except ProviderTimeout as exc:
            if self._timed_out():
                return self._done("timeout", self.deadline_detail, state.last_response)
            return self._fail(exc)
        except ProviderError as exc:
            return self._fail(exc)
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001  a provider's own bug is still a failed call
            return self._fail(exc)
        calls = self._unique_ids(response.tool_calls)
        content = _with_calls(response.content, calls)
        # Staged, not yet committed: it goes to the log with what follows from it (the
        # decisions, the tool starts, or Done) in one commit, before any tool runs.
        self.journal.stage(
            [
                LlmResponse(
                    iteration=state.iteration,
                    content=content,
                    usage=response.usage,
                    stop_reason=response.stop_reason,
                    model=response.model,
                    latency_ms=response.latency_ms,
                    request_digest=request_digest(request),
                )
            ]
        )
        return self._decide(msgspec.structs.replace(response, content=content), calls)

    def _decide(self, response: ModelResponse, calls: list[ToolCallBlock]) -> LoopTurn:
        stop = self._stop_wanted(response)
        if stop is not None:
            return self._done("stop_condition", stop or None, response.content)
        if not calls:
            return self._done("complete", None, response.content)
        detected = self._detect_loop(calls)
        if detected is not None and detected.action == "stop":
            return self._done(
                "loop_detected",
                f"{detected.tool_name} x{detected.consecutive_count}",
                response.content,
            )
        return self._run_round(calls)

    # ---------------------------------------------------------------- tools

    def _run_round(self, calls: Sequence[ToolCallBlock]) -> LoopTurn:
        state = self.state
        asks, decided = self._approvals(calls)
        if decided:
            self.journal.append(decided)
        if asks:
            self.journal.append([ApprovalRequested(calls=tuple(asks), reason=self.ask_reason)])
            return Paused(calls=tuple(asks), seq=self.state.seq)
        return self._execute(state.round_calls)

    def _approvals(self, calls: Sequence[ToolCallBlock]) -> tuple[list[ToolCallBlock], list[Any]]:
        """Ask the policy about every call not yet decided; 'ask' ones wait for a person."""
        policy = self.config.approval
        if policy is None:
            return [], []
        asks: list[ToolCallBlock] = []
        decided: list[Any] = []
        done = set(self.state.decisions) | set(self.state.results) | set(self.state.running)
        for call in calls:
            if call.id in done:
                continue
            verdict = _hook(policy, call, returns=Approval)
            if verdict is None:
                raise _HookFailed(TypeError("the approval policy returned None, not an Approval"))
            if verdict.decision != "ask" and verdict.decision not in _DECIDED:
                raise _HookFailed(
                    ValueError(
                        f"the approval policy decided {verdict.decision!r}; a decision is "
                        "approve, deny, modify or ask"
                    )
                )
            event = ToolCallDecided(
                call_id=call.id,
                tool_name=call.name,
                decision="deny" if verdict.decision == "ask" else verdict.decision,
                reason=verdict.reason,
                arguments=verdict.arguments,
            )
            try:  # a reason or arguments of the wrong type would make the stream unreadable
                checked(event)
            except ValueError as exc:
                raise _HookFailed(ValueError(f"the approval policy's answer: {exc}")) from None
            if verdict.decision == "ask":
                asks.append(call)
                self.ask_reason = verdict.reason
            elif verdict.decision != "approve" or verdict.reason:
                decided.append(event)
        return asks, decided

    def command(self, command: _Command) -> None:
        """A handle's command: kept for the next turn, except a stop that finds the loop
        paused for approval, which ends it now (nobody need decide first)."""
        self.commands.append(command)
        if command.kind != "stop" or not self.state.awaiting:
            return
        taken = False
        try:
            self.journal.catch_up()  # a decision from elsewhere may have ended the pause
            state = self.state
            if state.awaiting and not state.finished:
                taken = True
                self._take_commands()
                self._done("stop_condition", command.reason, state.last_response)
        except (StoreError, ValueError):  # not written now: the stop waits for a turn
            logger.exception("loop %s: could not stop while paused", self.stream)
            if taken:
                self.commands.append(command)

    def decide(
        self, call_id: str, decision: str, reason: str | None, arguments: dict[str, Any] | None
    ) -> None:
        """A person's decision on an awaited call (recorded at once)."""
        self.journal.catch_up()
        self.journal.append([decision_event(self.state, call_id, decision, reason, arguments)])

    def _after_decisions(self) -> LoopTurn:
        self.journal.catch_up()  # decisions may come from another process
        if self.state.awaiting:
            return Paused(calls=tuple(self.state.awaiting), seq=self.state.seq)
        return self._execute(self.state.round_calls)

    def _execute(self, calls: Sequence[ToolCallBlock]) -> LoopTurn:
        """Run the approved calls not yet run; results go back to the model in call order."""
        state = self.state
        decisions = state.decisions
        todo: list[tuple[ToolCallBlock, dict[str, Any]]] = []
        interrupted: list[Any] = []
        for call in calls:
            decision = decisions.get(call.id)
            if call.id in state.results or (decision is not None and decision.decision == "deny"):
                continue
            arguments = (
                decision.arguments
                if decision is not None and decision.arguments is not None
                else call.arguments
            )
            if call.id in state.running:  # started before a crash, never ended
                tool = self.tools.get(call.name)
                if tool is None or not tool.idempotent:
                    interrupted.append(
                        ToolExecutionEnd(
                            call_id=call.id,
                            tool_name=call.name,
                            content=INTERRUPTED.format(tool=call.name),
                            is_error=True,
                            attempts=0,
                        )
                    )
                    continue
            todo.append((call, arguments))
        starts = [
            None
            if c.id in state.running
            else ToolExecutionStart(call_id=c.id, tool_name=c.name, arguments=a)
            for c, a in todo
        ]
        # Write-ahead: a tool's start is on record before it runs, and only then. In
        # parallel all start at once; one after another, each start is written with the
        # previous tool's end, so a crash never leaves a start for a tool that never ran.
        if self.config.parallel_tool_execution and len(todo) > 1:
            self.journal.append([*interrupted, *(e for e in starts if e is not None)])
            self._run_parallel(todo)
        else:
            ahead: list[Any] = interrupted
            for (call, arguments), start in zip(todo, starts, strict=True):
                self.journal.append([*ahead, *([start] if start is not None else [])])
                ahead = [self._run_tool(call, arguments)]
            if ahead:
                self.journal.append(ahead)
        return self._end_round(calls)

    def _run_parallel(self, todo: list[tuple[ToolCallBlock, dict[str, Any]]]) -> None:
        """Run the calls at once; record each end as it comes, the ones that came
        together in one append (one commit instead of one per tool)."""
        pending = {self._pool().submit(self._run_tool, call, args) for call, args in todo}
        failure: _HookFailed | None = None
        while pending:
            done, pending = concurrent.futures.wait(
                pending, return_when=concurrent.futures.FIRST_COMPLETED
            )
            ends = []
            for future in done:
                try:
                    ends.append(future.result())
                except _HookFailed as exc:  # record the others' ends first
                    failure = failure or exc
            if ends:
                self.journal.append(ends)
        if failure is not None:
            raise failure

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        """One pool for the loop's lifetime: starting threads per round costs milliseconds."""
        if self.pool is None:
            self.pool = concurrent.futures.ThreadPoolExecutor(32, f"moot-tools-{self.stream}")
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False)
            self.pool = None
        self.release()

    def _run_tool(self, call: ToolCallBlock, arguments: dict[str, Any]) -> ToolExecutionEnd:
        """Run one call (in any thread); returns the event recording how it ended."""
        context = ToolContext(
            stream=self.stream,
            call_id=call.id,
            depth=self.state.depth,
            deadline=self.deadline,
            runtime=self.runtime,
        )
        outcome = self.tools.execute(
            call, context=context, deadline=self.deadline, arguments_override=arguments
        )
        content = outcome.content if outcome.is_error else self._process(call.name, outcome.content)
        return ToolExecutionEnd(
            call_id=call.id,
            tool_name=call.name,
            content=storable_text(content),
            is_error=outcome.is_error,
            duration_ms=outcome.duration_ms,
            attempts=outcome.attempts,
        )

    def _process(self, tool: str, content: str) -> str:
        """The result pipeline: processor, then extractor, then cacher."""
        c = self.config
        if c.result_processor is not None:
            content = _hook(c.result_processor, tool, content, returns=str)
            if content is None:
                raise _HookFailed(TypeError("result_processor returned None, not str"))
        if c.result_extractor is not None and estimate_tokens(content) > c.extract_above_tokens:
            query = next(
                (text_of(m.content) for m in reversed(self.state.messages) if m.role == "user"), ""
            )
            content = _hook(c.result_extractor, tool, content, query, returns=str) or content
        if c.result_cacher is not None and estimate_tokens(content) > c.cache_above_tokens:
            content = _hook(c.result_cacher, tool, content, returns=str) or content
        return content

    def _end_round(self, calls: Sequence[ToolCallBlock]) -> LoopTurn:
        due = self.state.warning_due
        if due is not None and not self.state.round_calls:  # after the round's results
            warning = LOOP_WARNING.format(tool=due.tool_name, count=due.consecutive_count)
            self.journal.append(
                [
                    MessagesInjected(
                        messages=(ChatMessage.text("user", warning),), source="loop_detection"
                    )
                ]
            )
        state = self.state
        return Yielded(
            iteration=state.iteration,
            calls=tuple(calls),
            results=state.last_results,
            usage=state.usage,
        )

    # ------------------------------------------------------------- checks

    def _stop_wanted(self, response: ModelResponse) -> str | None:
        """None to go on; a reason ("" for none given) to stop."""
        if self.config.stop_when is None:
            return None
        context = StopContext(
            iteration=self.state.iteration,
            response=response,
            usage=self.state.usage,
            calls_executed=self.state.calls_executed,
            last_results=self.state.last_results,
        )
        verdict = _hook(self.config.stop_when, context)
        if not verdict:  # None, False, 0, "", []: go on (Python's truth, as users expect)
            return None
        return verdict if isinstance(verdict, str) else ""

    def _detect_loop(self, calls: Sequence[ToolCallBlock]) -> LoopDetected | None:
        """Record a LoopDetected when the same calls came too often in a row (the count
        is folded from the responses, so a resumed loop remembers it)."""
        config = self.config.loop_detection
        count = self.state.repeat_count
        if config is None or count < config.threshold:
            return None
        name = "+".join(sorted({c.name for c in calls}))
        detected = LoopDetected(tool_name=name, consecutive_count=count, action=config.action)
        self.journal.append([detected])
        return detected

    def _masking(self, iteration: int) -> list[Any]:
        keep = self.config.mask_keep_iterations
        if keep is None:
            return []
        rounds = [m for m in self.state.messages if m.role == "tool"]
        old = rounds[: max(0, len(rounds) - keep)]
        count, saved = 0, 0
        for message in old:
            for block in message.content:
                if (
                    isinstance(block, ToolResultBlock)
                    and not block.is_error
                    and block.content != MASKED_RESULT
                ):
                    count += 1
                    saved += max(0, estimate_tokens(block.content) - estimate_tokens(MASKED_RESULT))
        return [ObservationsMasked(masked_count=count, tokens_saved=saved)] if count else []

    def _timed_out(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    # ------------------------------------------------------------- endings

    def _request(self) -> ModelRequest:
        messages = self.state.messages
        system = None
        if messages and messages[0].role == "system":
            system = text_of(messages[0].content)
            messages = messages[1:]
        return ModelRequest(
            messages=tuple(messages),
            system=system,
            tools=self.tools.specs(),
            temperature=self.config.temperature,
            max_tokens=self.config.max_tokens,
        )

    def _unique_ids(self, calls: list[ToolCallBlock]) -> list[ToolCallBlock]:
        """Tool-call ids unique within the stream (servers may repeat or omit them)."""
        # The history only grows (masking rewrites tool results, never calls): the ids
        # are collected from the messages added since the last call, not all of them.
        history = self.state.messages
        scanned, seen = self.call_ids
        if scanned > len(history):
            scanned, seen = 0, set()
        for m in history[scanned:]:
            seen.update(b.id for b in m.content if isinstance(b, ToolCallBlock))
        self.call_ids = (len(history), seen)
        taken: set[str] = set()
        out = []
        for i, call in enumerate(calls):
            fixed, n = call, 0
            while not fixed.id or fixed.id in seen or fixed.id in taken:  # made-up ones too
                suffix = f"_{n}" if n else ""
                fixed = msgspec.structs.replace(call, id=f"call_{self.state.iteration}_{i}{suffix}")
                n += 1
            taken.add(fixed.id)
            out.append(fixed)
        return out

    def _timeout(self, response: tuple[ContentBlock, ...]) -> LoopTurn:
        return self._done("timeout", self.deadline_detail, response)

    def _done(
        self, reason: str, detail: str | None, response: tuple[ContentBlock, ...]
    ) -> LoopTurn:
        state = self.state
        self.journal.append(
            [
                Done(
                    termination=Termination(reason=reason, detail=detail),  # type: ignore[arg-type]
                    iterations=state.iteration,
                    usage=state.usage,
                    response=response,
                )
            ]
        )
        return self._terminal()

    def _fail(self, exc: BaseException) -> LoopTurn:
        state = self.state
        self.journal.append(
            [LoopFailed(error=error_record(exc), iterations=state.iteration, usage=state.usage)]
        )
        return self._terminal()

    def _terminal(self) -> LoopTurn:
        state = self.state
        if state.error is not None:
            return Failed(error=state.error, iterations=state.iteration, usage=state.usage)
        assert state.termination is not None
        return Completed(
            result=LoopResult(
                stream=self.stream,
                termination=state.termination,
                iterations=state.iteration,
                usage=state.usage,
                response=state.response,
                model=self.provider.model,
            )
        )


class _HookFailed(Exception):
    """A user hook raised; the loop ends with LoopFailed carrying ``error``."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _hook(fn: Callable[..., Any], *args: Any, returns: type | None = None) -> Any:
    """Call a user hook; its exception, or a value not of type ``returns``, becomes
    :class:`_HookFailed` (a bad value would otherwise reach the log)."""
    try:
        value = fn(*args)
    except Exception as exc:
        raise _HookFailed(exc) from exc
    if returns is not None and value is not None and not isinstance(value, returns):
        name = getattr(fn, "__name__", "a hook")
        problem = TypeError(f"{name} returned {type(value).__name__}, not {returns.__name__}")
        raise _HookFailed(problem)
    return value


def model_calls(log: LogBase, stream: str) -> int:
    """How many of a loop's model calls have their outcome on record: its responses, plus
    a failed call (a LoopFailed while a call was in flight). A resumed scripted model
    skips that many replies."""
    state = log.replay(stream)
    assert isinstance(state, LoopState)
    cut_off = state.finished and state.answered < state.iteration  # failed, or timed out
    return state.answered + int(cut_off)


def decision_event(
    state: LoopState,
    call_id: str,
    decision: str,
    reason: str | None = None,
    arguments: dict[str, Any] | None = None,
) -> ToolCallDecided:
    """The event recording a person's decision on a call the loop waits for.

    Raises:
        ToolLoopError: no such call is waiting, or the decision is malformed.
    """
    if state.finished:
        raise ToolLoopError(f"the loop has ended ({state.status}); it waits for no decision")
    waiting = {c.id: c for c in state.awaiting}
    if call_id not in waiting:
        known = ", ".join(waiting) or "none"
        raise ToolLoopError(f"no call {call_id!r} is waiting for a decision (waiting: {known})")
    if decision not in _DECIDED:
        raise ToolLoopError(f"unknown decision {decision!r}")
    if decision == "modify" and arguments is None:
        raise ToolLoopError("a modify decision needs arguments")
    event = ToolCallDecided(
        call_id=call_id,
        tool_name=waiting[call_id].name,
        decision=decision,  # type: ignore[arg-type]
        reason=reason,
        arguments=arguments,
    )
    try:
        return checked(event)
    except ValueError as exc:
        raise ToolLoopError(str(exc)) from None


def _with_calls(
    content: tuple[ContentBlock, ...], calls: list[ToolCallBlock]
) -> tuple[ContentBlock, ...]:
    """``content`` with its tool calls replaced, in order, by ``calls`` (unique ids)."""
    it = iter(calls)
    return tuple(next(it) if isinstance(b, ToolCallBlock) else b for b in content)


# --------------------------------------------------------------------- actor


class _LoopActor(pykka.ThreadingActor):
    use_daemon_thread = True

    def __init__(self, engine: _Engine) -> None:
        super().__init__()
        self.engine = engine

    def on_stop(self) -> None:
        self.engine.close()

    def on_failure(self, *_: object) -> None:
        """A crash (pykka calls no on_stop then): the stream may be driven again."""
        self.engine.close()

    def on_receive(self, message: Any) -> Any:
        engine = self.engine
        match message:
            case "next":
                return engine.next_turn()
            case _Command():
                engine.command(message)
            case ("decide", str(call_id), str(decision), reason, arguments):
                engine.decide(call_id, decision, reason, arguments)
            case "catch_up":
                engine.journal.catch_up()
            case "state":
                snapshot: LoopState = msgspec.convert(msgspec.to_builtins(engine.state), LoopState)
                return snapshot
            case _:
                raise ToolLoopError(f"tool loop got an unknown message {message!r}")
        return None


class ToolLoopHandle:
    """Drives a loop actor from any thread; each wait takes a ``timeout``.

    A wait that times out leaves the loop running: the next :meth:`next_turn` returns
    the turn that was under way, it does not start another. A closed handle raises
    :class:`ToolLoopError`.
    """

    def __init__(self, log: LogBase, stream: str, ref: pykka.ActorRef[Any]) -> None:
        self.log = log
        self.stream = stream
        self._ref = ref
        #: The turn a timed-out next_turn left under way.
        self._pending: pykka.Future[Any] | None = None
        self._turns = threading.Lock()
        #: Set by close: a wait for a decision ends then.
        self._closed = threading.Event()

    def __repr__(self) -> str:
        return f"<ToolLoopHandle {self.stream}>"

    def next_turn(self, *, timeout: float | None = None) -> LoopTurn:
        """Run one iteration (or finish a paused one) and say what happened.

        Raises:
            TimeoutError: the turn did not end within ``timeout`` seconds (it goes on;
                the next call waits for it).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        # Another thread's turn holds the lock: waiting for it counts against our time.
        if not self._turns.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            raise TimeoutError(f"loop {self.stream}: another caller's turn did not end in time")
        try:
            future, self._pending = self._pending, None
            if future is None:
                future = self._call(lambda: self._ref.ask("next", block=False))
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                turn = self._call(lambda: future.get(timeout=left))
            except TimeoutError:
                self._pending = future  # handed over by the next call, whatever its end
                raise TimeoutError(
                    f"loop {self.stream}: no turn ended within {timeout} s (it goes on)"
                ) from None
            return cast("LoopTurn", turn)
        finally:
            self._turns.release()

    def continue_(self) -> None:
        """Go on normally at the next turn (the default)."""
        self._call(lambda: self._ref.tell(_Command("continue")))

    def inject(self, messages: Sequence[ChatMessage]) -> None:
        """Add ``messages`` to the history before the next model call.

        Raises:
            ToolLoopError: a message has the wrong shape (nothing is sent).
        """
        try:
            checked_messages = tuple(checked(m) for m in messages)
        except ValueError as exc:
            raise ToolLoopError(str(exc)) from None
        self._call(lambda: self._ref.tell(_Command("inject", checked_messages)))

    def stop(self, reason: str | None = None) -> None:
        """End the loop at the next turn, without another model call; a loop paused for
        approval ends at once, its waiting calls not run (``Done``, ``stop_condition``)."""
        if reason is not None and not isinstance(reason, str):
            raise ToolLoopError(f"a stop reason is a string, not {type(reason).__name__}")
        if reason is not None and storable_text(reason) != reason:
            raise ToolLoopError("a stop reason must be text UTF-8 can hold (no lone surrogates)")
        self._call(lambda: self._ref.tell(_Command("stop", reason=reason)))

    def decide(
        self,
        call_id: str,
        decision: Literal["approve", "deny", "modify"],
        *,
        reason: str | None = None,
        arguments: dict[str, Any] | None = None,
        timeout: float | None = 30,
    ) -> None:
        """Record a person's decision on a call the loop is waiting for.

        Raises:
            ToolLoopError: no such call waits, or the decision is malformed.
            TimeoutError: the loop was busy for ``timeout`` seconds (the decision is
                still recorded when it gets to it).
        """
        message = ("decide", call_id, decision, reason, arguments)
        self._call(lambda: self._ref.ask(message, timeout=timeout))

    def _call(self, action: Callable[[], _R]) -> _R:
        """Run a call on the actor, in moot's errors rather than pykka's."""
        try:
            return action()
        except pykka.Timeout:
            raise TimeoutError(
                f"loop {self.stream}: no answer in time (the loop is busy with a turn)"
            ) from None
        except pykka.ActorDeadError:
            raise ToolLoopError(f"loop {self.stream}: this handle is closed") from None

    def run(
        self,
        *,
        timeout: float | None = None,
        on_turn: Callable[[LoopTurn], None] | None = None,
        on_pause: Callable[[ToolLoopHandle, Paused], None] | None = None,
    ) -> LoopResult:
        """Drive the loop to its end (see :meth:`drive`).

        Raises:
            ToolLoopError: the loop failed (its LoopFailed is in the log).
            TimeoutError: it did not end within ``timeout`` seconds.
        """
        outcome = self.drive(timeout=timeout, on_turn=on_turn, on_pause=on_pause)
        if isinstance(outcome, Failed):
            raise ToolLoopError(f"loop {self.stream} failed: {outcome.error.message}")
        return outcome

    def drive(
        self,
        *,
        timeout: float | None = None,
        on_turn: Callable[[LoopTurn], None] | None = None,
        on_pause: Callable[[ToolLoopHandle, Paused], None] | None = None,
    ) -> LoopResult | Failed:
        """Turn after turn to the end, telling ``on_turn`` about each.

        While paused, ``on_pause(handle, paused)`` decides (re-drive does), or by
        default the loop waits for decisions from anywhere (:meth:`wait_for_decision`).

        Raises:
            TimeoutError: it did not end within ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            turn = self.next_turn(timeout=remaining)
            if on_turn is not None:
                on_turn(turn)
            match turn:
                case Completed():
                    return turn.result
                case Failed():
                    return turn
                case Paused() if on_pause is not None:
                    on_pause(self, turn)
                case Paused():
                    self.wait_for_decision(turn, deadline=deadline)

    def wait_for_decision(
        self, paused: Paused, *, deadline: float | None = None, poll: float = 0.05
    ) -> None:
        """Block until the stream has an event after ``paused.seq`` (a decision), or the
        deadline. A decision that came in before this call counts: nothing is missed.

        Decisions may come from this process or any other (``moot approve``).
        """
        start = self.log.stream_info(self.stream).last_position
        with self.log.subscribe(start, stream=self.stream, poll_interval=poll) as sub:
            while self.log.stream_info(self.stream).last_seq <= paused.seq:
                if self._closed.is_set():
                    raise ToolLoopError(f"loop {self.stream}: this handle is closed")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"loop {self.stream} is still waiting for approval")
                sub.next(timeout=poll if remaining is None else min(poll, remaining))

    def state(self, *, timeout: float | None = 30) -> LoopState:
        """A copy of the live state (equal to ``log.replay(stream)`` between turns)."""
        return cast("LoopState", self._call(lambda: self._ref.ask("state", timeout=timeout)))

    def close(self, *, timeout: float | None = 30) -> None:
        """Stop the actor (the stream stays as it is: resumable if not finished).

        A turn under way is finished first; closing twice is harmless.

        Raises:
            TimeoutError: the turn under way did not end within ``timeout`` seconds
                (the actor still stops when it does).
        """
        self._closed.set()
        try:
            self._ref.stop(timeout=timeout)
        except pykka.Timeout:
            raise TimeoutError(
                f"loop {self.stream}: a turn is still under way after {timeout} s; the "
                "loop stops when it ends"
            ) from None
        except pykka.ActorDeadError:
            pass

    def __enter__(self) -> ToolLoopHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ToolLoop:
    """Starting and resuming tool loops."""

    @staticmethod
    def start(
        log: LogBase,
        provider: Provider,
        tools: ToolRegistry | None = None,
        *,
        prompt: str | None = None,
        messages: Sequence[ChatMessage] = (),
        system: str | None = None,
        config: ToolLoopConfig | None = None,
        stream: str | None = None,
        parent: LoopParent | None = None,
        depth: int = 0,
        on_delta: Callable[[Delta], None] | None = None,
        deadline: float | None = None,
    ) -> ToolLoopHandle:
        """Record LoopStarted and start the loop's actor (nothing runs until asked).

        ``deadline`` (a ``time.monotonic()`` instant) bounds the loop as ``timeout_s``
        does, when it comes first: a nested loop gets its calling loop's."""
        from ._dialogue import new_stream_id

        tools = tools or ToolRegistry()
        config = config or ToolLoopConfig()
        history = list(messages)
        if system:
            history.insert(0, ChatMessage.text("system", system))
        if prompt:
            history.append(ChatMessage.text("user", prompt))
        if not history:
            raise ToolLoopError("a loop needs a prompt or messages")
        stream = stream or new_stream_id("loop")
        started = LoopStarted(
            parent=parent,
            depth=depth,
            config=config.record(),
            tools=tools.specs(),
            messages=tuple(history),
            model=provider.model,
        )
        try:
            started = checked(started)
        except ValueError as exc:  # a hand-made message of the wrong shape
            raise ToolLoopError(str(exc)) from None
        log.append(stream, [started], expected_seq=0)
        return ToolLoop._spawn(log, stream, provider, tools, config, on_delta, deadline=deadline)

    @staticmethod
    def run(
        log: LogBase,
        provider: Provider,
        tools: ToolRegistry | None = None,
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> LoopResult:
        """Fire and forget: start a loop, drive it to its end, stop its actor.

        Takes the arguments of :meth:`start`; waits for approvals like
        :meth:`ToolLoopHandle.run`.

        Raises:
            ToolLoopError: the loop failed (its LoopFailed is in the log).
        """
        handle = ToolLoop.start(log, provider, tools, **options)
        try:
            return handle.run(timeout=timeout)
        finally:
            handle.close()

    @staticmethod
    def resume(
        log: LogBase,
        stream: str,
        provider: Provider,
        tools: ToolRegistry | None = None,
        config: ToolLoopConfig | None = None,
        *,
        on_delta: Callable[[Delta], None] | None = None,
        deadline: float | None = None,
    ) -> ToolLoopHandle:
        """Pick up a loop from its log (after a crash or a restart while paused).

        A model call that was in flight is made again; a tool that was running is run
        again only if it is idempotent, otherwise the model gets an error result saying
        it was interrupted. A scripted provider skips the replies already on record.
        Without ``config``, the loop runs with the one it recorded (its limits, loop
        detection and masking; hooks are code, so pass a config to have them).
        """
        state = log.replay(stream)
        if not isinstance(state, LoopState):
            raise ToolLoopError(f"stream {stream!r} is not a tool loop")
        skip = getattr(provider, "skip", None)
        if callable(skip):
            skip(model_calls(log, stream))
        return ToolLoop._spawn(
            log,
            stream,
            provider,
            tools or ToolRegistry(),
            config or ToolLoopConfig.from_record(state.config),
            on_delta,
            resumed=True,
            deadline=deadline,
        )

    @staticmethod
    def _spawn(
        log: LogBase,
        stream: str,
        provider: Provider,
        tools: ToolRegistry,
        config: ToolLoopConfig,
        on_delta: Callable[[Delta], None] | None,
        *,
        resumed: bool = False,
        deadline: float | None = None,
    ) -> ToolLoopHandle:
        try:
            release = lease(log, stream)  # one driver per stream, also across processes
        except StreamBusy as exc:
            raise ToolLoopError(str(exc)) from None
        try:
            state = log.replay(stream)  # read once the lease is ours
            assert isinstance(state, LoopState)
            journal = Journal(log, stream, state)
            runtime = NestedLoops(log, stream, config, resumed=resumed)
            engine = _Engine(
                journal,
                provider,
                tools,
                config,
                on_delta=on_delta,
                runtime=runtime,
                deadline=deadline,
                release=release,
            )
            return ToolLoopHandle(log, stream, _LoopActor.start(engine))
        except BaseException:
            release()
            raise


@dataclass(frozen=True)
class NestedLoop:
    """A loop a tool is starting, as :attr:`ToolLoopConfig.nested` sees it.

    Attributes:
        parent: The loop and the ``ToolExecutionStart`` of the call that starts it.
        index: How many loops that call started before this one (0 for its first).
        provider: The model the tool asked for.
        tools: The tools the tool asked for.
        stream: The new loop's stream id; None: a fresh one.
    """

    parent: LoopParent
    index: int
    provider: Provider
    tools: ToolRegistry | None
    stream: str | None = None


@dataclass
class NestedLoops:
    """Given to tools (``ToolContext.runtime``) so they can run a loop of their own."""

    log: LogBase
    stream: str
    config: ToolLoopConfig
    #: The loop was resumed: a tool running again may find loops it started before.
    resumed: bool = False
    #: Loops started so far, per calling tool call (tools may run in parallel threads).
    started: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def run(
        self,
        context: ToolContext,
        provider: Provider,
        tools: ToolRegistry | None = None,
        *,
        prompt: str,
        config: ToolLoopConfig | None = None,
        timeout: float | None = None,
    ) -> LoopResult:
        """Run a child loop to its end, linked to this call; depth is one more than ours.
        The child ends (``timeout``) by the call's deadline if its own comes later.

        In a resumed loop, a tool that runs again after a crash finds the loops it had
        started on record: the n-th loop it asks for is the n-th it started then, which
        goes on where it stopped (its finished model calls and tools are not repeated;
        one that had ended gives its result at once).

        Raises:
            ToolLoopError: the child failed (e.g. the depth limit).
        """
        starts = [
            r.seq
            for r in self.log.read(self.stream)
            if isinstance(r.event, ToolExecutionStart) and r.event.call_id == context.call_id
        ]
        config = config or self.config
        if config.nested is None and self.config.nested is not None:
            config = dataclasses.replace(config, nested=self.config.nested)
        ours = self.config.max_depth
        if ours is not None and (config.max_depth is None or config.max_depth > ours):
            # A child's own config may not loosen the depth limit of the loops above it.
            config = dataclasses.replace(config, max_depth=ours)
        with self._lock:
            index = self.started.get(context.call_id, 0)
            self.started[context.call_id] = index + 1
        plan = NestedLoop(
            parent=LoopParent(stream=self.stream, seq=starts[-1] if starts else 0),
            index=index,
            provider=provider,
            tools=tools,
        )
        if config.nested is not None:
            plan = config.nested(plan)
        earlier = started_from(self.log, plan.parent) if self.resumed else []
        # The child ends by its caller's deadline too: it does not outlive the call.
        deadline = context.deadline
        if index < len(earlier):
            child = ToolLoop.resume(
                self.log, earlier[index], plan.provider, plan.tools, config, deadline=deadline
            )
        else:
            child = ToolLoop.start(
                self.log,
                plan.provider,
                plan.tools,
                prompt=prompt,
                config=config,
                stream=plan.stream,
                parent=plan.parent,
                depth=context.depth + 1,
                deadline=deadline,
            )
        try:
            return child.run(timeout=timeout)
        finally:
            child.close()


def started_from(log: LogBase, parent: LoopParent) -> list[str]:
    """The loops started from ``parent`` (a tool call) that are on record, in the order
    they started. Resume and re-drive both find a call's nested loops with it."""
    found = []
    for head in log.streams():
        if head.parent != parent.stream:
            continue
        first = next(iter(log.read(head.stream, until_seq=1)), None)
        if first is not None and getattr(first.event, "parent", None) == parent:
            found.append((first.position, head.stream))
    return [stream for _, stream in sorted(found)]
