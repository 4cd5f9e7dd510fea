"""The event-log contract, run on every backend: memory, in-memory SQLite, SQLite file."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import msgspec
import pytest

from moot.events import (
    DialogueMessage,
    DialogueStarted,
    IterationStart,
    LoopParent,
    LoopStarted,
    ParticipantInfo,
    Speaker,
    TurnStarted,
    fold,
)
from moot.store import (
    GENESIS,
    Anchor,
    ConcurrencyError,
    DatabaseError,
    IntegrityError,
    LogBase,
    UnknownStreamError,
    chain_hash,
)
from tests.conftest import BACKENDS, open_log
from tests.samples import dialogue_events, loop_events

if TYPE_CHECKING:
    from pathlib import Path


def started() -> DialogueStarted:
    return DialogueStarted(
        mode="broadcast", order="completion", participants=(ParticipantInfo(name="a"),)
    )


def message(i: int) -> DialogueMessage:
    return DialogueMessage(
        turn=1, speaker=Speaker(kind="user", name="u"), content=f"m{i}", origin="incoming"
    )


def test_every_event_type_round_trips(log: LogBase) -> None:
    dialogue, loop = dialogue_events(), loop_events()
    assert log.append("d", dialogue, expected_seq=0) == len(dialogue)
    assert log.append("l", loop, expected_seq=0) == len(loop)
    assert [r.event for r in log.read("d")] == dialogue
    assert [r.event for r in log.read("l")] == loop
    records = list(log.read_all())
    assert [r.event for r in records] == dialogue + loop
    assert [r.position for r in records] == list(range(1, len(records) + 1))
    assert [r.seq for r in records if r.stream == "l"] == list(range(1, len(loop) + 1))
    assert all(r.type == type(r.event).__name__ for r in records)
    assert records[-1].recorded_at.endswith("Z")
    assert "." in records[-1].recorded_at


def test_an_event_that_would_not_read_back_is_refused(log: LogBase) -> None:
    """msgspec checks types when it reads: an event of the wrong shape written once would
    make its stream, and every read of the whole log, fail from then on."""
    log.append("d", [started()])
    with pytest.raises(
        ValueError, match=r"invalid TurnStarted: Expected `int`, got `str` - at `\$.turn`"
    ):
        log.append("d", [message(1), TurnStarted(turn="2", speakers=())])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"invalid DialogueMessage: .*unsupported"):
        log.append("d", [msgspec.structs.replace(message(1), metadata={"x": object()})])

    class Stranger(msgspec.Struct, tag=True):
        version = 1

    with pytest.raises(ValueError, match="invalid Stranger"):
        log.append("d", [Stranger()])  # type: ignore[list-item]
    assert [r.seq for r in log.read_all()] == [1]  # nothing written, all still readable
    assert log.verify().ok


def test_the_last_position_is_the_newest_event(log: LogBase) -> None:
    assert log.last_position() == 0
    log.append("d", [started(), message(1)])
    log.append("e", [started()])
    assert log.last_position() == 3 == max(r.position for r in log.read_all())


def test_bad_stream_ids_and_cursors_are_refused_alike(log: LogBase) -> None:
    for bad in ("", "a\x00b", "lone \ud800 surrogate", 7):
        with pytest.raises(ValueError, match="invalid stream id"):
            log.append(bad, [started()])  # type: ignore[arg-type]
    log.append("d", [started(), message(1)])
    huge = 2**64
    assert list(log.read("d", huge)) == list(log.read_all(huge)) == []
    assert [r.seq for r in log.read("d", until_seq=huge)] == [1, 2]
    assert log.replay("d", until_seq=huge) == log.replay("d")
    with log.subscribe(huge) as sub:
        assert sub.next(timeout=0) is None
    for call in (
        lambda: list(log.read("d", 1.5)),  # type: ignore[arg-type]
        lambda: list(log.read_all("0")),  # type: ignore[arg-type]
        lambda: log.append("d", [message(3)], expected_seq=True),
        lambda: log.append("d", [message(3)], expected_seq="2"),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError, match="must be an int"):
            call()
    assert log.stream_info("d").last_seq == 2


@pytest.mark.parametrize("kind", BACKENDS)
def test_an_empty_audit_key_is_refused_before_anything_is_made(kind: str, tmp_path: Path) -> None:
    for key in ("", b""):
        with pytest.raises(ValueError, match="must not be empty"):
            open_log(kind, tmp_path, audit_key=key)
    assert list(tmp_path.iterdir()) == []


def test_stale_expected_seq_raises_and_writes_nothing(log: LogBase) -> None:
    log.append("d", [started()], expected_seq=0)
    with pytest.raises(ConcurrencyError) as info:
        log.append("d", [message(1), message(2)], expected_seq=0)
    assert (info.value.expected, info.value.actual) == (0, 1)
    with pytest.raises(ConcurrencyError):
        log.append("new", [started()], expected_seq=3)
    assert [r.seq for r in log.read("d")] == [1]
    assert [s.stream for s in log.streams()] == ["d"]
    assert log.append("d", [message(1)], expected_seq=1) == 2


def test_append_without_expectation_goes_to_the_end(log: LogBase) -> None:
    log.append("d", [started()])
    assert log.append("d", [message(1)]) == 2
    assert log.append("d", []) == 2


def test_a_stream_must_start_properly(log: LogBase) -> None:
    with pytest.raises(IntegrityError, match="first event"):
        log.append("d", [message(1)])
    log.append("d", [started()])
    with pytest.raises(IntegrityError, match="already started"):
        log.append("d", [started()])
    with pytest.raises(IntegrityError, match="does not belong"):
        log.append("d", [IterationStart(iteration=1, message_count=0)])
    with pytest.raises(IntegrityError, match="IterationStart does not belong"):
        log.append("d", [message(2), IterationStart(iteration=1, message_count=0)])
    with pytest.raises(IntegrityError, match="already started"):
        log.append("d", [message(2), started()])
    with pytest.raises(ValueError, match="invalid stream id"):
        log.append("", [started()])
    assert log.stream_info("d").last_seq == 1

    log.append("l", [LoopStarted(messages=())])
    with pytest.raises(IntegrityError, match="already started"):
        log.append("l", [IterationStart(iteration=1, message_count=0), LoopStarted(messages=())])
    with pytest.raises(IntegrityError, match="DialogueMessage does not belong in loop stream"):
        log.append("l", [IterationStart(iteration=1, message_count=0), message(3)])
    with pytest.raises(IntegrityError, match="already started"):
        log.append("l", [started()])
    assert log.stream_info("l").last_seq == 1
    assert log.append("l", [IterationStart(iteration=1, message_count=0)]) == 2


def test_heads_track_kind_parent_status(log: LogBase) -> None:
    log.append("d", dialogue_events())
    log.append("l", [LoopStarted(parent=LoopParent(stream="d", seq=4))])
    d, l_ = log.stream_info("d"), log.stream_info("l")
    assert (d.kind, d.status, d.parent, d.last_seq) == ("dialogue", "closed", None, 11)
    assert (l_.kind, l_.status, l_.parent, l_.last_seq) == ("loop", "open", "d", 1)
    assert d.last_hash == list(log.read_rows(stream="d"))[-1].hash
    assert l_.last_position == 12
    with pytest.raises(UnknownStreamError):
        log.stream_info("nope")


def test_loop_status_follows_approval_and_termination(log: LogBase) -> None:
    events = loop_events()
    statuses = []
    for i, event in enumerate(events):
        log.append("l", [event], expected_seq=i)
        statuses.append(log.stream_info("l").status)
    # started, iter, response, approval asked, decided (still awaiting), tool start ... done
    assert statuses[:6] == ["open", "open", "open", "awaiting", "awaiting", "open"]
    assert statuses[-2:] == ["completed", "completed"]  # terminal states are final


def test_read_after_seq_and_until(log: LogBase) -> None:
    log.append("d", [started()] + [message(i) for i in range(2500)])
    assert [r.seq for r in log.read("d", after_seq=2499)] == [2500, 2501]
    assert len(list(log.read("d"))) == 2501  # more than one page
    assert [r.seq for r in log.read("d", 10, until_seq=12)] == [11, 12]
    assert list(log.read("missing")) == []
    assert [r.position for r in log.read_all(after_position=2500)] == [2501]
    # Before the first is before the first, on every backend.
    assert len(list(log.read("d", after_seq=-1))) == len(list(log.read_all(-5))) == 2501


def test_replay_until_equals_folding_the_first_k(log: LogBase) -> None:
    events = dialogue_events()
    log.append("d", events)
    for k in range(1, len(events) + 1):
        assert log.replay("d", until_seq=k) == fold(events[:k])
    assert log.replay("d") == fold(events)
    loop = loop_events()
    log.append("l", loop)
    assert log.replay("l") == fold(loop)
    with pytest.raises(UnknownStreamError):
        log.replay("missing")


def test_verify_passes_on_an_honest_log(log: LogBase) -> None:
    log.append("d", dialogue_events())
    log.append("l", loop_events())
    report = log.verify()
    assert report.ok
    assert report.checked == 23
    assert report.first_bad is None
    assert log.verify("l").checked == 12
    first = next(log.read_rows())
    assert first.prev_hash == GENESIS
    assert len(first.hash) == 64


def test_a_report_anchors_what_it_verified(log: LogBase) -> None:
    log.append("d", dialogue_events())
    whole = log.verify().anchor
    one = log.verify("d").anchor
    assert whole is not None and one is not None
    head = log.stream_info("d")
    assert whole.heads == one.heads == {"d": (head.last_seq, head.last_hash)}
    assert (whole.position, whole.stream, one.stream) == (head.last_position, None, "d")
    assert msgspec.json.decode(msgspec.json.encode(whole), type=Anchor) == whole
    log.append("l", loop_events())
    log.append("d", [message(99)])
    later = log.verify(anchor=whole)  # an honest log only grows past its anchors
    assert later.ok and later.anchor is not None and set(later.anchor.heads) == {"d", "l"}
    assert log.verify("d", anchor=one).ok
    assert log.verify("l", anchor=whole).ok  # nothing of 'l' was anchored
    stranger = Anchor(position=1, heads={"gone": (3, "0" * 64)})
    report = log.verify(anchor=stranger)
    assert (report.ok, report.first_bad, report.stream, report.anchor) == (
        False,
        None,
        "gone",
        None,
    )
    with pytest.raises(ValueError, match="the anchor's seq 0 for stream 'd' is not a seq"):
        log.verify(anchor=Anchor(position=1, heads={"d": (0, "0" * 64)}))
    forged = Anchor(position=1, heads={"d": (1, "f" * 64)})
    report = log.verify(anchor=forged)
    assert (report.ok, report.first_bad) == (False, 1)
    assert report.reason == "stream 'd': the event at seq 1 is not the one anchored (rewritten)"


@pytest.mark.parametrize("kind", BACKENDS)
def test_an_audit_key_seals_the_chain(kind: str, tmp_path: Path) -> None:
    log = open_log(kind, tmp_path, audit_key=b"secret")
    log.append("d", [started(), message(1)])
    assert log.verify().ok
    row = next(log.read_rows())
    columns = (row.prev_hash, row.stream, row.seq, row.type, row.version, row.recorded_at)
    assert chain_hash(b"secret", *columns, row.data.encode()) == row.hash
    assert chain_hash(None, *columns, row.data.encode()) != row.hash
    log.close()


def test_group_commit_from_many_threads_takes_every_seq_once(log: LogBase) -> None:
    log.append("d", [started()])
    per_thread, threads = 50, 8

    def work(t: int) -> list[int]:
        return [log.append("d", [message(t * 1000 + i)]) for i in range(per_thread)]

    with ThreadPoolExecutor(threads) as pool:
        results = [seq for seqs in pool.map(work, range(threads)) for seq in seqs]
    assert sorted(results) == list(range(2, 2 + per_thread * threads))
    assert [r.seq for r in log.read("d")] == list(range(1, 2 + per_thread * threads))
    assert log.verify().ok


def test_racing_writers_with_expectations_never_fork(log: LogBase) -> None:
    log.append("d", [started()])
    barrier = threading.Barrier(6)
    wins: list[int] = []
    losses: list[int] = []

    def writer(n: int) -> None:
        barrier.wait(timeout=10)
        for _ in range(30):
            last = log.stream_info("d").last_seq
            try:
                wins.append(log.append("d", [message(n)], expected_seq=last))
            except ConcurrencyError:
                losses.append(n)

    pool = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=30)
    assert sorted(wins) == list(range(2, 2 + len(wins)))
    assert len(wins) + len(losses) == 180
    assert log.verify().ok


def test_one_failed_request_does_not_fail_its_batch_neighbours(log: LogBase) -> None:
    log.append("d", [started()])
    barrier = threading.Barrier(4)
    outcomes: dict[int, object] = {}

    def go(n: int) -> None:
        barrier.wait(timeout=10)
        try:
            if n == 0:
                outcomes[n] = log.append("d", [message(0)], expected_seq=99)
            else:
                outcomes[n] = log.append("d", [message(n)])
        except ConcurrencyError as exc:
            outcomes[n] = exc

    pool = [threading.Thread(target=go, args=(n,)) for n in range(4)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=30)
    assert isinstance(outcomes[0], ConcurrencyError)
    assert sorted(v for k, v in outcomes.items() if k) == [2, 3, 4]


def test_subscribe_sees_old_and_new_events(log: LogBase) -> None:
    log.append("d", [started(), message(0)])
    sub = log.subscribe(after_position=1)
    assert sub.next(timeout=5).seq == 2  # type: ignore[union-attr]
    assert sub.next(timeout=0.01) is None
    got = threading.Event()
    seen = []

    def follow() -> None:
        record = sub.next(timeout=10)
        seen.append(record)
        got.set()

    t = threading.Thread(target=follow)
    t.start()
    log.append("d", [message(1)])
    assert got.wait(10)
    t.join(10)
    assert seen[0] is not None
    assert seen[0].seq == 3
    sub.close()
    assert sub.next(timeout=1) is None
    assert list(sub) == []


def test_subscription_ends_when_the_log_closes(log: LogBase) -> None:
    log.append("d", [started()])
    sub = log.subscribe(after_position=1)
    done = threading.Event()
    out: list[object] = []

    def follow() -> None:
        out.extend(sub)
        done.set()

    t = threading.Thread(target=follow)
    t.start()
    log.close()
    assert done.wait(10)
    assert out == []


def test_closed_log_refuses_work(log: LogBase) -> None:
    log.close()
    with pytest.raises(DatabaseError, match="closed"):
        log.append("d", [started()])
    with pytest.raises(DatabaseError, match="closed"):
        list(log.read("d"))
    log.close()  # closing twice is fine


def test_records_encode_to_json(log: LogBase) -> None:
    log.append("d", [started()])
    record = next(log.read("d"))
    body = msgspec.json.decode(msgspec.json.encode(record))
    assert body["event"]["type"] == "DialogueStarted"
    assert record.event == started()
    assert isinstance(record.event, DialogueStarted)
    assert TurnStarted(turn=1, speakers=()) != record.event
