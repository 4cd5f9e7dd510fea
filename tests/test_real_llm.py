"""Against a real model: the ``moot`` command talking to a real OpenAI-compatible server.

Opt-in: set ``MOOT_REAL_LLM_URL`` to the server's base URL (for example the one that
``../shared/real-llm/start-server.sh`` prints, ``http://127.0.0.1:PORT/v1``). A small
model says unpredictable things, so these tests assert on protocol and structure only:
non-empty replies, token counts, a log that verifies, a loop that ends cleanly. Never
on wording.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import pytest

from moot.events import (
    DialogueMessage,
    Done,
    LlmResponse,
    ParticipantFailed,
    ToolExecutionEnd,
    ToolExecutionStart,
)
from moot.store import EventLog
from tests.command import moot as run_moot

if TYPE_CHECKING:
    import subprocess
    from pathlib import Path

URL = os.environ.get("MOOT_REAL_LLM_URL", "")
MODEL = os.environ.get("MOOT_REAL_LLM_MODEL", "smollm2-135m-instruct")

pytestmark = [
    pytest.mark.real_llm,
    pytest.mark.skipif(
        not URL,
        reason=(
            "set MOOT_REAL_LLM_URL to a real OpenAI-compatible server, "
            "e.g. ../shared/real-llm/start-server.sh"
        ),
    ),
]


# The key variable is optional: a local server started without API_KEY needs none.
AGENT = """agent = "openai"
base_url = "{url}"
model = "{model}"
api_key_env = "MOOT_REAL_LLM_KEY"
stream = {stream}
temperature = 0
max_tokens = {max_tokens}"""

DIALOGUE = """
[dialogue]
mode = "broadcast"
order = "participant_order"
id = "real"
context = "Two friends chat briefly."
turns = ["Say hello in one short sentence.", "Now name one colour you like."]

[[participant]]
name = "alice"
role = "friend"
{agent}

[[participant]]
name = "bob"
role = "friend"
{agent}
"""

LOOP = """
[loop]
id = "real-loop"
prompt = "What is 2 plus 3? Use the add tool."
system = "You are a helpful assistant. Use the add tool to add numbers."
tools = ["tests.loop_tools:add"]
max_iterations = 4
{agent}
"""


def moot(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_moot(db, *args, timeout=300)


def agent(stream: bool, max_tokens: int) -> str:
    return AGENT.format(url=URL, model=MODEL, stream=str(stream).lower(), max_tokens=max_tokens)


def timed_run(db: Path, scenario: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = moot(db, "run", str(scenario))
    return result, time.monotonic() - started


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "whole"])
def test_a_broadcast_dialogue_with_a_real_model(tmp_path: Path, stream: bool) -> None:
    db, scenario = tmp_path / "moot.db", tmp_path / "dialogue.toml"
    scenario.write_text(DIALOGUE.format(agent=agent(stream, max_tokens=48)), encoding="utf-8")
    result, seconds = timed_run(db, scenario)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "completed real"

    with EventLog(db, readonly=True) as log:
        log_events = [r.event for r in log.read("real")]
    failed = [e for e in log_events if isinstance(e, ParticipantFailed)]
    assert failed == []
    said = [e for e in log_events if isinstance(e, DialogueMessage) and e.origin == "agent"]
    assert sorted((m.turn, m.speaker.name) for m in said) == [
        (1, "alice"),
        (1, "bob"),
        (2, "alice"),
        (2, "bob"),
    ]
    for message in said:
        assert isinstance(message.content, str) and message.content.strip()
        assert message.usage is not None
        assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
        assert message.model
    print(f"\n[{'stream' if stream else 'whole'}] {seconds:.2f} s")
    for m in said:
        assert m.usage is not None
        print(
            f"  turn {m.turn} {m.speaker.name} ({m.model}, "
            f"in {m.usage.input_tokens} / out {m.usage.output_tokens}): {m.content[:80]!r}"
        )

    verified = moot(db, "verify")
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith("ok ")


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "whole"])
def test_a_tool_loop_with_a_real_model(tmp_path: Path, stream: bool) -> None:
    db, scenario = tmp_path / "moot.db", tmp_path / "loop.toml"
    # Room for several calls: the model often repeats its call, and a reply cut short
    # inside a call's arguments is malformed (it fails the loop).
    scenario.write_text(LOOP.format(agent=agent(stream, max_tokens=256)), encoding="utf-8")
    result, seconds = timed_run(db, scenario)
    # Whatever the model does after calling add (call it again, or answer), the loop
    # ends cleanly: a Done with some termination reason.
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "completed real-loop"

    with EventLog(db, readonly=True) as log:
        log_events = [r.event for r in log.read("real-loop")]
    done = log_events[-1]
    assert isinstance(done, Done)
    assert 1 <= done.iterations <= 4
    responses = [e for e in log_events if isinstance(e, LlmResponse)]
    assert len(responses) == done.iterations
    for response in responses:
        assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    starts = {e.call_id: e for e in log_events if isinstance(e, ToolExecutionStart)}
    ends = {e.call_id: e for e in log_events if isinstance(e, ToolExecutionEnd)}
    assert set(ends) == set(starts)  # every call the model made was run and recorded
    # The tool really went out and came back: the prompt asks for it, and with its
    # schema sent the model calls it (a loop whose tools never reach the model would
    # answer at once).
    assert starts, "the model called no tool"
    for end in ends.values():
        assert end.tool_name == "add" and end.content

    print(
        f"\n[{'stream' if stream else 'whole'}] {seconds:.2f} s, {done.iterations} iteration(s), "
        f"termination {done.termination.reason}, usage in {done.usage.input_tokens} / "
        f"out {done.usage.output_tokens}"
    )
    for start in starts.values():
        end = ends[start.call_id]
        print(f"  {start.tool_name}({start.arguments}) -> {end.content!r} error={end.is_error}")
    print(f"  stdout: {result.stdout.splitlines()}")

    verified = moot(db, "verify")
    assert verified.returncode == 0, verified.stderr
