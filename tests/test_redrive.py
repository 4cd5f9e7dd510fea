"""Re-drive: a scenario run again against its recording reproduces it, or says where not."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pytest

from moot.actors._model import ModelRequest, ModelResponse, assemble, call_model
from moot.actors._redrive import RecordedProvider, ReplayMissing, redrive, response_deltas
from moot.actors._scenario import load_scenario, run_dialogue, run_loop
from moot.events import (
    DialogueMessage,
    ReasoningBlock,
    TextBlock,
    ToolCallBlock,
    ToolExecutionEnd,
    Usage,
)
from moot.store import EventLog
from tests import fake_live
from tests.command import ROOT, moot

if TYPE_CHECKING:
    from pathlib import Path

    from moot.actors._loop import Paused


MIXED = """
[dialogue]
mode = "broadcast"
id = "mixed"
turns = ["Look up colour.", "And again."]

[[participant]]
name = "looker"
agent = "scripted"
tools = ["tests.loop_tools:lookup", "tests.loop_tools:add"]
replies = [
  {{ tool_calls = [{{ name = "lookup", arguments = {{ key = "colour" }} }}] }},
  {{ text = "{first}" }},
  {{ tool_calls = [{{ name = "add", arguments = {{ a = 1, b = 2 }} }}] }},
  {{ text = "three" }},
]

[[participant]]
name = "talker"
agent = "scripted"
replies = ["hello", "again"]
"""


def recorded(tmp_path: Path, text: str) -> tuple[Path, Path]:
    scenario, db = tmp_path / "s.toml", tmp_path / "moot.db"
    scenario.write_text(text)
    result = moot(db, "run", str(scenario))
    assert result.returncode == 0, result.stderr
    return scenario, db


def test_a_recorded_dialogue_with_a_tool_loop_redrives_cleanly(tmp_path: Path) -> None:
    scenario, db = recorded(tmp_path, MIXED.format(first="blue"))
    result = moot(db, "redrive", "mixed", str(scenario))
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout.startswith("reproduced ") and "of mixed" in result.stdout
    with EventLog(db, readonly=True) as log:  # the same from Python
        report = redrive(load_scenario(scenario), log, "mixed")  # type: ignore[arg-type]
        assert report.ok and report.divergence is None and report.compared > 20


def test_a_changed_scripted_reply_diverges_at_its_position(tmp_path: Path) -> None:
    _scenario, db = recorded(tmp_path, MIXED.format(first="blue"))
    changed = tmp_path / "changed.toml"
    changed.write_text(MIXED.format(first="green"))
    with EventLog(db, readonly=True) as log:
        report = redrive(load_scenario(changed), log, "mixed")  # type: ignore[arg-type]
        assert not report.ok and report.divergence is not None
        d = report.divergence
        at = next(r for r in log.read_all() if r.position == d.position)
    assert d.stream == "mixed/looker/t1" and '"blue"' in d.expected and '"green"' in d.actual
    assert at.stream == "mixed/looker/t1" and at.type == "LlmResponse"
    result = moot(db, "redrive", "mixed", str(changed))
    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == f"diverged at position {d.position} in mixed/looker/t1"


def test_a_changed_tool_result_diverges_at_its_position(tmp_path: Path) -> None:
    scenario, db = recorded(tmp_path, MIXED.format(first="blue"))
    env = {**os.environ, "MOOT_TEST_LOOKUP": "v2"}  # the (idempotent) tool now answers v2
    result = moot(db, "redrive", "mixed", str(scenario), env=env)
    assert result.returncode == 1
    with EventLog(db, readonly=True) as log:
        end = next(
            r
            for r in log.read_all()
            if isinstance(r.event, ToolExecutionEnd) and r.event.tool_name == "lookup"
        )
    assert result.stdout.splitlines()[0] == f"diverged at position {end.position} in {end.stream}"
    assert "colour=v1" in result.stdout and "colour=v2" in result.stdout


LIVE = """
[dialogue]
id = "live"
turns = ["same", "same"{extra}]

