"""Tool loops through the real ``moot`` command: approvals across restarts, crashes in
tools, and tool-loop participants in dialogues."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import TYPE_CHECKING

import pytest

from moot.actors._loop import INTERRUPTED
from moot.events import (
    DialogueMessage,
    LoopStarted,
    LoopState,
    PayloadDelivered,
    ToolExecutionEnd,
    ToolExecutionStart,
    ToolResultBlock,
)
from moot.store import EventLog
from tests.command import MOOT, ROOT, moot

if TYPE_CHECKING:
    from pathlib import Path

APPROVAL = """
[loop]
prompt = "What is 2 + 3?"
agent = "scripted"
replies = [{ tool_calls = [{ name = "add", arguments = { a = 2, b = 3 } }] }, { text = "It is 5." }]
tools = ["tests.loop_tools:add"]
approval = "ask"
"""


def start(db: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [MOOT, "--db", str(db), *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def paused_then_killed(tmp_path: Path) -> tuple[Path, Path, str, str]:
    scenario, db = tmp_path / "loop.toml", tmp_path / "moot.db"
    scenario.write_text(APPROVAL)
    proc = start(db, "run", str(scenario))
    assert proc.stdout is not None
    stream = proc.stdout.readline().split()[1]
    awaiting = proc.stdout.readline()
    assert awaiting.startswith("awaiting approval: "), awaiting
    call_id = awaiting.split()[2]
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    with EventLog(db, readonly=True) as log:
        assert log.stream_info(stream).status == "awaiting"
    return scenario, db, stream, call_id


def test_an_approval_survives_a_restart(tmp_path: Path) -> None:
    scenario, db, stream, call_id = paused_then_killed(tmp_path)
    waiting = start(db, "resume", stream, str(scenario))  # a new daemon, waiting again
    assert waiting.stdout is not None
    assert waiting.stdout.readline() == f"stream {stream}\n"
    assert waiting.stdout.readline().startswith(f"awaiting approval: {call_id}")
    approved = moot(db, "approve", stream, call_id, "--reason", "looks right")
    assert approved.returncode == 0, approved.stderr
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert "answer: It is 5." in out and out.endswith(f"completed {stream}\n")
    with EventLog(db, readonly=True) as log:
        assert log.verify().ok and log.stream_info(stream).status == "completed"
        ends = [r.event for r in log.read(stream) if isinstance(r.event, ToolExecutionEnd)]
        assert [e.content for e in ends] == ["5"]


def test_a_decision_taken_while_nothing_runs_is_picked_up(tmp_path: Path) -> None:
    scenario, db, stream, call_id = paused_then_killed(tmp_path)
    denied = moot(db, "deny", stream, call_id, "--reason", "no maths today")
    assert denied.returncode == 0 and denied.stdout.strip() == f"denied {call_id} in {stream}"
    resumed = moot(db, "resume", stream, str(scenario))
    assert resumed.returncode == 0, resumed.stderr
    assert "answer: It is 5." in resumed.stdout
    with EventLog(db, readonly=True) as log:
        state = log.replay(stream)
        events = [r.event for r in log.read(stream)]
    assert not any(isinstance(e, ToolExecutionStart) for e in events)  # a denied call never runs
    assert isinstance(state, LoopState)
    fed_back = [b for m in state.messages if m.role == "tool" for b in m.content]
    assert fed_back == [
        ToolResultBlock(
            tool_call_id=call_id, content="Tool call denied: no maths today", is_error=True
        )
    ]
    again = moot(db, "approve", stream, call_id)  # the loop is over: nothing waits
    assert again.returncode == 2
    assert again.stderr == "moot: the loop has ended (completed); it waits for no decision\n"
    assert len(again.stderr.strip().splitlines()) == 1


SLOW = """
[loop]
prompt = "Do it."
agent = "scripted"
replies = [{{ tool_calls = [{{ name = "{tool}" }}] }}, {{ text = "finished" }}]
tools = ["tests.loop_tools:{tool}"]
"""


@pytest.mark.parametrize("tool", ["fetch", "transfer"])
def test_sigkill_during_a_tool(tmp_path: Path, tool: str) -> None:
    scenario, db, runs = tmp_path / "slow.toml", tmp_path / "moot.db", tmp_path / "runs"
    scenario.write_text(SLOW.format(tool=tool))
    env = {**os.environ, "MOOT_TEST_RUNS": str(runs)}
    proc = start(db, "run", str(scenario), env=env)
    assert proc.stdout is not None and proc.stderr is not None
    stream = proc.stdout.readline().split()[1]
    assert proc.stderr.readline() == f"{tool} started\n"  # the tool is running now
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    resumed = moot(db, "resume", stream, str(scenario), env={**env, "MOOT_TEST_FAST": "1"})
    assert resumed.returncode == 0, resumed.stderr
    with EventLog(db, readonly=True) as log:
        assert log.verify().ok
        events = [r.event for r in log.read(stream)]
    starts = [e for e in events if isinstance(e, ToolExecutionStart)]
    ends = [e for e in events if isinstance(e, ToolExecutionEnd)]
    assert len(starts) == 1 and len(ends) == 1
    if tool == "fetch":  # idempotent: run again, once
        assert runs.read_text().splitlines() == ["fetch", "fetch"]
        assert (ends[0].content, ends[0].is_error) == ("fetch done", False)
    else:  # not idempotent: the model is told, the tool is not run again
        assert runs.read_text().splitlines() == ["transfer"]
        assert ends[0].is_error and ends[0].content == INTERRUPTED.format(tool="transfer")
    assert "answer: finished" in resumed.stdout


NESTED = """
[loop]
prompt = "Get it done."
agent = "scripted"
replies = [{ tool_calls = [{ name = "delegate" }] }, { text = "all done" }]
tools = ["tests.loop_tools:delegate"]
"""


def test_sigkill_in_a_nested_loop_then_resume_goes_on_with_that_loop(tmp_path: Path) -> None:
    """The outer tool runs again (it is idempotent) and asks for its helper loop again:
    it gets the one on record, which goes on after its last recorded step."""
    scenario, db, runs = tmp_path / "nested.toml", tmp_path / "moot.db", tmp_path / "runs"
    calls = tmp_path / "calls"
    scenario.write_text(NESTED)
    env = {**os.environ, "MOOT_TEST_RUNS": str(runs), "MOOT_SCRIPTED_CALL_LOG": str(calls)}
    proc = start(db, "run", str(scenario), env=env)
    assert proc.stdout is not None and proc.stderr is not None
    stream = proc.stdout.readline().split()[1]
    assert proc.stderr.readline() == "fetch started\n"  # inside the helper loop now
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    resumed = moot(db, "resume", stream, str(scenario), env={**env, "MOOT_TEST_FAST": "1"})
    assert resumed.returncode == 0, resumed.stderr
    assert "answer: all done" in resumed.stdout
    with EventLog(db, readonly=True) as log:
        assert log.verify().ok
        helpers = [h for h in log.streams() if h.parent == stream]
        assert len(helpers) == 1 and helpers[0].status == "completed"  # no second helper
        helper = [r.event for r in log.read(helpers[0].stream)]
        end = next(r.event for r in log.read(stream) if isinstance(r.event, ToolExecutionEnd))
    assert end.content == "helper: fetched"
    assert sum(isinstance(e, ToolExecutionStart) for e in helper) == 1
    assert runs.read_text().splitlines() == ["fetch", "fetch"]  # killed once, run again once
    # each scripted reply was asked for once: the helper's first one is not asked again
    helper_calls = [c for c in calls.read_text().splitlines() if c.startswith("helper")]
    assert helper_calls == ["helper 0", "helper 1"]


DIALOGUE = """
[dialogue]
mode = "broadcast"
order = "participant_order"
turns = ["Add 2 and 3.", "Thanks."]

