"""Model calls: the request, the streamed deltas, the assembled response, and providers.

A provider turns a :class:`ModelRequest` into a stream of deltas. Streaming and
non-streaming calls follow one rule: a non-streaming reply is turned into the same
deltas, and one :class:`Assembler` builds the :class:`ModelResponse` from them either
way. The deltas are what live subscribers see; only the assembled response is logged.
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import msgspec

from moot.events import (
    ChatMessage,
    ContentBlock,
    ReasoningBlock,
    TextBlock,
    ToolCallBlock,
    ToolSpec,
    Usage,
)

from ._errors import MalformedResponseError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

__all__ = [
    "Assembler",
    "Delta",
    "Finished",
    "ModelRequest",
    "ModelResponse",
    "Provider",
    "ReasoningDelta",
    "StopReason",
    "TextDelta",
    "ToolCallComplete",
    "ToolCallDelta",
    "ToolCallStart",
    "UsageDelta",
    "assemble",
    "call_model",
    "parse_arguments",
    "request_digest",
]

StopReason = Literal["end_turn", "tool_use", "max_tokens", "stop_sequence"]


class ModelRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Everything one model call needs. Tools are sent in the order given (sorted by name)."""

    messages: tuple[ChatMessage, ...]
    system: str | None = None
    tools: tuple[ToolSpec, ...] = ()
    #: "auto", "none", "required", or the name of one tool the model must call.
    tool_choice: str = "auto"
    temperature: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    #: A JSON Schema the reply must follow (structured output), or None.
    response_schema: dict[str, Any] | None = None
    #: Total seconds this call may take, retries included (also bounded by any deadline).
    timeout_s: float | None = None
    #: Sent with the call; their values never appear in reprs, logs or errors.
    extra_headers: dict[str, str] = {}

    def __repr__(self) -> str:
        shown = []
        for field in self.__struct_fields__:
            value = getattr(self, field)
            if field == "extra_headers":
                value = dict.fromkeys(value, "***")
            shown.append(f"{field}={value!r}")
        return f"ModelRequest({', '.join(shown)})"


class ModelResponse(msgspec.Struct, frozen=True, kw_only=True):
    """One complete model reply."""

    content: tuple[ContentBlock, ...]
    usage: Usage = Usage()
    stop_reason: StopReason = "end_turn"
    model: str | None = None
    latency_ms: float | None = None

    @property
    def text(self) -> str:
        return "".join(b.text for b in self.content if isinstance(b, TextBlock))

    @property
    def tool_calls(self) -> list[ToolCallBlock]:
        return [b for b in self.content if isinstance(b, ToolCallBlock)]