[[participant]]
name = "oracle"
agent = "tests.fake_live:provider"
history_turns = 0
"""


def test_identical_prompts_are_served_in_recorded_order_and_nothing_live_is_called(
    tmp_path: Path,
) -> None:
    scenario = tmp_path / "live.toml"
    scenario.write_text(LIVE.format(extra=""))
    with EventLog(tmp_path / "m.db") as log:
        run_dialogue(load_scenario(scenario), log)  # type: ignore[arg-type]
        replies = [
            r.event.content
            for r in log.read("live")
            if isinstance(r.event, DialogueMessage) and r.event.origin == "agent"
        ]
        assert replies == ["answer 1", "answer 2"]
        first, second = fake_live.CALLS[-2:]
        assert first == second  # the very same request, answered differently
        calls_before = len(fake_live.CALLS)
        report = redrive(load_scenario(scenario), log, "live")  # type: ignore[arg-type]
        assert report.ok, report
        assert len(fake_live.CALLS) == calls_before  # never a live call

        scenario.write_text(LIVE.format(extra=', "one more"'))
        report = redrive(load_scenario(scenario), log, "live")  # type: ignore[arg-type]
        assert not report.ok and report.divergence is not None
        closed = log.stream_info("live").last_position  # the log closed the dialogue...
        assert report.divergence.position == closed
        assert "one more" in report.divergence.actual  # ...where the new run went on
        assert len(fake_live.CALLS) == calls_before


def test_the_recorded_provider_fails_loudly_when_asked_for_more() -> None:
    provider = RecordedProvider([(ModelResponse(content=()), None)], label="x")
    request = ModelRequest(messages=())
    call_model(provider, request)
    with pytest.raises(ReplayMissing, match="no recorded reply for model call #2"):
        call_model(provider, request)


def test_a_recorded_reply_plays_back_as_the_same_reply() -> None:
    """Every kind of block survives being served again: signed, plain and redacted
    reasoning stay separate blocks, and tool calls keep their place."""
    reply = ModelResponse(
        content=(
            ReasoningBlock(text="think", signature="sig"),
            ReasoningBlock(text="", redacted="opaque"),
            ReasoningBlock(text="more"),
            TextBlock(text="Calling."),
            ToolCallBlock(id="c1", name="add", arguments={"a": 1, "b": 2}),
            TextBlock(text="And after."),
        ),
        usage=Usage(input_tokens=4, output_tokens=5),
        stop_reason="tool_use",
        model="m-1",
    )
    assert assemble(response_deltas(reply)) == reply


LOOP = """
[loop]
id = "sum"
prompt = "1 + 2?"
agent = "tests.fake_live:provider"
tools = ["tests.loop_tools:add"]
"""


def test_a_loop_with_a_live_model_redrives(tmp_path: Path) -> None:
    scenario = tmp_path / "loop.toml"
    scenario.write_text(LOOP)
    with EventLog(tmp_path / "m.db") as log:
        outcome = run_loop(load_scenario(scenario), log)  # type: ignore[arg-type]
        assert outcome.text == "answer 1"  # type: ignore[union-attr]
        calls_before = len(fake_live.CALLS)
        report = redrive(load_scenario(scenario), log, "sum")  # type: ignore[arg-type]
        assert report.ok, report
        assert len(fake_live.CALLS) == calls_before


def test_a_model_call_that_timed_out_by_itself_redrives_as_it_was(tmp_path: Path) -> None:
    """A read timeout long before the loop's deadline is recorded as LoopFailed; re-drive
    raises it again at once, rather than waiting out the loop's deadline (which would end
    the loop as Done and report a divergence that is not there)."""
    scenario = tmp_path / "loop.toml"
    scenario.write_text(
        '[loop]\nid = "t"\nprompt = "hi"\nagent = "tests.fake_live:timing_out"\ntimeout_s = 2\n'
    )
    with EventLog(tmp_path / "m.db") as log:
        run_loop(load_scenario(scenario), log)  # type: ignore[arg-type]
        assert type(list(log.read("t"))[-1].event).__name__ == "LoopFailed"
        report = redrive(load_scenario(scenario), log, "t")  # type: ignore[arg-type]
        assert report.ok, report


def test_a_loop_that_waited_for_approvals_redrives(tmp_path: Path) -> None:

    scenario = load_scenario(ROOT / "examples" / "calculator.toml")
    with EventLog(tmp_path / "m.db") as log:

        def approve_all(handle: Any, paused: Paused) -> None:
            for call in paused.calls:
                handle.decide(call.id, "approve", reason="fine")

        outcome = run_loop(scenario, log, stream="calc", on_pause=approve_all)  # type: ignore[arg-type]
        assert outcome.text == "3 apples and 2 pears cost 3.00."  # type: ignore[union-attr]
        report = redrive(scenario, log, "calc")  # the person's decisions come from the log
        assert report.ok, report


def test_a_changed_request_diverges_at_the_reply_it_produced(tmp_path: Path) -> None:
    scenario = tmp_path / "live.toml"
    scenario.write_text(LIVE.format(extra="") + 'instructions = "Be brief."\n')
    with EventLog(tmp_path / "m.db") as log:
        run_dialogue(load_scenario(scenario), log)  # type: ignore[arg-type]
        assert redrive(load_scenario(scenario), log, "live").ok  # type: ignore[arg-type]
        scenario.write_text(LIVE.format(extra="") + 'instructions = "Be thorough."\n')
        report = redrive(load_scenario(scenario), log, "live")  # type: ignore[arg-type]
        assert not report.ok and report.divergence is not None
        first_reply = next(
            r
            for r in log.read("live")
            if isinstance(r.event, DialogueMessage) and r.event.origin == "agent"
        )
        assert report.divergence.position == first_reply.position
        assert "request_changed" in report.divergence.actual


def test_redrive_never_changes_the_database(tmp_path: Path) -> None:
    import hashlib
    import sqlite3

    scenario, db = recorded(tmp_path, MIXED.format(first="blue"))
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    changed = tmp_path / "changed.toml"
    changed.write_text(MIXED.format(first="green"))
    assert moot(db, "redrive", "mixed", str(scenario)).returncode == 0
    assert moot(db, "redrive", "mixed", str(changed)).returncode == 1
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


NESTED_LOOP = """
[loop]
id = "study"
prompt = "Study colour."
agent = "scripted"
tools = ["tests.loop_tools:research"]
replies = [
  { tool_calls = [{ name = "research", arguments = { topic = "colour" } }] },
  { text = "studied" },
]
"""

NESTED_DIALOGUE = """
[dialogue]
mode = "broadcast"
id = "panel"
turns = ["Study colour."]

