"""AnthropicProvider: parsing recorded Messages API streams, and the requests it builds."""

from __future__ import annotations

import itertools
import json
from typing import TYPE_CHECKING, Any

import httpx
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moot.actors._anthropic import AnthropicProvider
from moot.actors._errors import (
    AuthenticationError,
    BadRequestError,
    ConnectionLostError,
    MalformedResponseError,
    RateLimitError,
    ServerError,
)
from moot.actors._model import (
    Delta,
    Finished,
    ModelRequest,
    ModelResponse,
    ReasoningDelta,
    ToolCallComplete,
    ToolCallDelta,
    ToolCallStart,
    UsageDelta,
    call_model,
)
from moot.events import (
    ChatMessage,
    ImageBlock,
    ReasoningBlock,
    TextBlock,
    ToolCallBlock,
    ToolResultBlock,
    ToolSpec,
    Usage,
)
from tests.sse_server import Reply, ScriptedServer

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

# ---------------------------------------------------------------- recorded replies


def event(kind: str, **fields: Any) -> tuple[str, str]:
    return kind, json.dumps({"type": kind, **fields}, ensure_ascii=False)


def block_delta(index: int, **delta: Any) -> tuple[str, str]:
    return event("content_block_delta", index=index, delta=delta)


START_USAGE = {
    "input_tokens": 25,
    "output_tokens": 1,
    "cache_creation_input_tokens": 7,
    "cache_read_input_tokens": 100,
}

