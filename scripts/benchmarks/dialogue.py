"""Dialogue benchmarks, each next to a bare baseline measured in the same run.

    python scripts/benchmarks/dialogue.py [--runs 5] [--turns 200] [--long-turns 10000]

Every dialogue writes to an EventLog in a temporary file (synchronous=FULL, the
default), so the figures include the durable log. Figures are medians of --runs runs:

  * overhead per agent message: 4 instant participants (a CallableAgent returning a
    constant, and an LlmAgent over a ScriptedProvider with no delay) x --turns broadcast
    turns, next to a bare pykka ask round trip and a bare durable append of one
    ~200-byte DialogueMessage;
  * broadcast efficiency: 10 and 100 participants that each take 50 ms (a model's
    latency, simulated with ``time.sleep``): the wall time of one turn after a warm-up
    turn, divided by 50 ms (target: at most 1.1 with 100), next to a bare pykka fan-out
    (as many actors, each told to sleep 50 ms and report back). Where the turn's time
    goes is printed from the agents' own clocks: when the first and the last agent
    started, when the last one returned, and how long the turn took after that;
  * memory, each in a fresh interpreter: RSS per open idle dialogue (200 dialogues of 4
    participants) next to as many bare idle pykka actors, and RSS across a --long-turns
    dialogue of 2 instant participants at 10 %, 50 % and 100 % of its turns. If RSS
    grows, a traced run names the lines that allocate what is kept (tracemalloc) and
    the containers that hold it.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import gc
import multiprocessing
import shutil
import statistics
import tempfile
import threading
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec
import pykka

import moot.actors
import moot.events
import moot.store
from moot.actors import (
    CallableAgent,
    Dialogue,
    LlmAgent,
    Participant,
    ScriptedProvider,
    ScriptedReply,
)
from moot.events import (
    DialogueMessage,
    DialogueStarted,
    ParticipantInfo,
    Speaker,
    encode_event,
)
from moot.store import EventLog

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from moot.actors import Agent, Payload, TurnReply

#: Seconds to wait for any reply or actor; a benchmark that hangs is a failed one.
TIMEOUT = 60.0
#: What an instant agent answers: ~100 characters, so a stored reply is ~250 bytes.
REPLY = "An instant reply of a constant length, about as long as one short sentence of a model."
#: The simulated latency of a slow agent.
LATENCY = 0.050
#: Timed turns per run in the broadcast benchmark (the run's figure is their median).
TURNS_PER_RUN = 3
#: RSS growth across the long dialogue above which it counts as growing.
GROWTH_BYTES = 2_000_000


def median(fn: Callable[[], float], runs: int) -> float:
    return statistics.median(fn() for _ in range(runs))


def fresh_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="moot-bench-"))


def rss() -> int:
    """This process's resident set size in bytes (VmRSS of /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a new interpreter, so that its RSS owes nothing to earlier runs."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


# ----------------------------------------------------------------- agents


def constant_reply(_payload: Payload) -> str:
    return REPLY


def callable_agent(_turns: int) -> Agent:
    return CallableAgent(constant_reply)


def llm_agent(turns: int) -> Agent:
    """An LlmAgent (history bounded to 20 exchanges) whose script lasts ``turns`` turns."""
    return LlmAgent(ScriptedProvider([ScriptedReply(text=REPLY)] * turns))


AGENTS: dict[str, Callable[[int], Agent]] = {
    "CallableAgent": callable_agent,
    "LlmAgent over ScriptedProvider": llm_agent,
}


def people(count: int, make: Callable[[int], Agent], turns: int) -> list[Participant]:
    return [Participant(f"p{i}", make(turns)) for i in range(count)]


@contextmanager
def dialogue_on_disk(participants: list[Participant]) -> Iterator[tuple[EventLog, Dialogue]]:
    """A dialogue on a fresh EventLog file; closed, and the file removed, on exit."""
    folder = fresh_dir()
    log = EventLog(folder / "dialogue.db")
    try:
        with Dialogue.create(log, participants=participants, timeout=TIMEOUT) as dialogue:
            yield log, dialogue
    finally:
        log.close()
        shutil.rmtree(folder)