[[participant]]
name = "scholar"
agent = "scripted"
tools = ["tests.loop_tools:research"]
replies = [
  { tool_calls = [{ name = "research", arguments = { topic = "colour" } }] },
  { text = "studied" },
]
"""


def events_of(log: EventLog, streams: list[str]) -> int:
    return sum(len(list(log.read(s))) for s in streams)


def test_a_nested_loop_is_served_from_its_recording_and_compared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scenario = tmp_path / "nested.toml"
    scenario.write_text(NESTED_LOOP)
    with EventLog(tmp_path / "m.db") as log:
        outcome = run_loop(load_scenario(scenario), log)  # type: ignore[arg-type]
        assert outcome.text == "studied"  # type: ignore[union-attr]
        (child,) = [h.stream for h in log.streams() if h.parent == "study"]
        result = next(r.event for r in log.read("study") if isinstance(r.event, ToolExecutionEnd))
        assert result.content.startswith("colour: answer ")  # the nested loop's live answer
        calls_before = len(fake_live.CALLS)

        report = redrive(load_scenario(scenario), log, "study")  # type: ignore[arg-type]
        assert report.ok, report
        assert report.compared == events_of(log, ["study", child])
        assert len(fake_live.CALLS) == calls_before  # the nested model was never called

        monkeypatch.setenv("MOOT_TEST_TOPIC", "shape")  # the helper is asked something else
        report = redrive(load_scenario(scenario), log, "study")  # type: ignore[arg-type]
        assert not report.ok and report.divergence is not None
        assert report.divergence.stream == child
        assert report.divergence.position == next(iter(log.read(child))).position
        assert "Research shape." in report.divergence.actual
        assert "Research colour." in report.divergence.expected
        assert len(fake_live.CALLS) == calls_before


def test_a_loop_nested_in_a_participants_loop_redrives(tmp_path: Path) -> None:
    scenario = tmp_path / "panel.toml"
    scenario.write_text(NESTED_DIALOGUE)
    with EventLog(tmp_path / "m.db") as log:
        run_dialogue(load_scenario(scenario), log)  # type: ignore[arg-type]
        (loop,) = [h.stream for h in log.streams() if h.parent == "panel"]
        (child,) = [h.stream for h in log.streams() if h.parent == loop]
        calls_before = len(fake_live.CALLS)
        report = redrive(load_scenario(scenario), log, "panel")  # type: ignore[arg-type]
        assert report.ok, report
        assert report.compared == events_of(log, ["panel", loop, child])
        assert len(fake_live.CALLS) == calls_before


JOINER = """
[dialogue]
mode = "broadcast"
id = "order"
turns = ["First?", "Historian, sum up."]

[[participant]]
name = "alice"
agent = "scripted"
replies = [{{ text = "A1", delay_ms = {alice} }}, "A2"]

[[participant]]
name = "bob"
agent = "scripted"
replies = [{{ text = "B1", delay_ms = {bob} }}, "B2"]

[[participant]]
name = "historian"
joins_at = 2
strategy = {{ kind = "full" }}
agent = "scripted"
replies = ["So far: A1, B1."]
"""


def test_replies_reach_the_log_in_the_recorded_order(tmp_path: Path) -> None:
    """The order concurrent replies were recorded in is part of a later prompt (the
    joiner's history): a re-drive whose replies finish in another order still matches."""
    _scenario, db = recorded(tmp_path, JOINER.format(alice=200, bob=0))  # bob, then alice
    swapped = tmp_path / "swapped.toml"  # now alice would finish first
    swapped.write_text(JOINER.format(alice=0, bob=200))
    with EventLog(db, readonly=True) as log:
        first = [r.event for r in log.read("order") if isinstance(r.event, DialogueMessage)]
        assert [m.content for m in first if m.turn == 1 and m.origin == "agent"] == ["B1", "A1"]
        report = redrive(load_scenario(swapped), log, "order")  # type: ignore[arg-type]
    assert report.ok, report.divergence