#: Thinking with a signature, multibyte text, and two tool calls whose JSON arrives in
#: many pieces, with pings in between, as the API streams them.
RECORDED_EVENTS = [
    event(
        "message_start",
        message={
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": "claude-test-1",
            "content": [],
            "stop_reason": None,
            "usage": START_USAGE,
        },
    ),
    event("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""}),
    block_delta(0, type="thinking_delta", thinking="Zürich → "),
    block_delta(0, type="thinking_delta", thinking="weather."),
    block_delta(0, type="signature_delta", signature="EqQBCgIYAhIM1gbcDa9GJwZA2b3h"),
    event("content_block_stop", index=0),
    event("ping"),
    event("content_block_start", index=1, content_block={"type": "text", "text": ""}),
    block_delta(1, type="text_delta", text="Grüße aus "),
    block_delta(1, type="text_delta", text="東京 🌍!"),
    event("content_block_stop", index=1),
    event(
        "content_block_start",
        index=2,
        content_block={"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {}},
    ),
    block_delta(2, type="input_json_delta", partial_json=""),
    block_delta(2, type="input_json_delta", partial_json='{"ci'),
    block_delta(2, type="input_json_delta", partial_json='ty": "Zü'),
    block_delta(2, type="input_json_delta", partial_json='rich", "unit": "°C"}'),
    event("content_block_stop", index=2),
    event(
        "content_block_start",
        index=3,
        content_block={"type": "tool_use", "id": "toolu_01B", "name": "search", "input": {}},
    ),
    block_delta(3, type="input_json_delta", partial_json='{"q": "naïve 🐍",'),
    block_delta(3, type="input_json_delta", partial_json=' "n": 3}'),
    event("content_block_stop", index=3),
    event(
        "message_delta",
        delta={"stop_reason": "tool_use", "stop_sequence": None},
        usage={"output_tokens": 89},
    ),
    event("message_stop"),
]


def sse(*events: tuple[str, str]) -> bytes:
    return "".join(f"event: {name}\ndata: {data}\n\n" for name, data in events).encode()


RECORDED = sse(*RECORDED_EVENTS)

EXPECTED = ModelResponse(
    content=(
        ReasoningBlock(text="Zürich → weather.", signature="EqQBCgIYAhIM1gbcDa9GJwZA2b3h"),
        TextBlock(text="Grüße aus 東京 🌍!"),
        ToolCallBlock(
            id="toolu_01A", name="get_weather", arguments={"city": "Zürich", "unit": "°C"}
        ),
        ToolCallBlock(id="toolu_01B", name="search", arguments={"q": "naïve 🐍", "n": 3}),
    ),
    usage=Usage(input_tokens=132, output_tokens=89, cache_read_tokens=100, cache_write_tokens=7),
    stop_reason="tool_use",
    model="claude-test-1",
)

RECORDED_WHOLE = {
    "id": "msg_01",
    "type": "message",
    "role": "assistant",
    "model": "claude-test-1",
    "content": [
        {
            "type": "thinking",
            "thinking": "Zürich → weather.",
            "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3h",
        },
        {"type": "text", "text": "Grüße aus 東京 🌍!"},
        {
            "type": "tool_use",
            "id": "toolu_01A",
            "name": "get_weather",
            "input": {"city": "Zürich", "unit": "°C"},
        },
        {
            "type": "tool_use",
            "id": "toolu_01B",
            "name": "search",
            "input": {"q": "naïve 🐍", "n": 3},
        },
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {**START_USAGE, "output_tokens": 89},
}

HELLO = ModelRequest(messages=(ChatMessage.text("user", "Hi"),))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def mock_provider(
    respond: Callable[[httpx.Request], httpx.Response], **kwargs: Any
) -> AnthropicProvider:
    client = httpx.Client(transport=httpx.MockTransport(respond))
    return AnthropicProvider(
        "claude-test-1", base_url="http://test.invalid", client=client, **kwargs
    )


def streaming(pieces: list[bytes]) -> Callable[[httpx.Request], httpx.Response]:
    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=iter(pieces)
        )

    return respond


def without_latency(response: ModelResponse) -> ModelResponse:
    return msgspec.structs.replace(response, latency_ms=None)


def message_start() -> tuple[str, str]:
    return event(
        "message_start",
        message={"model": "claude-test-1", "content": [], "usage": {"input_tokens": 5}},
    )


def text_reply(stop_reason: str) -> bytes:
    return sse(
        message_start(),
        event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        block_delta(0, type="text_delta", text="x"),
        event("content_block_stop", index=0),
        event("message_delta", delta={"stop_reason": stop_reason}, usage={"output_tokens": 1}),
        event("message_stop"),
    )


# ---------------------------------------------------------------- parsing


def test_a_recorded_stream_becomes_the_expected_deltas() -> None:
    deltas = list(mock_provider(streaming([RECORDED])).stream(HELLO))
    assert deltas[0] == UsageDelta(
        usage=Usage(input_tokens=132, output_tokens=1, cache_read_tokens=100, cache_write_tokens=7)
    )
    assert [d for d in deltas if isinstance(d, ReasoningDelta)] == [
        ReasoningDelta(text="Zürich → "),
        ReasoningDelta(text="weather."),
        ReasoningDelta(signature="EqQBCgIYAhIM1gbcDa9GJwZA2b3h"),
    ]
    assert [d for d in deltas if isinstance(d, ToolCallStart)] == [
        ToolCallStart(index=2, id="toolu_01A", name="get_weather"),
        ToolCallStart(index=3, id="toolu_01B", name="search"),
    ]
    fragments = [d for d in deltas if isinstance(d, ToolCallDelta)]
    assert len(fragments) == 5
    assert [d.call for d in deltas if isinstance(d, ToolCallComplete)] == list(EXPECTED.tool_calls)
    # Each call completes at its content_block_stop, before the next call starts.
    complete_a = next(i for i, d in enumerate(deltas) if isinstance(d, ToolCallComplete))
    start_b = deltas.index(ToolCallStart(index=3, id="toolu_01B", name="search"))
    assert complete_a < start_b
    assert deltas[-2] == UsageDelta(usage=EXPECTED.usage)
    assert deltas[-1] == Finished(stop_reason="tool_use", model="claude-test-1")


def test_the_assembled_stream_is_the_expected_response() -> None:
    response = call_model(mock_provider(streaming([RECORDED])), HELLO)
    assert without_latency(response) == EXPECTED


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(RECORDED)), max_size=40))
def test_any_split_of_the_bytes_gives_the_same_response(cuts: list[int]) -> None:
    response = call_model(mock_provider(streaming(split(RECORDED, cuts))), HELLO)
    assert without_latency(response) == EXPECTED


def test_one_byte_at_a_time_splits_every_multibyte_character() -> None:
    pieces = [RECORDED[i : i + 1] for i in range(len(RECORDED))]
    assert without_latency(call_model(mock_provider(streaming(pieces)), HELLO)) == EXPECTED


def test_a_non_streaming_reply_gives_the_same_response_as_the_stream() -> None:
    seen: list[httpx.Request] = []

    def respond(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=RECORDED_WHOLE)

    provider = mock_provider(respond)
    whole = provider.complete(HELLO)
    assert whole == EXPECTED
    assert without_latency(call_model(mock_provider(streaming([RECORDED])), HELLO)) == whole
    assert "stream" not in json.loads(seen[0].content)


