"""Tool-loop benchmarks, each next to a bare baseline measured in the same run.

    python scripts/benchmarks/loop.py [--runs 5] [--iterations 200]

Every loop writes to an EventLog in a temporary file (synchronous=FULL, the default),
so the figures include the durable log. Figures are medians of --runs runs:

  * overhead per iteration, with an instant model (a ScriptedProvider answering each
    call with one tool call) and an instant tool, over loops of --iterations
    iterations. An iteration is IterationStart, the model call, LlmResponse,
    ToolExecutionStart, the tool and ToolExecutionEnd: four commits. It is shown next
    to a bare durable append of one event (EventLog.append), so a ratio of 4.0 would
    be the four commits and nothing else. The first and the last 20 iterations are
    shown apart, since the history sent to the model grows with every iteration;
  * parallel tools: one response asking for 20 tools that take 100 ms each. The wall
    time of that round (``handle.next_turn()``: IterationStart, the model call,
    LlmResponse, 20 ToolExecutionStart, the tools, 20 ToolExecutionEnd) divided by
    100 ms (target: at most 1.2), next to a bare ThreadPoolExecutor running 20 sleeps
    of 100 ms. Where the round's time goes is printed from the tools' own clocks.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from moot.actors import ScriptedCall, ScriptedProvider, ScriptedReply, ToolRegistry, tool
from moot.actors._loop import Completed, ToolLoop, ToolLoopConfig, ToolLoopHandle, Yielded
from moot.events import ChatMessage, LoopStarted, ToolExecutionEnd, encode_event
from moot.store import EventLog

if TYPE_CHECKING:
    from collections.abc import Iterator

#: Seconds to wait for any turn of a loop; a benchmark that hangs is a failed one.
TIMEOUT = 60.0
#: How long a slow tool takes.
TOOL_SECONDS = 0.100
#: Tool calls in the parallel round.
PARALLEL = 20
#: Timed rounds per run in the parallel benchmark (the run's figure is their median).
ROUNDS_PER_RUN = 3
#: Iterations at each end of a loop shown apart.
EDGE = 20


def fresh_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="moot-bench-"))


@contextmanager
def log_on_disk() -> Iterator[EventLog]:
    """A fresh EventLog file; closed, and removed, on exit."""
    folder = fresh_dir()
    log = EventLog(folder / "loop.db")
    try:
        yield log
    finally:
        log.close()
        shutil.rmtree(folder)


@contextmanager
def running_loop(
    log: EventLog, replies: list[ScriptedReply], tools: ToolRegistry
) -> Iterator[ToolLoopHandle]:
    """A loop over ``replies`` (plus a final answer), closed on exit."""
    script = [*replies, ScriptedReply(text="done")]
    config = ToolLoopConfig(max_iterations=len(script))
    handle = ToolLoop.start(log, ScriptedProvider(script), tools, prompt="go", config=config)
    try:
        yield handle
    finally:
        handle.close()


def tool_round(handle: ToolLoopHandle, calls: int) -> Yielded:
    """One iteration, after making sure its tools really ran (no failure goes unnoticed)."""
    turn = handle.next_turn(timeout=TIMEOUT)
    if not isinstance(turn, Yielded) or len(turn.results) != calls:
        raise RuntimeError(f"expected {calls} tool result(s), got {turn!r}")
    if any(r.is_error for r in turn.results):
        raise RuntimeError(f"a tool failed: {turn.results}")
    return turn


def finish(handle: ToolLoopHandle) -> None:
    turn = handle.next_turn(timeout=TIMEOUT)
    if not isinstance(turn, Completed):
        raise RuntimeError(f"the loop did not complete: {turn!r}")


# ------------------------------------------------------ overhead per iteration


@tool
def echo(text: str) -> str:
    """Return the text as it is.

    Args:
        text: What to return.
    """
    return text


class Iterations(NamedTuple):
    """One loop's figures, in microseconds per iteration."""

    #: The median iteration.
    all: float
    first: float
    last: float
    commits: float


def bench_iterations(iterations: int) -> Iterations:
    replies = [
        ScriptedReply(tool_calls=(ScriptedCall("echo", {"text": f"step {i}"}),))
        for i in range(iterations)
    ]
    with log_on_disk() as log, running_loop(log, replies, ToolRegistry([echo])) as handle:
        commits = log._commits
        took = []
        for _ in range(iterations):
            started = time.perf_counter()
            tool_round(handle, 1)
            took.append(time.perf_counter() - started)
        commits = log._commits - commits
        finish(handle)
    return Iterations(
        all=statistics.median(took) * 1e6,
        first=statistics.median(took[:EDGE]) * 1e6,
        last=statistics.median(took[-EDGE:]) * 1e6,
        commits=commits / iterations,
    )


#: The baseline's event: a tool's end, as an iteration of the loop above appends it.
TOOL_END = ToolExecutionEnd(
    call_id="call_0_0", tool_name="echo", content="step 0", duration_ms=0.05, attempts=1
)


