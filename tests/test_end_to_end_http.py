"""End to end over HTTP: the real ``moot`` command against OpenAI-compatible servers.

Every test runs ``moot`` as a subprocess (cwd = the repository root) with scenario
files whose participants are ``agent = "openai"``, pointed at :class:`ScriptedServer`
instances on 127.0.0.1 that stream ``chat.completion.chunk`` events. A broadcast asks
its participants at the same moment, so each participant gets a server of its own:
which reply goes to whom is then fixed by the script, not by a race.

Nothing waits with ``sleep``: the tests wait for the subprocess to finish (with a
timeout) and then read the log and what the servers recorded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from moot.events import (
    DialogueMessage,
    Done,
    LlmResponse,
    LoopFailed,
    ParticipantFailed,
    TextBlock,
    ToolCallBlock,
    ToolExecutionEnd,
    ToolExecutionStart,
    TurnCompleted,
    Usage,
)
from moot.store import EventLog
from tests.command import moot as run_moot
from tests.openai_replies import error_reply, text_reply, tool_call_reply
from tests.sse_server import ScriptedServer

if TYPE_CHECKING:
    import subprocess
    from pathlib import Path

    from moot.events import Event
    from tests.sse_server import RecordedRequest


KEY_ENV = "MOOT_E2E_API_KEY"
SECRET = "sk-moot-SECRET-4242"  # noqa: S105  a made-up key the tests look for
REQUESTED_MODEL = "test-model"

FIRST_TURN = "Name the project."
SECOND_TURN = "Now criticise the names."

DIALOGUE = """
[dialogue]
mode = "broadcast"
order = "participant_order"
id = "{stream}"
context = "We are naming a small tool."
turns = {turns}

[[participant]]
name = "alice"
role = "writer"
description = "Likes short names."
agent = "openai"
base_url = "{alice}/v1"
model = "test-model"
api_key_env = "MOOT_E2E_API_KEY"

[[participant]]
name = "bob"
role = "critic"
agent = "openai"
base_url = "{bob}/v1"
model = "test-model"
api_key_env = "MOOT_E2E_API_KEY"
"""

LOOP = """
[loop]
id = "{stream}"
prompt = "What is 2 + 3?"
system = "Use the add tool, then answer."
agent = "openai"
base_url = "{url}/v1"
model = "test-model"
api_key_env = "MOOT_E2E_API_KEY"
tools = ["tests.loop_tools:add"]
max_iterations = 4
"""


def moot(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``moot`` command on ``db``, with the API key in its environment."""
    return run_moot(db, *args, env={**os.environ, KEY_ENV: SECRET}, timeout=60)


def dialogue_toml(stream: str, alice: str, bob: str, turns: list[str]) -> str:
    quoted = "[" + ", ".join(f'"{t}"' for t in turns) + "]"
    return DIALOGUE.format(stream=stream, alice=alice, bob=bob, turns=quoted)


def events(db: Path, stream: str) -> list[Event]:
    with EventLog(db, readonly=True) as log:
        return [r.event for r in log.read(stream)]


def replies(db: Path, stream: str) -> dict[tuple[int, str], DialogueMessage]:
    """The agents' replies of ``stream``, by (turn, speaker)."""
    return {
        (e.turn, e.speaker.name): e
        for e in events(db, stream)
        if isinstance(e, DialogueMessage) and e.origin == "agent"
    }


# ------------------------------------------------------- a recorded dialogue


@dataclass(frozen=True)
class Recorded:
    """A two-turn openai dialogue run once through ``moot run`` (servers since stopped)."""

    db: Path
    scenario: Path
    run: subprocess.CompletedProcess[str]
    alice: list[RecordedRequest]
    bob: list[RecordedRequest]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    """Run the dialogue against two servers, then stop them: later runs find no server."""
    tmp = tmp_path_factory.mktemp("recorded")
    db, scenario = tmp / "moot.db", tmp / "dialogue.toml"
    alice = ScriptedServer(
        text_reply("Call it moot.", model="served-alice-1", prompt_tokens=31, completion_tokens=4),
        text_reply(
            "Short names win.", model="served-alice-1", prompt_tokens=52, completion_tokens=4
        ),
    )
    bob = ScriptedServer(
        text_reply(
            "Ledger is clearer.", model="served-bob-2", prompt_tokens=29, completion_tokens=5
        ),
        text_reply("Too plain.", model="served-bob-2", prompt_tokens=50, completion_tokens=3),
    )
    with alice, bob:
        scenario.write_text(
            dialogue_toml("http-1", alice.url, bob.url, [FIRST_TURN, SECOND_TURN]),
            encoding="utf-8",
        )
        run = moot(db, "run", str(scenario))
    return Recorded(db, scenario, run, list(alice.requests), list(bob.requests))


