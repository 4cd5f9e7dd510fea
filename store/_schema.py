"""The database schema (DESIGN section 3), its migrations, and how a file is opened.

``PRAGMA user_version`` holds the schema version. Opening checks it before writing
anything: a file that is not SQLite, a SQLite file that is not a moot log, and a log
written by a newer schema are refused with a clear error and left untouched.
"""

from __future__ import annotations

import os
import pathlib
import sqlite3
import threading
from collections.abc import Callable

import sqlite_utils

from ._chain import key_check
from ._errors import DatabaseError

__all__ = ["SCHEMA_VERSION", "Release", "connect", "open_held", "prepare"]

#: Lets go of a file :func:`open_held` counted as held.
Release = Callable[[], None]

SCHEMA_VERSION = 1

MESSAGES_VIEW = """
SELECT stream, seq,
       json_extract(data, '$.turn') AS turn,
       json_extract(data, '$.speaker.name') AS speaker,
       json_extract(data, '$.speaker.role') AS role,
       json_extract(data, '$.content') AS content,
       recorded_at
FROM events WHERE type = 'DialogueMessage'
"""

# One row per tool call the model asked for, with how it ended: its ToolExecutionEnd,
# or the denial that stood in for one. Arguments are the ones the tool ran with.
TOOL_CALLS_VIEW = """
SELECT r.stream AS stream,
       json_extract(c.value, '$.id') AS call_id,
       json_extract(c.value, '$.name') AS tool,
       coalesce(json_extract(s.data, '$.arguments'), json_extract(c.value, '$.arguments'), '{}')
           AS arguments,
       coalesce(json_extract(e.data, '$.content'),
                'Tool call denied' || coalesce(': ' || json_extract(d.data, '$.reason'), ''))
           AS result,
       CASE WHEN e.position IS NOT NULL THEN coalesce(json_extract(e.data, '$.is_error'), 0)
            WHEN d.position IS NOT NULL THEN 1 END AS is_error,
       CASE WHEN e.position IS NOT NULL THEN coalesce(json_extract(e.data, '$.duration_ms'), 0)
            WHEN d.position IS NOT NULL THEN 0 END AS duration_ms
FROM events r
JOIN json_each(r.data, '$.content') c ON json_extract(c.value, '$.kind') = 'tool_call'
LEFT JOIN events s ON s.stream = r.stream AND s.seq > r.seq AND s.type = 'ToolExecutionStart'
     AND json_extract(s.data, '$.call_id') = json_extract(c.value, '$.id')
LEFT JOIN events e ON e.stream = r.stream AND e.seq > r.seq AND e.type = 'ToolExecutionEnd'
     AND json_extract(e.data, '$.call_id') = json_extract(c.value, '$.id')
LEFT JOIN events d ON d.stream = r.stream AND d.seq > r.seq AND d.type = 'ToolCallDecided'
     AND json_extract(d.data, '$.decision') = 'deny'
     AND json_extract(d.data, '$.call_id') = json_extract(c.value, '$.id')
WHERE r.type = 'LlmResponse'
"""


def _create_v1(db: sqlite_utils.Database, audit_key: bytes | None) -> None:
    db.table("events").create(
        {
            "position": int,
            "stream": str,
            "seq": int,
            "type": str,
            "version": int,
            "recorded_at": str,
            "data": str,
            "prev_hash": str,
            "hash": str,
        },
        pk="position",
        not_null={"stream", "seq", "type", "version", "recorded_at", "data", "prev_hash", "hash"},
    )
    db.table("events").create_index(["stream", "seq"], unique=True, index_name="events_stream_seq")
    # WITHOUT ROWID and no secondary index: every append updates one row here, and each
    # extra b-tree would add a page to every commit (10-20 % of a one-event commit).
    db.execute(
        """CREATE TABLE streams (
            stream TEXT PRIMARY KEY NOT NULL,
            kind TEXT NOT NULL,
            parent TEXT,
            status TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            last_seq INTEGER NOT NULL,
            last_hash TEXT NOT NULL,
            last_position INTEGER NOT NULL
        ) WITHOUT ROWID"""
    )
    db.table("moot_meta").create({"key": str, "value": str}, pk="key", not_null={"value"})
    meta = [{"key": "hash", "value": "hmac-sha256" if audit_key else "sha256"}]
    if audit_key:
        meta.append({"key": "key_check", "value": key_check(audit_key)})
    db.table("moot_meta").insert_all(meta)
    db.create_view("messages", MESSAGES_VIEW)
    db.create_view("tool_calls", TOOL_CALLS_VIEW)


