"""One encoder, one typed decoder, and the upcasters that read old event shapes.

An event is stored as its ``type`` (the tag), its ``version`` (of that type's schema)
and its JSON body. Reading a body written at the current version is a single typed
msgspec decode. A body written at an older version is decoded to plain JSON, passed
through the registered upcasters one version at a time, and converted to the event
type: old rows never need rewriting.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

import msgspec

from ._errors import EventDecodeError
from ._events import Event, EventBase

__all__ = [
    "CURRENT_VERSIONS",
    "EVENT_TYPES",
    "checked",
    "decode_event",
    "encode_checked",
    "encode_event",
    "register_upcaster",
]

#: Every event class by its tag.
EVENT_TYPES: dict[str, type[EventBase]] = {cls.__name__: cls for cls in typing.get_args(Event)}

#: The version each event type is written at today.
CURRENT_VERSIONS: dict[str, int] = {name: cls.version for name, cls in EVENT_TYPES.items()}

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Event)
_raw_decoder = msgspec.json.Decoder(dict[str, Any])

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

#: (type, from_version) -> function turning that body into the from_version + 1 body.
_UPCASTERS: dict[tuple[str, int], Upcaster] = {}


def register_upcaster(type_name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register ``fn`` as the upcaster of ``type_name`` bodies from ``from_version`` to the next.

    Args:
        type_name: The event type (its tag), e.g. ``"Done"``.
        from_version: The version the upcaster reads; it returns a ``from_version + 1`` body.
    """

    def register(fn: Upcaster) -> Upcaster:
        _UPCASTERS[(type_name, from_version)] = fn
        return fn

    return register


def encode_event(event: EventBase) -> bytes:
    """The JSON body of ``event`` (its tag included) as UTF-8 bytes."""
    return _encoder.encode(event)


_V = typing.TypeVar("_V", bound=msgspec.Struct)


def checked(value: _V) -> _V:
    """``value`` as it will read back from the log, every field checked against its type.

    msgspec checks types when it decodes, not when a Struct is made: a value built by
    hand with a wrong type would be written, and its stream could not be read again.
    Whatever comes from a user is passed through here before it is appended.

    Raises:
        ValueError: a field has the wrong type, or holds a value JSON cannot encode
            (text with a lone surrogate, say).
    """
    try:
        return msgspec.json.decode(_encoder.encode(value), type=type(value))
    except (TypeError, msgspec.EncodeError, msgspec.DecodeError, UnicodeError) as exc:
        raise ValueError(f"invalid {type(value).__name__}: {exc}") from exc


def encode_checked(event: EventBase) -> bytes:
    """The JSON body of ``event``, once it is known to read back as the same type.

    The log's writers use it: an event with a field of the wrong type, written once,
    would leave its stream (and every read of the whole log) unreadable.

    Raises:
        ValueError: a field has the wrong type or a value JSON cannot hold, or the
            event is not one of the log's event types.
    """
    try:
        data = _encoder.encode(event)
        if type(_decoder.decode(data)) is not type(event):
            raise ValueError(f"{type(event).__name__} is not an event type of the log")
    except (TypeError, msgspec.EncodeError, msgspec.DecodeError, UnicodeError) as exc:
        raise ValueError(f"invalid {type(event).__name__}: {exc}") from None
    return data


def decode_event(type_name: str, version: int, data: str | bytes) -> Event:
    """Decode a stored body into its event, upcasting it first when it is an old version.

    Raises:
        EventDecodeError: the type is unknown, the version is newer than this code
            knows, there is no upcaster for it, or the body does not match the schema.
    """
    current = CURRENT_VERSIONS.get(type_name)
    if current == version:
        try:
            event: Event = _decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise EventDecodeError(f"{type_name} v{version}: {exc}") from exc
        if type(event).__name__ != type_name:
            raise EventDecodeError(f"row says {type_name} but its body is {type(event).__name__}")
        return event
    return _decode_old(type_name, version, current, data)


def _decode_old(type_name: str, version: int, current: int | None, data: str | bytes) -> Event:
    if current is None:
        raise EventDecodeError(f"unknown event type {type_name!r} (written by a newer moot?)")
    if not isinstance(version, int):
        raise EventDecodeError(f"{type_name}: version {version!r} is not a number")
    if version > current:
        raise EventDecodeError(
            f"{type_name} v{version} is newer than this moot understands (v{current})"
        )
    try:
        body = _raw_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise EventDecodeError(f"{type_name} v{version}: {exc}") from exc
    for v in range(version, current):
        upcast = _UPCASTERS.get((type_name, v))
        if upcast is None:
            raise EventDecodeError(f"no upcaster for {type_name} v{v} -> v{v + 1}")
        body = upcast(body)
    body["type"] = type_name
    try:
        converted: Event = msgspec.convert(body, Event)
        return converted
    except msgspec.ValidationError as exc:
        raise EventDecodeError(f"{type_name} v{version} after upcasting: {exc}") from exc


@register_upcaster("Done", 1)
def upcast_done_v1_v2(body: dict[str, Any]) -> dict[str, Any]:
    """Done v1 carried the reason as a bare string, ``"termination": "max_iterations"``."""
    termination = body.get("termination")
    if isinstance(termination, str):
        body["termination"] = {"reason": termination}
    return body