class _Delta(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Base of the streamed pieces of a reply."""


class TextDelta(_Delta, frozen=True, tag="text"):
    text: str


class ReasoningDelta(_Delta, frozen=True, tag="reasoning"):
    text: str = ""
    signature: str | None = None
    #: A whole block of encrypted reasoning (see :attr:`ReasoningBlock.redacted`).
    redacted: str | None = None


class ToolCallStart(_Delta, frozen=True, tag="tool_call_start"):
    index: int
    id: str
    name: str


class ToolCallDelta(_Delta, frozen=True, tag="tool_call_delta"):
    """A fragment of a tool call's JSON arguments."""

    index: int
    arguments: str


class ToolCallComplete(_Delta, frozen=True, tag="tool_call_complete"):
    index: int
    call: ToolCallBlock


class UsageDelta(_Delta, frozen=True, tag="usage"):
    """The reply's usage so far: a snapshot that replaces the previous one, not an increment."""

    usage: Usage


class Finished(_Delta, frozen=True, tag="done"):
    stop_reason: StopReason = "end_turn"
    model: str | None = None


Delta = (
    TextDelta
    | ReasoningDelta
    | ToolCallStart
    | ToolCallDelta
    | ToolCallComplete
    | UsageDelta
    | Finished
)

_args_decoder = msgspec.json.Decoder(dict[str, Any])


class _OpenCall:
    __slots__ = ("args", "id", "name")

    def __init__(self, id: str, name: str) -> None:
        self.id = id
        self.name = name
        self.args: list[str] = []


class Assembler:
    """Builds one :class:`ModelResponse` from deltas: the only place replies are assembled.

    Consecutive text deltas become one text block, consecutive reasoning deltas one
    reasoning block; tool calls take their place at their start; blocks keep the order
    in which they began.
    """

    def __init__(self) -> None:
        self._blocks: list[ContentBlock | _OpenCall | list[str]] = []
        self._kinds: list[str] = []
        self._signatures: dict[int, str] = {}
        self._calls: dict[int, int] = {}  # call index -> block index
        self._usage = Usage()
        self._finished: Finished | None = None

    def feed(self, delta: Delta) -> None:
        match delta:
            case TextDelta(text=text):
                self._append_text("text", text)
            case ReasoningDelta(redacted=str(data)):
                self._blocks.append(ReasoningBlock(text="", redacted=data))
                self._kinds.append("redacted")
            case ReasoningDelta(text=text, signature=signature):
                self._append_text("reasoning", text)
                if signature:
                    self._signatures[len(self._blocks) - 1] = signature
            case ToolCallStart(index=index, id=id, name=name):
                self._calls[index] = len(self._blocks)
                self._blocks.append(_OpenCall(id, name))
                self._kinds.append("call")
            case ToolCallDelta(index=index, arguments=fragment):
                call = self._open_call(index)
                call.args.append(fragment)
            case ToolCallComplete(index=index, call=call):
                if index not in self._calls:
                    self._calls[index] = len(self._blocks)
                    self._blocks.append(call)
                    self._kinds.append("call")
                else:
                    self._blocks[self._calls[index]] = call
            case UsageDelta(usage=usage):
                self._usage = usage
            case Finished():
                self._finished = delta

    def _append_text(self, kind: str, text: str) -> None:
        if self._kinds and self._kinds[-1] == kind:
            last = self._blocks[-1]
            assert isinstance(last, list)
            last.append(text)
        else:
            self._blocks.append([text])
            self._kinds.append(kind)

    def _open_call(self, index: int) -> _OpenCall:
        position = self._calls.get(index)
        block = None if position is None else self._blocks[position]
        if not isinstance(block, _OpenCall):
            raise MalformedResponseError(f"arguments for tool call {index} that was never started")
        return block

    @property
    def finished(self) -> bool:
        return self._finished is not None

    def response(self, *, latency_ms: float | None = None) -> ModelResponse:
        """The assembled reply.

        Raises:
            MalformedResponseError: a tool call's arguments are not a JSON object.
        """
        content: list[ContentBlock] = []
        for i, (kind, block) in enumerate(zip(self._kinds, self._blocks, strict=True)):
            if isinstance(block, _OpenCall):
                content.append(_close_call(block))
            elif isinstance(block, list):
                text = "".join(block)
                if kind == "text":
                    if text:
                        content.append(TextBlock(text=text))
                elif text or i in self._signatures:
                    content.append(ReasoningBlock(text=text, signature=self._signatures.get(i)))
            else:
                content.append(block)
        done = self._finished or Finished()
        stop_reason = done.stop_reason
        if stop_reason == "end_turn" and any(isinstance(b, ToolCallBlock) for b in content):
            stop_reason = "tool_use"
        return ModelResponse(
            content=tuple(content),
            usage=self._usage,
            stop_reason=stop_reason,
            model=done.model,
            latency_ms=latency_ms,
        )


def _close_call(call: _OpenCall) -> ToolCallBlock:
    return tool_call_block(call.id, call.name, "".join(call.args))


def tool_call_block(id: str, name: str, raw: str) -> ToolCallBlock:
    """A finished tool call from its arguments' text. Text that is not a JSON object is
    kept as ``invalid_arguments``: the model made a mistake the loop answers with an
    error result (as it does for arguments of the wrong type), not a broken reply."""
    try:
        return ToolCallBlock(id=id, name=name, arguments=parse_arguments(name, raw))
    except MalformedResponseError:
        return ToolCallBlock(id=id, name=name, invalid_arguments=raw)


def cut_off(provider: str, name: str) -> MalformedResponseError:
    """The error for a reply cut off at max_tokens in the middle of tool call ``name``:
    its arguments are incomplete through no mistake of the model's, so it is not
    answered like a call with invalid arguments."""
    return MalformedResponseError(
        f"{provider}: the reply was cut off at max_tokens in the middle of tool call "
        f"{name!r}; raise max_tokens"
    )


def parse_arguments(name: str, raw: str) -> dict[str, Any]:
    """A tool call's JSON arguments as a dict (empty text means no arguments).

    Raises:
        MalformedResponseError: the text is not a JSON object.
    """
    text = raw.strip()
    if not text:
        return {}
    try:
        arguments: dict[str, Any] = _args_decoder.decode(text)
    except msgspec.DecodeError as exc:
        raise MalformedResponseError(
            f"tool call {name!r}: arguments are not a JSON object ({exc})"
        ) from exc
    return arguments


@runtime_checkable
class Provider(Protocol):
    """Something that answers model requests: an HTTP API, a script, or a recording.

    Implementations must be safe to call from several threads at once.
    """

    #: A short name for logs and events, e.g. "openai", "anthropic", "scripted".
    name: str
    #: The model it asks (None if the provider does not know).
    model: str | None

    def stream(self, request: ModelRequest, *, deadline: float | None = None) -> Iterator[Delta]:
        """Yield the reply's deltas as they arrive, ending with :class:`Finished`.

        ``deadline`` is a :func:`time.monotonic` instant the whole call (retries
        included) must end by. Closing the iterator cancels the call and closes its
        connection.

        Raises:
            ProviderError: the call failed (after any retries).
        """
        ...

    def complete(self, request: ModelRequest, *, deadline: float | None = None) -> ModelResponse:
        """The whole reply at once (a non-streaming request where the API has one)."""
        ...


def request_digest(request: ModelRequest) -> str:
    """A short, stable fingerprint of a request: what re-drive compares, instead of
    storing every prompt (which would grow the log with the square of the history)."""
    body = msgspec.json.encode(request, order="sorted")
    return hashlib.sha256(body).hexdigest()[:16]


def assemble(deltas: Iterable[Delta], *, latency_ms: float | None = None) -> ModelResponse:
    """The whole reply from a sequence of deltas (the non-streaming form of a stream)."""
    assembler = Assembler()
    for delta in deltas:
        assembler.feed(delta)
    return assembler.response(latency_ms=latency_ms)


def call_model(
    provider: Provider,
    request: ModelRequest,
    *,
    stream: bool = True,
    on_delta: Callable[[Delta], None] | None = None,
    deadline: float | None = None,
) -> ModelResponse:
    """Ask ``provider`` and return the assembled reply, passing deltas to ``on_delta``.

    Raises:
        ProviderError: the call failed.
    """
    started = time.monotonic()
    if not stream:
        response = provider.complete(request, deadline=deadline)
        if response.latency_ms is None:
            latency = (time.monotonic() - started) * 1000
            response = msgspec.structs.replace(response, latency_ms=round(latency, 3))
        return response
    assembler = Assembler()
    deltas = provider.stream(request, deadline=deadline)
    try:
        for delta in deltas:
            assembler.feed(delta)
            if on_delta is not None:
                on_delta(delta)
    finally:
        close = getattr(deltas, "close", None)
        if close is not None:
            close()
    return assembler.response(latency_ms=round((time.monotonic() - started) * 1000, 3))