[[participant]]
name = "calculator"
agent = "scripted"
tools = ["tests.loop_tools:add"]
replies = [
  { tool_calls = [{ name = "add", arguments = { a = 2, b = 3 } }] },
  { text = "2 + 3 = 5" },
  { text = "You are welcome." },
]
[participant.loop]
max_iterations = 4

[[participant]]
name = "chatter"
agent = "scripted"
replies = ["Nice.", "Bye."]
"""


def test_a_dialogue_with_a_tool_loop_participant(tmp_path: Path) -> None:
    scenario, db = tmp_path / "d.toml", tmp_path / "moot.db"
    scenario.write_text(DIALOGUE)
    result = moot(db, "run", str(scenario), "--id", "calc")
    assert result.returncode == 0, result.stderr
    assert "turn 1  calculator: 2 + 3 = 5" in result.stdout
    with EventLog(db, readonly=True) as log:
        loops = [s for s in log.streams() if s.kind == "loop"]
        assert sorted(s.stream for s in loops) == ["calc/calculator/t1", "calc/calculator/t2"]
        assert all(s.parent == "calc" and s.status == "completed" for s in loops)
        first = next(log.read("calc/calculator/t1")).event
        assert isinstance(first, LoopStarted) and first.parent is not None
        delivered = next(r for r in log.read("calc") if r.seq == first.parent.seq)
        assert isinstance(delivered.event, PayloadDelivered)
        assert delivered.event.participant == "calculator"
        reply = next(
            r.event
            for r in log.read("calc")
            if isinstance(r.event, DialogueMessage) and r.event.speaker.name == "calculator"
        )
        assert isinstance(reply, DialogueMessage) and reply.loop == "calc/calculator/t1"
    shown = moot(db, "show", "calc").stdout.splitlines()
    at_reply = shown.index("  calculator: 2 + 3 = 5")
    assert shown[at_reply + 1].strip() == "└ loop calc/calculator/t1"  # nested right under it
    assert any("add: 5" in line for line in shown[at_reply:])
    assert shown.index("── Turn 1 ──") < shown.index("  user: Add 2 and 3.")


def test_bad_loop_scenarios(tmp_path: Path) -> None:
    cases = {
        "no prompt": ('[loop]\nagent = "scripted"\nreplies = ["x"]\n', "needs a prompt"),
        "unknown tool path": (
            '[loop]\nprompt = "x"\nreplies = ["x"]\ntools = ["nowhere:thing"]\n',
            "Cannot load tool",
        ),
        "bad approval": (
            '[loop]\nprompt = "x"\nreplies = ["x"]\napproval = "maybe"\n',
            "approval must be",
        ),
        "bad detection": (
            '[loop]\nprompt = "x"\nreplies = ["x"]\nloop_detection = { action = "panic" }\n',
            "invalid loop settings",
        ),
    }
    for name, (text, reason) in cases.items():
        scenario = tmp_path / "bad.toml"
        scenario.write_text(text)
        result = moot(tmp_path / "x.db", "run", str(scenario))
        assert result.returncode == 2, (name, result.stderr)
        assert reason in result.stderr and len(result.stderr.strip().splitlines()) == 1, name
        assert not (tmp_path / "x.db").exists()


def test_the_calculator_example_waits_for_its_approvals(tmp_path: Path) -> None:
    db = tmp_path / "moot.db"
    proc = start(db, "run", str(ROOT / "examples" / "calculator.toml"))
    assert proc.stdout is not None
    stream = proc.stdout.readline().split()[1]
    waiting: list[str] = []
    while len(waiting) < 2:
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        if line.startswith("awaiting approval: "):
            waiting.append(line.split()[2])
    for call_id in waiting:
        assert moot(db, "approve", stream, call_id).returncode == 0
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "answer: 3 apples and 2 pears cost 3.00." in out
    assert "iteration 2  multiply" in out


def test_a_resumed_loop_participant_counts_only_its_own_calls() -> None:
    from moot.actors import Dialogue, Participant, ToolLoopAgent, ToolRegistry
    from moot.actors._scripted import ScriptedProvider, ScriptedReply
    from moot.store import MemoryEventLog

    def agent(log: MemoryEventLog, *replies: ScriptedReply) -> ToolLoopAgent:
        return ToolLoopAgent(ScriptedProvider(replies, label="bot"), ToolRegistry(), log)

    first, second = ScriptedReply(text="first"), ScriptedReply(text="second")
    log = MemoryEventLog()
    with Dialogue.create(
        log, participants=[Participant("bot", agent(log, first, second))], stream="A"
    ) as other:  # another dialogue, same participant name
        other.run("hi", timeout=30)
    boom = ScriptedReply(error="boom")
    b = Dialogue.create(
        log, participants=[Participant("bot", agent(log, boom, second))], stream="B"
    )
    assert [r.error.message for r in b.run("hi", timeout=30) if r.error] == [
        "loop B/bot/t1 failed: boom"
    ]
    b.stop()
    b = Dialogue.resume(log, "B", {"bot": agent(log, boom, second)})
    assert [r.content for r in b.run("again", timeout=30)] == ["second"]  # not boom again
    b.close()


def test_a_loop_participant_never_adopts_a_stream_that_is_not_its_loop() -> None:
    from moot.actors import Dialogue, Participant, ToolLoop, ToolLoopAgent, ToolRegistry
    from moot.actors._scripted import ScriptedProvider, ScriptedReply
    from moot.store import MemoryEventLog

    log = MemoryEventLog()
    squatter = ToolLoop.run(  # a standalone loop that happens to have the id
        log, ScriptedProvider([ScriptedReply(text="5")]), prompt="hi", stream="D/bot/t1", timeout=30
    )
    assert squatter.text == "5"
    bot = ToolLoopAgent(ScriptedProvider([ScriptedReply(text="mine")]), ToolRegistry(), log)
    with Dialogue.create(log, participants=[Participant("bot", bot)], stream="D") as d:
        (reply,) = d.run("hi", timeout=30)
    assert reply.error is not None
    assert reply.error.message == (
        "stream 'D/bot/t1' exists but is not the loop of 'bot' for turn 1 of 'D'"
    )
    assert log.stream_info("D/bot/t1").parent is None  # left as it was


def test_a_stream_has_one_driver_across_processes(tmp_path: Path) -> None:
    """A second driver would take the first one's running tool for a crashed one."""
    from moot.actors import Dialogue, Participant, ToolLoop, ToolRegistry
    from moot.actors._agents import CallableAgent
    from moot.actors._errors import DialogueError, ToolLoopError
    from moot.actors._scripted import ScriptedProvider, ScriptedReply
    from tests.test_sqlite_log import run_python

    db = tmp_path / "moot.db"
    driver = run_python(  # a loop whose tool waits for our word, in another process
        """
        import sys
        from moot.actors import ScriptedCall, ScriptedProvider, ScriptedReply, ToolLoop
        from moot.actors import ToolRegistry, tool
        from moot.store import EventLog

        @tool
        def pay() -> str:
            '''Pays, once.'''
            print("paying", flush=True)
            sys.stdin.readline()
            return "paid"

        log = EventLog(sys.argv[1])
        replies = [ScriptedReply(tool_calls=(ScriptedCall("pay", {}),)), ScriptedReply(text="ok")]
        handle = ToolLoop.start(
            log, ScriptedProvider(replies), ToolRegistry([pay]), prompt="go", stream="L"
        )
        print(handle.run(timeout=60).text, flush=True)
        """,
        str(db),
    )
    assert driver.stdout is not None and driver.stdin is not None
    assert driver.stdout.readline().strip() == "paying"
    with EventLog(db) as log:
        with pytest.raises(ToolLoopError, match="'L' is driven by another process"):
            ToolLoop.resume(log, "L", ScriptedProvider([ScriptedReply(text="x")]), ToolRegistry())
        driver.stdin.write("go\n")
        driver.stdin.flush()
        assert driver.stdout.readline().strip() == "ok"
        assert driver.wait(timeout=30) == 0
        ends = [r.event for r in log.read("L") if isinstance(r.event, ToolExecutionEnd)]
        assert [e.content for e in ends] == ["paid"]  # not "interrupted"
        # Within one process too; and once a driver stops, another may take over.
        d = Dialogue.create(log, participants=[Participant("a", CallableAgent(lambda p: "a"))])
        with pytest.raises(DialogueError, match="already driven in this process"):
            Dialogue.resume(log, d.stream, {"a": CallableAgent(lambda p: "a")})
        d.stop()
        again = Dialogue.resume(log, d.stream, {"a": CallableAgent(lambda p: "b")})
        assert [r.content for r in again.run("hi", timeout=30)] == ["b"]
        again.close()


