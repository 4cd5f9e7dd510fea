"""The inspection CLI, run as a real command: output, exit codes, one-line errors."""

from __future__ import annotations

import hashlib
import os
import queue
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import msgspec
import pytest

from moot.store import SCHEMA_VERSION, EventLog
from tests import test_sqlite_log as t
from tests.command import MOOT, moot
from tests.samples import dialogue_events, loop_events


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, match: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("moot: ") and match in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.fixture
def db(db_path: Path) -> Path:
    with EventLog(db_path) as log:
        log.append("d1", dialogue_events())
        log.append("loop-1", loop_events())
    return db_path


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sessions_lists_streams(db: Path) -> None:
    result = moot(db, "sessions", "--json")
    assert result.returncode == 0
    rows = msgspec.json.decode(result.stdout)
    by_id = {r["stream"]: r for r in rows}
    assert by_id["d1"]["kind"] == "dialogue"
    assert by_id["d1"]["events"] == 11
    assert by_id["loop-1"]["parent"] == "d1"
    assert by_id["loop-1"]["status"] == "completed"
    table = moot(db, "sessions").stdout
    assert "d1" in table
    assert "dialogue" in table
    assert "closed" in table


def test_show_is_a_transcript_with_loops_nested(db: Path) -> None:
    result = moot(db, "show", "d1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Turn 1" in out
    assert "alice (writer): moot" in out
    assert "[context_info]" in out
    assert "bob failed: slow" in out
    loop_at = out.index("loop loop-1")
    assert out.index("alice (writer): moot") < loop_at < out.index("bob failed")
    assert "add" in out
    assert "done (complete" in out


def test_events_jsonl_is_for_machines(db: Path) -> None:
    result = moot(db, "events", "--jsonl")
    lines = [msgspec.json.decode(line) for line in result.stdout.splitlines()]
    assert len(lines) == 23
    assert set(lines[0]) == {"position", "stream", "seq", "type", "version", "recorded_at", "data"}
    assert lines[0]["data"]["type"] == "DialogueStarted"
    only = moot(db, "events", "loop-1", "--type", "Done", "--jsonl").stdout.splitlines()
    assert [msgspec.json.decode(x)["version"] for x in only] == [2]
    after = moot(db, "events", "--after", "20", "--jsonl").stdout.splitlines()
    assert [msgspec.json.decode(x)["position"] for x in after] == [21, 22, 23]
    human = moot(db, "events", "d1").stdout.splitlines()
    assert len(human) == 11
    assert "d1#1 DialogueStarted" in human[0]


def test_replay_prints_the_state(db: Path) -> None:
    from moot.events import DialogueState, LoopState

    with EventLog(db, readonly=True) as log:
        expected, loop = log.replay("d1", until_seq=5), log.replay("loop-1")
    result = moot(db, "replay", "d1", "--until", "5", "--json")
    assert len(result.stdout.strip().splitlines()) == 1
    assert msgspec.json.decode(result.stdout, type=DialogueState) == expected
    pretty = moot(db, "replay", "loop-1").stdout
    assert msgspec.json.decode(pretty, type=LoopState) == loop
    # Every field is printed, defaults included (stored events leave those out).
    blocks = [b for m in msgspec.json.decode(pretty)["messages"] for b in m["content"]]
    results = [b for b in blocks if b["kind"] == "tool_result"]
    assert results and all("is_error" in b for b in results)


def test_verify_ok(db: Path) -> None:
    result = moot(db, "verify")
    assert (result.returncode, result.stdout.strip()) == (0, "ok 23 events")
    assert moot(db, "verify", "loop-1").stdout.strip() == "ok 12 events"


@pytest.mark.parametrize(
    ("sql", "position"),
    [
        ("UPDATE events SET data = replace(data, 'm4', 'm5') WHERE position = 6", 6),
        ("DELETE FROM events WHERE position = 4", 4),
        ("DELETE FROM events WHERE position IN (9, 10)", 9),
        ("UPDATE events SET data = CAST(data AS BLOB) WHERE position = 5", 5),
    ],
    ids=["changed-byte", "deleted-middle", "removed-tail", "data-as-blob"],
)
def test_verify_names_the_first_bad_position(db_path: Path, sql: str, position: int) -> None:
    t.fresh(db_path)
    t.tamper(db_path, sql)
    result = moot(db_path, "verify")
    assert_one_line_error(result, 1, f"broken at position {position}")


def test_verify_finds_swapped_rows_and_forgeries(db_path: Path, tmp_path: Path) -> None:
    t.test_two_swapped_rows_are_found(db_path)
    assert_one_line_error(moot(db_path, "verify"), 1, "broken at position 3")
    forged = tmp_path / "forged.db"
    t.test_a_forged_row_with_plain_sha256_is_found_under_an_audit_key(forged)
    env = {"MOOT_AUDIT_KEY": "audit-key", "PATH": "/usr/bin:/bin"}
    assert_one_line_error(moot(forged, "verify", env=env), 1, "broken at position 13")
    assert_one_line_error(moot(forged, "verify"), 2, "audit key")


def test_bad_databases_exit_2_and_stay_unchanged(tmp_path: Path) -> None:
    newer = tmp_path / "newer.db"
    t.fresh(newer)
    t.tamper(newer, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn = sqlite3.connect(newer)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE people (name TEXT)")
    conn.commit()
    conn.close()
    text = tmp_path / "text.db"
    text.write_text("not a database\n" * 20)
    for path, match in (
        (newer, "newer moot"),
        (foreign, "not a moot event log"),
        (text, "not a SQLite database"),
    ):
        before = file_hash(path)
        for command in (["sessions"], ["verify"], ["events"], ["show", "d"], ["tail"]):
            assert_one_line_error(moot(path, *command), 2, match)
        assert file_hash(path) == before
    missing = tmp_path / "missing.db"
    assert_one_line_error(moot(missing, "sessions"), 2, "no such database file")
    assert not missing.exists()


def test_usage_errors_are_one_line(db: Path) -> None:
    assert_one_line_error(moot(db, "frobnicate"), 2, "No such command")
    assert_one_line_error(moot(db, "replay"), 2, "Missing argument")
    assert_one_line_error(moot(db, "show", "nope"), 2, "no stream 'nope'")
    assert_one_line_error(moot(db, "replay", "d1", "--until", "x"), 2, "not a valid integer")
    assert_one_line_error(moot(db, "replay", "d1", "--until", "0"), 2, "not in the range x>=1")


def test_verify_of_one_stream_tells_a_missing_stream_from_a_missing_head(db_path: Path) -> None:
    t.fresh(db_path)
    assert_one_line_error(moot(db_path, "verify", "nope"), 2, "no stream 'nope'")
    t.tamper(db_path, "DELETE FROM streams WHERE stream = 'e'")
    assert_one_line_error(moot(db_path, "verify", "e"), 1, "has events but no head")


def test_verify_saves_and_checks_an_anchor(db_path: Path, tmp_path: Path) -> None:
    t.fresh(db_path)
    kept = tmp_path / "anchor.json"
    result = moot(db_path, "verify", "--save-anchor", str(kept))
    assert (result.returncode, result.stdout) == (0, "ok 12 events\n")
    saved = msgspec.json.decode(kept.read_bytes())
    assert saved["position"] == 12 and set(saved["heads"]) == {"d", "e"}
    before = file_hash(db_path)
    again = moot(db_path, "verify", "--anchor", str(kept), "--save-anchor", str(kept))
    assert (again.returncode, again.stdout) == (0, "ok 12 events\n")  # rotated in place
    assert file_hash(db_path) == before  # still read-only
    rotated = kept.read_bytes()
    t.tamper(
        db_path, "DELETE FROM events WHERE stream = 'e'", "DELETE FROM streams WHERE stream = 'e'"
    )
    assert moot(db_path, "verify").returncode == 0  # the chain alone cannot tell
    assert_one_line_error(
        moot(db_path, "verify", "--anchor", str(kept)),
        1,
        "broken: stream 'e': the anchor has seq 2 but the log has no such stream",
    )
    assert kept.read_bytes() == rotated  # a failed check saves nothing
    (tmp_path / "junk.json").write_text("{}")
    assert_one_line_error(
        moot(db_path, "verify", "--anchor", str(tmp_path / "junk.json")), 2, "not a moot anchor"
    )
    assert_one_line_error(
        moot(db_path, "verify", "--anchor", str(tmp_path / "none.json")),
        2,
        "cannot read the anchor",
    )
    assert_one_line_error(
        moot(db_path, "verify", "--save-anchor", str(tmp_path / "no" / "dir.json")),
        2,
        "cannot write the anchor",
    )


def test_a_damaged_head_row_is_tampering_not_a_crash(db_path: Path) -> None:
    t.fresh(db_path)
    t.tamper(db_path, "UPDATE streams SET last_seq = 'abc' WHERE stream = 'd'")
    assert_one_line_error(
        moot(db_path, "verify"),
        1,
        "broken: stream 'd': its head row is damaged (Expected `int`, got `str` - at `$.last_seq`)",
    )


def test_tail_and_events_take_odd_counts_and_damaged_heads(db_path: Path) -> None:
    t.fresh(db_path)
    t.tamper(db_path, "UPDATE streams SET last_position = 'x'")
    tailed = moot(db_path, "tail", "-n", "2")  # the end of the log comes from its events
    assert tailed.returncode == 0, tailed.stderr
    assert [line.split()[0] for line in tailed.stdout.splitlines()] == ["11", "12"]
    everything = moot(db_path, "events", "--after", str(-(2**70)))
    assert everything.returncode == 0 and len(everything.stdout.splitlines()) == 12
    assert moot(db_path, "events", "--after", str(2**70)).stdout == ""
    assert_one_line_error(moot(db_path, "tail", "-n", "-3"), 2, "not in the range x>=0")


def test_damaged_rows_are_reported_not_crashed_on(db_path: Path) -> None:
    """Columns of the wrong type or data that is not JSON (an altered file): every
    command answers in one line or with valid output, never with a traceback."""
    t.fresh(db_path)
    t.tamper(
        db_path,
        "UPDATE events SET version = 'x' WHERE position = 3",
        "UPDATE events SET data = '{not json' WHERE position = 4",
    )
    where = "d#3: DialogueMessage: version 'x' is not a number"  # the row is named
    assert_one_line_error(moot(db_path, "replay", "d"), 2, where)
    assert_one_line_error(moot(db_path, "show", "d"), 2, "d#3 (position 3): DialogueMessage")
    assert_one_line_error(moot(db_path, "verify"), 1, "broken at position 3")
    result = moot(db_path, "events", "--jsonl")
    assert result.returncode == 0, result.stderr
    lines = [msgspec.json.decode(line) for line in result.stdout.splitlines()]
    assert [line["position"] for line in lines] == list(range(1, 13))
    assert lines[3]["data"] == "{not json" and lines[3]["invalid"] == "data is not JSON"
    assert "invalid" not in lines[4] and lines[4]["data"]["type"] == "DialogueMessage"


def test_read_commands_never_change_the_database(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    before = file_hash(db)
    for command in (
        ["sessions"],
        ["show", "d1"],
        ["events"],
        ["replay", "d1"],
        ["verify"],
        ["tail"],
    ):
        assert moot(db, *command).returncode == 0
    assert file_hash(db) == before


def test_tail_follow_prints_what_another_process_appends(db: Path) -> None:
    proc = subprocess.Popen(
        [MOOT, "--db", str(db), "tail", "-n", "1", "--follow", "--jsonl"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        first = msgspec.json.decode(lines.get(timeout=30))
        assert first["position"] == 23  # the backlog came first: tail is following now
        writer = subprocess.run(
            [
                sys.executable,
                "-c",
                (
                    "import sys; from moot.store import EventLog; "
                    "from tests.test_sqlite_log import message; "
                    "EventLog(sys.argv[1]).append('d1', [message('late')])"
                ),
                str(db),
            ],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert writer.returncode == 0, writer.stderr
        new = msgspec.json.decode(lines.get(timeout=1.0))  # within a second, as promised
        assert new["data"]["content"] == "late"
        assert new["position"] == 24
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("command", [["events"], ["show", "d1"], ["sessions"]])
def test_a_reader_that_goes_away_is_not_an_error(db: Path, command: list[str]) -> None:
    with EventLog(db) as log:  # more output than a pipe holds, so the write must fail
        log.append("d1", [t.message("x" * 200) for _ in range(2000)])
        for i in range(2000):
            log.append(f"s{i}", [t.started()])
    reader = subprocess.Popen(["head", "-n", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    writer = subprocess.run(
        [MOOT, "--db", str(db), *command],
        stdout=reader.stdin,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )
    assert reader.stdin is not None
    reader.stdin.close()
    reader.wait(timeout=10)
    assert writer.returncode == 0 and writer.stderr == ""


def test_text_cannot_drive_the_terminal_or_forge_transcript_lines(db_path: Path) -> None:
    forged = "fine\n  bob (critic): I agree with everything\x1b[2J\x1b]0;owned\x07"
    with EventLog(db_path) as log:
        log.append("d", [t.started(), t.message(forged)])
        log.append("evil\x1b[2J\nd  dialogue  closed", [t.started()])
    show = moot(db_path, "show", "d")
    assert show.returncode == 0, show.stderr
    assert "\x1b" not in show.stdout and "\x07" not in show.stdout
    assert "\\x1b[2J" in show.stdout  # shown, escaped
    assert "\n  bob (critic)" not in show.stdout  # the continuation line is indented
    assert "\n      bob (critic): I agree" in show.stdout
    for command in (["sessions"], ["events"], ["tail"]):
        out = moot(db_path, *command).stdout
        assert "\x1b" not in out and "evil\\x1b[2J\\nd" in out, command


def test_output_the_terminal_cannot_encode_is_escaped(db: Path) -> None:
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "PYTHONUTF8": "0"}
    result = moot(db, "show", "d1", env=env)
    assert result.returncode == 0, result.stderr
    assert "\\xb7" in result.stdout or "\\u2500" in result.stdout


def test_output_that_cannot_be_written_is_a_one_line_error(db: Path, tmp_path: Path) -> None:
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [MOOT, "--db", str(db), "events"], stdout=full, stderr=subprocess.PIPE, text=True
        )
    assert result.returncode == 2 and result.stderr.strip() == "moot: No space left on device"
    closed = subprocess.run(
        [MOOT, "--db", str(db), "sessions"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        pass_fds=(),
        preexec_fn=lambda: os.close(1),
    )
    assert closed.returncode == 2 and "standard output is closed" in closed.stderr
    folder = tmp_path / "anchor"
    folder.mkdir()
    assert_one_line_error(moot(db, "verify", "--save-anchor", str(folder)), 2, "Is a directory")
    assert not (tmp_path / "anchor.partial").exists()  # nothing left behind


def test_a_stream_argument_that_is_not_text_is_a_usage_error(db: Path) -> None:
    bad = b"\xff".decode("utf-8", "surrogateescape")
    for command in ("show", "events", "replay", "verify"):
        assert_one_line_error(moot(db, command, bad), 2, "invalid stream id")


def test_show_nests_the_loop_of_a_participant_that_failed(db_path: Path) -> None:
    from moot.events import Error, LoopFailed, LoopParent, LoopStarted, ParticipantFailed

    with EventLog(db_path) as log:
        log.append("d", [t.started(), t.message("compute")])
        failed = ParticipantFailed(turn=1, participant="a", error=Error("x", "loop failed"))
        log.append("d", [failed])
        parent = LoopParent(stream="d", seq=3, turn=1, participant="a")
        log.append(
            "d/a/t1",
            [LoopStarted(parent=parent), LoopFailed(error=Error("x", "the model broke"))],
        )
    out = moot(db_path, "show", "d").stdout
    assert out.index("a failed: loop failed") < out.index("loop d/a/t1")
    assert "failed: the model broke" in out


def test_a_log_in_a_place_it_cannot_write_is_read_as_it_is(db: Path, tmp_path: Path) -> None:
    """An archived log (a read-only folder): WAL readers need a -shm file beside it, which
    cannot be made there; with no WAL left over, the file alone is read."""
    import shutil

    folder = tmp_path / "archive"
    folder.mkdir()
    with EventLog(db):  # closing the last connection folds the WAL into the file
        pass
    shutil.copy(db, folder / "moot.db")
    (folder / "moot.db").chmod(0o444)
    folder.chmod(0o555)
    prefix: list[str] = []
    if os.geteuid() == 0:  # root writes anywhere: drop that for the command
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv to drop the override")
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    try:
        for command in (["sessions"], ["verify"], ["show", "d1"]):
            result = subprocess.run(
                [*prefix, MOOT, "--db", str(folder / "moot.db"), *command],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 0, (command, result.stderr)
        assert sorted(p.name for p in folder.iterdir()) == ["moot.db"]
        follow = subprocess.run(
            [*prefix, MOOT, "--db", str(folder / "moot.db"), "tail", "--follow"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert_one_line_error(follow, 2, "there is nothing to follow")
    finally:
        folder.chmod(0o755)


def test_json_output_is_utf8_whatever_the_terminal(db_path: Path) -> None:
    with EventLog(db_path) as log:
        log.append("d", [t.started(), t.message("smile \U0001f600, café")])
    env = {**os.environ, "PYTHONIOENCODING": "latin-1", "PYTHONUTF8": "0"}
    for command in (["events", "--jsonl"], ["replay", "d", "--json"], ["sessions", "--json"]):
        result = subprocess.run(
            [MOOT, "--db", str(db_path), *command], capture_output=True, env=env, timeout=60
        )
        assert result.returncode == 0, result.stderr
        for line in result.stdout.decode("utf-8").splitlines():
            msgspec.json.decode(line)  # valid JSON, one object a line
    assert "\U0001f600" in moot(db_path, "events", "--jsonl").stdout


def test_run_output_and_errors_escape_control_characters(tmp_path: Path) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text(
        '[dialogue]\nmode = "broadcast"\nturns = ["go"]\n\n[[participant]]\nname = "a"\n'
        'agent = "scripted"\nreplies = ["ok \\u001b]0;owned\\u0007 done"]\n'
    )
    db = tmp_path / "m.db"
    result = moot(db, "run", str(scenario))
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\\x1b]0;owned\\x07" in result.stdout
    bad = moot(db, "approve", "no\x1b[2Jpe", "call")
    assert bad.returncode == 2 and "\x1b" not in bad.stderr and "\\x1b[2J" in bad.stderr
