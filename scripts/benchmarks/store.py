"""Event-log benchmarks, each next to a raw baseline measured in the same run.

    python scripts/benchmarks/store.py [--events 1000000] [--runs 5] [--appends-only]

Figures (medians of --runs runs, synchronous=FULL, ~800-byte events):
  * group commit: 8 threads appending (1, 10 and 100 events per call), and one thread
    appending 400, vs raw sqlite3 inserting the same rows in transactions of the same
    size from one thread;
  * one event per commit from one thread vs raw sqlite3 BEGIN/INSERT/COMMIT, with and
    without the stream-head upsert that the schema asks of every append;
  * replay of a long dialogue stream vs a raw cursor + msgspec decode + the same fold;
  * verify throughput;
  * ``moot sessions`` on the big database (wall time of the real command).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from moot.events import (
    DialogueMessage,
    DialogueStarted,
    Event,
    ParticipantInfo,
    PayloadDelivered,
    Speaker,
    TurnCompleted,
    TurnStarted,
    encode_event,
    evolve,
)
from moot.store import EventLog, chain_hash
from moot.store._base import utc_now

if TYPE_CHECKING:
    from collections.abc import Callable

TEXT = "lorem ipsum dolor sit amet " * 28  # ~760 characters: ~800-byte events


def median(fn: Callable[[], float], runs: int) -> float:
    return statistics.median(fn() for _ in range(runs))


def spread(ours: list[float], bases: list[float]) -> str:
    """The lowest and highest ratio of one run to its own baseline: how noisy the disk was."""
    ratios = [o / b for o, b in zip(ours, bases, strict=True)]
    return f"(runs {min(ratios):.2f}-{max(ratios):.2f})"


def fresh_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="moot-bench-"))


def message(i: int, name: str = "user") -> DialogueMessage:
    kind = "user" if name == "user" else "agent"
    return DialogueMessage(
        turn=1 + i // 3,
        speaker=Speaker(kind=kind, name=name),  # type: ignore[arg-type]
        content=f"{i} {TEXT}",
        origin="incoming" if kind == "user" else "agent",
    )


START = DialogueStarted(
    mode="broadcast",
    order="completion",
    participants=(ParticipantInfo(name="a"), ParticipantInfo(name="b")),
)

SCHEMA = """
CREATE TABLE events (position INTEGER PRIMARY KEY, stream TEXT NOT NULL, seq INTEGER NOT NULL,
  type TEXT NOT NULL, version INTEGER NOT NULL, recorded_at TEXT NOT NULL, data TEXT NOT NULL,
  prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
CREATE UNIQUE INDEX events_stream_seq ON events (stream, seq);
"""
INSERT = "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"


def raw_rows(n: int) -> list[tuple[object, ...]]:
    """The rows the log would write for n messages, hashed, ready for raw inserts."""
    rows, prev = [], "0" * 64
    for i in range(n):
        data = encode_event(message(i))
        at = utc_now()
        digest = chain_hash(None, prev, "s", i + 1, "DialogueMessage", 1, at, data)
        rows.append((i + 1, "s", i + 1, "DialogueMessage", 1, at, data.decode(), prev, digest))
        prev = digest
    return rows


def raw_connection(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(SCHEMA)
    return conn


# ------------------------------------------------------------------ appends


def bench_group_commit(threads: int, per_call: int, calls: int) -> tuple[float, float]:
    """Events/s of ``threads`` threads each appending ``calls`` times ``per_call`` events."""
    folder = fresh_dir()
    log = EventLog(folder / "g.db")
    for t in range(threads):
        log.append(f"s{t}", [START])
    batches = [[message(i) for i in range(per_call)] for _ in range(calls)]
    barrier = threading.Barrier(threads + 1)

    def work(t: int) -> None:
        barrier.wait()
        for events in batches:
            log.append(f"s{t}", events)

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for p in pool:
        p.start()
    commits_before = log._commits
    barrier.wait()
    started = time.perf_counter()
    for p in pool:
        p.join()
    elapsed = time.perf_counter() - started
    group = threads * calls * per_call / max(1, log._commits - commits_before)
    log.close()
    shutil.rmtree(folder)
    return threads * calls * per_call / elapsed, group


def bench_raw_batches(total: int, batch: int) -> float:
    folder = fresh_dir()
    conn = raw_connection(folder / "raw.db")
    rows = raw_rows(total)
    started = time.perf_counter()
    for i in range(0, total, batch):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(INSERT, rows[i : i + batch])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    shutil.rmtree(folder)
    return total / elapsed


def bench_single(n: int) -> float:
    folder = fresh_dir()
    log = EventLog(folder / "one.db")
    log.append("s", [START])
    events = [message(i) for i in range(n)]
    started = time.perf_counter()
    for event in events:
        log.append("s", [event])
    elapsed = time.perf_counter() - started
    log.close()
    shutil.rmtree(folder)
    return n / elapsed


#: What the log writes besides the event row: the stream's head (DESIGN section 3).
HEAD_SCHEMA = """
CREATE TABLE streams (stream TEXT PRIMARY KEY NOT NULL, kind TEXT NOT NULL, parent TEXT,
  status TEXT NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
  last_seq INTEGER NOT NULL, last_hash TEXT NOT NULL, last_position INTEGER NOT NULL)
  WITHOUT ROWID;
"""
UPSERT_HEAD = (
    "INSERT INTO streams VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(stream) DO UPDATE SET "
    "status = excluded.status, updated_at = excluded.updated_at, last_seq = excluded.last_seq, "
    "last_hash = excluded.last_hash, last_position = excluded.last_position"
)


def bench_raw_single(n: int, head: bool = False) -> float:
    """Raw sqlite3, one row per BEGIN/INSERT/COMMIT; with ``head``, the stream's head row
    is upserted in the same transaction, as the log's schema asks of every append."""
    folder = fresh_dir()
    conn = raw_connection(folder / "raw1.db")
    conn.executescript(HEAD_SCHEMA)
    rows = raw_rows(n)
    started = time.perf_counter()
    for row in rows:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(INSERT, row)
        if head:
            position, _, seq, _, _, at, _, _, digest = row
            values = ("s", "dialogue", None, "open", at, at, seq, digest, position)
            conn.execute(UPSERT_HEAD, values)
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    shutil.rmtree(folder)
    return n / elapsed


# ------------------------------------------------------------ replay, verify


def turn_events(turn: int, first_seq: int) -> list[Event]:
    """One broadcast turn of two participants: 7 events, 3 of them ~800-byte messages."""
    return [
        TurnStarted(turn=turn, speakers=("a", "b")),
        message(turn),
        PayloadDelivered(turn=turn, participant="a", messages=(first_seq + 1,)),
        PayloadDelivered(turn=turn, participant="b", messages=(first_seq + 1,)),
        message(turn, "a"),
        message(turn, "b"),
        TurnCompleted(turn=turn, yielded=("a", "b")),
    ]


def build_big(path: Path, events: int) -> None:
    with EventLog(path, synchronous="NORMAL") as log:
        seq = log.append("big", [START])
        turn = 1
        while seq < events:
            batch: list[Event] = []
            while len(batch) < 7000 and seq + len(batch) < events:
                batch.extend(turn_events(turn, seq + len(batch) + 1))
                turn += 1
            seq = log.append("big", batch[: events - seq])
        for s in range(999):
            log.append(f"small-{s}", [START] + [message(i) for i in range(9)])


def bench_replay(path: Path) -> tuple[float, int]:
    with EventLog(path, readonly=True) as log:
        started = time.perf_counter()
        state = log.replay("big")
        elapsed = time.perf_counter() - started
    return state.seq / elapsed, state.seq


def bench_raw_replay(path: Path) -> float:
    decoder = msgspec.json.Decoder(Event)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    started = time.perf_counter()
    state = None
    for _type, _version, data in conn.execute(
        "SELECT type, version, data FROM events WHERE stream = ? ORDER BY seq", ("big",)
    ):
        state = evolve(state, decoder.decode(data))
    elapsed = time.perf_counter() - started
    conn.close()
    assert state is not None
    return state.seq / elapsed


def bench_verify(path: Path) -> float:
    with EventLog(path, readonly=True) as log:
        started = time.perf_counter()
        report = log.verify()
        elapsed = time.perf_counter() - started
    assert report.ok, report
    return report.checked / elapsed


def bench_sessions(path: Path) -> float:
    moot = str(Path(sys.executable).parent / "moot")
    started = time.perf_counter()
    result = subprocess.run([moot, "--db", str(path), "sessions"], capture_output=True, check=True)
    elapsed = time.perf_counter() - started
    assert result.stdout.count(b"\n") >= 1000
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--appends-only", action="store_true", help="skip replay and verify")
    args = parser.parse_args()
    runs = args.runs

    # Each run of ours is followed by its baseline, so both see the same disk: fsync
    # times on a shared virtual disk drift by tens of per cent within a minute.
    # The last line is one thread with big appends: no group to form, and no other
    # thread to hand the interpreter lock to (compare it with the 8-thread lines).
    for threads, per_call, calls in ((8, 1, 500), (8, 10, 200), (8, 100, 100), (1, 400, 200)):
        results, bases = [], []
        for _ in range(runs):
            result = bench_group_commit(threads, per_call, calls)
            batch = max(1, round(result[1]))
            results.append(result)
            bases.append(bench_raw_batches(max(16000, 20 * batch), batch))
        ours = statistics.median(r[0] for r in results)
        group = statistics.median(r[1] for r in results)
        base = statistics.median(bases)
        print(
            f"group commit, {threads} thread(s) x {per_call} event(s)/append: {ours:,.0f} events/s "
            f"(~{group:.0f} events/commit)  raw sqlite3, same rows/commit: {base:,.0f} rows/s"
            f"  ratio {ours / base:.2f} {spread([r[0] for r in results], bases)}"
        )

    singles, raws, heads = [], [], []
    for _ in range(runs):
        singles.append(bench_single(2000))
        raws.append(bench_raw_single(2000))
        heads.append(bench_raw_single(2000, head=True))
    ours, base, head = (statistics.median(x) for x in (singles, raws, heads))
    print(
        f"one event per commit, 1 thread: {ours:,.0f} events/s  raw sqlite3 (event row only): "
        f"{base:,.0f}/s  ratio {ours / base:.2f} {spread(singles, raws)}  raw sqlite3 (event "
        f"row + stream head): {head:,.0f}/s  ratio {ours / head:.2f} {spread(singles, heads)}"
    )

    if args.appends_only:
        return
    folder = fresh_dir()
    big = folder / "big.db"
    started = time.perf_counter()
    build_big(big, args.events)
    size = os.path.getsize(big) / 1e6
    took = time.perf_counter() - started
    print(f"built {args.events:,} + 9,990 events ({size:,.0f} MB) in {took:.1f} s")
    results = [bench_replay(big) for _ in range(runs)]
    ours = statistics.median(r[0] for r in results)
    base = median(lambda: bench_raw_replay(big), runs)
    print(
        f"replay {results[0][1]:,} events: {ours:,.0f} events/s  raw cursor+msgspec+fold: "
        f"{base:,.0f}/s  ratio {ours / base:.2f}"
    )
    ours = median(lambda: bench_verify(big), runs)
    print(f"verify: {ours:,.0f} events/s")
    ours = median(lambda: bench_sessions(big), runs)
    print(
        f"moot sessions on {args.events:,} events / 1,000 streams: {ours * 1000:,.0f} ms "
        "(whole command, interpreter start included)"
    )
    shutil.rmtree(folder)


if __name__ == "__main__":
    main()
