"""The SQLite file backend: other processes, crashes, tampering, bad files and the views."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import pytest

from moot.events import (
    ChatMessage,
    DialogueMessage,
    DialogueStarted,
    Done,
    IterationStart,
    LlmResponse,
    LoopStarted,
    LoopState,
    ParticipantInfo,
    Speaker,
    Termination,
    ToolCallBlock,
    ToolCallDecided,
    ToolExecutionEnd,
    ToolExecutionStart,
)
from moot.store import SCHEMA_VERSION, ConcurrencyError, DatabaseError, EventLog, chain_hash
from moot.store._base import _Append
from moot.store._sqlite import _Heads
from tests.samples import dialogue_events

ROOT = Path(__file__).resolve().parent.parent


def started() -> DialogueStarted:
    return DialogueStarted(
        mode="broadcast", order="completion", participants=(ParticipantInfo(name="a"),)
    )


def message(text: str) -> DialogueMessage:
    return DialogueMessage(
        turn=1, speaker=Speaker(kind="user", name="u"), content=text, origin="incoming"
    )


def run_python(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def snapshot(path: Path) -> dict[str, str | None]:
    """Hashes of the database file and its side files (None when absent)."""
    out: dict[str, str | None] = {}
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(path) + suffix)
        out[suffix] = hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None
    return out


# ------------------------------------------------------------ other processes

WRITER = """
import sys
from moot.store import EventLog, ConcurrencyError
from tests.test_sqlite_log import message
log = EventLog(sys.argv[1])
name, count = sys.argv[2], int(sys.argv[3])
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()
done = 0
while done < count:
    last = log.stream_info("d").last_seq
    try:
        log.append("d", [message(f"{name}-{done}")], expected_seq=last)
        done += 1
    except ConcurrencyError:
        pass
log.close()
"""


def test_two_processes_append_to_one_stream(db_path: Path) -> None:
    with EventLog(db_path) as log:
        log.append("d", [started()])
    procs = [run_python(WRITER, str(db_path), name, "150") for name in ("p", "q")]
    for p in procs:
        assert p.stdout is not None
        assert p.stdout.readline() == "ready\n"
    for p in procs:  # release both at once
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    with EventLog(db_path, readonly=True) as log:
        records = list(log.read("d"))
        assert [r.seq for r in records] == list(range(1, 302))
        contents = [r.event.content for r in records[1:]]  # type: ignore[union-attr]
        for name in ("p", "q"):
            mine = [c for c in contents if c.startswith(name + "-")]
            assert mine == [f"{name}-{i}" for i in range(150)]
        assert log.verify().ok


def test_two_logs_on_one_file_see_each_others_appends(db_path: Path) -> None:
    """Each writer plans from the heads of its own last commit; when the other one has
    written since, that plan is stale, and it must not show: every answer is the one
    a fresh read of the file would give."""
    with EventLog(db_path) as one, EventLog(db_path) as two:
        assert one.append("s", [started(), message("1")]) == 2
        assert two.append("s", [message("2")], expected_seq=2) == 3
        # one last wrote seq 2: an expectation of 3 is right, one of 2 is stale
        assert one.append("s", [message("3")], expected_seq=3) == 4
        with pytest.raises(ConcurrencyError):
            two.append("s", [message("x")], expected_seq=3)
        assert two.append("s", []) == 4  # nothing to write proves nothing: read afresh
        assert two.append("t", [started()]) == 1  # another stream: positions still move on
        assert one.append("s", [message("5")]) == 5
        assert one.append("t", [message("t2")], expected_seq=1) == 2
        assert two.append("t", [message("t3")]) == 3
        for log in (one, two):
            assert [r.position for r in log.read_all()] == list(range(1, 9))
            assert [h.last_seq for h in sorted(log.streams(), key=lambda h: h.stream)] == [5, 3]
            assert log.verify().ok


def test_heads_remembered_from_before_another_writer_are_not_trusted(db_path: Path) -> None:
    """A writer that reads one stream's head from the file learns that someone else has
    written; the heads it remembers for other streams are stale, and must not be used."""
    with EventLog(db_path) as one, EventLog(db_path) as two:
        one.append("x", [started()])
        one.append("z", [started()])  # one remembers x and z at seq 1
        two.append("x", [message("by two")])  # x is at seq 2 now
        one.append("y", [started()])  # a new stream: one reads the file's last position
        # x (expecting seq 2, as it is) and z, in one commit of one's, as group commit
        # would put them when their callers queue behind the same leader.
        x = _Append("x", [message("x3")], 2, None)
        z = _Append("z", [message("z2")], None, None)
        one._commit_batch([x, z], [])
        assert (x.error, x.result) == (None, 3)
        assert (z.error, z.result) == (None, 2)
        contents = [r.event.content for r in two.read("x") if isinstance(r.event, DialogueMessage)]
        assert contents == ["by two", "x3"]
        assert one.verify().ok


def test_verify_reads_one_snapshot_while_others_append(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append that lands between verify's walk over the events and its read of the
    heads is not mistaken for a removed tail: verify sees the log as it was."""
    fresh(db_path)
    with EventLog(db_path) as log, EventLog(db_path) as other:
        heads = log._heads
        appended: list[int] = []

        def heads_after_an_append(stream: str | None) -> Any:
            if not appended:  # another writer, mid-verify
                appended.append(other.append("d", [message("meanwhile")]))
            return heads(stream)

        monkeypatch.setattr(log, "_heads", heads_after_an_append)
        report = log.verify()
        assert report.ok, report
        assert report.checked == 12  # the events before the append, and only those
        assert appended == [11]
        monkeypatch.undo()
        assert log.verify().checked == 13


