"""A provider for the Anthropic Messages API.

Speaks ``POST {base_url}/v1/messages``. Streaming reads named server-sent events::

    message_start                      the model, and input usage
    content_block_start  index, block  text | tool_use | thinking | redacted_thinking
    content_block_delta  index, delta  text_delta | input_json_delta | thinking_delta
                                       | signature_delta
    content_block_stop   index         a tool call is complete here
    message_delta                      stop_reason, output usage
    message_stop                       the end
    ping                               keep-alive, ignored
    error                              overloaded_error etc., raised as the matching ProviderError

A non-streaming reply is turned into the same deltas, so one
:class:`~moot.actors._model.Assembler` builds the response either way.

Usage is a snapshot: ``message_start`` gives the input side, ``message_delta`` the
output side (and sometimes updated input counts); the two are merged. ``input_tokens``
of the resulting :class:`Usage` is the whole prompt, cached parts included (Anthropic
counts cache reads and writes apart from ``input_tokens``), so that it means the same
as with the other providers; ``cache_read_tokens`` and ``cache_write_tokens`` say how
much of it came from or went into the cache.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from moot.events import (
    ChatMessage,
    ContentBlock,
    ImageBlock,
    ReasoningBlock,
    TextBlock,
    ToolCallBlock,
    ToolResultBlock,
    ToolSpec,
    Usage,
)

from ._errors import (
    BadRequestError,
    ConnectionLostError,
    MalformedResponseError,
)
from ._http import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
    HttpProvider,
    RetryPolicy,
    drain,
    error_for_status,
    tool_call_block,
)
from ._model import (
    Delta,
    Finished,
    ModelRequest,
    ModelResponse,
    ReasoningDelta,
    StopReason,
    TextDelta,
    ToolCallComplete,
    ToolCallDelta,
    ToolCallStart,
    UsageDelta,
    assemble,
    cut_off,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import httpx

__all__ = ["AnthropicProvider", "build_messages_request", "reply_deltas"]

DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 1024

_STOP_REASONS: dict[str, StopReason] = {
    "end_turn": "end_turn",
    "tool_use": "tool_use",
    "max_tokens": "max_tokens",
    "stop_sequence": "stop_sequence",
    "model_context_window_exceeded": "max_tokens",
    "pause_turn": "end_turn",
    "refusal": "end_turn",
}

#: The HTTP status each in-stream error type stands for, so it maps like the status would.
_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

# ------------------------------------------------------------------ request shapes


class _Out(msgspec.Struct, omit_defaults=True):
    """Base of the request shapes: unset optional fields are left out of the JSON."""


class _Text(_Out, tag_field="type", tag="text"):
    text: str


class _Base64Source(_Out, tag_field="type", tag="base64"):
    media_type: str
    data: str


class _URLSource(_Out, tag_field="type", tag="url"):
    url: str


class _Image(_Out, tag_field="type", tag="image"):
    source: _Base64Source | _URLSource


class _ToolUse(_Out, tag_field="type", tag="tool_use"):
    id: str
    name: str
    input: dict[str, Any]


class _ToolResult(_Out, tag_field="type", tag="tool_result"):
    tool_use_id: str
    content: str
    is_error: bool = False


class _Thinking(_Out, tag_field="type", tag="thinking"):
    thinking: str
    signature: str


class _RedactedThinking(_Out, tag_field="type", tag="redacted_thinking"):
    data: str


_OutBlock = _Text | _Image | _ToolUse | _ToolResult | _Thinking | _RedactedThinking


class _Message(_Out):
    role: str
    content: list[_OutBlock]


class _Tool(_Out):
    name: str
    description: str
    input_schema: dict[str, Any]


class _ToolChoice(_Out):
    type: str
    name: str | None = None


class _ThinkingConfig(_Out):
    type: str
    budget_tokens: int


class _OutputFormat(_Out):
    type: str
    schema: dict[str, Any]


class _OutputConfig(_Out):
    format: _OutputFormat


class _MessagesRequest(_Out):
    model: str
    max_tokens: int
    messages: list[_Message]
    system: str | None = None
    tools: list[_Tool] | None = None
    tool_choice: _ToolChoice | None = None
    temperature: float | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    thinking: _ThinkingConfig | None = None
    output_config: _OutputConfig | None = None


_encoder = msgspec.json.Encoder()

# ------------------------------------------------------------------- reply shapes


class _In(msgspec.Struct):
    """Base of the reply shapes: every field has a default, unknown fields are ignored."""


class _InBlock(_In):
    type: str = ""
    text: str | None = None
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None  # redacted_thinking
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None


class _InDelta(_In):
    """A ``content_block_delta``'s or a ``message_delta``'s delta: the fields of both."""

    type: str = ""
    text: str | None = None
    partial_json: str | None = None
    thinking: str | None = None
    signature: str | None = None
    stop_reason: str | None = None


class _InUsage(_In):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class _InError(_In):
    type: str = ""
    message: str | None = None


class _InMessage(_In):
    #: ``message``; a whole reply may also be an ``error`` (with ``error``), whatever
    #: its HTTP status.
    type: str | None = None
    model: str | None = None
    content: list[_InBlock] | None = None
    stop_reason: str | None = None
    usage: _InUsage | None = None
    error: _InError | None = None


class _Event(_In):
    """One streamed event, whatever its type (unknown types are skipped, as the API asks)."""

    type: str = ""
    message: _InMessage | None = None
    index: int | None = None
    content_block: _InBlock | None = None
    delta: _InDelta | None = None
    usage: _InUsage | None = None
    error: _InError | None = None


_event_decoder = msgspec.json.Decoder(_Event)
_message_decoder = msgspec.json.Decoder(_InMessage)


_T = TypeVar("_T")


def _decode(decoder: msgspec.json.Decoder[_T], data: str | bytes) -> _T:
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise MalformedResponseError(f"anthropic: a reply event is not valid ({exc})") from exc


# ------------------------------------------------------------------ request building


def build_messages_request(
    request: ModelRequest,
    *,
    model: str,
    max_tokens: int,
    stream: bool,
    thinking_budget: int | None = None,
) -> bytes:
    """The JSON body of a Messages API call for ``request``.

    System messages among ``request.messages`` join ``request.system`` in the top-level
    ``system``; tool results travel in ``user`` messages; consecutive messages of one
    role are merged, as the API expects alternating turns.

    Args:
        request: What to ask.
        model: The model name to send.
        max_tokens: The reply's token limit when the request sets none (the API needs one).
        stream: Whether to ask for a server-sent event stream.
        thinking_budget: Tokens the model may think for (extended thinking), or None.

    Returns:
        The encoded body.
    """
    system = [request.system] if request.system else []
    system += [_text(m) for m in request.messages if m.role == "system"]
    body = _MessagesRequest(
        model=model,
        max_tokens=request.max_tokens or max_tokens,
        messages=_messages(request.messages),
        system="\n\n".join(s for s in system if s) or None,
        temperature=request.temperature,
        stop_sequences=list(request.stop) or None,
        stream=stream,
    )
    if request.tools:
        body.tools = [_tool(spec) for spec in request.tools]
        body.tool_choice = _tool_choice(request.tool_choice)
    if thinking_budget is not None:
        body.thinking = _ThinkingConfig(type="enabled", budget_tokens=thinking_budget)
    if request.response_schema is not None:
        body.output_config = _OutputConfig(
            format=_OutputFormat(type="json_schema", schema=request.response_schema)
        )
    return _encoder.encode(body)


def _text(message: ChatMessage) -> str:
    return "".join(b.text for b in message.content if isinstance(b, TextBlock))


def _messages(messages: tuple[ChatMessage, ...]) -> list[_Message]:
    out: list[_Message] = []
    for message in messages:
        if message.role == "system":
            continue
        role = "assistant" if message.role == "assistant" else "user"
        blocks = [b for b in map(_block, message.content) if b is not None]
        if out and out[-1].role == role:
            out[-1].content.extend(blocks)
        elif blocks:
            out.append(_Message(role=role, content=blocks))
    for turn in out:
        if turn.role == "user":
            # Tool results must open a user turn, before any text.
            turn.content.sort(key=lambda b: not isinstance(b, _ToolResult))
    return out


def _block(block: ContentBlock) -> _OutBlock | None:
    """One content block on the wire; None for what this API cannot take back."""
    match block:
        case TextBlock(text=text):
            return _Text(text=text) if text else None  # the API rejects empty text blocks
        case ToolCallBlock(id=id, name=name, arguments=arguments):
            return _ToolUse(id=id, name=name, input=arguments)
        case ToolResultBlock(tool_call_id=call_id, content=content, is_error=is_error):
            return _ToolResult(tool_use_id=call_id, content=content, is_error=is_error)
        case ReasoningBlock(redacted=str(data)):
            return _RedactedThinking(data=data)
        case ReasoningBlock(text=text, signature=signature):
            # Thinking goes back only with its signature (from this API); other reasoning
            # is dropped.
            return _Thinking(thinking=text, signature=signature) if signature else None
        case ImageBlock(media_type=media_type, data=data, url=url):
            if url:
                return _Image(source=_URLSource(url=url))
            if data is None:
                raise BadRequestError("an image block needs data or a url")
            return _Image(source=_Base64Source(media_type=media_type, data=data))


def _tool(spec: ToolSpec) -> _Tool:
    schema = spec.parameters or {"type": "object", "properties": {}}
    return _Tool(name=spec.name, description=spec.description, input_schema=schema)


def _tool_choice(choice: str) -> _ToolChoice:
    kinds = {"auto": "auto", "none": "none", "required": "any"}
    if choice in kinds:
        return _ToolChoice(type=kinds[choice])
    return _ToolChoice(type="tool", name=choice)


# ------------------------------------------------------------------ reply parsing


class _ReplyState:
    """Turns events into deltas: the one parser of both streamed and whole replies."""

    def __init__(self, redact: Callable[[str], str] = str) -> None:
        self.model: str | None = None
        self.stop_reason: StopReason | None = None
        self.done = False
        self._redact = redact
        self._usage = _InUsage()
        self._calls: dict[int, tuple[str, str, list[str]]] = {}  # index -> id, name, arguments
        #: Tool calls whose arguments were not a JSON object (names, in order).
        self._invalid: list[str] = []

    def feed(self, event: _Event) -> Iterator[Delta]:
        """The deltas of one event."""
        match event.type:
            case "message_start":
                yield from self._start(event.message or _InMessage())
            case "content_block_start":
                yield from self.start_block(event.index or 0, event.content_block or _InBlock())
            case "content_block_delta":
                yield from self._delta(event.index or 0, event.delta or _InDelta())
            case "content_block_stop":
                yield from self.stop_block(event.index or 0)
            case "message_delta":
                yield from self.end(event.delta or _InDelta(), event.usage)
            case "message_stop":
                self.done = True
            case "error":
                raise _in_stream_error(event.error or _InError(), self._redact)

    def _start(self, message: _InMessage) -> Iterator[Delta]:
        self.model = message.model
        if message.usage is not None:
            yield UsageDelta(usage=self._merge_usage(message.usage))

    def start_block(self, index: int, block: _InBlock) -> Iterator[Delta]:
        """The deltas of a content block's start (all of it, for a whole reply)."""
        match block.type:
            case "text" if block.text:
                yield TextDelta(text=block.text)
            case "thinking":
                if block.thinking:
                    yield ReasoningDelta(text=block.thinking)
                if block.signature:
                    yield ReasoningDelta(signature=block.signature)
            case "redacted_thinking" if block.data:
                yield ReasoningDelta(redacted=block.data)
            case "tool_use":
                if not block.id or not block.name:
                    raise MalformedResponseError("anthropic: a tool_use block without id or name")
                self._calls[index] = (block.id, block.name, [])
                yield ToolCallStart(index=index, id=block.id, name=block.name)
                if block.input:
                    yield from self._arguments(index, _encoder.encode(block.input).decode())

    def _delta(self, index: int, delta: _InDelta) -> Iterator[Delta]:
        match delta.type:
            case "text_delta" if delta.text:
                yield TextDelta(text=delta.text)
            case "input_json_delta" if delta.partial_json:
                yield from self._arguments(index, delta.partial_json)
            case "thinking_delta" if delta.thinking:
                yield ReasoningDelta(text=delta.thinking)
            case "signature_delta" if delta.signature:
                yield ReasoningDelta(signature=delta.signature)

    def _arguments(self, index: int, fragment: str) -> Iterator[Delta]:
        if index not in self._calls:
            raise MalformedResponseError(f"anthropic: arguments for block {index}, not a tool_use")
        self._calls[index][2].append(fragment)
        yield ToolCallDelta(index=index, arguments=fragment)

    def stop_block(self, index: int) -> Iterator[Delta]:
        """A :class:`ToolCallComplete` when the stopped block is a tool call."""
        if index in self._calls:
            id, name, fragments = self._calls.pop(index)
            block = tool_call_block(id, name, "".join(fragments))
            if block.invalid_arguments is not None:
                self._invalid.append(name)  # cut off, if the reply stops at max_tokens
            yield ToolCallComplete(index=index, call=block)

    def end(self, delta: _InDelta, usage: _InUsage | None) -> Iterator[Delta]:
        """The stop reason and final usage (``message_delta``)."""
        if delta.stop_reason is not None:
            self.stop_reason = _STOP_REASONS.get(delta.stop_reason, "end_turn")
        if usage is not None:
            yield UsageDelta(usage=self._merge_usage(usage))

    def _merge_usage(self, usage: _InUsage) -> Usage:
        """Fold ``usage`` into the snapshot (its set fields win) and return the snapshot."""
        self._usage = _InUsage(
            **{
                field: getattr(usage, field) if getattr(usage, field) is not None else old
                for field, old in msgspec.structs.asdict(self._usage).items()
            }
        )
        return _usage(self._usage)

    def finish(self, model: str | None) -> Iterator[Delta]:
        """The closing deltas: calls left open (a stream cut short of its stops), then Finished."""
        for index in sorted(self._calls):
            yield from self.stop_block(index)
        if self._invalid and self.stop_reason == "max_tokens":
            raise cut_off("anthropic", self._invalid[-1])
        yield Finished(stop_reason=self.stop_reason or "end_turn", model=self.model or model)


