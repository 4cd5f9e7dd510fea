"""Scenario files through the real ``moot`` command: run, crash, resume, bad files."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading
from typing import TYPE_CHECKING

import msgspec
import pytest

from moot.actors._agents import LlmAgent
from moot.actors._dialogue import Dialogue, Participant
from moot.actors._scripted import ScriptedProvider, ScriptedReply
from moot.events import DialogueMessage
from moot.store import EventLog
from tests.command import MOOT, ROOT, moot

if TYPE_CHECKING:
    from pathlib import Path

CRASHABLE = """
[dialogue]
mode = "{mode}"
turns = ["one", "two", "three"]

[[participant]]
name = "a"
agent = "scripted"
replies = [
  {{ text = "a1", delay_ms = 120 }},
  {{ text = "a2", delay_ms = 40 }},
  {{ text = "a3", delay_ms = 90 }},
]

[[participant]]
name = "b"
agent = "scripted"
replies = [
  {{ text = "b1", delay_ms = 30 }},
  {{ text = "b2", delay_ms = 150 }},
  {{ text = "b3", delay_ms = 20 }},
]

[[participant]]
name = "c"
agent = "scripted"
replies = [
  {{ text = "c1", delay_ms = 70 }},
  {{ text = "c2", delay_ms = 60 }},
  {{ text = "c3", delay_ms = 130 }},
]
"""


@pytest.mark.parametrize("mode", ["broadcast", "sequential"])
@pytest.mark.parametrize("kill_after", [0, 1, 2, 4, 7])
def test_sigkill_mid_turn_then_resume(tmp_path: Path, mode: str, kill_after: int) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text(CRASHABLE.format(mode=mode))
    db, calls = tmp_path / "moot.db", tmp_path / "calls.log"
    env = {**os.environ, "MOOT_SCRIPTED_CALL_LOG": str(calls)}
    proc = subprocess.Popen(
        [MOOT, "--db", str(db), "run", str(scenario)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    stream = proc.stdout.readline().split()[1]
    for _ in range(kill_after):  # kill after that many replies were printed
        assert proc.stdout.readline().startswith("turn ")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    with EventLog(db) as log:
        before = {(m.speaker.name, m.content) for m in _replies(log, stream)}
    assert len(before) >= kill_after

    resumed = moot(db, "resume", stream, str(scenario), env=env)
    assert resumed.returncode == 0, resumed.stderr
    with EventLog(db, readonly=True) as log:
        assert log.verify().ok
        final = [(m.speaker.name, m.content) for m in _replies(log, stream)]
        assert log.stream_info(stream).status == "closed"
    expected = {(n, f"{n}{t}") for n in "abc" for t in (1, 2, 3)}
    assert sorted(final) == sorted(expected)  # every reply, exactly once
    asked = collections.Counter(calls.read_text().split("\n")[:-1])
    for name, content in before:  # nothing on record before the kill was asked again
        index = int(content[1:]) - 1
        assert asked[f"{name} {index}"] == 1, (name, content, asked)
    assert set(asked) == {f"{n} {i}" for n in "abc" for i in range(3)}


def _replies(log: EventLog, stream: str) -> list[DialogueMessage]:
    return [
        r.event
        for r in log.read(stream)
        if isinstance(r.event, DialogueMessage) and r.event.origin == "agent"
    ]


def test_run_prints_turns_and_the_stream(tmp_path: Path) -> None:
    result = moot(tmp_path / "m.db", "run", str(ROOT / "examples" / "debate.toml"), "--id", "deb")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "stream deb" and lines[-1] == "completed deb"
    assert lines[1] == "turn 1  critic: transcript: it records every word."
    assert "turn 2  pragmatist failed: model overloaded" in lines
    again = moot(tmp_path / "m.db", "run", str(ROOT / "examples" / "debate.toml"), "--id", "deb")
    assert (again.returncode, again.stdout) == (2, "")
    assert again.stderr == (
        "moot: stream 'deb' already exists (to continue it: moot resume deb FILE)\n"
    )
    finished = moot(tmp_path / "m.db", "resume", "deb", str(ROOT / "examples" / "debate.toml"))
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout == "stream deb\nnothing to resume: deb is closed\n"
    refused = moot(tmp_path / "m.db", "run", str(ROOT / "examples" / "debate.toml"), "--id", "")
    assert refused.returncode == 2 and "invalid stream id ''" in refused.stderr


@pytest.mark.parametrize("name", ["debate", "review_chain", "late_joiner", "tool_participant"])
def test_examples_run(tmp_path: Path, name: str) -> None:
    result = moot(tmp_path / "m.db", "run", str(ROOT / "examples" / f"{name}.toml"))
    assert result.returncode == 0, result.stderr
    assert moot(tmp_path / "m.db", "verify").returncode == 0


BAD = {
    "unknown mode": (
        '[dialogue]\nmode = "chaos"\nturns = ["x"]\n[[participant]]\nname = "a"\nreplies = ["x"]\n',
        "unknown mode 'chaos'",
    ),
    "stranger": (
        '[dialogue]\norder = "explicit"\nnames = ["zed"]\nturns = ["x"]\n'
        '[[participant]]\nname = "a"\nreplies = ["x"]\n',
        "unknown participant(s): zed",
    ),
    "missing replies": (
        '[dialogue]\nturns = ["x"]\n[[participant]]\nname = "a"\nagent = "scripted"\n',
        "needs a non-empty 'replies' list",
    ),
    "invalid toml": ('[dialogue\nturns = ["x"]\n', "invalid TOML"),
    "bad reply": (
        '[dialogue]\nturns = ["x"]\n[[participant]]\nname = "a"\n'
        'replies = [{ text = "x", error = "y" }]\n',
        "replies[0]",
    ),
    "no turns": ('[dialogue]\n[[participant]]\nname = "a"\nreplies = ["x"]\n', "'turns'"),
    "unknown agent": (
        '[dialogue]\nturns = ["x"]\n[[participant]]\nname = "a"\nagent = "gpt"\n',
        "unknown agent 'gpt'",
    ),
    "unknown key": (
        '[dialogue]\nturns = ["x"]\nmood = "happy"\n[[participant]]\nname = "a"\nreplies = ["x"]\n',
        "unknown key(s): mood",
    ),
}


def _one(dialogue: str = "", participant: str = "", extra: str = "") -> str:
    """A scenario with one participant, plus the given lines."""
    return (
        f'[dialogue]\nturns = ["x"]\n{dialogue}\n[[participant]]\nname = "a"\n'
        f'replies = ["x"]\n{participant}\n{extra}'
    )


# Values of the wrong type or out of range: refused when the file is read, the key named.
BAD |= {
    "id not a string": (_one("id = 5"), "Expected `str | null`, got `int` - at `$.id`"),
    "empty id": (_one('id = ""'), "at `$.id`"),
    "names not strings": (
        _one('order = "explicit"\nnames = [1]'),
        "Expected `str`, got `int` - at `$.names[0]`",
    ),
    "names a string": (_one('order = "explicit"\nnames = "ab"'), "at `$.names`"),
    "role a number": (_one(participant="role = 5"), "at `$.role`"),
    "capabilities a string": (_one(participant='capabilities = "abc"'), "at `$.capabilities`"),
    "history_turns negative": (
        _one(participant="history_turns = -1"),
        ">= 0 - at `$.history_turns`",
    ),
    "base_url a number": (
        _one(participant='agent = "openai"\nmodel = "m"\nbase_url = 5'),
        "at `$.base_url`",
    ),
    "stream a string": (_one(participant='stream = "no"'), "Expected `bool | null`"),
    "timeout_s a string": (_one(participant='timeout_s = "x"'), "at `$.timeout_s`"),
    "delay_ms infinite": (
        _one(participant='replies = [{ text = "x", delay_ms = inf }]').replace(
            'replies = ["x"]\n', "", 1
        ),
        "delay_ms must be between 0 and",
    ),
    "max_iterations negative": (
        _one(participant='tools = ["tests.loop_tools:add"]\nloop = { max_iterations = -5 }'),
        ">= 1 - at `$.max_iterations`",
    ),
    "threshold 0": (
        _one(
            participant='tools = ["tests.loop_tools:add"]\n'
            "loop = { loop_detection = { threshold = 0 } }"
        ),
        ">= 2 - at `$.threshold`",
    ),
    "typo in a loop table": (
        _one(participant='tools = ["tests.loop_tools:add"]\nloop = { max_iteration = 1 }'),
        "loop: unknown key(s): max_iteration",
    ),
    "typo in loop_detection": (
        _one(
            participant='tools = ["tests.loop_tools:add"]\n'
            "loop = { loop_detection = { treshold = 9 } }"
        ),
        "treshold",
    ),
    "typo in context": (
        _one('context = { enviroment = "x" }'),
        "context: unknown key(s): enviroment",
    ),
    "typo in a strategy": (
        _one(participant='joins_at = 2\nstrategy = { kind = "recent", turn = 2 }'),
        "strategy: unknown key(s): turn",
    ),
    "range backwards": (
        _one(participant='joins_at = 2\nstrategy = { kind = "range", start = 5, end = 1 }'),
        "invalid strategy",
    ),
    "moderator without its mode": (
        _one(extra='[moderator]\nreplies = ["broadcast"]'),
        "needs mode",
    ),
    "typo in moderator": (
        _one('mode = "moderator"', extra='[moderator]\nreplies = ["broadcast"]\ntemprature = 0.2'),
        "[moderator]: unknown key(s): temprature",
    ),
    "standalone loop timeout negative": (
        '[loop]\nprompt = "hi"\nreplies = ["x"]\ntimeout_s = -1\n',
        "at `$.timeout_s`",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_scenarios_fail_before_anything_runs(tmp_path: Path, case: str) -> None:
    text, reason = BAD[case]
    scenario = tmp_path / "bad.toml"
    scenario.write_text(text)
    db = tmp_path / "moot.db"
    result = moot(db, "run", str(scenario))
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and reason in lines[0] and "Traceback" not in result.stderr
    assert not db.exists()  # nothing was written, not even an empty log
    assert result.stdout == ""


def test_two_hundred_dialogues_finish_and_leave_no_threads(tmp_path: Path) -> None:
    before = threading.active_count()
    log = EventLog(tmp_path / "many.db")

    def one(i: int) -> list[str]:
        people = [
            Participant(
                n,
                LlmAgent(
                    ScriptedProvider([ScriptedReply(text=f"{n}{i}-{t}") for t in range(2)], label=n)
                ),
            )
            for n in ("a", "b", "c", "d")
        ]
        d = Dialogue.create(log, participants=people)
        out = [r.content or "" for t in range(2) for r in d.run(f"turn {t}", timeout=60)]
        d.close()
        return out

    results: dict[int, list[str]] = {}
    workers = [
        threading.Thread(target=lambda k=k: results.__setitem__(k, one(k))) for k in range(200)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert len(results) == 200 and all(len(r) == 8 for r in results.values())
    assert len(log.streams()) == 200 and log.verify().ok
    log.close()
    assert threading.active_count() == before


def test_replay_json_of_a_run(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    moot(db, "run", str(ROOT / "examples" / "late_joiner.toml"), "--id", "lj")
    state = msgspec.json.decode(moot(db, "replay", "lj", "--json").stdout)
    assert list(state["participants"]) == ["alice", "bob", "historian"]
    assert state["status"] == "closed" and state["message_count"] == 10


def test_a_turn_that_cannot_run_exits_1(tmp_path: Path) -> None:
    scenario = tmp_path / "m.toml"
    scenario.write_text(
        '[dialogue]\nmode = "moderator"\nturns = ["hello"]\n'
        '[[participant]]\nname = "a"\nreplies = ["hi"]\n'
        '[moderator]\nreplies = [{ error = "moderator down" }]\n'
    )
    result = moot(tmp_path / "m.db", "run", str(scenario))
    assert result.returncode == 1
    assert result.stderr.strip() == "moot: the moderator failed: moderator down"