@pytest.mark.parametrize(
    ("reason", "stop_reason"),
    [
        ("end_turn", "end_turn"),
        ("max_tokens", "max_tokens"),
        ("stop_sequence", "stop_sequence"),
        ("tool_use", "tool_use"),
        ("pause_turn", "end_turn"),
        ("refusal", "end_turn"),
    ],
)
def test_stop_reasons(reason: str, stop_reason: str) -> None:
    deltas = list(mock_provider(streaming([text_reply(reason)])).stream(HELLO))
    assert deltas[-1] == Finished(stop_reason=stop_reason, model="claude-test-1")  # type: ignore[arg-type]


def test_usage_is_a_merged_snapshot() -> None:
    deltas = list(mock_provider(streaming([text_reply("end_turn")])).stream(HELLO))
    usages = [d.usage for d in deltas if isinstance(d, UsageDelta)]
    assert usages == [Usage(input_tokens=5), Usage(input_tokens=5, output_tokens=1)]


@pytest.mark.parametrize(
    ("kind", "error_type", "retryable"),
    [
        ("overloaded_error", ServerError, True),
        ("api_error", ServerError, True),
        ("rate_limit_error", RateLimitError, True),
        ("invalid_request_error", BadRequestError, False),
        ("authentication_error", AuthenticationError, False),
    ],
)
def test_an_error_event_raises_the_matching_error(
    kind: str, error_type: type[Exception], retryable: bool
) -> None:
    body = sse(
        message_start(),
        event("error", error={"type": kind, "message": "Overloaded"}),
    )
    calls = 0

    def respond(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return streaming([body])(request)

    got: list[Delta] = []
    with pytest.raises(error_type, match="Overloaded") as caught:
        got.extend(mock_provider(respond).stream(HELLO))
    assert caught.value.retryable is retryable  # type: ignore[attr-defined]
    assert calls == 1  # the stream had begun: not retried
    assert got == [UsageDelta(usage=Usage(input_tokens=5))]


def test_a_stream_without_message_stop_is_a_lost_connection() -> None:
    body = sse(message_start(), block_delta(0, type="text_delta", text="half"))
    with pytest.raises(ConnectionLostError):
        list(mock_provider(streaming([body])).stream(HELLO))


def test_unknown_events_and_blocks_are_skipped() -> None:
    body = sse(
        message_start(),
        event("content_block_start", index=0, content_block={"type": "a_future_block", "x": 1}),
        event("content_block_stop", index=0),
        event("something_new", anything=1),
        event("content_block_start", index=1, content_block={"type": "text", "text": ""}),
        block_delta(1, type="citations_delta", citation={}),
        block_delta(1, type="text_delta", text="ok"),
        event("content_block_stop", index=1),
        event("message_delta", delta={"stop_reason": "end_turn"}),
        event("message_stop"),
    )
    response = call_model(mock_provider(streaming([body])), HELLO)
    assert response.content == (TextBlock(text="ok"),)


REDACTED = "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr3qpP"


def test_redacted_thinking_is_kept_whole_streamed_or_not() -> None:
    """Encrypted reasoning comes as one block with no deltas; it must be kept as it is
    (the API wants it back with the tool results), apart from the thinking beside it."""
    body = sse(
        message_start(),
        event("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""}),
        block_delta(0, type="thinking_delta", thinking="Let me see."),
        block_delta(0, type="signature_delta", signature="sig-9"),
        event("content_block_stop", index=0),
        event(
            "content_block_start",
            index=1,
            content_block={"type": "redacted_thinking", "data": REDACTED},
        ),
        event("content_block_stop", index=1),
        event(
            "content_block_start",
            index=2,
            content_block={"type": "tool_use", "id": "toolu_9", "name": "now", "input": {}},
        ),
        event("content_block_stop", index=2),
        event("message_delta", delta={"stop_reason": "tool_use"}),
        event("message_stop"),
    )
    expected = (
        ReasoningBlock(text="Let me see.", signature="sig-9"),
        ReasoningBlock(text="", redacted=REDACTED),
        ToolCallBlock(id="toolu_9", name="now"),
    )
    assert call_model(mock_provider(streaming([body])), HELLO).content == expected
    whole = {
        "type": "message",
        "role": "assistant",
        "model": "claude-test-1",
        "content": [
            {"type": "thinking", "thinking": "Let me see.", "signature": "sig-9"},
            {"type": "redacted_thinking", "data": REDACTED},
            {"type": "tool_use", "id": "toolu_9", "name": "now", "input": {}},
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 3, "output_tokens": 4},
    }
    provider = mock_provider(lambda _request: httpx.Response(200, json=whole))
    assert provider.complete(HELLO).content == expected


def test_a_malformed_event_and_arguments_for_a_non_tool_block() -> None:
    with pytest.raises(MalformedResponseError):
        list(mock_provider(streaming([sse(("message_start", "{not json"))])).stream(HELLO))
    body = sse(message_start(), block_delta(0, type="input_json_delta", partial_json="{}"))
    with pytest.raises(MalformedResponseError, match="not a tool_use"):
        list(mock_provider(streaming([body])).stream(HELLO))


def one_tool_call(name: str, partial_json: str, stop_reason: str) -> bytes:
    """A streamed reply holding one tool_use block whose input is ``partial_json``."""
    return sse(
        message_start(),
        event(
            "content_block_start",
            index=0,
            content_block={"type": "tool_use", "id": "toolu_1", "name": name, "input": {}},
        ),
        block_delta(0, type="input_json_delta", partial_json=partial_json),
        event("content_block_stop", index=0),
        event("message_delta", delta={"stop_reason": stop_reason}, usage={"output_tokens": 5}),
        event("message_stop"),
    )


def test_tool_use_input_that_is_not_json_is_kept_for_an_error_result() -> None:
    body = one_tool_call("f", '{"a": tru', "tool_use")
    deltas = list(mock_provider(streaming([body])).stream(HELLO))
    calls = [d.call for d in deltas if isinstance(d, ToolCallComplete)]
    assert calls == [ToolCallBlock(id="toolu_1", name="f", invalid_arguments='{"a": tru')]


def test_a_tool_call_cut_at_max_tokens_says_so_as_openai_does() -> None:
    body = one_tool_call("add", '{"a": 2, "b', "max_tokens")
    with pytest.raises(MalformedResponseError, match=r"cut off at max_tokens.*'add'"):
        call_model(mock_provider(streaming([body])), HELLO)


def test_a_whole_reply_that_is_an_error_or_not_utf8_raises() -> None:
    """An error body with status 200 is the error it names, as in a stream."""
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    provider = mock_provider(lambda request: httpx.Response(200, json=error))
    with pytest.raises(ServerError, match="overloaded_error: Overloaded") as caught:
        provider.complete(HELLO)
    assert caught.value.status_code == 529
    odd = mock_provider(lambda request: httpx.Response(200, json={"type": "completion"}))
    with pytest.raises(MalformedResponseError, match="'completion', not a message"):
        odd.complete(HELLO)
    latin = mock_provider(lambda request: httpx.Response(200, content=b'{"model": "caf\xe9"}'))
    with pytest.raises(MalformedResponseError, match="can't decode byte 0xe9"):
        latin.complete(HELLO)


# ---------------------------------------------------------------- requests


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer(Reply(chunks=[text_reply("end_turn")])) as running:
        yield running


WEATHER = ToolSpec(
    name="get_weather",
    description="Weather for a city.",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}},
)
CLOCK = ToolSpec(name="now")


