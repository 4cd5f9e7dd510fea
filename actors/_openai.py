"""A provider for OpenAI-compatible Chat Completions servers.

Speaks ``POST {base_url}/chat/completions`` as OpenAI, vLLM, llama.cpp's server, Ollama
(``/v1``) and LM Studio do. Streaming reads server-sent ``chat.completion.chunk``
objects until ``data: [DONE]``; a non-streaming reply is turned into the same deltas, so
one :class:`~moot.actors._model.Assembler` builds the response either way.

What servers differ in, and how it is handled:

* ``content: ""`` next to tool calls, extra fields (``timings``), ids without a
  ``call_`` prefix: tolerated; a tool call without an id gets a generated one;
* reasoning arrives as ``delta.reasoning_content`` or ``delta.reasoning``;
* usage arrives in the last chunk (``stream_options.include_usage``), with cached prompt
  tokens and reasoning tokens when the server counts them;
* a server that numbers every parallel call ``index: 0`` but gives each its own id still
  gets separate calls.
"""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING, Any

import msgspec

from moot.events import (
    ChatMessage,
    ImageBlock,
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

__all__ = ["OpenAIProvider", "build_chat_request", "reply_deltas"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"

_STOP_REASONS: dict[str, StopReason] = {
    "stop": "end_turn",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "length": "max_tokens",
    "content_filter": "end_turn",
}

# ------------------------------------------------------------------ request shapes


class _Out(msgspec.Struct, omit_defaults=True):
    """Base of the request shapes: unset optional fields are left out of the JSON."""


class _ImageURL(_Out):
    url: str


class _TextPart(_Out, tag_field="type", tag="text"):
    text: str


class _ImagePart(_Out, tag_field="type", tag="image_url"):
    image_url: _ImageURL


class _FunctionCall(_Out):
    name: str
    arguments: str


class _OutToolCall(_Out, tag_field="type", tag="function"):
    id: str
    function: _FunctionCall


class _OutMessage(msgspec.Struct):
    # No omit_defaults: "content" is always sent, as null next to tool calls.
    role: str
    content: str | list[_TextPart | _ImagePart] | None


class _AssistantMessage(_OutMessage):
    tool_calls: list[_OutToolCall]


class _ToolMessage(_OutMessage):
    tool_call_id: str


class _FunctionSpec(_Out):
    name: str
    description: str
    parameters: dict[str, Any]


class _Tool(_Out, tag_field="type", tag="function"):
    function: _FunctionSpec


class _ToolName(_Out):
    name: str


class _NamedToolChoice(_Out, tag_field="type", tag="function"):
    function: _ToolName


class _JsonSchema(_Out):
    name: str
    schema: dict[str, Any]
    strict: bool


class _ResponseFormat(_Out, tag_field="type", tag="json_schema"):
    json_schema: _JsonSchema


class _StreamOptions(_Out):
    include_usage: bool


class _ChatRequest(_Out):
    model: str
    messages: list[_OutMessage]
    stream: bool = False
    stream_options: _StreamOptions | None = None
    tools: list[_Tool] | None = None
    tool_choice: str | _NamedToolChoice | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    stop: list[str] | None = None
    response_format: _ResponseFormat | None = None


_encoder = msgspec.json.Encoder()

# ------------------------------------------------------------------- reply shapes


class _In(msgspec.Struct):
    """Base of the reply shapes: every field has a default, unknown fields are ignored."""


class _InFunction(_In):
    name: str | None = None
    arguments: str | None = None


class _InToolCall(_In):
    index: int | None = None
    id: str | None = None
    function: _InFunction | None = None


class _InMessage(_In):
    """A streamed ``delta`` or a whole ``message``: the same fields."""

    content: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[_InToolCall] | None = None
    #: The legacy form of a tool call (answering ``functions``, which moot never sends).
    function_call: _InFunction | None = None


class _Choice(_In):
    index: int = 0
    delta: _InMessage | None = None
    message: _InMessage | None = None
    finish_reason: str | None = None


class _PromptDetails(_In):
    cached_tokens: int | None = None


class _CompletionDetails(_In):
    reasoning_tokens: int | None = None


class _InUsage(_In):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: _PromptDetails | None = None
    completion_tokens_details: _CompletionDetails | None = None


class _InError(_In):
    message: str | None = None
    type: str | None = None
    code: str | int | None = None


class _Chunk(_In):
    """One ``chat.completion.chunk``, or a whole ``chat.completion``, or an in-stream error."""

    model: str | None = None
    choices: list[_Choice] | None = None
    usage: _InUsage | None = None
    error: _InError | None = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)


def _decode_chunk(data: str | bytes) -> _Chunk:
    try:
        return _chunk_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise MalformedResponseError(f"openai: a reply chunk is not valid ({exc})") from exc


# ------------------------------------------------------------------ request building


def build_chat_request(request: ModelRequest, *, model: str, stream: bool) -> bytes:
    """The JSON body of a Chat Completions call for ``request``.

    Args:
        request: What to ask.
        model: The model name to send.
        stream: Whether to ask for a server-sent event stream (with usage at the end).

    Returns:
        The encoded body.
    """
    messages: list[_OutMessage] = []
    if request.system:
        messages.append(_OutMessage(role="system", content=request.system))
    for message in request.messages:
        messages.extend(_messages(message))
    body = _ChatRequest(
        model=model,
        messages=messages,
        stream=stream,
        stream_options=_StreamOptions(include_usage=True) if stream else None,
        temperature=request.temperature,
        max_tokens=request.max_tokens,
        stop=list(request.stop) or None,
    )
    if request.tools:
        body.tools = [_tool(spec) for spec in request.tools]
        body.tool_choice = _tool_choice(request.tool_choice)
    if request.response_schema is not None:
        body.response_format = _ResponseFormat(
            json_schema=_JsonSchema(name="response", schema=request.response_schema, strict=True)
        )
    return _encoder.encode(body)


def _messages(message: ChatMessage) -> Iterator[_OutMessage]:
    """One chat message as OpenAI messages: tool results first, one ``tool`` message each."""
    for block in message.content:
        if isinstance(block, ToolResultBlock):
            yield _ToolMessage(role="tool", content=block.content, tool_call_id=block.tool_call_id)
    if message.role == "tool":
        return
    calls = [
        _OutToolCall(
            id=b.id,
            function=_FunctionCall(
                name=b.name,
                arguments=b.invalid_arguments
                if b.invalid_arguments is not None
                else _encoder.encode(b.arguments).decode(),
            ),
        )
        for b in message.content
        if isinstance(b, ToolCallBlock)
    ]
    content = _content(message)
    if calls and message.role == "assistant":
        yield _AssistantMessage(role="assistant", content=content or None, tool_calls=calls)
    elif content:
        yield _OutMessage(role=message.role, content=content)


def _content(message: ChatMessage) -> str | list[_TextPart | _ImagePart]:
    """Plain text when the message has only text; parts when it has images too.

    Reasoning is left out: OpenAI-compatible servers take no reasoning back.
    """
    parts: list[_TextPart | _ImagePart] = []
    for block in message.content:
        if isinstance(block, TextBlock):
            parts.append(_TextPart(text=block.text))
        elif isinstance(block, ImageBlock):
            parts.append(_ImagePart(image_url=_ImageURL(url=_image_url(block))))
    if all(isinstance(p, _TextPart) for p in parts):
        return "".join(p.text for p in parts if isinstance(p, _TextPart))
    return parts


def _image_url(block: ImageBlock) -> str:
    if block.url:
        return block.url
    if block.data is None:
        raise BadRequestError("an image block needs data or a url")
    return f"data:{block.media_type};base64,{block.data}"


def _tool(spec: ToolSpec) -> _Tool:
    parameters = spec.parameters or {"type": "object", "properties": {}}
    return _Tool(
        function=_FunctionSpec(name=spec.name, description=spec.description, parameters=parameters)
    )


def _tool_choice(choice: str) -> str | _NamedToolChoice:
    if choice in {"auto", "none", "required"}:
        return choice
    return _NamedToolChoice(function=_ToolName(name=choice))


# ------------------------------------------------------------------ reply parsing


class _OpenCall:
    __slots__ = ("arguments", "given_id", "id", "index", "name", "started")

    def __init__(self, index: int, id: str | None) -> None:
        self.index = index
        self.given_id = bool(id)
        self.id = id or _new_call_id()
        self.name: str | None = None
        self.arguments: list[str] = []
        self.started = False


def _new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class _StreamState:
    """Turns chunks into deltas: the one parser of both streamed and whole replies."""

    def __init__(self, redact: Callable[[str], str] = str) -> None:
        self.model: str | None = None
        self.stop_reason: StopReason | None = None
        self._redact = redact
        self._calls: dict[int, _OpenCall] = {}  # the server's index -> the open call
        self._order: list[_OpenCall] = []

    def feed(self, chunk: _Chunk) -> Iterator[Delta]:
        """The deltas of one chunk (or of one whole reply)."""
        if chunk.error is not None:
            raise _in_stream_error(chunk.error, self._redact)
        if chunk.model:
            self.model = chunk.model
        for choice in chunk.choices or ():
            if choice.index == 0:
                yield from self._choice(choice)
        if chunk.usage is not None:
            yield UsageDelta(usage=_usage(chunk.usage))

    def _choice(self, choice: _Choice) -> Iterator[Delta]:
        message = choice.delta or choice.message
        if message is not None:
            yield from self._message(message, whole=choice.message is not None)
        if choice.finish_reason is not None:
            self.stop_reason = _STOP_REASONS.get(choice.finish_reason, "end_turn")
            yield from self.complete_calls()

    def _message(self, message: _InMessage, *, whole: bool) -> Iterator[Delta]:
        reasoning = message.reasoning_content or message.reasoning
        if reasoning:
            yield ReasoningDelta(text=reasoning)
        if message.content:
            yield TextDelta(text=message.content)
        if message.refusal:
            yield TextDelta(text=message.refusal)
        if message.function_call is not None:
            raise MalformedResponseError(
                "openai: the reply calls a function the legacy way (function_call); moot "
                "asks with tools and reads tool_calls"
            )
        for position, call in enumerate(message.tool_calls or ()):
            # A whole message's calls carry no index: their position is their index.
            yield from self._call(call, position if whole else call.index)

    def _call(self, chunk: _InToolCall, index: int | None) -> Iterator[Delta]:
        function = chunk.function or _InFunction()
        call = self._call_for(chunk, index)
        if function.name and not call.started:
            call.name = function.name
        if function.arguments:
            call.arguments.append(function.arguments)
        if not call.started and call.name:
            call.started = True
            yield ToolCallStart(index=call.index, id=call.id, name=call.name)
            if call.arguments:
                yield ToolCallDelta(index=call.index, arguments="".join(call.arguments))
        elif call.started and function.arguments:
            yield ToolCallDelta(index=call.index, arguments=function.arguments)

    def _call_for(self, chunk: _InToolCall, index: int | None) -> _OpenCall:
        """The open call this fragment belongs to, or a new one.

        A fragment with an id that differs from the open call's at the same index is a
        new call (some servers number every parallel call 0). A fragment without an
        index continues the last call, unless it brings an id of its own.
        """
        if index is None:
            last = self._order[-1] if self._order else None
            if last is not None and (not chunk.id or chunk.id == last.id):
                return last
            index = -len(self._order) - 1  # a key no numbered call uses
        call = self._calls.get(index)
        if call is None or (chunk.id and call.given_id and chunk.id != call.id):
            call = _OpenCall(len(self._order), chunk.id)
            self._calls[index] = call
            self._order.append(call)
        return call

    def complete_calls(self) -> Iterator[Delta]:
        """A :class:`ToolCallComplete` for every call still open, in the order they began."""
        for call in self._order:
            if not call.started:
                raise MalformedResponseError("openai: a tool call without a name")
            block = tool_call_block(call.id, call.name or "", "".join(call.arguments))
            if block.invalid_arguments is not None and self.stop_reason == "max_tokens":
                raise cut_off("openai", block.name)
            yield ToolCallComplete(index=call.index, call=block)
        self._calls.clear()
        self._order.clear()

    def finish(self, model: str | None = None) -> Finished:
        """The closing delta; ``model`` stands in when the server did not name one."""
        return Finished(stop_reason=self.stop_reason or "end_turn", model=self.model or model)


def _usage(usage: _InUsage) -> Usage:
    prompt = usage.prompt_tokens_details
    completion = usage.completion_tokens_details
    return Usage(
        input_tokens=usage.prompt_tokens or 0,
        output_tokens=usage.completion_tokens or 0,
        reasoning_tokens=completion.reasoning_tokens if completion else None,
        cache_read_tokens=prompt.cached_tokens if prompt else None,
    )


def _in_stream_error(error: _InError, redact: Callable[[str], str]) -> Exception:
    status = error.code if isinstance(error.code, int) and 400 <= error.code < 600 else 500
    detail = ": ".join(x for x in (error.type, error.message) if x)
    return error_for_status(status, redact(detail), provider="openai")


def reply_deltas(
    reply: bytes | str, *, model: str | None = None, redact: Callable[[str], str] = str
) -> Iterator[Delta]:
    """The deltas of a whole (non-streaming) Chat Completions reply, ending with Finished.

    Args:
        reply: The JSON body of a ``chat.completion``.
        model: The model asked for, named in Finished if the reply names none.
        redact: Scrubs secrets from the messages of errors the reply carries.

    Raises:
        MalformedResponseError: the body is not a chat completion.
        ProviderError: the body is an error.
    """
    state = _StreamState(redact)
    yield from state.feed(_decode_chunk(reply))
    yield from state.complete_calls()
    yield state.finish(model)


# ------------------------------------------------------------------ the provider


class OpenAIProvider(HttpProvider):
    """A model behind an OpenAI-compatible Chat Completions API.

    Safe to call from several threads at once; each call takes its own connection from
    one pool.

    Args:
        base_url: The API root, e.g. ``http://127.0.0.1:8080/v1`` (default:
            ``$OPENAI_BASE_URL``, else OpenAI's).
        model: The model to ask (default: ``$OPENAI_MODEL``).
        api_key: The key, sent as a bearer token (default: the ``api_key_env`` variable;
            none at all is fine for local servers).
        api_key_env: The environment variable holding the key.
        client: An :class:`httpx.Client` to use (never closed by the provider).
        retry: When to try a failed call again.
        connect_timeout: Seconds to connect.
        read_timeout: Seconds of silence allowed while waiting for the reply.
        timeout: Seconds a whole call may take, retries included (None: no limit
            besides the request's ``timeout_s`` and the caller's deadline).

    Raises:
        ConfigurationError: no model was given or found in the environment.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        *,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        client: httpx.Client | None = None,
        retry: RetryPolicy | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        timeout: float | None = None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip(
            "/"
        )
        key = api_key if api_key is not None else os.environ.get(api_key_env)
        key = key.strip() if key else key  # a key read from a file ends with a newline
        self._setup(
            model=model,
            model_env="OPENAI_MODEL",
            key=key,
            url=f"{self.base_url}/chat/completions",
            headers={"authorization": f"Bearer {key}"} if key else {},
            client=client,
            retry=retry,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            timeout=timeout,
        )

    def stream(self, request: ModelRequest, *, deadline: float | None = None) -> Iterator[Delta]:
        """Yield the reply's deltas as they arrive, ending with :class:`Finished`.

        Args:
            request: What to ask.
            deadline: A :func:`time.monotonic` instant the call must end by.

        Raises:
            ProviderError: the call failed; :class:`ConnectionLostError` if the stream
                ended before the reply did.
        """
        call_deadline = self._endpoint.deadline(request.timeout_s, deadline)
        body = build_chat_request(request, model=self._model, stream=True)
        state = _StreamState(self._endpoint.redact)
        events = self._endpoint.events(body, headers=request.extra_headers, deadline=call_deadline)
        done = False
        try:
            for event in events:
                if event.data.strip() == "[DONE]":
                    done = True
                    break
                if event.data:
                    yield from state.feed(_decode_chunk(event.data))
            else:
                if state.stop_reason is None:
                    raise ConnectionLostError("openai: the stream ended before the reply did")
        finally:
            if done:
                drain(events)  # in the background: the reply is complete; it closes them
            else:
                events.close()
        yield from state.complete_calls()
        yield state.finish(self._model)

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
        body = build_chat_request(request, model=self._model, stream=False)
        reply = self._endpoint.post(body, headers=request.extra_headers, deadline=call_deadline)
        return assemble(reply_deltas(reply, model=self._model, redact=self._endpoint.redact))