#: MIGRATIONS[n] takes a database at version n to version n + 1.
MIGRATIONS: list[Callable[[sqlite_utils.Database, bytes | None], None]] = [_create_v1]
assert len(MIGRATIONS) == SCHEMA_VERSION


def _precheck(path: str) -> None:
    """Refuse a non-SQLite file or a newer schema from the file header alone.

    Opening a WAL database with SQLite creates its ``-wal`` and ``-shm`` side files;
    reading the 100-byte header first refuses the clear cases without touching anything.
    (A newer version still only in the WAL is caught after opening.)
    """
    try:
        with open(path, "rb") as f:
            header = f.read(100)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise DatabaseError(f"{path}: cannot read ({exc.strerror})") from exc
    if not header:
        return
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        raise DatabaseError(f"{path}: not a SQLite database (file is not a database)")
    version = int.from_bytes(header[60:64], "big", signed=True)
    if version > SCHEMA_VERSION:
        raise DatabaseError(_newer(path, version))


def _newer(path: str, version: int) -> str:
    return (
        f"{path}: written by a newer moot (schema {version}; this moot knows up to "
        f"{SCHEMA_VERSION}); upgrade moot to open it"
    )


#: The database files this process holds open through SQLite: (device, inode) -> count.
_HELD: dict[tuple[int, int], int] = {}
_HELD_LOCK = threading.Lock()


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def open_held(path: str, *, readonly: bool, timeout: float) -> tuple[sqlite3.Connection, Release]:
    """Check the file (see :func:`_precheck`) and open a connection to it; returns the
    connection and the function to call once it is closed.

    The check reads the file with ``open()``, and closing that descriptor would drop
    every POSIX lock the process holds on the file, its SQLite connections' included:
    another process could then delete the WAL under them. So the file is checked only
    while this process holds no connection to it, and counted as held from the moment
    one is opened until the returned function is called (after the connection closed).
    """
    with _HELD_LOCK:
        if path != ":memory:" and _file_id(path) not in _HELD:
            _precheck(path)
        conn = connect(path, readonly=readonly, timeout=timeout)
        key = _file_id(path) if path != ":memory:" else None  # a new file exists now
        if key is not None:
            _HELD[key] = _HELD.get(key, 0) + 1
    released = False

    def release() -> None:
        nonlocal released
        with _HELD_LOCK:
            if released or key is None:
                return
            released = True
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]

    return conn, release


class Archive(sqlite3.Connection):
    """A read-only connection to a log read as it is (SQLite's immutable mode): nobody
    can be writing it, so it is never followed for new events."""


def _archived(path: str, error: sqlite3.OperationalError) -> bool:
    """Whether a read-only open failed only because the folder cannot be written."""
    name = getattr(error, "sqlite_errorname", "")
    if not name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN")):
        return False
    folder = os.path.dirname(os.path.abspath(path))
    return not os.access(folder, os.W_OK) and not os.path.exists(f"{path}-wal")