def full_request(**overrides: Any) -> ModelRequest:
    messages = (
        ChatMessage.text("system", "Answer in German."),
        ChatMessage(
            role="user",
            content=(
                TextBlock(text="What is this?"),
                TextBlock(text=""),
                ImageBlock(media_type="image/png", data="iVBORw0KGgo="),
                ImageBlock(media_type="image/jpeg", url="https://example.invalid/cat.jpg"),
            ),
        ),
        ChatMessage(
            role="assistant",
            content=(
                ReasoningBlock(text="I should look.", signature="sig-1"),
                ReasoningBlock(text="", redacted="opaque-1"),
                ReasoningBlock(text="unsigned, from another model"),
                TextBlock(text="Checking."),
                ToolCallBlock(id="toolu_1", name="get_weather", arguments={"city": "Zürich"}),
                ToolCallBlock(id="toolu_2", name="now"),
            ),
        ),
        ChatMessage(
            role="tool",
            content=(
                ToolResultBlock(tool_call_id="toolu_1", content="12 °C"),
                ToolResultBlock(tool_call_id="toolu_2", content="clock broke", is_error=True),
            ),
        ),
        ChatMessage.text("user", "Thanks."),
    )
    fields: dict[str, Any] = {
        "messages": messages,
        "system": "You are terse.",
        "tools": (WEATHER, CLOCK),
        "tool_choice": "required",
        "temperature": 0.3,
        "stop": ("END",),
        "response_schema": {"type": "object", "properties": {"a": {"type": "string"}}},
        "extra_headers": {"anthropic-beta": "some-feature"},
    }
    return ModelRequest(**(fields | overrides))


