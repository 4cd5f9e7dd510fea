"""The SQLite event log: the schema of DESIGN section 3 behind the shared log rules.

Writes go through one connection in ``BEGIN IMMEDIATE`` transactions, one per group
commit; reads of a file database use a second connection, so a long read never holds
up a writer (WAL lets both run at once). An in-memory database has one connection,
which reads and writes share under one lock.

The schema is created with sqlite-utils; appends use ``executemany`` on the same
connection, because the append funnel must stay within a few per cent of raw sqlite3
(``scripts/bench`` measures it), and sqlite-utils' ``insert_all`` spends its time on
column discovery that a fixed schema does not need.
"""

from __future__ import annotations

import functools
import itertools
import operator
import os
import sqlite3
import threading
import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, NoReturn, Self

import msgspec

from ._base import LogBase, StaleHeads, Subscription
from ._errors import DatabaseError, StoreError
from ._records import Anchor, StoredEvent, StreamInfo, VerifyReport
from ._schema import Archive, open_held, prepare

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

__all__ = ["EventLog"]

_COLUMNS = "position, stream, seq, type, version, recorded_at, data, prev_hash, hash"
_HEAD_COLUMNS = (
    "stream, kind, parent, status, created_at, updated_at, last_seq, last_hash, last_position"
)
_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
#: Rows per INSERT statement: 9 parameters each, within SQLite's limit of 32,766.
_CHUNK = 1000
#: A row's ``data`` (see _COLUMNS).
_DATA = operator.itemgetter(6)
#: SQLite's own checkpoint inside a commit, left as a backstop only (see _checkpoint):
#: 10,000 pages, ten times its default.
_BACKSTOP_PAGES = 10_000

#: Open file logs, so that a forked child can forget their checkpoint state.
_LOGS: weakref.WeakSet[EventLog] = weakref.WeakSet()


def _forget_checkpoints() -> None:
    """In a forked child: a checkpoint running in the parent (in a thread the child
    does not have) must not leave its lock held, and the inherited connection is the
    parent's to close."""
    for log in list(_LOGS):
        log._checkpointing = threading.Lock()
        log._cconn = None


os.register_at_fork(after_in_child=_forget_checkpoints)


@functools.lru_cache(maxsize=64)
def _insert(rows: int) -> str:
    return f"INSERT INTO events ({_COLUMNS}) VALUES " + ", ".join([_ROW] * rows)


@functools.lru_cache(maxsize=64)
def _upsert(rows: int) -> str:
    return (
        f"INSERT INTO streams ({_HEAD_COLUMNS}) VALUES " + ", ".join([_ROW] * rows) + " "
        "ON CONFLICT(stream) DO UPDATE SET status = excluded.status, "
        "updated_at = excluded.updated_at, last_seq = excluded.last_seq, "
        "last_hash = excluded.last_hash, last_position = excluded.last_position"
    )


