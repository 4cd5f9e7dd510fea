"""Leases: one driver per stream, across threads and processes.

A dialogue's coordinator and a loop's engine are the only writers of their streams'
facts; a second driver resuming the same stream would take the first one's running
tools for crashed ones and record them as interrupted, or run them twice. So whoever
drives a stream holds its lease until it stops: an in-process registry for handles of
this process, and for a log in a file, a POSIX lock on one byte of a side file
(``<db>-lock``, the byte chosen by a hash of the stream id) for other processes. The
system releases the lock when a process dies, so a crash never leaves a stream stuck.

The side file is opened once per database and never closed: closing any descriptor
of a file drops every POSIX lock the process holds on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from moot.store import LogBase

__all__ = ["StreamBusy", "lease"]

logger = logging.getLogger("moot.actors.lease")

_lock = threading.Lock()
#: (database, stream) pairs driven by this process.
_held: set[tuple[str, str]] = set()
#: database path -> the side file's descriptor (never closed; see the module docstring).
_files: dict[str, int] = {}


class StreamBusy(Exception):
    """Another handle or process drives the stream."""


def lease(log: LogBase, stream: str) -> Callable[[], None]:
    """Take the lease of ``stream`` in ``log``; returns the function that gives it back.

    Raises:
        StreamBusy: another handle of this process, or another process, drives it.
    """
    # The file as it was when the log opened it (a relative path read later would follow
    # a change of the working directory).
    path = getattr(log, "realpath", None)
    database = path if isinstance(path, str) else f"memory:{id(log)}"
    on_disk = isinstance(path, str)
    key = (database, stream)
    byte = int.from_bytes(hashlib.blake2b(stream.encode(), digest_size=8).digest()) >> 2
    with _lock:
        if key in _held:
            raise StreamBusy(f"stream {stream!r} is already driven in this process")
        fd = _side_file(database) if on_disk else None
        if fd is not None:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, byte)
            except OSError:
                raise StreamBusy(
                    f"stream {stream!r} is driven by another process; stop it first"
                ) from None
        _held.add(key)
    released = False

    def release() -> None:
        nonlocal released
        with _lock:
            if released:
                return
            released = True
            _held.discard(key)
            if fd is not None:
                with contextlib.suppress(OSError):
                    fcntl.lockf(fd, fcntl.LOCK_UN, 1, byte)

    return release


def _forget() -> None:
    """In a forked child: the parent's leases are not the child's (nor are its POSIX
    locks); the inherited descriptors stay open, as closing them is never safe. The
    lock is made anew (a thread of the parent may have held it at the fork)."""
    global _lock  # noqa: PLW0603
    _lock = threading.Lock()
    _held.clear()
    _files.clear()


os.register_at_fork(after_in_child=_forget)


def _side_file(database: str) -> int | None:
    """The lock file's descriptor (None if it cannot be made: a read-only folder, in
    which case only this process's own handles are kept apart)."""
    fd = _files.get(database)
    if fd is None:
        try:
            fd = os.open(f"{database}-lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            logger.warning(
                "%s-lock: cannot open (%s); leases hold in this process only",
                database,
                exc.strerror,
            )
            return None
        _files[database] = fd
    return fd