def test_a_lease_names_the_file_whatever_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moot.actors import Dialogue, Participant
    from moot.actors._agents import CallableAgent
    from moot.actors._errors import DialogueError

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    log = EventLog("moot.db")
    d = Dialogue.create(log, participants=[Participant("x", CallableAgent(lambda p: "1"))])
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(DialogueError, match="already driven"):
        Dialogue.resume(log, d.stream, {"x": CallableAgent(lambda p: "2")})
    d.close()
    log.close()


def test_stopping_a_dialogue_ends_its_participants_waits_for_decisions(
    tmp_path: Path,
) -> None:
    """A tool-loop participant paused for approval gives the wait up when its dialogue
    stops; the loop stays paused, and the resumed dialogue picks it up."""
    from moot.actors import Dialogue, Participant, ToolRegistry
    from moot.actors._loop import ToolLoopConfig, ask_person, decision_event
    from moot.actors._loop_agent import ToolLoopAgent
    from moot.actors._scripted import ScriptedCall, ScriptedProvider, ScriptedReply
    from moot.events import LoopState
    from tests.loop_tools import add

    def agent(log: EventLog) -> ToolLoopAgent:
        replies = [
            ScriptedReply(tool_calls=(ScriptedCall("add", {"a": 1, "b": 2}),)),
            ScriptedReply(text="done"),
        ]
        config = ToolLoopConfig(approval=lambda call: ask_person())
        return ToolLoopAgent(ScriptedProvider(replies), ToolRegistry([add]), log, config=config)

    with EventLog(tmp_path / "m.db") as log:
        d = Dialogue.create(log, participants=[Participant("a", agent(log))], timeout=30)
        with log.subscribe() as follow:
            d.session("go")
            while not (
                (record := follow.next(timeout=30)) is not None
                and record.type == "ApprovalRequested"
            ):
                assert record is not None
        d.stop()  # at once: the participant's wait for a decision ends
        loop = record.stream
        assert log.stream_info(loop).status == "awaiting"
        again = Dialogue.resume(log, d.stream, {"a": agent(log)}, timeout=30)
        session = again.finish_turn()
        state = log.replay(loop)
        assert isinstance(state, LoopState)
        call = state.awaiting[0]
        log.append(loop, [decision_event(state, call.id, "approve")], expected_seq=state.seq)
        assert [r.content for r in session.all(30)] == ["done"]
        again.close()