def _usage(usage: _InUsage) -> Usage:
    read = usage.cache_read_input_tokens
    write = usage.cache_creation_input_tokens
    return Usage(
        input_tokens=(usage.input_tokens or 0) + (read or 0) + (write or 0),
        output_tokens=usage.output_tokens or 0,
        cache_read_tokens=read,
        cache_write_tokens=write,
    )


def _in_stream_error(error: _InError, redact: Callable[[str], str]) -> Exception:
    status = _ERROR_STATUS.get(error.type, 500)
    detail = ": ".join(x for x in (error.type, error.message) if x)
    return error_for_status(status, redact(detail), provider="anthropic")


def reply_deltas(
    reply: bytes | str, *, model: str | None = None, redact: Callable[[str], str] = str
) -> Iterator[Delta]:
    """The deltas of a whole (non-streaming) Messages API reply, ending with Finished.

    Args:
        reply: The JSON body of a ``message``.
        model: The model asked for, named in Finished if the reply names none.
        redact: Scrubs secrets from the messages of errors the reply carries.

    Raises:
        MalformedResponseError: the body is not a message.
    """
    message = _decode(_message_decoder, reply)
    if message.type == "error" or message.error is not None:
        raise _in_stream_error(message.error or _InError(), redact)
    if message.type not in (None, "message"):
        raise MalformedResponseError(f"anthropic: the reply is a {message.type!r}, not a message")
    state = _ReplyState(redact)
    yield from state.feed(_Event(type="message_start", message=message))
    for index, block in enumerate(message.content or ()):
        yield from state.start_block(index, block)
        yield from state.stop_block(index)
    yield from state.end(_InDelta(stop_reason=message.stop_reason), None)
    yield from state.finish(model)