def bench_append(n: int) -> float:
    """Microseconds per bare durable ``EventLog.append`` of one event."""
    with log_on_disk() as log:
        log.append("loop", [LoopStarted(messages=(ChatMessage.text("user", "go"),))])
        for _ in range(20):
            log.append("loop", [TOOL_END])
        started = time.perf_counter()
        for _ in range(n):
            log.append("loop", [TOOL_END])
        elapsed = time.perf_counter() - started
    return elapsed / n * 1e6


def report_iterations(runs: int, iterations: int) -> None:
    appends, results = [], []
    for _ in range(runs):  # interleaved: both see the same load
        appends.append(bench_append(500))
        results.append(bench_iterations(iterations))
    append = statistics.median(appends)
    ours = Iterations(*(statistics.median(column) for column in zip(*results, strict=True)))
    print(
        f"per iteration, {iterations} iterations, instant model and tool: {ours.all:,.0f} us "
        f"({ours.commits:.1f} commits/iteration)  bare durable append "
        f"({len(encode_event(TOOL_END))} bytes): {append:,.0f} us  ratio {ours.all / append:.2f}"
        f" (the commits alone: {ours.commits:.1f})"
    )
    print(
        f"  first {EDGE} iterations: {ours.first:,.0f} us each (ratio {ours.first / append:.2f}),"
        f" last {EDGE}: {ours.last:,.0f} us (ratio {ours.last / append:.2f})"
    )


# ------------------------------------------------------------ parallel tools


class Clock:
    """When the slow tool's calls started and ended (``list.append`` is atomic)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []

    def clear(self) -> None:
        self.starts.clear()
        self.ends.clear()


CLOCK = Clock()


@tool
def slow() -> str:
    """Take 100 ms, like a call to a remote service."""
    CLOCK.starts.append(time.perf_counter())
    time.sleep(TOOL_SECONDS)
    CLOCK.ends.append(time.perf_counter())
    return "slept"


class RoundTiming(NamedTuple):
    """One round, in seconds from the call to ``next_turn``."""

    wall: float
    first_start: float
    last_start: float
    last_end: float
    #: From the last tool's return to ``next_turn`` returning.
    tail: float
    commits: float


def timed_round(log: EventLog, handle: ToolLoopHandle) -> RoundTiming:
    CLOCK.clear()
    commits = log._commits
    started = time.perf_counter()
    tool_round(handle, PARALLEL)
    ended = time.perf_counter()
    last_end = max(CLOCK.ends)
    return RoundTiming(
        wall=ended - started,
        first_start=min(CLOCK.starts) - started,
        last_start=max(CLOCK.starts) - started,
        last_end=last_end - started,
        tail=ended - last_end,
        commits=log._commits - commits,
    )


def medians(samples: list[RoundTiming]) -> RoundTiming:
    return RoundTiming(*(statistics.median(column) for column in zip(*samples, strict=True)))


def bench_parallel() -> RoundTiming:
    """One run: a fresh loop whose responses each ask for 20 slow tools at once."""
    calls = tuple(ScriptedCall("slow") for _ in range(PARALLEL))
    replies = [ScriptedReply(tool_calls=calls)] * ROUNDS_PER_RUN
    with log_on_disk() as log, running_loop(log, replies, ToolRegistry([slow])) as handle:
        timings = [timed_round(log, handle) for _ in range(ROUNDS_PER_RUN)]
        finish(handle)
    return medians(timings)


def bare_round() -> float:
    """The baseline: a fresh pool (as the loop makes one per round) running 20 sleeps."""
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        for future in [pool.submit(time.sleep, TOOL_SECONDS) for _ in range(PARALLEL)]:
            future.result(timeout=TIMEOUT)
    return time.perf_counter() - started


def report_parallel(runs: int) -> None:
    bench_parallel()  # warm-up: imports, the first pool, the first loop actor
    timings, bares = [], []
    for _ in range(runs):  # interleaved: both see the same load
        timings.append(bench_parallel())
        bares.append(statistics.median(bare_round() for _ in range(ROUNDS_PER_RUN)))
    timing, bare = medians(timings), statistics.median(bares)
    ratio = timing.wall / TOOL_SECONDS
    print(
        f"{PARALLEL} parallel tools x {TOOL_SECONDS * 1000:.0f} ms: {timing.wall * 1000:.1f} ms "
        f"wall, ratio {ratio:.2f} (target <= 1.2: {'met' if ratio <= 1.2 else 'not met'})  "
        f"bare ThreadPoolExecutor: {bare * 1000:.1f} ms, ratio {bare / TOOL_SECONDS:.2f}"
    )
    print(
        f"  tools started {timing.first_start * 1000:.1f}-{timing.last_start * 1000:.1f} ms "
        f"into the round, the last returned at {timing.last_end * 1000:.1f} ms, the round "
        f"ended {timing.tail * 1000:.1f} ms later; {timing.commits:.0f} commits/round; "
        f"{(timing.wall - bare) * 1000:.1f} ms more than the bare pool"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=200)
    args = parser.parse_args()
    report_iterations(args.runs, args.iterations)
    report_parallel(args.runs)


if __name__ == "__main__":
    main()