def checked(replies: list[TurnReply], expected: int) -> list[TurnReply]:
    """``replies``, after making sure the turn really ran (no failure goes unnoticed)."""
    failed = [r.error.message for r in replies if r.error is not None]
    if failed or len(replies) != expected:
        raise RuntimeError(f"turn went wrong: {len(replies)}/{expected} replies, {failed[:1]}")
    return replies


# ------------------------------------------------- overhead per message


def bench_messages(
    make: Callable[[int], Agent], participants: int, turns: int
) -> tuple[float, float]:
    """Microseconds per agent message (median turn / participants), and commits per turn."""
    with dialogue_on_disk(people(participants, make, turns + 1)) as (log, dialogue):
        checked(dialogue.run("warm up", timeout=TIMEOUT), participants)
        commits = log._commits
        took = []
        for turn in range(turns):
            started = time.perf_counter()
            checked(dialogue.run(f"turn {turn}", timeout=TIMEOUT), participants)
            took.append(time.perf_counter() - started)
        commits = log._commits - commits
    return statistics.median(took) / participants * 1e6, commits / turns


class Idle(pykka.ThreadingActor):
    """An actor that does nothing: what pykka costs by itself."""

    use_daemon_thread = True

    def on_receive(self, message: Any) -> None:
        return None


def bench_ask(n: int) -> float:
    """Microseconds per bare ``ask`` round trip to an actor that answers at once."""
    ref = Idle.start()
    try:
        for _ in range(100):
            ref.ask("ping", timeout=TIMEOUT)
        started = time.perf_counter()
        for _ in range(n):
            ref.ask("ping", timeout=TIMEOUT)
        elapsed = time.perf_counter() - started
    finally:
        ref.stop(timeout=TIMEOUT)
    return elapsed / n * 1e6


START = DialogueStarted(
    mode="broadcast",
    order="completion",
    participants=(ParticipantInfo(name="p0"), ParticipantInfo(name="p1")),
)
#: The baseline's event: an agent message of about 200 bytes once encoded.
MESSAGE = DialogueMessage(
    turn=1, speaker=Speaker(kind="agent", name="p0"), content=REPLY[:96], origin="agent"
)


def bench_append(n: int) -> float:
    """Microseconds per bare durable ``EventLog.append`` of one DialogueMessage."""
    folder = fresh_dir()
    log = EventLog(folder / "append.db")
    try:
        log.append("s", [START])
        for _ in range(20):
            log.append("s", [MESSAGE])
        started = time.perf_counter()
        for _ in range(n):
            log.append("s", [MESSAGE])
        elapsed = time.perf_counter() - started
    finally:
        log.close()
        shutil.rmtree(folder)
    return elapsed / n * 1e6


def report_messages(runs: int, turns: int) -> None:
    """Each run measures the baselines and then the dialogues, so that all of them see
    the same load on a shared machine."""
    asks, appends = [], []
    ours: dict[str, list[tuple[float, float]]] = {label: [] for label in AGENTS}
    for _ in range(runs):
        asks.append(bench_ask(2000))
        appends.append(bench_append(500))
        for label, make in AGENTS.items():
            ours[label].append(bench_messages(make, 4, turns))
    ask, append = statistics.median(asks), statistics.median(appends)
    print(
        f"bare pykka ask round trip: {ask:,.0f} us   bare durable append "
        f"({len(encode_event(MESSAGE))} bytes): {append:,.0f} us"
    )
    for label, results in ours.items():
        each = statistics.median(r[0] for r in results)
        commits = statistics.median(r[1] for r in results)
        print(
            f"per agent message, 4 x {turns} broadcast turns, {label}: {each:,.0f} us "
            f"({commits:.1f} commits/turn)  ratio to ask {each / ask:.1f}, "
            f"to append {each / append:.2f}"
        )


# ------------------------------------------------------- broadcast