def test_a_broadcast_dialogue_runs_against_the_server(recorded: Recorded) -> None:
    assert recorded.run.returncode == 0, recorded.run.stderr
    assert recorded.run.stdout.splitlines() == [
        "stream http-1",
        "turn 1  alice: Call it moot.",
        "turn 1  bob: Ledger is clearer.",
        "turn 2  alice: Short names win.",
        "turn 2  bob: Too plain.",
        "completed http-1",
    ]

    got = replies(recorded.db, "http-1")
    assert {k: m.content for k, m in got.items()} == {
        (1, "alice"): "Call it moot.",
        (1, "bob"): "Ledger is clearer.",
        (2, "alice"): "Short names win.",
        (2, "bob"): "Too plain.",
    }
    assert got[1, "alice"].usage == Usage(input_tokens=31, output_tokens=4)
    assert got[2, "bob"].usage == Usage(input_tokens=50, output_tokens=3)
    assert {m.model for k, m in got.items() if k[1] == "alice"} == {"served-alice-1"}
    assert {m.model for k, m in got.items() if k[1] == "bob"} == {"served-bob-2"}

    verified = moot(recorded.db, "verify")
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith("ok ")


def test_the_server_receives_the_rendered_persona_and_messages(recorded: Recorded) -> None:
    assert len(recorded.alice) == 2 and len(recorded.bob) == 2
    for request in recorded.alice + recorded.bob:
        assert request.method == "POST" and request.path == "/v1/chat/completions"
        body = request.json
        assert body["model"] == REQUESTED_MODEL
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert "tools" not in body

    first = recorded.alice[0].json["messages"]
    assert [m["role"] for m in first] == ["system", "user"]
    system = first[0]["content"]
    assert system.startswith("You are alice, the writer.")
    assert "Likes short names." in system
    assert "- alice (you)" in system and "- bob (ally) - critic" in system
    assert "We are naming a small tool." in system
    assert FIRST_TURN in first[1]["content"]
    assert recorded.bob[0].json["messages"][0]["content"].startswith("You are bob, the critic.")

    # Turn 2: alice's own reply comes back as history; bob's reply and the new input
    # arrive together as the new user message.
    second = recorded.alice[1].json["messages"]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert second[2]["content"] == "Call it moot."
    assert "Ledger is clearer." in second[3]["content"]
    assert SECOND_TURN in second[3]["content"]
    assert "Call it moot." not in second[3]["content"]  # never its own reply as new input


# ------------------------------------------------------------ a tool loop