def connect(path: str, *, readonly: bool, timeout: float) -> sqlite3.Connection:
    """Open a connection without writing anything (autocommit, usable from any thread).

    Use :func:`open_held`, which checks the file first, safely.
    """
    try:
        if path == ":memory:":
            if readonly:
                raise DatabaseError("an in-memory database cannot be opened read-only")
            return sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        if readonly:
            if not os.path.isfile(path):
                raise DatabaseError(f"{path}: no such database file")
            uri = pathlib.Path(path).resolve().as_uri() + "?mode=ro"
            conn = sqlite3.connect(
                uri, uri=True, isolation_level=None, check_same_thread=False, timeout=timeout
            )
            conn.execute("PRAGMA query_only=1")
            try:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.OperationalError as exc:
                if not _archived(path, exc):
                    raise
                # A log in a folder this process cannot write (an archive, a read-only
                # mount) cannot get the -shm file WAL readers share. With no WAL beside it
                # (nothing committed outside the file, and no writer, who would have
                # made one), the file alone is the log: read it as it is.
                conn.close()
                conn = sqlite3.connect(
                    uri + "&immutable=1",
                    uri=True,
                    isolation_level=None,
                    check_same_thread=False,
                    timeout=timeout,
                    factory=Archive,
                )
                conn.execute("PRAGMA query_only=1")
            except sqlite3.DatabaseError:
                pass  # not a database: _inspect says so
            return conn
        return sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=timeout)
    except sqlite3.Error as exc:
        raise DatabaseError(f"{path}: cannot open ({exc})") from exc


def _inspect(conn: sqlite3.Connection, path: str) -> tuple[int, set[str]]:
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    except sqlite3.OperationalError as exc:  # locked, unreadable, no room: not its format
        raise DatabaseError(f"{path}: cannot read ({exc})") from exc
    except sqlite3.DatabaseError as exc:
        raise DatabaseError(f"{path}: not a SQLite database ({exc})") from exc
    return version, names


def _check_version(version: int, names: set[str], path: str, readonly: bool) -> None:
    ours = {"events", "streams", "moot_meta"} <= names
    if names and not ours:
        raise DatabaseError(f"{path}: a SQLite database, but not a moot event log")
    if version > SCHEMA_VERSION:
        raise DatabaseError(_newer(path, version))
    if readonly and version == 0:
        raise DatabaseError(f"{path}: an empty database, not a moot event log")
    if readonly and version < SCHEMA_VERSION:
        raise DatabaseError(f"{path}: schema {version} needs migrating; open it read-write once")
    if version > 0 and not ours:
        raise DatabaseError(f"{path}: a SQLite database, but not a moot event log")


def prepare(
    conn: sqlite3.Connection, path: str, *, readonly: bool, audit_key: bytes | None
) -> dict[str, str]:
    """Check (and for a writer, create or migrate) the schema; returns the log's metadata.

    Raises:
        DatabaseError: not SQLite, not a moot log, newer schema, or the wrong audit key.
    """
    version, names = _inspect(conn, path)
    _check_version(version, names, path, readonly)
    if version < SCHEMA_VERSION:
        _migrate(conn, path, audit_key)
    try:
        meta = dict(conn.execute("SELECT key, value FROM moot_meta").fetchall())
    except sqlite3.Error as exc:
        raise DatabaseError(f"{path}: not a moot event log ({exc})") from exc
    sealed = meta.get("hash") == "hmac-sha256"
    if audit_key is not None and not sealed:
        raise DatabaseError(f"{path}: this log has no audit key, but one was given")
    if audit_key is not None and meta.get("key_check") != key_check(audit_key):
        raise DatabaseError(f"{path}: the audit key does not match this log")
    return meta


def _migrate(conn: sqlite3.Connection, path: str, audit_key: bytes | None) -> None:
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated while we waited for the write lock.
            version, names = _inspect(conn, path)
            _check_version(version, names, path, readonly=False)
            db = sqlite_utils.Database(conn, execute_plugins=False)
            for step in MIGRATIONS[version:]:
                step(db, audit_key)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise DatabaseError(f"{path}: cannot create the schema ({exc})") from exc