class _Heads:
    """The stream heads and last position as this writer left them at its last commit.

    Reading them back costs a query per commit, and a query releases and retakes the
    GIL, which is dear while other threads queue appends; so the writer plans from
    these instead. If another connection (a process, or a second EventLog on the
    file) has written since, the plan is stale: but positions are given out in order
    without gaps, so the stale plan's first row takes a position that is already
    taken, its INSERT fails on the primary key, and the batch is planned again from
    the database (see :class:`_Tx`). A plan that writes no rows proves nothing, so it
    is never trusted from here. Reading heads from the database also reads the last
    position; if it is not this writer's, every remembered head is forgotten. So
    whenever the remembered position is the database's, so is every remembered head.
    """

    #: Heads kept at most; the least recently written are forgotten first.
    LIMIT = 4096

    def __init__(self) -> None:
        self.position: int | None = None  # None: nothing known
        self.streams: dict[str, StreamInfo] = {}

    def clear(self) -> None:
        self.position = None
        self.streams.clear()

    def learn(self, position: int, heads: Iterable[StreamInfo]) -> None:
        """Remember the log as a committed transaction left it."""
        self.position = position
        streams = self.streams
        for head in heads:
            streams.pop(head.stream, None)  # re-inserted last: the most recent
            streams[head.stream] = head
        if len(streams) > self.LIMIT:
            for name in list(itertools.islice(streams, len(streams) - self.LIMIT // 2)):
                del streams[name]


class _Tx:
    """A write transaction on the writer connection (see :class:`moot.store._base.Transaction`).

    Used as a context manager, under the log's write lock: entering begins, leaving
    commits (or rolls back on an error). A class rather than a generator: this runs once per
    commit, and ``contextlib.contextmanager`` costs several microseconds each time.
    """

    def __init__(self, log: EventLog) -> None:
        self._log = log
        self._conn = log._wconn
        self._known = log._known
        self.cached = False
        #: The log's last position and the heads read or written in this transaction.
        self.position = 0
        self.seen: list[StreamInfo] = []
        #: About how many bytes this transaction adds to the WAL (see EventLog._checkpoint).
        self.size = 0

    def __enter__(self) -> Self:
        # The caller holds the log's write lock (see LogBase._commit_batch).
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"{self._log.path}: cannot start a write ({exc})") from exc
        except BaseException:  # interrupted, perhaps just after BEGIN: leave no write open
            self._log._rollback()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        log = self._log
        if kind is None:
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as error:
                log._rollback()
                raise StoreError(f"{log.path}: write failed ({error})") from error
            except BaseException:
                log._rollback()
                raise
            self._known.learn(self.position, self.seen)
            log._unchecked += self.size
            return
        log._rollback()
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"{log.path}: write failed ({exc})") from exc

    def heads(self, streams: set[str]) -> tuple[int, dict[str, StreamInfo]]:
        known = self._known
        if known.position is not None:
            cached = known.streams
            found = {s: cached[s] for s in streams if s in cached}
            if len(found) == len(streams):
                self.cached = True
                self.position = known.position
                return known.position, found
        self.cached = False
        # One statement for all of it: each call releases and retakes the GIL, which
        # costs more than the query when other threads are queueing appends.
        names = list(streams)
        marks = ", ".join("?" * len(names))
        rows = self._conn.execute(
            f"SELECT (SELECT max(position) FROM events), {_HEAD_COLUMNS} FROM streams "
            f"WHERE stream IN ({marks}) UNION ALL SELECT (SELECT max(position) FROM events), "
            "NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL",
            names,
        ).fetchall()
        found = {r[1]: StreamInfo(*r[1:]) for r in rows if r[1] is not None}
        self.position = int(rows[-1][0] or 0)
        if known.position is not None and self.position != known.position:
            # Someone else has written since this writer's last commit: any head it
            # remembers may be stale, not only the ones asked for now.
            known.clear()
        self.seen = list(found.values())
        return self.position, found

    def write(self, rows: list[tuple[Any, ...]], heads: list[StreamInfo]) -> None:
        # Multi-row statements rather than executemany: the sqlite3 module releases and
        # retakes the GIL around every row, and with threads queueing appends each
        # retake waits for them; one statement per chunk made 8-thread group commit
        # about twice as fast (scripts/benchmarks/store.py).
        conn = self._conn
        if self.cached and not rows:
            self._stale()
        for i in range(0, len(rows), _CHUNK):
            chunk = rows[i : i + _CHUNK]
            params = chunk[0] if len(chunk) == 1 else list(itertools.chain.from_iterable(chunk))
            try:
                conn.execute(_insert(len(chunk)), params)
            except sqlite3.IntegrityError:
                if self.cached and i == 0:
                    self._stale()
                raise
        if rows:
            self.position = rows[-1][0]
            # What a commit adds to the WAL, about: the pages every commit touches (the
            # stream's head, the (stream, seq) index, the last leaf, ~3.5 pages), and
            # for each row its data and the rest of its row, counted half again for the
            # partly filled leaves that successive commits write again.
            data = sum([len(d) if d.isascii() else len(d.encode()) for d in map(_DATA, rows)])
            self.size += (data + 200 * len(rows)) * 3 // 2 + 14336
        self.seen.extend(heads)
        for i in range(0, len(heads), _CHUNK):
            chunk_heads = heads[i : i + _CHUNK]
            if len(chunk_heads) == 1:
                values: Any = msgspec.structs.astuple(chunk_heads[0])
            else:
                values = list(
                    itertools.chain.from_iterable(msgspec.structs.astuple(h) for h in chunk_heads)
                )
            conn.execute(_upsert(len(chunk_heads)), values)

    def _stale(self) -> NoReturn:
        """The cached heads were stale: forget them, and read from the database from now on."""
        self._known.clear()
        self.cached = False
        raise StaleHeads


