"""The hash chain: how each event's ``hash`` is computed from its row and its predecessor.

The hashed message is the ``data`` column's UTF-8 bytes, one newline byte, then the
compact UTF-8 JSON array ``[prev_hash, stream, seq, type, version, recorded_at]``
(non-ASCII characters are not escaped). ``hash`` is the hex SHA-256 of that message, or
its hex HMAC-SHA256 when the log has an audit key. The first event of a stream has
``prev_hash`` = 64 zeros. Anyone can recompute a chain with the standard library alone;
without the key nobody can forge an HMAC chain.

The body comes first so that the costly part, hashing the body, can be done by the
appending thread before it queues for the group commit; the writer then only copies
that state and adds the short header (see ``scripts/benchmarks/store.py``).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Protocol

import msgspec

__all__ = ["GENESIS", "Hasher", "body_hasher", "chain_hash", "encode_header", "key_check"]

GENESIS = "0" * 64

_header = msgspec.json.Encoder()
#: The header's bytes: ``encode_header((prev_hash, stream, seq, type, version, recorded_at))``.
encode_header = _header.encode


class Hasher(Protocol):
    def copy(self) -> Hasher: ...
    def update(self, data: bytes, /) -> None: ...
    def hexdigest(self) -> str: ...


def body_hasher(key: bytes | None, data: bytes) -> Hasher:
    """The hash state after the body and its newline: the first half of an event's hash.

    The writer completes a copy of it with :func:`encode_header` of the row's header.
    """
    h: Hasher = hashlib.sha256(data) if key is None else hmac.new(key, data, "sha256")
    h.update(b"\n")
    return h


def chain_hash(
    key: bytes | None,
    prev_hash: str,
    stream: str,
    seq: int,
    type_name: str,
    version: int,
    recorded_at: str,
    data: bytes,
) -> str:
    """The hash of one event row (see the module docstring for the exact bytes)."""
    message = (
        data + b"\n" + _header.encode((prev_hash, stream, seq, type_name, version, recorded_at))
    )
    if key is None:
        return hashlib.sha256(message).hexdigest()
    return hmac.digest(key, message, "sha256").hex()


def key_check(key: bytes) -> str:
    """A short value that tells whether a key is the one a log was sealed with.

    It is an HMAC of a fixed label, so it reveals nothing that helps to find the key.
    """
    return hmac.digest(key, b"moot audit key check", "sha256").hex()[:16]