def test_the_request_body_the_server_receives(server: ScriptedServer) -> None:
    provider = AnthropicProvider(
        "claude-test-1", api_key="sk-ant-test-0001", base_url=server.url + "/"
    )
    with provider:
        call_model(provider, full_request())
    (received,) = server.requests
    assert (received.method, received.path) == ("POST", "/v1/messages")
    assert received.headers["x-api-key"] == "sk-ant-test-0001"
    assert received.headers["anthropic-version"] == "2023-06-01"
    assert received.headers["anthropic-beta"] == "some-feature"
    assert received.json == {
        "model": "claude-test-1",
        "max_tokens": 1024,
        "system": "You are terse.\n\nAnswer in German.",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {
                        "type": "image",
                        "source": {
                            "type": "base64",
                            "media_type": "image/png",
                            "data": "iVBORw0KGgo=",
                        },
                    },
                    {
                        "type": "image",
                        "source": {"type": "url", "url": "https://example.invalid/cat.jpg"},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "I should look.", "signature": "sig-1"},
                    {"type": "redacted_thinking", "data": "opaque-1"},
                    {"type": "text", "text": "Checking."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "get_weather",
                        "input": {"city": "Zürich"},
                    },
                    {"type": "tool_use", "id": "toolu_2", "name": "now", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "12 °C"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "content": "clock broke",
                        "is_error": True,
                    },
                    {"type": "text", "text": "Thanks."},
                ],
            },
        ],
        "tools": [
            {
                "name": "get_weather",
                "description": "Weather for a city.",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
            {
                "name": "now",
                "description": "",
                "input_schema": {"type": "object", "properties": {}},
            },
        ],
        "tool_choice": {"type": "any"},
        "temperature": 0.3,
        "stop_sequences": ["END"],
        "stream": True,
        "output_config": {
            "format": {
                "type": "json_schema",
                "schema": {"type": "object", "properties": {"a": {"type": "string"}}},
            }
        },
    }


@pytest.mark.parametrize(
    ("choice", "sent"),
    [
        ("auto", {"type": "auto"}),
        ("none", {"type": "none"}),
        ("required", {"type": "any"}),
        ("get_weather", {"type": "tool", "name": "get_weather"}),
    ],
)
def test_tool_choice(server: ScriptedServer, choice: str, sent: object) -> None:
    request = ModelRequest(messages=HELLO.messages, tools=(WEATHER,), tool_choice=choice)
    with AnthropicProvider("m", base_url=server.url) as provider:
        call_model(provider, request)
    assert server.requests[0].json["tool_choice"] == sent


def test_a_minimal_request_and_the_options_of_the_provider() -> None:
    with (
        ScriptedServer(Reply.json(RECORDED_WHOLE)) as server,
        AnthropicProvider(
            "m",
            api_key="",
            base_url=server.url + "/v1",
            max_tokens=2048,
            anthropic_version="2099-01-01",
            thinking_budget=1500,
        ) as provider,
    ):
        assert without_latency(call_model(provider, HELLO, stream=False)) == EXPECTED
        call_model(provider, msgspec.structs.replace(HELLO, max_tokens=77), stream=False)
    first, second = server.requests
    assert first.path == "/v1/messages"
    assert first.json == {
        "model": "m",
        "max_tokens": 2048,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "thinking": {"type": "enabled", "budget_tokens": 1500},
    }
    assert second.json["max_tokens"] == 77
    assert first.headers["anthropic-version"] == "2099-01-01"
    assert "x-api-key" not in first.headers


def test_an_error_event_never_shows_the_key() -> None:
    key = "sk-test-SECRET123"
    body = sse(event("error", error={"type": "authentication_error", "message": f"bad {key}"}))
    provider = mock_provider(streaming([body]), api_key=key)
    with pytest.raises(AuthenticationError) as caught:
        list(provider.stream(HELLO))
    assert key not in str(caught.value) and "[redacted]" in str(caught.value)


def test_an_image_without_data_or_url_is_a_bad_request() -> None:
    image = ChatMessage(role="user", content=(ImageBlock(media_type="image/png"),))
    with pytest.raises(BadRequestError, match="image"):
        list(mock_provider(streaming([])).stream(ModelRequest(messages=(image,))))