def test_a_standalone_tool_loop_runs_against_the_server(tmp_path: Path) -> None:
    db, scenario = tmp_path / "moot.db", tmp_path / "loop.toml"
    server = ScriptedServer(
        # The arguments arrive in three deltas, cut inside a key and a value.
        tool_call_reply("add", ['{"a"', ': 2, "b', '": 3}'], call_id="call_e2e_1", model="served"),
        text_reply("The sum is 5.", model="served"),
    )
    with server:
        scenario.write_text(LOOP.format(stream="sum-1", url=server.url), encoding="utf-8")
        result = moot(db, "run", str(scenario))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "stream sum-1" and lines[-1] == "completed sum-1"
    assert 'iteration 1  add({"a":2,"b":3}) -> 5' in lines
    assert "answer: The sum is 5." in lines

    log = events(db, "sum-1")
    responses = [e for e in log if isinstance(e, LlmResponse)]
    assert [r.stop_reason for r in responses] == ["tool_use", "end_turn"]
    assert responses[0].content == (
        ToolCallBlock(id="call_e2e_1", name="add", arguments={"a": 2, "b": 3}),
    )
    assert responses[0].model == "served"
    assert responses[1].content == (TextBlock(text="The sum is 5."),)
    [start] = [e for e in log if isinstance(e, ToolExecutionStart)]
    [end] = [e for e in log if isinstance(e, ToolExecutionEnd)]
    assert (start.call_id, start.tool_name, start.arguments) == (
        "call_e2e_1",
        "add",
        {"a": 2, "b": 3},
    )
    assert (end.call_id, end.content, end.is_error) == ("call_e2e_1", "5", False)
    assert isinstance(log[-1], Done) and log[-1].iterations == 2

    assert len(server.requests) == 2
    offered = server.requests[0].json["tools"]
    assert [t["function"]["name"] for t in offered] == ["add"]
    messages = server.requests[1].json["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    [call] = messages[2]["tool_calls"]
    assert call["id"] == "call_e2e_1" and call["function"]["name"] == "add"
    assert messages[3] == {"role": "tool", "content": "5", "tool_call_id": "call_e2e_1"}

    shown = moot(db, "show", "sum-1")
    assert shown.returncode == 0, shown.stderr
    assert "add" in shown.stdout and "call_e2e_1" in shown.stdout
    assert "The sum is 5." in shown.stdout

    # The server is gone: a re-drive serves the recorded replies and the tool's result.
    again = moot(db, "redrive", "sum-1", str(scenario))
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout == f"reproduced {len(log)} events of sum-1\n"


# ----------------------------------------------------------------- faults


def test_a_participant_whose_server_keeps_failing_is_recorded_and_the_dialogue_goes_on(
    tmp_path: Path,
) -> None:
    db, scenario = tmp_path / "moot.db", tmp_path / "dialogue.toml"
    alice = ScriptedServer(error_reply(500, "upstream exploded"))  # every attempt
    bob = ScriptedServer(text_reply("Ledger.", model="served-bob"))
    with alice, bob:
        scenario.write_text(dialogue_toml("f-1", alice.url, bob.url, [FIRST_TURN]), "utf-8")
        result = moot(db, "run", str(scenario))
    assert result.returncode == 0, result.stderr
    assert "turn 1  alice failed: openai: HTTP 500" in result.stdout
    assert "turn 1  bob: Ledger." in result.stdout
    assert len(alice.requests) == 3  # the default RetryPolicy: three attempts in all
    assert len(bob.requests) == 1

    log = events(db, "f-1")
    [failed] = [e for e in log if isinstance(e, ParticipantFailed)]
    assert failed.participant == "alice"
    assert failed.error.kind == "server_error" and failed.error.retryable
    assert "upstream exploded" in failed.error.message
    assert [m.content for m in replies(db, "f-1").values()] == ["Ledger."]
    [completed] = [e for e in log if isinstance(e, TurnCompleted)]
    assert completed.failed == ("alice",) and completed.yielded == ("bob",)


def test_a_loop_whose_server_keeps_failing_ends_in_loop_failed(tmp_path: Path) -> None:
    db, scenario = tmp_path / "moot.db", tmp_path / "loop.toml"
    with ScriptedServer(error_reply(500, "upstream exploded")) as server:
        scenario.write_text(LOOP.format(stream="f-2", url=server.url), encoding="utf-8")
        result = moot(db, "run", str(scenario))
    assert result.returncode == 1
    assert result.stderr.startswith("moot: the loop failed: openai: HTTP 500")
    assert len(server.requests) == 3
    log = events(db, "f-2")
    assert isinstance(log[-1], LoopFailed)
    assert log[-1].error.kind == "server_error" and log[-1].error.retryable
    assert not any(isinstance(e, LlmResponse | Done) for e in log)


def test_a_rate_limit_with_retry_after_is_waited_out(tmp_path: Path) -> None:
    db, scenario = tmp_path / "moot.db", tmp_path / "dialogue.toml"
    alice = ScriptedServer(
        error_reply(429, "slow down", headers={"Retry-After": "0.2"}),
        text_reply("Call it moot.", model="served-alice"),
    )
    bob = ScriptedServer(text_reply("Ledger.", model="served-bob"))
    with alice, bob:
        scenario.write_text(dialogue_toml("rl-1", alice.url, bob.url, [FIRST_TURN]), "utf-8")
        result = moot(db, "run", str(scenario))
    assert result.returncode == 0, result.stderr
    assert len(alice.requests) == 2
    # A lower bound only: the retry waited at least as long as the server asked.
    assert alice.requests[1].received_at - alice.requests[0].received_at >= 0.2
    assert alice.requests[1].body == alice.requests[0].body
    got = replies(db, "rl-1")
    assert got[1, "alice"].content == "Call it moot."
    assert len([k for k in got if k[1] == "alice"]) == 1
    assert not any(isinstance(e, ParticipantFailed) for e in events(db, "rl-1"))


# ---------------------------------------------------------------- secrets


def stored_bytes(db: Path) -> bytes:
    """Every byte SQLite keeps for ``db``: the file, its WAL and its shared memory."""
    files = [db.with_name(db.name + suffix) for suffix in ("", "-wal", "-shm")]
    return b"".join(f.read_bytes() for f in files if f.exists())


def test_the_api_key_is_sent_and_never_stored_or_printed(recorded: Recorded) -> None:
    assert recorded.run.returncode == 0, recorded.run.stderr
    sent = {r.headers.get("authorization") for r in recorded.alice + recorded.bob}
    assert sent == {f"Bearer {SECRET}"}  # the key did reach the server

    stored = stored_bytes(recorded.db)
    assert b"Call it moot." in stored  # the right files were read
    assert SECRET.encode() not in stored
    assert SECRET not in recorded.run.stdout + recorded.run.stderr
    shown = {
        "events": ["events", "--jsonl"],  # every event, whole
        "show": ["show", "http-1"],
        "replay": ["replay", "http-1"],
    }
    for name, command in shown.items():
        printed = moot(recorded.db, *command)
        assert printed.returncode == 0, printed.stderr
        assert "Short names win." in printed.stdout, name
        assert SECRET not in printed.stdout + printed.stderr, name


def test_a_key_echoed_in_an_error_body_is_redacted(tmp_path: Path) -> None:
    db, scenario = tmp_path / "moot.db", tmp_path / "dialogue.toml"
    echo = ScriptedServer(error_reply(401, f"Incorrect API key provided: {SECRET}."))
    with echo, ScriptedServer(text_reply("Ledger.", model="served-bob")) as bob:
        scenario.write_text(dialogue_toml("k-1", echo.url, bob.url, [FIRST_TURN]), "utf-8")
        result = moot(db, "run", str(scenario))
    assert result.returncode == 0, result.stderr
    assert len(echo.requests) == 1  # a 401 is final: no retry
    [failed] = [e for e in events(db, "k-1") if isinstance(e, ParticipantFailed)]
    assert failed.error.kind == "authentication" and not failed.error.retryable
    assert "Incorrect API key provided" in failed.error.message
    assert SECRET not in failed.error.message
    assert SECRET.encode() not in stored_bytes(db)
    assert SECRET not in result.stdout + result.stderr


# ---------------------------------------------------------------- re-drive


def test_redrive_reproduces_the_recorded_dialogue_with_no_server(recorded: Recorded) -> None:
    # The fixture's servers are stopped: any live call would fail the re-drive.
    result = moot(recorded.db, "redrive", "http-1", str(recorded.scenario))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("reproduced ") and "of http-1" in result.stdout
    assert int(result.stdout.split()[1]) == len(events(recorded.db, "http-1"))


def test_redrive_of_a_changed_turn_prints_the_first_divergence(
    recorded: Recorded, tmp_path: Path
) -> None:
    changed = tmp_path / "changed.toml"
    text = recorded.scenario.read_text(encoding="utf-8")
    changed.write_text(text.replace(SECOND_TURN, "Now praise the names."), encoding="utf-8")
    result = moot(recorded.db, "redrive", "http-1", str(changed))
    assert result.returncode == 1
    out = result.stdout.splitlines()
    assert out[0].startswith("diverged at position ") and out[0].endswith(" in http-1")
    position = int(out[0].split()[3])
    with EventLog(recorded.db, readonly=True) as log:
        [there] = [r.event for r in log.read("http-1") if r.position == position]
    assert isinstance(there, DialogueMessage) and there.content == SECOND_TURN
    assert out[1].startswith("  expected: ") and SECOND_TURN in out[1]
    assert out[2].startswith("  actual: ") and "Now praise the names." in out[2]
    assert result.stderr.startswith("moot: diverged at position")


def test_redrive_that_needs_more_model_calls_fails_and_calls_no_server(
    recorded: Recorded, tmp_path: Path
) -> None:
    more = tmp_path / "more.toml"
    # Servers that would answer, so that a live call could not go unnoticed.
    alice = ScriptedServer(text_reply("live alice", model="live"))
    bob = ScriptedServer(text_reply("live bob", model="live"))
    with alice, bob:
        more.write_text(
            dialogue_toml("http-1", alice.url, bob.url, [FIRST_TURN, SECOND_TURN, "One more."]),
            encoding="utf-8",
        )
        result = moot(recorded.db, "redrive", "http-1", str(more))
    assert result.returncode == 1
    assert alice.requests == [] and bob.requests == []
    assert "diverged at position" in result.stdout
    assert "One more." in result.stdout
    assert "live alice" not in result.stdout and "live bob" not in result.stdout