def test_a_writer_keeps_a_bounded_number_of_heads(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_Heads, "LIMIT", 4)
    with EventLog(db_path) as log:
        for round_ in range(3):
            for i in range(10):
                events = [started()] if round_ == 0 else [message(f"{round_}")]
                assert log.append(f"s{i}", events, expected_seq=round_) == round_ + 1
                assert len(log._known.streams) <= 4
        assert log.verify().ok
        assert {h.last_seq for h in log.streams()} == {3}


def test_the_wal_is_checkpointed_apart_from_commits(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits only append to the WAL; once about CHECKPOINT_BYTES are there, the leader
    that steps down copies them into the database file."""
    monkeypatch.setattr(EventLog, "CHECKPOINT_BYTES", 500_000)
    with EventLog(db_path) as log:
        log.append("d", [started()])
        empty = db_path.stat().st_size
        for i in range(10):  # ~33 KB of WAL a commit, as the log counts
            log.append("d", [message(f"{i}/{j} " + "x" * 1000) for j in range(10)])
        assert db_path.stat().st_size == empty  # nothing checkpointed yet
        for i in range(10, 20):
            log.append("d", [message(f"{i}/{j} " + "x" * 1000) for j in range(10)])
        assert db_path.stat().st_size > empty + 150_000
        assert log.verify().ok
        assert log.stream_info("d").last_seq == 201


def test_the_wal_starts_over_while_threads_keep_appending(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints run beside the committing threads, yet each one completes: the WAL
    file stays a few thresholds long instead of holding every commit."""
    monkeypatch.setattr(EventLog, "CHECKPOINT_BYTES", 100_000)
    with EventLog(db_path) as log:
        for t in range(8):
            log.append(f"s{t}", [started()])

        def work(t: int) -> None:
            for i in range(40):
                log.append(f"s{t}", [message(f"{t}/{i}/{j} " + "y" * 800) for j in range(5)])

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(work, range(8)))
        assert db_path.stat().st_size > 8 * 40 * 5 * 800  # checkpointed into the file
        # The WAL header counts the times the WAL started over (its checkpoint sequence):
        # ~5 MB went through it, a checkpoint every ~100 KB.
        header = Path(f"{db_path}-wal").read_bytes()[:32]
        assert int.from_bytes(header[12:16], "big") >= 5
        assert log.verify().ok
        assert [log.stream_info(f"s{t}").last_seq for t in range(8)] == [201] * 8