class EventLog(LogBase):
    """The append-only, hash-chained event log in a SQLite file (or ``":memory:"``).

    Args:
        path: The database file; created with the schema if missing. ``":memory:"``
            gives a private in-memory database.
        audit_key: Seal the hash chain with HMAC-SHA256 under this key. A log created
            with a key can only be appended to and verified with the same key.
        readonly: Open the file read-only: the database is never changed, and a missing
            file is an error rather than a new database. (SQLite may still create the
            ``-wal`` and ``-shm`` side files that any reader of a WAL database uses.)
        synchronous: ``"FULL"`` (default): an acknowledged append survives power loss.
            ``"NORMAL"``: faster, and may lose the last commits on power loss (never on
            a process crash).
        timeout: Seconds to wait for another process's write lock.

    Raises:
        DatabaseError: the file is not SQLite, not a moot log, written by a newer
            schema, or the audit key does not match.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = "moot.db",
        *,
        audit_key: bytes | str | None = None,
        readonly: bool = False,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        timeout: float = 30.0,
    ) -> None:
        super().__init__(audit_key)
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be 'FULL' or 'NORMAL'")
        self.path = os.fspath(path)
        self.readonly = readonly
        self._memory = self.path == ":memory:"
        #: The file's resolved path when it was opened (None in memory): it names the
        #: database whatever the working directory becomes.
        self.realpath = None if self._memory else os.path.realpath(self.path)
        conn, release = open_held(self.path, readonly=readonly, timeout=timeout)
        #: Called once the connections are closed (see open_held).
        self._releases = [release]
        try:
            self.meta = prepare(conn, self.path, readonly=readonly, audit_key=self._key)
            if not readonly:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(f"PRAGMA synchronous={synchronous}")
                if not self._memory:
                    # Checkpoints are run apart from commits (see _checkpoint).
                    conn.execute(f"PRAGMA wal_autocheckpoint={_BACKSTOP_PAGES}")
        except BaseException:
            conn.close()
            release()
            raise
        #: Read as it is, from a folder this process cannot write (see schema.connect).
        self.archive = isinstance(conn, Archive)
        self.sealed = self.meta.get("hash") == "hmac-sha256"
        if self.sealed and self._key is None:
            self._refusal = f"{self.path}: this log is sealed with an audit key; give the key"
        self._wconn = conn
        # The read lock is re-entrant: a snapshot (see _snapshot) holds it around reads
        # that take it again.
        if self._memory or readonly:
            self._rconn = conn
            self._rlock = threading.RLock()
            self._write_lock = self._rlock
        else:
            try:
                self._rconn, release = open_held(self.path, readonly=True, timeout=timeout)
            except BaseException:
                conn.close()
                self._releases[0]()
                raise
            self._releases.append(release)
            self._rlock = threading.RLock()
            self._write_lock = threading.Lock()
        self._known = _Heads()
        #: Bytes written to the WAL since the last checkpoint (an estimate).
        self._unchecked = 0
        self._checkpointing = threading.Lock()
        self._cconn: sqlite3.Connection | None = None
        if not (self._memory or readonly):
            _LOGS.add(self)

    def __repr__(self) -> str:
        return f"EventLog({self.path!r})"

    # ------------------------------------------------------------------- writing

    def _transaction(self) -> _Tx:
        return _Tx(self)

    def _rollback(self) -> None:
        self._known.clear()
        if self._wconn.in_transaction:
            self._wconn.execute("ROLLBACK")

    # ------------------------------------------------------------------- reading

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        with self._rlock:
            self._check_open()
            try:
                return self._rconn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: read failed ({exc})") from exc

    def _page_stream(
        self, stream: str, after_seq: int, until_seq: int | None, limit: int
    ) -> list[StoredEvent]:
        until = "" if until_seq is None else f" AND seq <= {int(until_seq)}"
        rows = self._query(
            f"SELECT {_COLUMNS} FROM events WHERE stream = ? AND seq > ?{until} "
            "ORDER BY seq LIMIT ?",
            (stream, after_seq, limit),
        )
        return [StoredEvent(*r) for r in rows]

    def _page_all(self, after_position: int, limit: int, stream: str | None) -> list[StoredEvent]:
        if stream is None:
            rows = self._query(
                f"SELECT {_COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT ?",
                (after_position, limit),
            )
        else:
            rows = self._query(
                f"SELECT {_COLUMNS} FROM events WHERE stream = ? AND position > ? "
                "ORDER BY position LIMIT ?",
                (stream, after_position, limit),
            )
        return [StoredEvent(*r) for r in rows]

    def _iterate(self, sql: str, params: tuple[Any, ...]) -> Iterator[Any]:
        """Stream a query's rows under the read lock (for replay and verify, which are pure)."""
        with self._rlock:
            self._check_open()
            try:
                yield from self._rconn.execute(sql, params)
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: read failed ({exc})") from exc

    def _replay_rows(self, stream: str, until_seq: int | None) -> Iterable[tuple[str, int, str]]:
        if until_seq is None:
            return self._iterate(
                "SELECT type, version, data FROM events WHERE stream = ? ORDER BY seq", (stream,)
            )
        return self._iterate(
            "SELECT type, version, data FROM events WHERE stream = ? AND seq <= ? ORDER BY seq",
            (stream, until_seq),
        )

    def _verify_rows(self, stream: str | None) -> Iterable[tuple[Any, ...]]:
        if stream is None:
            return self._iterate(f"SELECT {_COLUMNS} FROM events ORDER BY position", ())
        return self._iterate(
            f"SELECT {_COLUMNS} FROM events WHERE stream = ? ORDER BY position", (stream,)
        )

    def _heads(self, stream: str | None) -> list[StreamInfo]:
        if stream is None:
            rows = self._query(
                f"SELECT {_HEAD_COLUMNS} FROM streams ORDER BY updated_at DESC, stream", ()
            )
        else:
            rows = self._query(f"SELECT {_HEAD_COLUMNS} FROM streams WHERE stream = ?", (stream,))
        return [StreamInfo(*r) for r in rows]

    def _last_position(self) -> int:
        (last,) = self._query("SELECT max(position) FROM events", ())[0]
        return int(last or 0)

    def _missing_after(self, position: int, upto: int) -> int:
        expected = position + 1
        for (p,) in self._iterate(
            "SELECT position FROM events WHERE position > ? AND position <= ? ORDER BY position",
            (position, upto),
        ):
            if p != expected:
                break
            expected += 1
        return min(expected, upto)

    def verify(self, stream: str | None = None, *, anchor: Anchor | None = None) -> VerifyReport:
        if self.sealed and self._key is None:
            raise DatabaseError(
                f"{self.path}: this log is sealed with an audit key; verifying needs the key"
            )
        return super().verify(stream, anchor=anchor)

    @contextmanager
    def _snapshot(self) -> Iterator[None]:
        """One read transaction on the reader connection: every read inside sees the log
        as it was at the first of them (WAL). Other reads of this object wait meanwhile;
        writers do not (unless the database is in memory, where they share it)."""
        with self._rlock:
            self._check_open()
            conn = self._rconn
            try:
                conn.execute("BEGIN")
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: read failed ({exc})") from exc
            try:
                yield
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")  # nothing was written: ends the read

    def subscribe(
        self, after_position: int = 0, *, stream: str | None = None, poll_interval: float = 0.05
    ) -> Subscription:
        if self.archive:
            raise DatabaseError(
                f"{self.path}: read as an archive (its folder cannot be written, so nobody "
                "appends to it); there is nothing to follow"
            )
        return super().subscribe(after_position, stream=stream, poll_interval=poll_interval)

    #: Checkpoint once about this many bytes are in the WAL (SQLite's default: 1,000 pages).
    CHECKPOINT_BYTES = 4_096_000

    def _after_lead(self) -> None:
        if self._memory:
            return
        if self._unchecked >= self.CHECKPOINT_BYTES and self._checkpointing.acquire(blocking=False):
            try:
                self._checkpoint()
            finally:
                self._checkpointing.release()

    def _checkpoint(self) -> None:
        """Copy the WAL's pages back into the database, on a connection of its own.

        SQLite would do it inside the COMMIT that crosses its threshold, holding up every
        append of that group commit. Here the leader that has just stepped down does it,
        its callers already woken: first beside the next leader, which goes on committing
        (a PASSIVE checkpoint never blocks a writer), then, holding this log's writers
        off, the few pages they wrote meanwhile, so that the checkpoint is complete and the
        next commit starts the WAL over (without that pass the WAL grows for as long as
        appends keep coming). A reader inside a transaction, or another process's
        appends, can keep it from completing; it is then tried again after another
        eighth of the threshold. SQLite's own checkpoint stays on as a backstop, at ten
        times its usual size.
        """
        self._unchecked = 0
        complete = False
        try:
            if self._cconn is None:
                if self._closed:
                    return
                # The resolved path: the working directory may have changed since.
                path = self.realpath or self.path
                self._cconn, release = open_held(path, readonly=False, timeout=0)
                self._releases.append(release)
            conn = self._cconn
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            with self._write_lock:
                busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            complete = not busy and frames == copied
        except (sqlite3.Error, DatabaseError):
            pass  # the appends are committed; a later checkpoint copies their pages
        if not complete:
            self._unchecked = self.CHECKPOINT_BYTES - self.CHECKPOINT_BYTES // 8

    def _close(self) -> None:
        with self._checkpointing:
            if self._cconn is not None:
                self._cconn.close()
        with self._rlock:
            self._rconn.close()
        with self._write_lock:
            self._wconn.close()
        for release in self._releases:  # only now may the file be opened plainly again
            release()
