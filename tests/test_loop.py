"""Tool loops: every behaviour of the seed's suite restated for moot, and the fixed defects."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest

from moot.actors._loop import (
    Approval,
    Completed,
    Failed,
    LoopResult,
    NestedLoop,
    Paused,
    StopContext,
    ToolLoop,
    ToolLoopConfig,
    ToolLoopHandle,
    Yielded,
    ask_person,
    deny,
    modify,
)
from moot.actors._model import Finished, TextDelta, ToolCallDelta, ToolCallStart, assemble
from moot.actors._scripted import ScriptedCall, ScriptedProvider, ScriptedReply
from moot.actors._tools import ToolContext, ToolRegistry, ToolRetry, tool
from moot.events import (
    MASKED_RESULT,
    ChatMessage,
    Done,
    IterationStart,
    LlmResponse,
    LoopDetected,
    LoopDetectionInfo,
    LoopFailed,
    LoopStarted,
    LoopState,
    MessagesInjected,
    ObservationsMasked,
    TextBlock,
    ToolCallBlock,
    ToolCallDecided,
    ToolExecutionEnd,
    ToolExecutionStart,
    ToolResultBlock,
    Usage,
)
from moot.store import EventLog, LogBase

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

T = 30  # seconds: the bound on every wait


@tool
def add(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


@tool
def fail() -> str:
    """Always fails."""
    raise RuntimeError("intentional failure")


@tool
def search(query: str) -> str:
    """Search."""
    return f"result for {query}"


def calls(*specs: tuple[str, dict[str, Any]]) -> ScriptedReply:
    return ScriptedReply(tool_calls=tuple(ScriptedCall(n, a) for n, a in specs))


def text(t: str, delay_ms: float = 0) -> ScriptedReply:
    return ScriptedReply(text=t, delay_ms=delay_ms)


@pytest.fixture
def log(tmp_path: Path) -> Iterator[LogBase]:
    """A log on disk; when the test is over, every loop stream in it must be causal."""
    opened = EventLog(tmp_path / "moot.db")
    yield opened
    try:
        for head in opened.streams():
            if head.kind == "loop":
                events = [r.event for r in opened.read(head.stream)]
                assert causal_problems(events) == [], head.stream
    finally:
        opened.close()


def causal_problems(events: list[Any]) -> list[str]:
    """What in a loop stream is out of causal order: each model call between its
    IterationStart and LlmResponse; a tool started only when a response asked for it,
    once, and never when denied; ended only after it started; every call of a response
    answered before the next model call; the end last."""
    problems: list[str] = []
    if not events or not isinstance(events[0], LoopStarted):
        return ["the first event is not LoopStarted"]
    asked: dict[str, int] = {}  # call id -> the iteration whose response asked for it
    started: set[str] = set()
    ended: set[str] = set()
    denied: set[str] = set()
    iteration, calling = 0, False
    for i, event in enumerate(events):
        if isinstance(event, Done | LoopFailed) and i != len(events) - 1:
            problems.append(f"#{i} {type(event).__name__} is not the last event")
        match event:
            case IterationStart():
                unanswered = [
                    c for c, n in asked.items() if n == iteration and c not in ended | denied
                ]
                if unanswered:
                    problems.append(f"#{i} a model call before {unanswered} were answered")
                iteration, calling = event.iteration, True
            case LlmResponse():
                if not calling or event.iteration != iteration:
                    problems.append(f"#{i} a response without its IterationStart")
                calling = False
                asked.update(
                    (b.id, event.iteration) for b in event.content if isinstance(b, ToolCallBlock)
                )
            case ToolCallDecided():
                if event.call_id not in asked:
                    problems.append(f"#{i} a decision on {event.call_id}, never asked for")
                if event.decision == "deny":
                    denied.add(event.call_id)
            case ToolExecutionStart():
                if event.call_id not in asked or event.call_id in denied | started:
                    problems.append(f"#{i} {event.call_id} started unasked, denied or twice")
                started.add(event.call_id)
            case ToolExecutionEnd():
                if event.call_id not in started or event.call_id in ended:
                    problems.append(f"#{i} {event.call_id} ended before it started, or twice")
                ended.add(event.call_id)
    return problems


class Run:
    """A loop, its provider, and what it recorded."""

    def __init__(
        self,
        log: LogBase,
        replies: list[ScriptedReply],
        tools: list[Any] | None = None,
        **config: Any,
    ) -> None:
        self.log = log
        self.provider = ScriptedProvider(replies)
        self.handle: ToolLoopHandle = ToolLoop.start(
            log,
            self.provider,
            ToolRegistry(tools if tools is not None else [add, fail, search]),
            prompt="go",
            config=ToolLoopConfig(**config),
        )

    def turn(self) -> Any:
        turn = self.handle.next_turn(timeout=T)
        if isinstance(turn, Yielded | Paused):  # the live state is the log's, every time
            assert self.state() == self.replay()
        return turn

    def result(self) -> LoopResult:
        return self.handle.run(timeout=T)

    def events(self, kind: type | None = None) -> list[Any]:
        found = [r.event for r in self.log.read(self.handle.stream)]
        return found if kind is None else [e for e in found if isinstance(e, kind)]

    def state(self) -> LoopState:
        return self.handle.state()

    def replay(self) -> LoopState:
        state = self.log.replay(self.handle.stream)
        assert isinstance(state, LoopState)
        return state


ADD = ("add", {"a": 2, "b": 3})


class Gate:
    """A tool named ``slow`` that runs until the test opens the gate."""

    def __init__(self) -> None:
        self.open, self.running = threading.Event(), threading.Event()

        @tool
        def slow() -> str:
            """Waits for the test."""
            self.running.set()
            self.open.wait(T)
            return "ok"

        self.tool = slow


# ------------------------------------------------------------------ the basics


def test_text_only_completes_in_one_iteration(log: LogBase) -> None:
    run = Run(log, [text("Hello!")])
    turn = run.turn()
    assert isinstance(turn, Completed)
    assert (turn.result.iterations, turn.result.text) == (1, "Hello!")
    assert turn.result.termination.reason == "complete"
    assert run.provider.calls == 1


def test_a_tool_round_counts_an_iteration_and_usage_sums(log: LogBase) -> None:
    run = Run(log, [calls(ADD), text("The answer is 5")])
    first = run.turn()
    assert isinstance(first, Yielded) and first.iteration == 1
    assert [r.content for r in first.results] == ["5.0"]
    done = run.turn()
    assert isinstance(done, Completed)
    assert (done.result.iterations, done.result.text) == (2, "The answer is 5")
    per_call = [e.usage for e in run.events(LlmResponse)]
    assert done.result.usage == per_call[0] + per_call[1]
    assert done.result.usage.input_tokens > per_call[0].input_tokens


def test_several_rounds(log: LogBase) -> None:
    run = Run(log, [calls(ADD), calls(("add", {"a": 1, "b": 1})), text("Done")])
    result = run.result()
    assert (result.iterations, result.text) == (3, "Done")


def test_max_iterations_keeps_the_last_real_response(log: LogBase) -> None:
    replies = [calls(("add", {"a": i, "b": 1})) for i in range(5)]
    run = Run(log, replies, max_iterations=3)
    result = run.result()
    assert result.termination.reason == "max_iterations" and result.iterations == 3
    last = run.events(LlmResponse)[-1]
    assert result.response == last.content  # not an empty response
    assert run.provider.calls == 3  # no fourth model call
    assert len(run.events(ToolExecutionEnd)) == 3  # the third round's tools did run
    assert not any(e.iteration == 4 for e in run.events(IterationStart))


def test_deny_sends_an_error_result_and_the_loop_goes_on(log: LogBase) -> None:
    run = Run(log, [calls(ADD), text("ok")], approval=lambda call: deny("not today"))
    result = run.result()
    assert result.text == "ok"
    assert run.events(ToolExecutionStart) == []  # a denied call never runs
    sent = run.provider.requests[1].messages
    result_block = sent[-1].content[0]
    assert isinstance(result_block, ToolResultBlock)
    assert (result_block.content, result_block.is_error) == ("Tool call denied: not today", True)
    decided = run.events(ToolCallDecided)[0]
    assert (decided.decision, decided.reason) == ("deny", "not today")


def test_modify_runs_with_new_arguments_revalidated(log: LogBase) -> None:
    run = Run(log, [calls(ADD), text("ok")], approval=lambda call: modify({"a": 100, "b": 200}))
    run.result()
    assert run.events(ToolExecutionStart)[0].arguments == {"a": 100, "b": 200}
    assert run.events(ToolExecutionEnd)[0].content == "300.0"
    bad = Run(log, [calls(ADD), text("ok")], approval=lambda call: modify({"a": "x"}))
    bad.result()
    end = bad.events(ToolExecutionEnd)[0]
    assert end.is_error and end.content.startswith("Invalid arguments for tool 'add'")


def test_all_calls_of_a_response_are_answered_before_the_next_call(log: LogBase) -> None:
    run = Run(log, [calls(ADD, ("search", {"query": "x"})), text("both")])
    run.result()
    second = run.provider.requests[1].messages[-1]
    assert second.role == "tool"
    assert [b.content for b in second.content] == ["5.0", "result for x"]  # type: ignore[union-attr]


def test_unknown_tool_and_invalid_arguments_become_error_results(log: LogBase) -> None:
    run = Run(log, [calls(("nope", {}), ("add", {"a": "two"})), text("recovered")])
    result = run.result()
    assert result.text == "recovered"
    ends = {e.tool_name: e for e in run.events(ToolExecutionEnd)}
    assert ends["nope"].is_error and ends["nope"].content == "Unknown tool: nope"
    assert ends["add"].is_error and "Invalid arguments for tool 'add'" in ends["add"].content
    assert (ends["nope"].attempts, ends["add"].attempts) == (0, 0)


def test_a_failing_tool_is_an_error_result(log: LogBase) -> None:
    run = Run(log, [calls(("fail", {})), text("ok")])
    run.result()
    end = run.events(ToolExecutionEnd)[0]
    assert end.is_error and end.content == "RuntimeError: intentional failure"


# ------------------------------------------------------------- stop conditions


def test_stop_conditions_see_the_right_context(log: LogBase) -> None:
    seen: list[tuple[int, int, list[str]]] = []
    contexts: list[StopContext] = []

    def stop_after_one_call(ctx: StopContext) -> bool:
        seen.append((ctx.iteration, ctx.calls_executed, [r.content for r in ctx.last_results]))
        contexts.append(ctx)
        return ctx.calls_executed >= 1

    other = ("add", {"a": 1, "b": 1})
    run = Run(log, [calls(ADD), calls(other), text("never")], stop_when=stop_after_one_call)
    result = run.result()
    assert result.termination.reason == "stop_condition" and result.iterations == 2
    assert seen == [(1, 0, []), (2, 1, ["5.0"])]
    # Each sees its own response, and the usage of the loop so far, that response included.
    responses = run.events(LlmResponse)
    assert [[(c.name, c.arguments) for c in ctx.response.tool_calls] for ctx in contexts] == [
        [ADD],
        [other],
    ]
    for n, ctx in enumerate(contexts, 1):
        so_far = responses[:n]
        assert ctx.usage.input_tokens == sum(r.usage.input_tokens for r in so_far) > 0
        assert ctx.usage.output_tokens == sum(r.usage.output_tokens for r in so_far) > 0


def test_a_stop_condition_may_stop_before_the_tools_run(log: LogBase) -> None:
    run = Run(log, [calls(ADD)], stop_when=lambda ctx: "budget exceeded")
    result = run.result()
    assert result.termination.reason == "stop_condition"
    assert result.termination.detail == "budget exceeded"
    assert result.iterations == 1
    assert any(isinstance(b, ToolCallBlock) for b in result.response)
    assert run.events(ToolExecutionStart) == []


def test_a_stop_condition_beats_completion(log: LogBase) -> None:
    run = Run(log, [text("plain")], stop_when=lambda ctx: "manual stop")
    result = run.result()
    termination = result.termination
    assert (termination.reason, termination.detail) == ("stop_condition", "manual stop")


@pytest.mark.parametrize("verdict", [None, False, 0, "", [], {}])
def test_a_stop_condition_answering_false_goes_on(log: LogBase, verdict: object) -> None:
    run = Run(log, [calls(ADD), text("done")], stop_when=lambda ctx: verdict)
    result = run.result()
    assert (result.termination.reason, result.iterations) == ("complete", 2)


# -------------------------------------------------------------- loop detection


def repeated(n: int, args: dict[str, Any] | None = None) -> list[ScriptedReply]:
    return [calls(("search", args or {"query": "same"})) for _ in range(n)]


def test_loop_detection_warns_on_the_third_identical_call_set(log: LogBase) -> None:
    run = Run(
        log,
        [*repeated(3), text("ok")],
        loop_detection=LoopDetectionInfo(threshold=3, action="warn"),
    )
    result = run.result()
    assert result.termination.reason == "complete"
    detected = run.events(LoopDetected)
    assert [(d.tool_name, d.consecutive_count, d.action) for d in detected] == [
        ("search", 3, "warn")
    ]


def test_different_arguments_are_not_a_loop(log: LogBase) -> None:
    replies = [calls(("search", {"query": q})) for q in ("foo", "bar", "baz")] + [text("ok")]
    run = Run(log, replies, loop_detection=LoopDetectionInfo(threshold=3, action="stop"))
    assert run.result().iterations == 4
    assert run.events(LoopDetected) == []


def test_loop_detection_stop_ends_the_loop_without_running_the_third(log: LogBase) -> None:
    run = Run(log, repeated(5), loop_detection=LoopDetectionInfo(threshold=3, action="stop"))
    result = run.result()
    assert result.termination.reason == "loop_detected" and result.iterations == 3
    assert len(run.events(ToolExecutionEnd)) == 2


def test_injected_warnings_come_after_the_rounds_results(log: LogBase) -> None:
    run = Run(
        log,
        [*repeated(3), text("ok")],
        loop_detection=LoopDetectionInfo(threshold=3, action="inject_warning"),
    )
    result = run.result()
    assert result.iterations == 4
    fourth = run.provider.requests[3].messages
    assert [m.role for m in fourth[-3:]] == ["assistant", "tool", "user"]
    assert "identical arguments 3 times" in fourth[-1].content[0].text  # type: ignore[union-attr]
    injected = run.events(MessagesInjected)
    assert [m.source for m in injected] == ["loop_detection"]


# ------------------------------------------------------------------ timeouts


def test_a_zero_timeout_stops_before_the_first_model_call(log: LogBase) -> None:
    run = Run(log, [text("never")], timeout_s=0)
    result = run.result()
    assert result.termination.reason == "timeout" and result.iterations == 0
    assert run.provider.calls == 0


def test_the_timeout_cuts_a_slow_model_call(log: LogBase) -> None:
    run = Run(log, [calls(ADD), text("too late", delay_ms=30_000)], timeout_s=0.3)
    result = run.result()
    assert result.termination.reason == "timeout"
    assert result.iterations == 2
    assert run.events(Done)[0].response == run.events(LlmResponse)[0].content


def test_the_timeout_cuts_a_hanging_tool(log: LogBase) -> None:
    release = threading.Event()

    @tool
    def hang() -> str:
        """Hangs."""
        release.wait(T)
        return "finally"

    run = Run(log, [calls(("hang", {})), text("never")], tools=[hang], timeout_s=0.3)
    try:
        result = run.result()
    finally:
        release.set()
    assert result.termination.reason == "timeout"
    end = run.events(ToolExecutionEnd)[0]
    assert end.is_error and "timed out" in end.content


def test_a_nested_loop_ends_by_its_callers_deadline(log: LogBase) -> None:
    slow = ScriptedProvider([text("too late", delay_ms=30_000)])
    child_over = threading.Event()
    outcome: list[Any] = []

    @tool
    def delegate(context: ToolContext) -> str:
        """Ask a sub-agent whose own config has no time limit."""
        try:
            outcome.append(context.runtime.run(context, slow, prompt="x", config=ToolLoopConfig()))
        except BaseException as exc:
            outcome.append(exc)
            raise
        finally:
            child_over.set()
        return "never in time"

    run = Run(log, [calls(("delegate", {})), text("never")], tools=[delegate], timeout_s=0.3)
    assert run.result().termination.reason == "timeout"
    assert child_over.wait(T)  # the child does not run on after its caller gave up
    (child,) = outcome
    assert isinstance(child, LoopResult)
    assert child.termination.reason == "timeout"
    assert child.termination.detail == "at the deadline of the loop that started it"
    assert log.stream_info(child.stream).status == "completed"
    assert log.replay(child.stream).config.timeout_s is None  # the record is its own config


# -------------------------------------------------------------------- retries


def test_flaky_tools_succeed_within_their_retries(log: LogBase) -> None:
    failures = {"left": 2}

    @tool(retry=ToolRetry(max_retries=3, initial_delay=0.001, jitter=0))
    def flaky() -> str:
        """Fails twice."""
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("transient failure")
        return "success after retries"

    seen: list[str] = []

    def picky(exc: BaseException) -> bool:
        seen.append(str(exc))
        return "TRANSIENT" in str(exc)

    @tool(retry=ToolRetry(max_retries=3, initial_delay=0.001, jitter=0, retry_if=picky))
    def selective() -> str:
        """Fails for good."""
        raise ValueError("permanent failure")

    run = Run(log, [calls(("flaky", {}), ("selective", {})), text("ok")], tools=[flaky, selective])
    run.result()
    ends = {e.tool_name: e for e in run.events(ToolExecutionEnd)}
    assert (ends["flaky"].content, ends["flaky"].attempts) == ("success after retries", 3)
    assert (ends["selective"].is_error, ends["selective"].attempts) == (True, 1)
    assert seen == ["permanent failure"]


# ------------------------------------------------------------------ the handle


def test_continue_inject_and_stop_through_the_handle(log: LogBase) -> None:
    run = Run(log, [calls(ADD), calls(ADD), text("Final")])
    assert isinstance(run.turn(), Yielded)
    run.handle.continue_()
    assert isinstance(run.turn(), Yielded)
    run.handle.inject([ChatMessage.text("user", "Worker completed task X")])
    done = run.turn()
    assert isinstance(done, Completed) and done.result.iterations == 3
    third = run.provider.requests[2].messages
    assert third[-1] == ChatMessage.text("user", "Worker completed task X")

    stopped = Run(log, [calls(ADD), text("never")])
    assert isinstance(stopped.turn(), Yielded)
    stopped.handle.stop("task_spawn detected")
    end = stopped.turn()
    assert isinstance(end, Completed)
    assert (end.result.termination.reason, end.result.termination.detail) == (
        "stop_condition",
        "task_spawn detected",
    )
    assert stopped.provider.calls == 1
    assert isinstance(stopped.turn(), Completed)  # asking again repeats the end


def test_handle_commands_between_two_turns_all_count_in_order(log: LogBase) -> None:
    run = Run(log, [calls(ADD), text("Final")])
    assert isinstance(run.turn(), Yielded)
    run.handle.inject([ChatMessage.text("user", "A")])
    run.handle.inject([ChatMessage.text("user", "B")])
    run.handle.continue_()  # does not undo them
    assert isinstance(run.turn(), Completed)
    sent = run.provider.requests[1].messages
    assert list(sent[-2:]) == [ChatMessage.text("user", "A"), ChatMessage.text("user", "B")]

    stopped = Run(log, [calls(ADD), text("never")])
    assert isinstance(stopped.turn(), Yielded)
    stopped.handle.stop("enough")
    stopped.handle.continue_()  # too late: the stop stands
    end = stopped.turn()
    assert isinstance(end, Completed) and end.result.termination.detail == "enough"
    assert stopped.provider.calls == 1


def test_the_depth_limit_errors_on_the_first_turn(log: LogBase) -> None:
    provider = ScriptedProvider([text("never")])
    handle = ToolLoop.start(log, provider, prompt="go", depth=1, config=ToolLoopConfig(max_depth=1))
    turn = handle.next_turn(timeout=T)
    assert isinstance(turn, Failed) and "max nesting depth" in turn.error.message
    assert provider.calls == 0
    assert handle.next_turn(timeout=T) == turn


def test_nested_loops_are_linked_and_limited(log: LogBase) -> None:
    inner = ScriptedProvider([text("inner answer")])
    too_deep = ScriptedProvider([text("never")])

    @tool
    def delegate(context: ToolContext) -> str:
        """Ask a sub-agent."""
        return str(context.runtime.run(context, inner, prompt="sub task", timeout=T).text)

    @tool
    def delegate_deep(context: ToolContext) -> str:
        """Ask a sub-agent that may not nest."""
        config = ToolLoopConfig(max_depth=1)
        return str(context.runtime.run(context, too_deep, prompt="x", config=config, timeout=T))

    run = Run(
        log,
        [calls(("delegate", {}), ("delegate_deep", {})), text("outer done")],
        tools=[delegate, delegate_deep],
    )
    assert run.result().text == "outer done"
    children = {
        s.stream: log.replay(s.stream) for s in log.streams() if s.parent == run.handle.stream
    }
    assert len(children) == 2
    for child in children.values():
        assert isinstance(child, LoopState) and child.depth == 1
        assert child.parent is not None and child.parent.stream == run.handle.stream
        start = next(r for r in log.read(run.handle.stream) if r.seq == child.parent.seq)
        assert isinstance(start.event, ToolExecutionStart)
    ends = {e.tool_name: e for e in run.events(ToolExecutionEnd)}
    assert ends["delegate"].content == "inner answer"
    assert ends["delegate_deep"].is_error and "max nesting depth" in ends["delegate_deep"].content
    assert too_deep.calls == 0


def test_a_child_config_cannot_loosen_the_depth_limit(log: LogBase) -> None:
    never = ScriptedProvider([text("never")])

    @tool
    def spawn(context: ToolContext) -> str:
        """Start a sub-loop with a config of its own that sets no depth limit."""
        config = ToolLoopConfig(max_depth=None)
        return str(context.runtime.run(context, never, prompt="x", config=config, timeout=T))

    run = Run(log, [calls(("spawn", {})), text("outer done")], tools=[spawn], max_depth=1)
    assert run.result().text == "outer done"
    end = run.events(ToolExecutionEnd)[0]
    assert end.is_error and "max nesting depth" in end.content
    assert never.calls == 0


def test_the_nested_hook_places_every_nested_loop_also_grandchildren(log: LogBase) -> None:
    """ToolLoopConfig.nested sees each loop a tool starts, in call order, and may give it
    another model and a stream id; loops started from nested loops inherit the hook."""
    asked = ScriptedProvider([text("never")])  # what the tools ask for: never used
    grandchild = ScriptedProvider([text("leaf answer")])
    child = ScriptedProvider([calls(("leaf", {})), text("child answer")])
    second = ScriptedProvider([text("second answer")])
    seen: list[NestedLoop] = []

    def place(plan: NestedLoop) -> NestedLoop:
        seen.append(plan)
        model = {("root", 0): child, ("root", 1): second}.get(
            (plan.parent.stream, plan.index), grandchild
        )
        return dataclasses.replace(plan, provider=model, stream=f"{plan.parent.stream}.{len(seen)}")

    @tool
    def leaf(context: ToolContext) -> str:
        """Ask the deepest helper."""
        return str(context.runtime.run(context, asked, prompt="leaf task", timeout=T).text)

    @tool
    def branch(context: ToolContext) -> str:
        """Ask a helper that has helpers of its own, twice."""
        tools = ToolRegistry([leaf])
        first = context.runtime.run(context, asked, tools, prompt="task", timeout=T)
        return f"{first.text} / {context.runtime.run(context, asked, prompt='again').text}"

    handle = ToolLoop.start(
        log,
        ScriptedProvider([calls(("branch", {})), text("root done")]),
        ToolRegistry([branch]),
        prompt="go",
        stream="root",
        config=ToolLoopConfig(nested=place),
    )
    try:
        assert handle.run(timeout=T).text == "root done"
    finally:
        handle.close()
    assert asked.calls == 0
    assert [(p.parent.stream, p.index) for p in seen] == [
        ("root", 0),
        ("root.1", 0),
        ("root", 1),
    ]
    heads = {h.stream: h.parent for h in log.streams()}
    assert heads == {"root": None, "root.1": "root", "root.1.2": "root.1", "root.3": "root"}
    depths = {s: log.replay(s).depth for s in heads}  # type: ignore[union-attr]
    assert depths == {"root": 0, "root.1": 1, "root.1.2": 2, "root.3": 1}
    end = next(e for e in (r.event for r in log.read("root")) if isinstance(e, ToolExecutionEnd))
    assert end.content == "child answer / second answer"


def test_masking_keeps_exactly_the_configured_recent_iterations(log: LogBase) -> None:
    replies = [calls(("search", {"query": f"q{i}"})) for i in range(4)] + [text("done")]
    run = Run(log, replies, mask_keep_iterations=2)
    run.result()
    fifth = run.provider.requests[4].messages
    results = [m.content[0].content for m in fifth if m.role == "tool"]  # type: ignore[union-attr]
    assert results == [MASKED_RESULT, MASKED_RESULT, "result for q2", "result for q3"]
    masked = run.events(ObservationsMasked)
    assert sum(m.masked_count for m in masked) == 2 and all(m.tokens_saved >= 0 for m in masked)


def test_results_go_through_processor_extractor_and_cacher(log: LogBase) -> None:
    run = Run(
        log,
        [calls(("search", {"query": "big"})), text("ok")],
        result_processor=lambda tool, content: content.upper(),
        result_extractor=lambda tool, content, query: f"[extract of {tool} for {query}]",
        extract_above_tokens=1,
        result_cacher=lambda tool, content: f"[cached {len(content)} chars]",
        cache_above_tokens=5,
    )
    run.result()
    assert run.events(ToolExecutionEnd)[0].content == "[cached 26 chars]"  # of the extract


# ------------------------------------------------------------- fixed defects


def test_the_final_answer_is_in_the_history(log: LogBase) -> None:
    run = Run(log, [calls(ADD), text("Final answer")])
    run.result()
    assert run.state().messages[-1] == ChatMessage(
        role="assistant", content=(TextBlock(text="Final answer"),)
    )


def test_an_error_is_terminal_and_repeats(log: LogBase) -> None:
    run = Run(log, [ScriptedReply(error="model overloaded"), text("never")])
    first = run.turn()
    assert isinstance(first, Failed) and first.error.message == "model overloaded"
    assert run.turn() == first and run.turn() == first
    assert len(run.events(LoopFailed)) == 1 and run.provider.calls == 1
    assert log.stream_info(run.handle.stream).status == "failed"


def test_parallel_results_are_fed_back_in_call_order(log: LogBase) -> None:
    order: list[str] = []

    @tool
    def first(context: ToolContext) -> str:
        """Finishes last: only once the end of ``second`` is on record."""
        with log.subscribe(stream=context.stream) as events:
            while True:
                record = events.next(timeout=T)
                assert record is not None, "second never ended"
                if (
                    isinstance(record.event, ToolExecutionEnd)
                    and record.event.tool_name == "second"
                ):
                    break
        order.append("first")
        return "1"

    @tool
    def second() -> str:
        """Finishes first."""
        order.append("second")
        return "2"

    run = Run(log, [calls(("first", {}), ("second", {})), text("ok")], tools=[first, second])
    run.result()
    assert order == ["second", "first"]
    ends = [e.tool_name for e in run.events(ToolExecutionEnd)]
    assert ends == ["second", "first"]  # appended live, as they ended
    fed = run.provider.requests[1].messages[-1]
    assert [b.content for b in fed.content] == ["1", "2"]  # type: ignore[union-attr]


def test_tools_reach_the_model_sorted_by_name(log: LogBase) -> None:
    run = Run(log, [text("hi")], tools=[search, add, fail])
    run.result()
    assert [t.name for t in run.provider.requests[0].tools] == ["add", "fail", "search"]


def test_reasoning_is_kept(log: LogBase) -> None:
    run = Run(log, [ScriptedReply(text="42", reasoning="six times seven")])
    result = run.result()
    assert [type(b).__name__ for b in result.response] == ["ReasoningBlock", "TextBlock"]


def test_events_are_causal_and_live_state_equals_replay(log: LogBase) -> None:
    run = Run(log, [calls(ADD, ("search", {"query": "x"})), calls(ADD), text("ok")])
    while True:
        turn = run.turn()
        assert run.state() == run.replay()
        if not isinstance(turn, Yielded):
            break
    kinds = [type(e).__name__ for e in run.events()]
    assert kinds[:3] == ["LoopStarted", "IterationStart", "LlmResponse"]
    assert kinds[-1] == "Done"
    for i, kind in enumerate(kinds):
        if kind == "ToolExecutionEnd":
            call_id = run.events()[i].call_id
            starts = [
                j
                for j, e in enumerate(run.events())
                if isinstance(e, ToolExecutionStart) and e.call_id == call_id
            ]
            assert starts and starts[0] < i
        if kind == "LlmResponse":
            assert kinds[i - 1] in ("IterationStart", "ObservationsMasked")


def test_approval_pauses_until_a_person_decides(log: LogBase) -> None:
    run = Run(
        log,
        [calls(ADD, ("search", {"query": "x"})), text("ok")],
        approval=lambda call: ask_person("check") if call.name == "add" else deny("no"),
    )
    paused = run.turn()
    assert isinstance(paused, Paused) and [c.name for c in paused.calls] == ["add"]
    assert log.stream_info(run.handle.stream).status == "awaiting"
    assert isinstance(run.turn(), Paused)  # still waiting
    run.handle.decide(paused.calls[0].id, "approve")
    assert isinstance(run.turn(), Yielded)
    assert run.result().text == "ok"
    assert run.events(ToolExecutionEnd)[0].content == "5.0"


def test_stop_ends_a_loop_paused_for_approval_at_once(log: LogBase) -> None:
    """Nobody has to decide first: a driver waiting for a decision sees the loop end."""
    from moot.actors._errors import ToolLoopError

    run = Run(log, [calls(ADD), text("never")], approval=lambda call: ask_person())
    paused: list[Paused] = []
    ended: concurrent.futures.Future[LoopResult] = concurrent.futures.Future()

    def drive() -> None:
        try:
            ended.set_result(run.handle.run(timeout=T, on_turn=note))
        except BaseException as exc:  # handed to the test thread
            ended.set_exception(exc)

    def note(turn: Any) -> None:
        if isinstance(turn, Paused):
            paused.append(turn)
            asked.set()

    asked = threading.Event()
    threading.Thread(target=drive, daemon=True).start()
    assert asked.wait(T)  # the driver now waits for a decision
    run.handle.inject([ChatMessage.text("user", "never mind")])
    run.handle.stop("the person left")
    result = ended.result(T)
    assert result.termination.reason == "stop_condition"
    assert result.termination.detail == "the person left"
    assert run.events(ToolExecutionStart) == []  # the waiting call never ran
    kinds = [type(e).__name__ for e in run.events()]
    assert kinds[-3:] == ["ApprovalRequested", "MessagesInjected", "Done"]
    state = run.replay()
    assert state.status == "completed" and state.awaiting == []
    assert run.state() == state
    assert run.provider.calls == 1  # no model call after the stop
    with pytest.raises(ToolLoopError, match="has ended"):
        run.handle.decide(paused[0].calls[0].id, "approve")


def test_stop_between_turns_still_waits_for_the_next_turn(log: LogBase) -> None:
    run = Run(log, [calls(ADD), text("never")])
    assert isinstance(run.turn(), Yielded)
    run.handle.stop()
    assert [type(e).__name__ for e in run.events()][-1] == "ToolExecutionEnd"  # not yet
    turn = run.turn()
    assert isinstance(turn, Completed)
    assert turn.result.termination.reason == "stop_condition"


def test_messages_of_the_wrong_shape_are_refused_before_they_reach_the_log(log: LogBase) -> None:
    from moot.actors._errors import ToolLoopError

    bad = ChatMessage(role="user", content="hi")  # type: ignore[arg-type]  # not blocks
    wrong = r"invalid LoopStarted: .* at `\$.messages\[0\].content`"
    with pytest.raises(ToolLoopError, match=wrong):
        ToolLoop.start(log, ScriptedProvider([text("x")]), messages=[bad])
    assert log.streams() == []
    run = Run(log, [calls(ADD), text("done")])
    assert isinstance(run.turn(), Yielded)
    with pytest.raises(ToolLoopError, match=r"invalid ChatMessage: .* at `\$.content`"):
        run.handle.inject([bad])
    assert run.result().text == "done"
    assert run.events(MessagesInjected) == []
    assert run.state() == run.replay()


def test_decisions_of_the_wrong_type_never_reach_the_log(log: LogBase) -> None:
    from moot.actors._errors import ToolLoopError

    run = Run(log, [calls(ADD), text("never")], approval=lambda call: deny(5))  # type: ignore[arg-type]
    turn = run.turn()
    assert isinstance(turn, Failed)
    assert turn.error.message.startswith("the approval policy's answer: invalid ToolCallDecided")
    assert run.state() == run.replay()  # the stream reads back
    run = Run(log, [calls(ADD), text("ok")], approval=lambda call: ask_person())
    paused = run.turn()
    assert isinstance(paused, Paused)
    call_id = paused.calls[0].id
    with pytest.raises(ToolLoopError, match=r"invalid ToolCallDecided: .* at `\$.reason`"):
        run.handle.decide(call_id, "deny", reason=5)  # type: ignore[arg-type]
    with pytest.raises(ToolLoopError, match=r"invalid ToolCallDecided: .* at `\$.arguments`"):
        run.handle.decide(call_id, "modify", arguments=[1])  # type: ignore[arg-type]
    with pytest.raises(ToolLoopError, match="a stop reason is a string, not int"):
        run.handle.stop(5)  # type: ignore[arg-type]
    run.handle.decide(call_id, "approve")
    assert run.result().text == "ok"
    assert run.state() == run.replay()


def test_a_tool_that_changes_its_arguments_changes_nothing_on_record(log: LogBase) -> None:
    @tool
    def tag(items: list[Any], opts: dict[str, Any]) -> str:
        """Tags things, carelessly editing what it was given."""
        items.append("MUTATED")
        opts["inner"].append("MUTATED")
        return "ok"

    asked = {"items": [1], "opts": {"inner": [1]}}
    run = Run(log, [calls(("tag", asked)), text("done")], tools=[tag])
    assert isinstance(run.turn(), Yielded)
    assert run.state() == run.replay()
    assert run.result().text == "done"
    sent = run.provider.requests[-1].messages[1].content[0]
    assert isinstance(sent, ToolCallBlock) and sent.arguments == asked


def test_text_utf8_cannot_hold_becomes_replacement_characters(log: LogBase) -> None:
    """A file name that is not UTF-8 reaches Python as lone surrogates (os.listdir)."""
    name = b"caf\xe9.txt".decode("utf-8", "surrogateescape")

    @tool
    def ls() -> str:
        """Lists files."""
        return "report.txt\n" + name

    @tool
    def cat() -> str:
        """Fails, naming the file."""
        raise RuntimeError(f"cannot read {name}")

    run = Run(log, [calls(("ls", {}), ("cat", {})), text("done")], tools=[ls, cat])
    assert run.result().text == "done"
    ends = {e.tool_name: e for e in run.events(ToolExecutionEnd)}
    assert ends["ls"].content == "report.txt\ncaf\ufffd.txt" and not ends["ls"].is_error
    assert ends["cat"].is_error and ends["cat"].content.endswith("cannot read caf\ufffd.txt")
    assert run.state() == run.replay()


def test_a_turn_that_outlasts_its_wait_is_the_next_one_returned(log: LogBase) -> None:
    gate = Gate()
    run = Run(log, [calls(("slow", {})), calls(("slow", {})), text("done")], tools=[gate.tool])
    with pytest.raises(TimeoutError, match=r"no turn ended within 0\.05 s"):
        run.handle.next_turn(timeout=0.05)
    with pytest.raises(TimeoutError, match="busy with a turn"):
        run.handle.state(timeout=0.05)
    gate.open.set()
    turn = run.handle.next_turn(timeout=T)  # the turn under way, not a new one
    assert isinstance(turn, Yielded) and turn.iteration == 1
    assert run.provider.calls == 1
    assert run.result().text == "done"


def test_a_handed_over_turn_that_failed_is_not_handed_over_twice(tmp_path: Path) -> None:
    from moot.store import StoreError

    class Flaky(EventLog):
        failing = False

        def append(self, stream: str, events: Any, **kwargs: Any) -> int:
            if self.failing:
                raise StoreError("disk full (simulated)")
            return super().append(stream, events, **kwargs)

    gate = Gate()
    log = Flaky(tmp_path / "flaky.db")
    run = Run(log, [calls(("slow", {})), text("done")], tools=[gate.tool])
    with pytest.raises(TimeoutError):
        run.handle.next_turn(timeout=0.05)
    log.failing = True
    gate.open.set()
    with pytest.raises(StoreError, match="disk full"):
        run.handle.next_turn(timeout=T)  # the turn under way, which failed
    log.failing = False
    assert isinstance(run.turn(), Yielded)  # a new try, not the old failure again
    assert run.result().text == "done"
    log.close()


def test_a_wait_behind_another_callers_turn_keeps_its_timeout(log: LogBase) -> None:
    gate = Gate()
    run = Run(log, [calls(("slow", {})), text("done")], tools=[gate.tool])
    first: concurrent.futures.Future[Any] = concurrent.futures.Future()
    threading.Thread(
        target=lambda: first.set_result(run.handle.next_turn(timeout=T)), daemon=True
    ).start()
    assert gate.running.wait(T)  # the other caller's turn is under way
    with pytest.raises(TimeoutError, match="another caller's turn"):
        run.handle.next_turn(timeout=0.05)
    gate.open.set()
    assert isinstance(first.result(T), Yielded)
    assert run.result().text == "done"


def test_a_closed_handle_says_so(log: LogBase) -> None:
    from moot.actors._errors import ToolLoopError

    gate = Gate()
    run = Run(log, [calls(("slow", {})), text("done")], tools=[gate.tool])
    with pytest.raises(TimeoutError):
        run.handle.next_turn(timeout=0.05)
    with pytest.raises(TimeoutError, match="still under way"):
        run.handle.close(timeout=0.05)
    gate.open.set()
    run.handle.close(timeout=T)  # the turn ends, then the actor stops
    run.handle.close()  # twice is harmless
    finished = run.handle.next_turn(timeout=T)  # the turn that was under way is not lost
    assert isinstance(finished, Yielded) and finished.iteration == 1
    for call in (
        lambda: run.handle.next_turn(timeout=T),
        lambda: run.handle.run(timeout=T),
        lambda: run.handle.inject([ChatMessage.text("user", "x")]),
        run.handle.stop,
        run.handle.continue_,
        run.handle.state,
        lambda: run.handle.decide("x", "approve"),
    ):
        with pytest.raises(ToolLoopError, match="this handle is closed"):
            call()
    assert [type(e).__name__ for e in run.events()][-1] == "ToolExecutionEnd"  # resumable


def test_a_loop_resumed_without_a_config_keeps_the_one_it_recorded(log: LogBase) -> None:
    same = calls(ADD)
    config = {"max_iterations": 3, "parallel_tool_execution": False, "mask_keep_iterations": 1}
    run = Run(log, [same, calls(("search", {"query": "a"})), same, text("never")], **config)
    assert isinstance(run.turn(), Yielded)
    run.handle.close()
    provider = ScriptedProvider([same, calls(("search", {"query": "a"})), same, text("never")])
    handle = ToolLoop.resume(log, run.handle.stream, provider, ToolRegistry([add, search]))
    result = handle.run(timeout=T)
    handle.close()
    assert (result.termination.reason, result.iterations) == ("max_iterations", 3)
    assert ToolLoopConfig.from_record(run.replay().config).record() == run.replay().config


def test_a_hook_failing_with_text_utf8_cannot_hold_ends_the_loop_on_record(
    log: LogBase,
) -> None:
    odd = b"file-\xff.txt".decode("utf-8", "surrogateescape")

    def stop_when(ctx: StopContext) -> bool:
        raise RuntimeError(f"cannot read {odd}")

    run = Run(log, [calls(ADD), text("never")], stop_when=stop_when)
    turn = run.turn()
    assert isinstance(turn, Failed) and turn.error.message == "cannot read file-\ufffd.txt"
    assert run.provider.calls == 1 and run.state() == run.replay()


def test_closing_the_handle_ends_a_wait_for_a_decision(log: LogBase) -> None:
    from moot.actors._errors import ToolLoopError

    run = Run(log, [calls(ADD), text("never")], approval=lambda call: ask_person())
    ended: concurrent.futures.Future[BaseException | None] = concurrent.futures.Future()
    asked = threading.Event()

    def drive() -> None:
        try:
            run.handle.run(on_turn=lambda turn: asked.set() if isinstance(turn, Paused) else None)
        except BaseException as exc:  # handed to the test thread
            ended.set_result(exc)
        else:
            ended.set_result(None)

    threading.Thread(target=drive, daemon=True).start()
    assert asked.wait(T)  # the driver waits for a person, with no time limit
    run.handle.close()
    failure = ended.result(T)
    assert isinstance(failure, ToolLoopError) and "this handle is closed" in str(failure)
    assert log.stream_info(run.handle.stream).status == "awaiting"  # resumable


def test_costs_from_a_pricing_table(log: LogBase) -> None:
    from moot.actors._loop import Pricing

    run = Run(log, [text("hi")])
    result = run.result()
    pricing = Pricing({"scripted": (1.0, 2.0)})
    usage = result.usage
    assert result.cost(pricing) == (usage.input_tokens + 2 * usage.output_tokens) / 1e6
    assert Pricing().cost("x", Usage(input_tokens=5)) == 0


def test_a_hook_that_raises_ends_the_loop_on_record(log: LogBase) -> None:
    def broken(ctx: StopContext) -> bool:
        raise ValueError("bad hook")

    run = Run(log, [calls(ADD), text("never")], stop_when=broken)
    turn = run.turn()
    assert isinstance(turn, Failed) and turn.error.message == "bad hook"
    kinds = [type(e).__name__ for e in run.events()]
    assert kinds[-2:] == ["LlmResponse", "LoopFailed"]  # the response is on record too
    assert run.state() == run.replay()


def test_the_fire_and_forget_form(log: LogBase) -> None:
    provider = ScriptedProvider([calls(ADD), text("5")])
    result = ToolLoop.run(log, provider, ToolRegistry([add]), prompt="2+3?", timeout=T)
    assert (result.text, result.iterations) == ("5", 2)
    assert log.stream_info(result.stream).status == "completed"
    failing = ScriptedProvider([ScriptedReply(error="down")])
    from moot.actors._errors import ToolLoopError

    with pytest.raises(ToolLoopError, match="down"):
        ToolLoop.run(log, failing, prompt="x", timeout=T)


# ------------------------------------------------------- restarts and failures


def test_a_decision_that_comes_before_the_wait_is_not_missed(log: LogBase) -> None:
    from moot.actors._loop import decision_event

    run = Run(log, [calls(ADD), text("ok")], approval=lambda call: ask_person())
    paused = run.turn()
    assert isinstance(paused, Paused)
    state = run.replay()  # as `moot approve` does, from outside the loop
    log.append(
        run.handle.stream,
        [decision_event(state, paused.calls[0].id, "approve")],
        expected_seq=state.seq,
    )
    run.handle.wait_for_decision(paused, deadline=time.monotonic() + T)  # returns at once
    assert isinstance(run.turn(), Yielded)


class Broken:
    """A provider with a bug of its own (not a ProviderError)."""

    name = "broken"
    model: str | None = "broken"

    def stream(self, request: Any, *, deadline: float | None = None) -> Any:
        raise KeyError("choices")

    def complete(self, request: Any, *, deadline: float | None = None) -> Any:
        raise KeyError("choices")


def test_a_provider_bug_is_a_failed_call(log: LogBase) -> None:
    handle = ToolLoop.start(log, Broken(), prompt="x")  # type: ignore[arg-type]
    turn = handle.next_turn(timeout=T)
    assert isinstance(turn, Failed) and turn.error.kind == "KeyError"
    assert log.stream_info(handle.stream).status == "failed"
    handle.close()


def test_a_hook_failing_after_an_approval_ends_the_loop_on_record(log: LogBase) -> None:
    def processor(tool: str, content: str) -> str:
        raise ValueError("processor bug")

    run = Run(
        log,
        [calls(ADD), text("never")],
        approval=lambda call: ask_person(),
        result_processor=processor,
    )
    paused = run.turn()
    assert isinstance(paused, Paused)
    run.handle.decide(paused.calls[0].id, "approve")
    turn = run.turn()
    assert isinstance(turn, Failed) and turn.error.message == "processor bug"
    assert log.stream_info(run.handle.stream).status == "failed"


def test_a_restarted_loop_keeps_its_warning_and_its_counts(log: LogBase) -> None:
    seen: list[int] = []

    def count(ctx: StopContext) -> None:
        seen.append(ctx.calls_executed)

    same = calls(("search", {"query": "x"}))
    config = {
        "loop_detection": LoopDetectionInfo(threshold=2, action="inject_warning"),
        "approval": lambda call: ask_person(),
        "stop_when": count,
    }
    run = Run(log, [same, same, text("done")], tools=[search], **config)
    restarted = False
    while True:
        turn = run.turn()
        if isinstance(turn, Paused):
            if run.replay().detections and not restarted:  # stop and resume, mid-round
                run.handle.close()
                provider = ScriptedProvider([same, same, text("done")])
                run.provider = provider
                run.handle = ToolLoop.resume(
                    log,
                    run.handle.stream,
                    provider,
                    ToolRegistry([search]),
                    ToolLoopConfig(**config),
                )
                restarted = True
            run.handle.decide(turn.calls[0].id, "approve")
        elif not isinstance(turn, Yielded):
            break
    assert restarted
    assert [e.source for e in run.events(MessagesInjected)] == ["loop_detection"]
    assert seen == [0, 1, 2]  # counted from the log, not from the process


def test_hooks_that_return_nonsense_end_the_loop_on_record(log: LogBase) -> None:
    run = Run(log, [calls(ADD), text("never")], approval=lambda call: None)  # type: ignore[arg-type,return-value]
    turn = run.turn()
    assert isinstance(turn, Failed) and "not an Approval" in turn.error.message
    assert run.state() == run.replay()
    other = Run(log, [calls(ADD), text("never")], result_processor=lambda t, c: None)  # type: ignore[arg-type,return-value]
    turn = other.turn()
    assert isinstance(turn, Failed) and "not str" in turn.error.message
    assert list(log.read(other.handle.stream))  # still readable: no null was written


# ------------------------------------------------------------- found in review


@tool
def leave() -> str:
    """A tool that calls sys.exit."""
    raise SystemExit(3)


@tool
def cancelled() -> str:
    """A tool whose own event loop was cancelled."""
    raise asyncio.CancelledError


def test_a_tool_raising_a_base_exception_is_an_error_result(log: LogBase) -> None:
    bystander = Run(log, [text("still here")])
    run = Run(log, [calls(("leave", {}), ("cancelled", {})), text("recovered")], [leave, cancelled])
    assert run.result().text == "recovered"
    ends = {e.tool_name: e for e in run.events(ToolExecutionEnd)}
    assert (ends["leave"].is_error, ends["leave"].content) == (True, "SystemExit: 3")
    assert (ends["cancelled"].is_error, ends["cancelled"].content) == (True, "CancelledError")
    assert ends["leave"].attempts == 1
    assert bystander.result().text == "still here"  # no other actor was stopped
    assert run.state() == run.replay()


def test_one_after_another_each_start_is_written_just_before_its_tool(log: LogBase) -> None:
    run = Run(
        log,
        [calls(ADD, ("search", {"query": "x"})), text("done")],
        parallel_tool_execution=False,
    )
    run.result()
    order = [
        (type(e).__name__, e.tool_name)
        for e in run.events()
        if isinstance(e, ToolExecutionStart | ToolExecutionEnd)
    ]
    assert order == [
        ("ToolExecutionStart", "add"),
        ("ToolExecutionEnd", "add"),
        ("ToolExecutionStart", "search"),
        ("ToolExecutionEnd", "search"),
    ]
    assert run.state() == run.replay()


def test_repeated_call_ids_are_made_unique_even_against_made_up_ones(log: LogBase) -> None:
    first = ScriptedReply(tool_calls=(ScriptedCall("add", {"a": 1, "b": 1}, id="call_1_1"),) * 2)
    run = Run(log, [first, text("both answered")])
    assert run.result().text == "both answered"
    ids = [e.call_id for e in run.events(ToolExecutionEnd)]
    assert len(ids) == 2 and len(set(ids)) == 2
    answered = run.provider.requests[1].messages[-1].content
    assert [b.tool_call_id for b in answered] == ids  # type: ignore[union-attr]


def test_a_call_id_the_server_repeats_every_iteration_is_made_unique_each_time(
    log: LogBase,
) -> None:
    again = ScriptedReply(tool_calls=(ScriptedCall("add", {"a": 1, "b": 2}, id="call_x"),))
    run = Run(log, [again, again, again, text("done")])
    assert run.result().text == "done"
    ids = [e.call_id for e in run.events(ToolExecutionEnd)]
    assert ids[0] == "call_x" and len(set(ids)) == 3
    assert run.replay() == run.state()


def test_modify_to_empty_arguments_runs_with_empty_arguments(log: LogBase) -> None:
    seen: list[dict[str, Any]] = []

    @tool
    def knob(level: int = 1) -> str:
        """A tool with a default."""
        seen.append({"level": level})
        return str(level)

    run = Run(
        log, [calls(("knob", {"level": 9})), text("ok")], [knob], approval=lambda c: modify({})
    )
    run.result()
    assert seen == [{"level": 1}]
    assert run.events(ToolExecutionStart)[0].arguments == {}


def test_an_approval_policy_with_a_made_up_decision_fails_the_loop_cleanly(log: LogBase) -> None:
    run = Run(log, [calls(ADD), text("never")], approval=lambda c: Approval("Approve"))  # type: ignore[arg-type]
    turn = run.turn()
    assert isinstance(turn, Failed)
    assert "decided 'Approve'" in turn.error.message
    assert run.events(ToolExecutionStart) == [] and run.events(ToolCallDecided) == []
    assert run.replay() == run.state()  # the stream still reads back


class _BadArguments:
    """A model whose first reply calls a tool with arguments that are not JSON."""

    name = "bad-arguments"
    model = "bad-arguments"

    def __init__(self) -> None:
        self.requests: list[Any] = []

    def stream(self, request: Any, *, deadline: float | None = None) -> Iterator[Any]:
        self.requests.append(request)
        if len(self.requests) == 1:
            yield ToolCallStart(index=0, id="c1", name="add")
            yield ToolCallDelta(index=0, arguments='{"a": 2, "b": ')  # cut short
            yield Finished(stop_reason="tool_use", model=self.model)
        else:
            yield TextDelta(text="I will send valid JSON next time")
            yield Finished(stop_reason="end_turn", model=self.model)

    def complete(self, request: Any, *, deadline: float | None = None) -> Any:
        return assemble(self.stream(request, deadline=deadline))


def test_arguments_that_are_not_json_get_an_error_result(log: LogBase) -> None:
    model = _BadArguments()
    handle = ToolLoop.start(log, model, ToolRegistry([add]), prompt="go")
    result = handle.run(timeout=T)
    assert result.text == "I will send valid JSON next time"
    ends = [r.event for r in log.read(handle.stream) if isinstance(r.event, ToolExecutionEnd)]
    assert len(ends) == 1 and ends[0].is_error
    assert ends[0].content == (
        'Invalid arguments for tool \'add\': not a JSON object: {"a": 2, "b": '
    )
    answer = model.requests[1].messages[-1].content[0]
    assert isinstance(answer, ToolResultBlock) and answer.is_error
    assert log.replay(handle.stream) == handle.state()