def test_a_reader_keeps_its_snapshot_across_checkpoints(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(EventLog, "CHECKPOINT_BYTES", 100_000)
    with EventLog(db_path) as log:
        log.append("d", [started()])
        reader = sqlite3.connect(db_path, isolation_level=None)
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM events").fetchone() == (1,)
        for i in range(20):  # several thresholds' worth
            log.append("d", [message(f"{i}/{j} " + "y" * 800) for j in range(10)])
        assert reader.execute("SELECT count(*) FROM events").fetchone() == (1,)
        reader.execute("COMMIT")
        assert reader.execute("SELECT count(*) FROM events").fetchone() == (201,)
        reader.close()
        # The checkpoint it held up is tried again soon (not a whole threshold later).
        log.append("d", [message("z")])
        assert db_path.stat().st_size > 200 * 800  # all of it in the file now
        assert log.verify().ok


def test_checkpoints_find_the_file_after_a_change_of_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(EventLog, "CHECKPOINT_BYTES", 100_000)
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with EventLog("moot.db") as log:
        log.append("d", [started()])
        monkeypatch.chdir(elsewhere)
        for i in range(20):
            log.append("d", [message(f"{i}/{j} " + "y" * 800) for j in range(10)])
        assert list(elsewhere.iterdir()) == []
        assert (tmp_path / "moot.db").stat().st_size > 200 * 800
        assert log.verify().ok


def test_a_child_forked_during_a_checkpoint_can_checkpoint_and_close(db_path: Path) -> None:
    log = EventLog(db_path)
    log.append("d", [started()])
    log._checkpoint()  # the checkpoint connection is open
    with log._checkpointing:  # as if another thread were checkpointing at the fork
        pid = os.fork()
        if pid == 0:  # the child: the lock is free, the parent's connection forgotten
            ok = log._checkpointing.acquire(timeout=5) and log._cconn is None
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert log._cconn is not None  # the parent's own is untouched
    log.close()


CRASHER = """
import sys
from moot.store import EventLog
from tests.test_sqlite_log import message
log = EventLog(sys.argv[1])
attempt, batch = sys.argv[2], 0
while True:
    size = 1 + batch % 5
    events = [message(f"{attempt}/{batch}/{i}/{size}/" + "x" * 700) for i in range(size)]
    log.append("d", events)
    sys.stdout.write(f"{batch}\\n"); sys.stdout.flush()
    batch += 1
"""


def test_sigkill_while_appending_leaves_a_verifiable_prefix(db_path: Path) -> None:
    rng = random.Random(20261123)
    with EventLog(db_path) as log:
        log.append("d", [started()])
    for attempt in range(20):
        proc = run_python(CRASHER, str(db_path), str(attempt))
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.strip().isdigit(), proc.stderr.read() if proc.stderr else ""
        # Kill at a random moment after the writer got going.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=rng.uniform(0.0, 0.15))
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        acked = max(int(x) for x in [first, *out.splitlines()] if x.strip().isdigit())
        with EventLog(db_path) as log:
            report = log.verify()
            assert report.ok, report
            rows = [r.event for r in log.read("d")][1:]
        batches: dict[int, list[int]] = {}
        sizes: dict[int, int] = {}
        for event in rows:
            assert isinstance(event, DialogueMessage)
            run, batch, index, size, _ = event.content.split("/")
            if int(run) == attempt:
                batches.setdefault(int(batch), []).append(int(index))
                sizes[int(batch)] = int(size)
        # A prefix of what was sent: batches 0..n in order, each one whole, and every
        # acknowledged batch among them.
        assert list(batches) == list(range(len(batches)))
        assert all(items == list(range(sizes[b])) for b, items in batches.items())
        assert len(batches) >= acked + 1


def test_opening_a_log_never_drops_the_locks_of_its_own_connections(db_path: Path) -> None:
    """Opening a second connection used to read the file header with open()/close():
    the close dropped the process's POSIX locks, so another process closing its own
    connection took itself for the last one and deleted the WAL under this one."""
    with EventLog(db_path) as log:
        log.append("d", [started()])
    other = run_python(
        """
        import sqlite3, sys
        conn = sqlite3.connect(sys.argv[1], isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        print("locked", flush=True)
        sys.stdin.readline()
        conn.execute("COMMIT")
        conn.close()
        print("closed", flush=True)
        """,
        str(db_path),
    )
    assert other.stdout is not None and other.stdin is not None
    assert other.stdout.readline().strip() == "locked"
    with EventLog(db_path) as log, EventLog(db_path, readonly=True) as reader:
        other.stdin.write("go\n")
        other.stdin.flush()
        assert other.stdout.readline().strip() == "closed"
        assert other.wait(timeout=30) == 0
        assert Path(str(db_path) + "-wal").exists()  # still ours
        assert log.append("d", [message("after")]) == 2
        assert reader.stream_info("d").last_seq == 2
        assert log.verify().ok


# ------------------------------------------------------------------ tampering


def fresh(db_path: Path, key: bytes | None = None) -> None:
    with EventLog(db_path, audit_key=key) as log:
        log.append("d", [started()] + [message(f"m{i}") for i in range(9)])
        log.append("e", [started(), message("other")])


def tamper(db_path: Path, *sql: str) -> None:
    conn = sqlite3.connect(db_path)
    for statement in sql:
        conn.execute(statement)
    conn.commit()
    conn.close()


def verify(db_path: Path, key: bytes | None = None) -> tuple[bool, int | None]:
    with EventLog(db_path, audit_key=key, readonly=True) as log:
        report = log.verify()
    return report.ok, report.first_bad


def test_one_changed_byte_is_found(db_path: Path) -> None:
    fresh(db_path)
    tamper(db_path, "UPDATE events SET data = replace(data, 'm4', 'm5') WHERE position = 6")
    assert verify(db_path) == (False, 6)


def test_a_deleted_middle_row_is_found(db_path: Path) -> None:
    fresh(db_path)
    tamper(db_path, "DELETE FROM events WHERE position = 4")
    assert verify(db_path) == (False, 4)  # the missing position itself
    with EventLog(db_path, readonly=True) as log:  # a single stream's check sees the seq gap
        report = log.verify("d")
    assert (report.ok, report.first_bad) == (False, 5)


def test_removed_last_rows_are_found(db_path: Path) -> None:
    fresh(db_path)
    tamper(db_path, "DELETE FROM events WHERE position IN (9, 10)")
    assert verify(db_path) == (False, 9)


def test_two_swapped_rows_are_found(db_path: Path) -> None:
    fresh(db_path)
    cols = "stream, seq, type, version, recorded_at, data, prev_hash, hash"
    conn = sqlite3.connect(db_path)
    a = conn.execute(f"SELECT {cols} FROM events WHERE position = 3").fetchone()
    b = conn.execute(f"SELECT {cols} FROM events WHERE position = 7").fetchone()
    conn.execute("DELETE FROM events WHERE position IN (3, 7)")
    conn.execute(f"INSERT INTO events (position, {cols}) VALUES (3, ?,?,?,?,?,?,?,?)", b)
    conn.execute(f"INSERT INTO events (position, {cols}) VALUES (7, ?,?,?,?,?,?,?,?)", a)
    conn.commit()
    conn.close()
    assert verify(db_path) == (False, 3)


def test_a_forged_row_with_plain_sha256_is_found_under_an_audit_key(db_path: Path) -> None:
    key = b"audit-key"
    fresh(db_path, key)
    conn = sqlite3.connect(db_path)
    last_seq, last_hash = conn.execute(
        "SELECT last_seq, last_hash FROM streams WHERE stream = 'd'"
    ).fetchone()
    data = msgspec.json.encode(message("forged"))
    at = "2099-01-01T00:00:00.000000Z"  # the newest row, as its head says
    # The hash exactly as a log without a key computes it: a correct plain SHA-256 chain.
    forged = chain_hash(None, last_hash, "d", last_seq + 1, "DialogueMessage", 1, at, data)
    conn.execute(
        "INSERT INTO events (position, stream, seq, type, version, recorded_at, data, prev_hash,"
        " hash) VALUES (13, 'd', ?, 'DialogueMessage', 1, ?, ?, ?, ?)",
        (last_seq + 1, at, data.decode(), last_hash, forged),
    )
    conn.execute(
        "UPDATE streams SET last_seq = ?, last_hash = ?, last_position = 13, updated_at = ?"
        " WHERE stream = 'd'",
        (last_seq + 1, forged, at),
    )
    conn.commit()
    conn.close()
    with EventLog(db_path, readonly=True, audit_key=key) as log:
        report = log.verify()
    assert (report.ok, report.first_bad) == (False, 13)
    assert "hash" in (report.reason or ""), report.reason
    # Without the key nobody can verify (or write) a sealed log.
    with pytest.raises(DatabaseError, match="audit key"), EventLog(db_path, readonly=True) as log:
        log.verify()
    with EventLog(db_path) as log, pytest.raises(DatabaseError, match="sealed with an audit key"):
        log.append("d", [message("unsigned")])
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (13,)
    with pytest.raises(DatabaseError, match="does not match"):
        EventLog(db_path, audit_key=b"wrong")


def test_an_anchor_finds_what_the_chain_alone_cannot(db_path: Path) -> None:
    """The newest stream deleted whole (events and head), and a stream's chain rewritten
    from its first event with recomputed plain SHA-256: the chain checks out both times;
    an anchor kept outside the database does not."""
    fresh(db_path)
    with EventLog(db_path) as log:
        taken = log.verify().anchor
        assert taken is not None and taken.position == 12
        assert taken.heads == {s.stream: (s.last_seq, s.last_hash) for s in log.streams()}
        log.append("d", [message("later")])  # the log goes on after the anchor
        assert log.verify(anchor=taken).ok
        log.append("f", [started(), message("newest")])
    tamper(
        db_path, "DELETE FROM events WHERE stream = 'f'", "DELETE FROM streams WHERE stream = 'f'"
    )
    assert verify(db_path) == (True, None)  # nothing left to notice
    with EventLog(db_path, readonly=True) as log:
        assert log.verify(anchor=taken).ok  # the anchor was taken before 'f' existed
        later = log.verify().anchor  # taken now, it holds 'd' and 'e' as they are
    with EventLog(db_path) as log:
        log.append("f", [started()])
        newest = log.verify().anchor
    assert newest is not None and newest.position == 14
    tamper(
        db_path, "DELETE FROM events WHERE stream = 'f'", "DELETE FROM streams WHERE stream = 'f'"
    )
    with EventLog(db_path, readonly=True) as log:
        report = log.verify(anchor=newest)
    assert not report.ok and report.stream == "f"
    assert report.reason == (
        "stream 'f': the anchor has seq 1 but the log has no such stream (events removed)"
    )
    # Rewrite 'e' from its first event: new contents, every hash recomputed.
    conn = sqlite3.connect(db_path)
    rows = conn.execute(
        "SELECT position, seq, type, version, recorded_at, data FROM events "
        "WHERE stream = 'e' ORDER BY seq"
    ).fetchall()
    prev = "0" * 64
    for position, seq, type_name, version, at, data in rows:
        changed = data.replace("other", "forged")
        digest = chain_hash(None, prev, "e", seq, type_name, version, at, changed.encode())
        conn.execute(
            "UPDATE events SET data = ?, prev_hash = ?, hash = ? WHERE position = ?",
            (changed, prev, digest, position),
        )
        prev = digest
    conn.execute("UPDATE streams SET last_hash = ? WHERE stream = 'e'", (prev,))
    conn.commit()
    conn.close()
    assert verify(db_path) == (True, None)
    with EventLog(db_path, readonly=True) as log:
        report = log.verify(anchor=later)
        assert (report.ok, report.first_bad, report.stream) == (False, 12, "e")
        assert report.reason == "stream 'e': the event at seq 2 is not the one anchored (rewritten)"
        assert log.verify("d", anchor=later).ok  # a stream's check looks at that stream only
        assert not log.verify("e", anchor=later).ok


def test_an_anchor_finds_a_removed_tail_of_the_whole_log(db_path: Path) -> None:
    fresh(db_path)
    with EventLog(db_path) as log:
        taken = log.verify().anchor
    assert taken is not None
    # The last event of 'e' removed and its head put back one step: the chain checks out.
    conn = sqlite3.connect(db_path)
    seq, digest, position = conn.execute(
        "SELECT seq, hash, position FROM events WHERE stream = 'e' AND seq = 1"
    ).fetchone()
    conn.execute("DELETE FROM events WHERE position = 12")
    conn.execute(
        "UPDATE streams SET last_seq = ?, last_hash = ?, last_position = ?, "
        "status = 'open', updated_at = created_at WHERE stream = 'e'",
        (seq, digest, position),
    )
    conn.commit()
    conn.close()
    assert verify(db_path) == (True, None)
    with EventLog(db_path, readonly=True) as log:
        report = log.verify(anchor=taken)
    assert (report.ok, report.stream) == (False, "e")
    assert (
        report.reason
        == "stream 'e': the anchor has seq 2 but the log ends at seq 1 (events removed)"
    )


# ------------------------------------------------------------------ bad files


def test_newer_schema_is_refused_and_untouched(db_path: Path) -> None:
    fresh(db_path)
    tamper(db_path, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    before = snapshot(db_path)
    for readonly in (False, True):
        with pytest.raises(DatabaseError, match="newer moot"):
            EventLog(db_path, readonly=readonly)
    assert snapshot(db_path) == before


def test_a_sqlite_file_that_is_not_a_moot_log(db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    conn.execute("CREATE TABLE people (name TEXT)")
    conn.commit()
    conn.close()
    before = snapshot(db_path)
    for readonly in (False, True):
        with pytest.raises(DatabaseError, match="not a moot event log"):
            EventLog(db_path, readonly=readonly)
    assert snapshot(db_path) == before


def test_a_file_that_is_not_sqlite(db_path: Path) -> None:
    db_path.write_bytes(b"hello, I am a text file\n" * 100)
    before = snapshot(db_path)
    for readonly in (False, True):
        with pytest.raises(DatabaseError, match="not a SQLite database"):
            EventLog(db_path, readonly=readonly)
    assert snapshot(db_path) == before


def test_readonly_never_creates_a_file(db_path: Path) -> None:
    with pytest.raises(DatabaseError, match="no such database file"):
        EventLog(db_path, readonly=True)
    assert not db_path.exists()


def test_readonly_cannot_append(db_path: Path) -> None:
    fresh(db_path)
    with EventLog(db_path, readonly=True) as log, pytest.raises(DatabaseError, match="read-only"):
        log.append("d", [message("x")])


def test_schema_and_pragmas(db_path: Path) -> None:
    fresh(db_path)
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    indexes = {r[1] for r in conn.execute("PRAGMA index_list(events)")}
    assert "events_stream_seq" in indexes
    with pytest.raises(sqlite3.IntegrityError):  # the schema itself refuses a fork
        conn.execute(
            "INSERT INTO events (stream, seq, type, version, recorded_at, data, prev_hash, hash)"
            " VALUES ('d', 2, 'X', 1, '', '{}', '', '')"
        )
    conn.close()


# ---------------------------------------------------------------------- views


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("status", "'closed'"),
        ("kind", "'loop'"),
        ("parent", "'e'"),
        ("created_at", "'2000-01-01T00:00:00.000000Z'"),
        ("updated_at", "'2000-01-01T00:00:00.000000Z'"),
        ("last_position", "3"),
    ],
)
def test_an_edited_stream_head_is_found(db_path: Path, column: str, value: str) -> None:
    """Every column of a stream's head follows from its events, so none can be edited."""
    fresh(db_path)
    assert verify(db_path) == (True, None)
    tamper(db_path, f"UPDATE streams SET {column} = {value} WHERE stream = 'd'")
    with EventLog(db_path, readonly=True) as log:
        report = log.verify()
    assert (report.ok, report.first_bad, report.stream) == (False, 10, "d")
    assert f"head says {column}" in (report.reason or "")


def test_a_v1_row_written_by_an_older_moot_is_read_back_as_v2(db_path: Path) -> None:
    """Done v1 (``response`` instead of ``termination``) sits in the log as it was
    written, hash and all; reading, replay and verify see the v2 event."""
    with EventLog(db_path) as log:
        log.append("l", [LoopStarted(messages=(ChatMessage.text("user", "hi"),))])
        head = log.stream_info("l")
    v1 = '{"type":"Done","termination":"max_iterations","iterations":3,"response":[]}'
    at = "2025-01-02T03:04:05.000006Z"
    digest = chain_hash(None, head.last_hash, "l", 2, "Done", 1, at, v1.encode())
    tamper(
        db_path,
        f"INSERT INTO events VALUES (2, 'l', 2, 'Done', 1, '{at}', '{v1}', "
        f"'{head.last_hash}', '{digest}')",
        f"UPDATE streams SET last_seq = 2, last_hash = '{digest}', last_position = 2, "
        f"status = 'completed', updated_at = '{at}' WHERE stream = 'l'",
    )
    with EventLog(db_path, readonly=True) as log:
        done = list(log.read("l"))[-1]
        assert (done.type, done.version) == ("Done", 1)
        assert done.event == Done(termination=Termination(reason="max_iterations"), iterations=3)
        state = log.replay("l")
        assert isinstance(state, LoopState)
        assert (state.status, state.termination) == ("completed", done.event.termination)
        assert log.verify().ok


def test_messages_and_tool_calls_views(db_path: Path) -> None:
    calls = (
        ToolCallBlock(id="c1", name="add", arguments={"a": 2, "b": 3}),
        ToolCallBlock(id="c2", name="rm", arguments={"path": "/"}),
        ToolCallBlock(id="c3", name="add", arguments={"a": 1}),
    )
    with EventLog(db_path) as log:
        log.append("d", dialogue_events())
        log.append(
            "l",
            [
                LoopStarted(),
                IterationStart(iteration=1, message_count=1),
                LlmResponse(iteration=1, content=calls, stop_reason="tool_use"),
                ToolCallDecided(call_id="c2", tool_name="rm", decision="deny", reason="no"),
                ToolCallDecided(
                    call_id="c3", tool_name="add", decision="modify", arguments={"a": 1, "b": 1}
                ),
                ToolExecutionStart(call_id="c1", tool_name="add", arguments={"a": 2, "b": 3}),
                ToolExecutionStart(call_id="c3", tool_name="add", arguments={"a": 1, "b": 1}),
                ToolExecutionEnd(call_id="c3", tool_name="add", content="2", duration_ms=1.5),
                ToolExecutionEnd(call_id="c1", tool_name="add", content="5", duration_ms=2.0),
            ],
        )
    conn = sqlite3.connect(db_path)
    rows = conn.execute("SELECT stream, seq, turn, speaker, role, content FROM messages").fetchall()
    assert rows == [
        ("d", 3, 1, "user", None, "Name it — ünïcödé ✓"),
        ("d", 6, 1, "alice", "writer", "moot"),
    ]
    rows = conn.execute(
        "SELECT stream, call_id, tool, arguments, result, is_error, duration_ms FROM tool_calls"
        " ORDER BY call_id"
    ).fetchall()
    assert rows == [
        ("l", "c1", "add", '{"a":2,"b":3}', "5", 0, 2.0),
        ("l", "c2", "rm", '{"path":"/"}', "Tool call denied: no", 1, 0),
        ("l", "c3", "add", '{"a":1,"b":1}', "2", 0, 1.5),
    ]
    conn.close()


def test_a_whole_removed_stream_is_found(db_path: Path) -> None:
    fresh(db_path)
    with EventLog(db_path) as log:
        log.append("f", [started(), message("after")])  # positions 13 and 14
    tamper(
        db_path, "DELETE FROM events WHERE stream = 'e'", "DELETE FROM streams WHERE stream = 'e'"
    )
    assert verify(db_path) == (False, 11)