# ------------------------------------------------------------------ the provider


class AnthropicProvider(HttpProvider):
    """A model behind the Anthropic Messages API.

    Safe to call from several threads at once; each call takes its own connection from
    one pool.

    Args:
        model: The model to ask (default: ``$ANTHROPIC_MODEL``).
        api_key: The key, sent as ``x-api-key`` (default: the ``api_key_env`` variable).
        api_key_env: The environment variable holding the key.
        base_url: The API root, without ``/v1`` (a trailing ``/v1`` is tolerated;
            default: ``$ANTHROPIC_BASE_URL``, else Anthropic's).
        client: An :class:`httpx.Client` to use (never closed by the provider).
        retry: When to try a failed call again.
        max_tokens: The reply's token limit when a request sets none (the API needs one).
        anthropic_version: The ``anthropic-version`` header.
        thinking_budget: Tokens of extended thinking per call, or None for none.
        connect_timeout: Seconds to connect.
        read_timeout: Seconds of silence allowed while waiting for the reply.
        timeout: Seconds a whole call may take, retries included (None: no limit
            besides the request's ``timeout_s`` and the caller's deadline).

    Raises:
        ConfigurationError: no model was given or found in the environment.
    """

    name = "anthropic"

    def __init__(
        self,
        model: str | None = None,
        *,
        api_key: str | None = None,
        api_key_env: str = "ANTHROPIC_API_KEY",
        base_url: str | None = None,
        client: httpx.Client | None = None,
        retry: RetryPolicy | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        anthropic_version: str = DEFAULT_VERSION,
        thinking_budget: int | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        timeout: float | None = None,
    ) -> None:
        self.max_tokens = max_tokens
        self.thinking_budget = thinking_budget
        root = (base_url or os.environ.get("ANTHROPIC_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.base_url = root.removesuffix("/v1")
        key = api_key if api_key is not None else os.environ.get(api_key_env)
        key = key.strip() if key else key  # a key read from a file ends with a newline
        headers = {"anthropic-version": anthropic_version}
        if key:
            headers["x-api-key"] = key
        self._setup(
            model=model,
            model_env="ANTHROPIC_MODEL",
            key=key,
            url=f"{self.base_url}/v1/messages",
            headers=headers,
            client=client,
            retry=retry,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            timeout=timeout,
        )

    def _body(self, request: ModelRequest, *, stream: bool) -> bytes:
        return build_messages_request(
            request,
            model=self._model,
            max_tokens=self.max_tokens,
            stream=stream,
            thinking_budget=self.thinking_budget,
        )

    def stream(self, request: ModelRequest, *, deadline: float | None = None) -> Iterator[Delta]:
        """Yield the reply's deltas as they arrive, ending with :class:`Finished`.

        Args:
            request: What to ask.
            deadline: A :func:`time.monotonic` instant the call must end by.

        Raises:
            ProviderError: the call failed (an ``error`` event included);
                :class:`ConnectionLostError` if the stream ended before ``message_stop``.
        """
        call_deadline = self._endpoint.deadline(request.timeout_s, deadline)
        events = self._endpoint.events(
            self._body(request, stream=True), headers=request.extra_headers, deadline=call_deadline
        )
        state = _ReplyState(self._endpoint.redact)
        try:
            for event in events:
                if event.data:
                    yield from state.feed(_decode(_event_decoder, event.data))
                if state.done:
                    break
            else:
                raise ConnectionLostError("anthropic: the stream ended before message_stop")
        finally:
            if state.done:
                drain(events)  # in the background: the reply is complete; it closes them
            else:
                events.close()
        yield from state.finish(self._model)

    def complete(self, request: ModelRequest, *, deadline: float | None = None) -> ModelResponse:
        """The whole reply from one non-streaming call, assembled like a stream.

        Args:
            request: What to ask.
            deadline: A :func:`time.monotonic` instant the call must end by.

        Returns:
            The assembled reply.

        Raises:
            ProviderError: the call failed.
        """
        call_deadline = self._endpoint.deadline(request.timeout_s, deadline)
        reply = self._endpoint.post(
            self._body(request, stream=False),
            headers=request.extra_headers,
            deadline=call_deadline,
        )
        return assemble(reply_deltas(reply, model=self._model, redact=self._endpoint.redact))