class Sleeper:
    """An agent body that takes ``seconds`` (a model's latency) and notes when it ran.

    Called in participant threads; ``list.append`` is atomic, so no lock is needed.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.starts: list[float] = []
        self.ends: list[float] = []

    def __call__(self, _payload: Payload) -> str:
        self.starts.append(time.perf_counter())
        time.sleep(self.seconds)
        self.ends.append(time.perf_counter())
        return "done"


class TurnTiming(NamedTuple):
    """One turn, in seconds from the call to ``run``."""

    wall: float
    first_start: float
    last_start: float
    last_end: float
    #: From the last agent's return to ``run`` returning.
    tail: float
    commits: float


def timed_turn(log: EventLog, dialogue: Dialogue, sleeper: Sleeper, n: int) -> TurnTiming:
    sleeper.starts.clear()
    sleeper.ends.clear()
    commits = log._commits
    started = time.perf_counter()
    checked(dialogue.run("go", timeout=TIMEOUT), n)
    ended = time.perf_counter()
    last_end = max(sleeper.ends)
    return TurnTiming(
        wall=ended - started,
        first_start=min(sleeper.starts) - started,
        last_start=max(sleeper.starts) - started,
        last_end=last_end - started,
        tail=ended - last_end,
        commits=log._commits - commits,
    )


def medians(samples: list[TurnTiming]) -> TurnTiming:
    return TurnTiming(*(statistics.median(column) for column in zip(*samples, strict=True)))


def bench_broadcast(n: int) -> TurnTiming:
    """One run: a fresh dialogue of ``n`` slow participants, a warm-up turn, timed turns."""
    sleeper = Sleeper(LATENCY)
    with dialogue_on_disk([Participant(f"p{i}", CallableAgent(sleeper)) for i in range(n)]) as (
        log,
        dialogue,
    ):
        checked(dialogue.run("warm up", timeout=TIMEOUT), n)
        return medians([timed_turn(log, dialogue, sleeper, n) for _ in range(TURNS_PER_RUN)])


class Napper(pykka.ThreadingActor):
    """The bare fan-out's actor: sleeps like a slow agent, then reports back."""

    use_daemon_thread = True

    def __init__(self, seconds: float, done: Countdown) -> None:
        super().__init__()
        self.seconds = seconds
        self.done = done

    def on_receive(self, message: Any) -> None:
        time.sleep(self.seconds)
        self.done()


