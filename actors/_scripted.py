"""The scripted model: answers each call with the next entry of a list (DESIGN section 9).

It speaks the same provider interface as the HTTP models, deltas included, so every
path through a dialogue or a tool loop can run with no server. Entries are used in
order and never repeated: when they run out, the call fails with a clear error.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import msgspec

from moot.events import ToolCallBlock, Usage

from ._errors import ConfigurationError, ProviderTimeout, ScriptError
from ._model import (
    Delta,
    Finished,
    ModelRequest,
    ModelResponse,
    ReasoningDelta,
    TextDelta,
    ToolCallComplete,
    ToolCallStart,
    UsageDelta,
    assemble,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["ScriptedCall", "ScriptedProvider", "ScriptedReply"]

#: If set, every scripted call appends a line "<label> <index>" to this file, so tests
#: can count the calls made across processes (and crashes).
CALL_LOG_ENV = "MOOT_SCRIPTED_CALL_LOG"

_json = msgspec.json.Encoder()


class ScriptedCall(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A tool call a scripted reply asks for."""

    name: str
    arguments: dict[str, Any] = {}
    id: str | None = None


#: The longest a scripted reply may be delayed (a day): a bigger value is a mistake.
_MAX_DELAY_MS = 86_400_000.0


class ScriptedReply(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One scripted answer: text, an error, and/or tool calls; optionally late."""

    text: str | None = None
    error: str | None = None
    tool_calls: tuple[ScriptedCall, ...] = ()
    reasoning: str | None = None
    delay_ms: float = 0

    def __post_init__(self) -> None:
        if self.error is not None and (self.text is not None or self.tool_calls):
            raise ValueError("a scripted reply is either an error or an answer, not both")
        if self.error is None and self.text is None and not self.tool_calls:
            raise ValueError("a scripted reply needs text, error or tool_calls")
        if not 0 <= self.delay_ms <= _MAX_DELAY_MS:  # NaN fails too
            raise ValueError(f"delay_ms must be between 0 and {_MAX_DELAY_MS:.0f}")


def parse_replies(raw: Any, where: str) -> tuple[ScriptedReply, ...]:
    """Scripted replies from scenario data (a list of tables or strings).

    Raises:
        ConfigurationError: an entry is malformed.
    """
    if not isinstance(raw, list) or not raw:
        raise ConfigurationError(f"{where}: a scripted agent needs a non-empty 'replies' list")
    replies = []
    for i, item in enumerate(raw):
        entry = {"text": item} if isinstance(item, str) else item
        try:
            replies.append(msgspec.convert(entry, ScriptedReply))
        except (msgspec.ValidationError, ValueError) as exc:
            raise ConfigurationError(f"{where}: replies[{i}]: {exc}") from exc
    return tuple(replies)


class ScriptedProvider:
    """A provider that plays back ``replies``, one per call, in order.

    Args:
        replies: The answers, in order.
        label: Names this script in the call log (e.g. the participant's name).
        model: What to report as the model.

    Thread-safe: concurrent calls take distinct entries.
    """

    name = "scripted"

    def __init__(
        self,
        replies: tuple[ScriptedReply, ...] | list[ScriptedReply],
        *,
        label: str = "scripted",
        model: str = "scripted",
    ) -> None:
        self.replies = tuple(replies)
        self.label = label
        self.model: str | None = model
        self._lock = threading.Lock()
        self._next = 0
        #: Calls made through this object (not counting skipped ones).
        self.calls = 0
        #: The last requests received, in order (what the model was shown); bounded, so
        #: a long scripted session does not keep every prompt in memory.
        self.requests: collections.deque[ModelRequest] = collections.deque(maxlen=100)
        self._cancel = threading.Event()

    def __repr__(self) -> str:
        return f"ScriptedProvider({self.label!r}, {len(self.replies)} replies, next={self._next})"

    @property
    def position(self) -> int:
        """How many entries have been used (or skipped)."""
        return self._next

    def skip(self, count: int) -> None:
        """Mark the first ``count`` entries as used: their calls are already on record."""
        with self._lock:
            self._next = max(self._next, count)

    def _take(self) -> tuple[int, ScriptedReply]:
        with self._lock:
            index = self._next
            if index >= len(self.replies):
                raise ScriptError(
                    f"scripted agent {self.label!r} has no reply left "
                    f"(all {len(self.replies)} were used)"
                )
            self._next += 1
            self.calls += 1
        path = os.environ.get(CALL_LOG_ENV)
        if path:
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"{self.label} {index}\n")
                f.flush()
                os.fsync(f.fileno())
        return index, self.replies[index]

    def stream(self, request: ModelRequest, *, deadline: float | None = None) -> Iterator[Delta]:
        index, reply = self._take()
        self.requests.append(request)
        self._wait(reply.delay_ms / 1000, deadline)
        if reply.error is not None:
            raise ScriptError(reply.error)
        yield from _deltas(index, reply, request)

    def complete(self, request: ModelRequest, *, deadline: float | None = None) -> ModelResponse:
        return assemble(self.stream(request, deadline=deadline))

    def _wait(self, seconds: float, deadline: float | None) -> None:
        if deadline is not None and time.monotonic() + seconds > deadline:
            self._cancel.wait(max(0.0, deadline - time.monotonic()))
            raise ProviderTimeout(
                f"scripted reply of {self.label!r} did not come before the deadline"
            )
        if seconds > 0:
            self._cancel.wait(seconds)


def _deltas(index: int, reply: ScriptedReply, request: ModelRequest) -> Iterator[Delta]:
    if reply.reasoning:
        yield ReasoningDelta(text=reply.reasoning)
    if reply.text:
        yield TextDelta(text=reply.text)
    for i, call in enumerate(reply.tool_calls):
        call_id = call.id or f"call_{index}_{i}"
        yield ToolCallStart(index=i, id=call_id, name=call.name)
        yield ToolCallComplete(
            index=i, call=ToolCallBlock(id=call_id, name=call.name, arguments=call.arguments)
        )
    # About four bytes of JSON a token; one encoding of the whole history, not one repr
    # per message (a long loop asks every iteration).
    prompt = len(_json.encode(request.messages)) + len(request.system or "")
    output = len(reply.text or "") + sum(len(_json.encode(c.arguments)) for c in reply.tool_calls)
    yield UsageDelta(
        usage=Usage(input_tokens=max(1, prompt // 4), output_tokens=max(1, output // 4))
    )
    yield Finished(stop_reason="tool_use" if reply.tool_calls else "end_turn", model="scripted")