class Countdown:
    """Set ``finished`` once it has been called ``reset(n)``'s n times (any threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._left = 0
        self.finished = threading.Event()

    def reset(self, n: int) -> None:
        self._left = n
        self.finished.clear()

    def __call__(self) -> None:
        with self._lock:
            self._left -= 1
            if self._left == 0:
                self.finished.set()


def fan_out(refs: list[pykka.ActorRef[Any]], countdown: Countdown) -> float:
    countdown.reset(len(refs))
    started = time.perf_counter()
    for ref in refs:
        ref.tell("go")
    if not countdown.finished.wait(TIMEOUT):
        raise RuntimeError("bare fan-out did not finish")
    return time.perf_counter() - started


def bench_fan_out(n: int) -> float:
    """One run of the bare baseline: ``n`` actors told at once, each sleeping 50 ms."""
    countdown = Countdown()
    refs = [Napper.start(LATENCY, countdown) for _ in range(n)]
    try:
        fan_out(refs, countdown)
        return statistics.median(fan_out(refs, countdown) for _ in range(TURNS_PER_RUN))
    finally:
        pykka.get_all([ref.stop(block=False) for ref in refs], timeout=TIMEOUT)


def report_broadcast(runs: int) -> None:
    for n in (10, 100):
        timings, bares = [], []
        for _ in range(runs):  # interleaved: both see the same load
            timings.append(bench_broadcast(n))
            bares.append(bench_fan_out(n))
        timing, bare = medians(timings), statistics.median(bares)
        ratio = timing.wall / LATENCY
        target = ""
        if n == 100:
            target = f" (target <= 1.1: {'met' if ratio <= 1.1 else 'not met'})"
        print(
            f"broadcast {n} x {LATENCY * 1000:.0f} ms: {timing.wall * 1000:.1f} ms wall, ratio "
            f"{ratio:.2f}{target}  bare pykka fan-out: {bare * 1000:.1f} ms, ratio "
            f"{bare / LATENCY:.2f}"
        )
        print(
            f"  agents started {timing.first_start * 1000:.1f}-{timing.last_start * 1000:.1f} ms "
            f"into the turn, the last returned at {timing.last_end * 1000:.1f} ms, the turn "
            f"ended {timing.tail * 1000:.1f} ms later; {timing.commits:.0f} commits/turn; "
            f"{(timing.wall - bare) * 1000:.1f} ms more than the bare fan-out"
        )


# --------------------------------------------------------------- memory


def idle_dialogues(count: int, size: int, talk: bool) -> float:
    """Bytes of RSS per open dialogue of ``size`` instant participants (fresh process)."""
    folder = fresh_dir()
    log = EventLog(folder / "idle.db")
    opened: list[Dialogue] = []
    try:
        with Dialogue.create(log, participants=people(size, callable_agent, 2)) as warm:
            checked(warm.run("warm up", timeout=TIMEOUT), size)
        gc.collect()
        before = rss()
        for _ in range(count):
            dialogue = Dialogue.create(log, participants=people(size, callable_agent, 2))
            opened.append(dialogue)
            if talk:
                checked(dialogue.run("hello", timeout=TIMEOUT), size)
        gc.collect()
        grown = rss() - before
    finally:
        for dialogue in opened:
            dialogue.close()
        log.close()
        shutil.rmtree(folder)
    return grown / count


def idle_actors(count: int) -> float:
    """Bytes of RSS per bare idle pykka actor (fresh process)."""
    warm = Idle.start()
    warm.stop(timeout=TIMEOUT)
    gc.collect()
    before = rss()
    refs: list[pykka.ActorRef[Any]] = []
    try:
        refs.extend(Idle.start() for _ in range(count))
        gc.collect()
        grown = rss() - before
    finally:
        pykka.get_all([ref.stop(block=False) for ref in refs], timeout=TIMEOUT)
    return grown / count


def report_idle(runs: int) -> None:
    count, size = 200, 4
    actors = size + 1  # a coordinator and one actor per participant
    opened = median(lambda: in_fresh_process(idle_dialogues, count, size, False), runs)
    talked = median(lambda: in_fresh_process(idle_dialogues, count, size, True), runs)
    bare = median(lambda: in_fresh_process(idle_actors, count * actors), runs) * actors
    print(
        f"RSS per open idle dialogue ({count} x {size} participants): {opened / 1024:,.0f} KB "
        f"(after one turn each: {talked / 1024:,.0f} KB)  bare pykka, {actors} idle actors: "
        f"{bare / 1024:,.0f} KB  ratio {opened / bare:.2f}"
    )


class LongRun(NamedTuple):
    samples: list[tuple[int, int]]
    seconds: float
    kept: int


def sample_points(turns: int) -> list[int]:
    return [turns // 10, turns // 2, turns]


def long_dialogue(kind: str, turns: int) -> LongRun:
    """RSS of a ``turns``-turn dialogue of 2 instant agents at its sample points."""
    points = set(sample_points(turns))
    samples = []
    with dialogue_on_disk(people(2, AGENTS[kind], turns)) as (_log, dialogue):
        started = time.perf_counter()
        for turn in range(1, turns + 1):
            checked(dialogue.run(f"turn {turn}", timeout=TIMEOUT), 2)
            if turn in points:
                gc.collect()
                samples.append((turn, rss()))
        elapsed = time.perf_counter() - started
        kept = len(dialogue.state().messages)
    return LongRun(samples, elapsed, kept)


def report_long(turns: int) -> None:
    for kind in AGENTS:
        run = in_fresh_process(long_dialogue, kind, turns)
        first, last = run.samples[0], run.samples[-1]
        growth = last[1] - first[1]
        verdict = "flat" if growth < GROWTH_BYTES else "GROWS"
        mbs = " / ".join(f"{r / 1e6:.1f}" for _, r in run.samples)
        at = " / ".join(f"{t:,}" for t, _ in run.samples)
        per_turn = growth / (last[0] - first[0]) / 1024
        print(
            f"RSS across a {turns:,}-turn dialogue of 2 instant participants ({kind}): {mbs} MB "
            f"at turns {at}: {verdict} ({per_turn:+.2f} KB/turn); the state keeps "
            f"{run.kept} message(s); {run.seconds / turns * 1000:.2f} ms/turn"
        )
        if growth >= GROWTH_BYTES:
            for line in in_fresh_process(trace_growth, kind, 100, 200, 600):
                print("  " + line)


# ------------------------------------------------- what grows, if anything


def moot_roots() -> tuple[str, ...]:
    """The folders of moot's packages (a frame there is moot's own code)."""
    packages = (moot.actors, moot.events, moot.store)
    return tuple(str(Path(m.__file__).parent) for m in packages if m.__file__ is not None)


def where(traceback: tracemalloc.Traceback, roots: tuple[str, ...]) -> str:
    """The innermost moot frames of an allocation, innermost first."""
    frames = [f for f in reversed(traceback) if f.filename.startswith(roots)]
    shown = [f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno}" for f in frames]
    return " < ".join(shown[:4]) or str(traceback[-1])


def sizes() -> dict[int, int]:
    """Length by id of every container the garbage collector tracks."""
    kinds = (list, dict, set, collections.deque)
    return {id(o): len(o) for o in gc.get_objects() if isinstance(o, kinds)}


def owner(container: object) -> str:
    """``Class.attribute`` of the object holding ``container``, when one is found.

    Since Python 3.11 an instance's attributes live in the object until its
    ``__dict__`` is asked for, so the referrer is the instance itself, or its dict.
    """
    for referrer in gc.get_referrers(container):
        holders = [referrer]
        if isinstance(referrer, dict):
            holders = [h for h in gc.get_referrers(referrer) if vars_of(h) is referrer]
        for holder in holders:
            for name, value in fields(holder):
                if value is container:
                    return f"{type(holder).__qualname__}.{name}"
    return f"a {type(container).__name__} held by no attribute"


def vars_of(obj: object) -> dict[str, Any] | None:
    try:
        return vars(obj)
    except TypeError:
        return None


def fields(obj: object) -> list[tuple[str, Any]]:
    """An object's attributes: a Struct's fields, or its ``__dict__``."""
    if isinstance(obj, msgspec.Struct):
        return [(name, getattr(obj, name)) for name in obj.__struct_fields__]
    attributes = vars_of(obj)
    return [] if attributes is None or isinstance(obj, type) else list(attributes.items())


def trace_growth(kind: str, start: int, first: int, last: int) -> list[str]:
    """What the long dialogue keeps between turns ``first`` and ``last`` (fresh process).

    Tracing starts at turn ``start``; the top allocation sites still alive at ``last``
    that were not at ``first`` are listed, then the containers that grew in between.
    """
    with dialogue_on_disk(people(2, AGENTS[kind], last)) as (_log, dialogue):
        talk(dialogue, 1, start)
        tracemalloc.start(25)
        talk(dialogue, start, first + 1)
        before, lengths = settled_snapshot(), sizes()
        talk(dialogue, first + 1, last + 1)
        after = settled_snapshot()
        tracemalloc.stop()
        span = last - first
        lines = [f"tracemalloc, turns {first:,}-{last:,}: what was allocated and is still kept"]
        lines += allocation_lines(after.compare_to(before, "traceback")[:3], span)
        lines += container_lines(lengths, span)
    return lines


def talk(dialogue: Dialogue, first: int, stop: int) -> None:
    for turn in range(first, stop):
        checked(dialogue.run(f"turn {turn}", timeout=TIMEOUT), 2)


def settled_snapshot() -> tracemalloc.Snapshot:
    """A snapshot after a collection, without this file's own allocations (``sizes``)."""
    gc.collect()
    return tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, __file__)])


def allocation_lines(stats: list[tracemalloc.StatisticDiff], span: int) -> list[str]:
    roots = moot_roots()
    return [
        f"  {s.size_diff / span / 1024:+.2f} KB/turn ({s.count_diff / span:+.0f} blocks/turn) "
        f"at {where(s.traceback, roots)}"
        for s in stats
    ]


def container_lines(lengths: dict[int, int], span: int) -> list[str]:
    """The holders of containers that gained at least one item every other turn."""
    grown: dict[str, list[int]] = collections.defaultdict(list)
    for o in gc.get_objects():
        if id(o) in lengths and isinstance(o, list | dict | set | collections.deque):
            added = len(o) - lengths[id(o)]
            if added >= span // 2:
                grown[owner(o)].append(added)
    ranked = sorted(grown.items(), key=lambda item: -sum(item[1]))[:3]
    return [
        f"  {holder} ({len(added)} of them) grew by {statistics.mean(added) / span:.1f} "
        "items/turn each"
        for holder, added in ranked
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--long-turns", type=int, default=10_000)
    args = parser.parse_args()
    report_messages(args.runs, args.turns)
    report_broadcast(args.runs)
    report_idle(args.runs)
    report_long(args.long_turns)


if __name__ == "__main__":
    main()
