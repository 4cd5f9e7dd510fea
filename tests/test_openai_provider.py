"""OpenAIProvider: parsing recorded Chat Completions streams, and the requests it builds."""

from __future__ import annotations

import itertools
import json
from typing import TYPE_CHECKING, Any

import httpx
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moot.actors._errors import (
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    ConnectionLostError,
    MalformedResponseError,
    ServerError,
)
from moot.actors._model import (
    Delta,
    Finished,
    ModelRequest,
    ModelResponse,
    ReasoningDelta,
    TextDelta,
    ToolCallComplete,
    ToolCallDelta,
    ToolCallStart,
    UsageDelta,
    call_model,
)
from moot.actors._openai import OpenAIProvider, build_chat_request
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


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> str:
    """One chat.completion.chunk as a server writes it (raw UTF-8, not \\u escapes)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    body = {
        "id": "chatcmpl-7",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-test-1",
        "choices": choices,
        **extra,
    }
    return json.dumps(body, ensure_ascii=False)


def call_fragment(
    index: int, arguments: str, id: str | None = None, name: str | None = None
) -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if id is not None:
        call |= {"id": id, "type": "function"}
        call["function"]["name"] = name
    return {"tool_calls": [call]}


USAGE = {
    "prompt_tokens": 120,
    "completion_tokens": 48,
    "total_tokens": 168,
    "prompt_tokens_details": {"cached_tokens": 64},
    "completion_tokens_details": {"reasoning_tokens": 12},
}

#: A reply with reasoning, multibyte text, and two parallel tool calls whose arguments
#: arrive in many pieces (one of them cut inside a multibyte character's escape-free
#: UTF-8), then usage in a last chunk with no choices.
RECORDED_EVENTS = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"reasoning_content": "The user wants "}),
    chunk({"reasoning_content": "weather — für Zürich."}),
    chunk({"content": "Grüße aus "}),
    chunk({"content": "東京 🌍! "}),
    chunk(call_fragment(0, "", id="call_abc", name="get_weather")),
    chunk(call_fragment(0, '{"ci')),
    chunk(call_fragment(0, 'ty": "Zü')),
    chunk(call_fragment(0, 'rich", "unit')),
    chunk(call_fragment(0, '": "°C"}')),
    chunk(call_fragment(1, '{"q"', id="9f8e7d", name="search")),
    chunk(call_fragment(1, ': "naïve 🐍",')),
    chunk(call_fragment(1, ' "n": 3}')),
    chunk({}, finish="tool_calls"),
    chunk(None, usage=USAGE),
    "[DONE]",
]
RECORDED = "".join(f"data: {e}\n\n" for e in RECORDED_EVENTS).encode()

EXPECTED = ModelResponse(
    content=(
        ReasoningBlock(text="The user wants weather — für Zürich."),
        TextBlock(text="Grüße aus 東京 🌍! "),
        ToolCallBlock(
            id="call_abc", name="get_weather", arguments={"city": "Zürich", "unit": "°C"}
        ),
        ToolCallBlock(id="9f8e7d", name="search", arguments={"q": "naïve 🐍", "n": 3}),
    ),
    usage=Usage(input_tokens=120, output_tokens=48, reasoning_tokens=12, cache_read_tokens=64),
    stop_reason="tool_use",
    model="gpt-test-1",
)

#: The same reply as one non-streaming chat.completion.
RECORDED_WHOLE = {
    "id": "chatcmpl-7",
    "object": "chat.completion",
    "model": "gpt-test-1",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Grüße aus 東京 🌍! ",
                "reasoning_content": "The user wants weather — für Zürich.",
                "tool_calls": [
                    {
                        "id": "call_abc",
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": '{"city": "Zürich", "unit": "°C"}',
                        },
                    },
                    {
                        "id": "9f8e7d",
                        "type": "function",
                        "function": {"name": "search", "arguments": '{"q": "naïve 🐍", "n": 3}'},
                    },
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
    "usage": USAGE,
}

HELLO = ModelRequest(messages=(ChatMessage.text("user", "Hi"),))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (anywhere, also inside a UTF-8 character)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def mock_provider(
    respond: Callable[[httpx.Request], httpx.Response], **kwargs: Any
) -> OpenAIProvider:
    client = httpx.Client(transport=httpx.MockTransport(respond))
    return OpenAIProvider("http://test.invalid/v1", "gpt-test-1", client=client, **kwargs)


def streaming(pieces: list[bytes]) -> Callable[[httpx.Request], httpx.Response]:
    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=iter(pieces)
        )

    return respond


def sse(*events: str) -> bytes:
    return "".join(f"data: {e}\n\n" for e in events).encode()


def deltas_of(provider: OpenAIProvider, request: ModelRequest = HELLO) -> list[Delta]:
    return list(provider.stream(request))


def without_latency(response: ModelResponse) -> ModelResponse:
    return msgspec.structs.replace(response, latency_ms=None)


# ---------------------------------------------------------------- parsing


def test_a_recorded_stream_becomes_the_expected_deltas() -> None:
    deltas = deltas_of(mock_provider(streaming([RECORDED])))
    starts = [d for d in deltas if isinstance(d, ToolCallStart)]
    fragments = [d for d in deltas if isinstance(d, ToolCallDelta)]
    completes = [d for d in deltas if isinstance(d, ToolCallComplete)]
    assert [(s.index, s.id, s.name) for s in starts] == [
        (0, "call_abc", "get_weather"),
        (1, "9f8e7d", "search"),
    ]
    assert "".join(f.arguments for f in fragments if f.index == 0) == (
        '{"city": "Zürich", "unit": "°C"}'
    )
    assert len(fragments) == 7  # the second call starts with its first fragment
    assert [c.call for c in completes] == list(EXPECTED.tool_calls)
    assert [d.text for d in deltas if isinstance(d, ReasoningDelta)] == [
        "The user wants ",
        "weather — für Zürich.",
    ]
    assert [d for d in deltas if isinstance(d, UsageDelta)] == [UsageDelta(usage=EXPECTED.usage)]
    assert deltas[-1] == Finished(stop_reason="tool_use", model="gpt-test-1")
    # The calls are complete when finish_reason arrives, before the usage chunk.
    assert deltas.index(completes[-1]) < deltas.index(UsageDelta(usage=EXPECTED.usage))


def test_the_assembled_stream_is_the_expected_response() -> None:
    provider = mock_provider(streaming([RECORDED]))
    assert without_latency(call_model(provider, HELLO)) == EXPECTED


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(RECORDED)), max_size=40))
def test_any_split_of_the_bytes_gives_the_same_response(cuts: list[int]) -> None:
    provider = mock_provider(streaming(split(RECORDED, cuts)))
    assert without_latency(call_model(provider, HELLO)) == EXPECTED


def test_one_byte_at_a_time_splits_every_multibyte_character() -> None:
    pieces = [RECORDED[i : i + 1] for i in range(len(RECORDED))]
    assert without_latency(call_model(mock_provider(streaming(pieces)), HELLO)) == EXPECTED


def test_a_non_streaming_reply_gives_the_same_response_as_the_stream() -> None:
    seen: list[httpx.Request] = []

    def respond(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=RECORDED_WHOLE)

    provider = mock_provider(respond)
    assert provider.complete(HELLO) == EXPECTED
    streamed = call_model(mock_provider(streaming([RECORDED])), HELLO)
    assert without_latency(streamed) == provider.complete(HELLO)
    assert "stream" not in json.loads(seen[0].content)


def test_tolerates_what_local_servers_send() -> None:
    # llama.cpp style: content "" next to tool calls, ids without "call_", `timings`,
    # and a call without any id at all.
    events = [
        chunk({"role": "assistant", "content": None}, timings={"predicted_ms": 12.5}),
        chunk({"content": "", **call_fragment(0, '{"x": 1}', id="Xy12", name="first")}),
        chunk(
            {
                "content": "",
                "tool_calls": [{"index": 1, "function": {"name": "second", "arguments": "{}"}}],
            }
        ),
        chunk({"content": ""}, finish="tool_calls", timings={"predicted_n": 9}),
        "[DONE]",
    ]
    response = call_model(mock_provider(streaming([sse(*events)])), HELLO)
    first, second = response.tool_calls
    assert (first.id, first.name, first.arguments) == ("Xy12", "first", {"x": 1})
    assert second.name == "second" and second.id.startswith("call_") and len(second.id) > 8
    assert response.text == "" and response.stop_reason == "tool_use"


def test_parallel_calls_all_numbered_zero_stay_separate() -> None:
    events = [
        chunk(call_fragment(0, '{"a":', id="c1", name="one")),
        chunk(call_fragment(0, " 1}")),
        chunk(call_fragment(0, '{"b": 2}', id="c2", name="two")),
        chunk({}, finish="tool_calls"),
        "[DONE]",
    ]
    response = call_model(mock_provider(streaming([sse(*events)])), HELLO)
    assert [(c.id, c.name, c.arguments) for c in response.tool_calls] == [
        ("c1", "one", {"a": 1}),
        ("c2", "two", {"b": 2}),
    ]


def test_reasoning_in_delta_reasoning_field() -> None:
    events = [
        chunk({"reasoning": "think"}),
        chunk({"content": "ok"}, finish="stop"),
        "[DONE]",
    ]
    response = call_model(mock_provider(streaming([sse(*events)])), HELLO)
    assert response.content == (ReasoningBlock(text="think"), TextBlock(text="ok"))


@pytest.mark.parametrize(
    ("finish", "stop_reason"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("content_filter", "end_turn"),
        ("tool_calls", "tool_use"),
        ("function_call", "tool_use"),
        ("something_new", "end_turn"),
    ],
)
def test_finish_reasons_map_to_stop_reasons(finish: str, stop_reason: str) -> None:
    events = [chunk({"content": "x"}), chunk({}, finish=finish), "[DONE]"]
    deltas = deltas_of(mock_provider(streaming([sse(*events)])))
    assert deltas[-1] == Finished(stop_reason=stop_reason, model="gpt-test-1")  # type: ignore[arg-type]


def test_usage_in_the_finishing_chunk_and_no_done_marker() -> None:
    events = [chunk({"content": "x"}), chunk({}, finish="stop", usage={"prompt_tokens": 3})]
    response = call_model(mock_provider(streaming([sse(*events)])), HELLO)
    assert response.usage == Usage(input_tokens=3)
    assert response.text == "x"


def test_a_stream_that_ends_before_the_reply_is_a_lost_connection() -> None:
    events = [chunk({"content": "half a rep"})]
    provider = mock_provider(streaming([sse(*events)]))
    got: list[Delta] = []
    with pytest.raises(ConnectionLostError) as caught:
        got.extend(provider.stream(HELLO))
    assert caught.value.retryable
    assert got == [TextDelta(text="half a rep")]


def test_an_error_object_in_the_stream_is_raised() -> None:
    error = {"error": {"message": "context too long", "type": "invalid_request", "code": 400}}
    provider = mock_provider(streaming([sse(chunk({"content": "x"}), json.dumps(error))]))
    with pytest.raises(BadRequestError, match="context too long"):
        deltas_of(provider)
    overloaded = {"error": {"message": "overloaded", "type": "server_error"}}
    provider = mock_provider(streaming([sse(json.dumps(overloaded))]))
    with pytest.raises(ServerError) as caught:
        deltas_of(provider)
    assert caught.value.retryable


def test_arguments_that_are_not_json_are_kept_for_an_error_result() -> None:
    """The model's mistake, not a broken reply: the call keeps the text it was sent, the
    loop answers it with an error result, and the text goes back to the model as it was."""
    events = [chunk(call_fragment(0, '{"a": ', id="c", name="f")), chunk({}, finish="tool_calls")]
    deltas = deltas_of(mock_provider(streaming([sse(*events)])))
    (complete,) = [d for d in deltas if isinstance(d, ToolCallComplete)]
    assert complete.call == ToolCallBlock(id="c", name="f", invalid_arguments='{"a": ')
    history = ChatMessage(role="assistant", content=(complete.call,))
    body = build_chat_request(ModelRequest(messages=(history,)), model="m", stream=False)
    sent = msgspec.json.decode(body)["messages"][0]["tool_calls"][0]
    assert sent["function"] == {"name": "f", "arguments": '{"a": '}


def test_a_non_sse_content_type_is_malformed() -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"not": "a stream"})

    with pytest.raises(MalformedResponseError, match="event stream"):
        deltas_of(mock_provider(respond))


# ---------------------------------------------------------------- requests


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    done = sse(chunk({"content": "ok"}, finish="stop"), "[DONE]")
    with ScriptedServer(Reply(chunks=[done])) as running:
        yield running


WEATHER = ToolSpec(
    name="get_weather",
    description="Weather for a city.",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}},
)
CLOCK = ToolSpec(name="now")  # no description, no parameters


def full_request(**overrides: Any) -> ModelRequest:
    messages = (
        ChatMessage(
            role="user",
            content=(
                TextBlock(text="What is in "),
                TextBlock(text="this picture?"),
                ImageBlock(media_type="image/png", data="iVBORw0KGgo="),
                ImageBlock(media_type="image/jpeg", url="https://example.invalid/cat.jpg"),
            ),
        ),
        ChatMessage(
            role="assistant",
            content=(
                ReasoningBlock(text="secret thoughts", signature="sig"),
                TextBlock(text="Let me check."),
                ToolCallBlock(id="call_1", name="get_weather", arguments={"city": "Zürich"}),
                ToolCallBlock(id="call_2", name="now", arguments={}),
            ),
        ),
        ChatMessage(
            role="tool",
            content=(
                ToolResultBlock(tool_call_id="call_1", content="12 °C"),
                ToolResultBlock(tool_call_id="call_2", content="boom", is_error=True),
            ),
        ),
        ChatMessage(role="assistant", content=(ToolCallBlock(id="call_3", name="now"),)),
        ChatMessage(role="user", content=(ToolResultBlock(tool_call_id="call_3", content="noon"),)),
        ChatMessage.text("user", "Thanks. Summarise."),
    )
    fields: dict[str, Any] = {
        "messages": messages,
        "system": "You are terse.",
        "tools": (WEATHER, CLOCK),
        "tool_choice": "auto",
        "temperature": 0.2,
        "max_tokens": 300,
        "stop": ("END", "\n\n"),
        "response_schema": {"type": "object", "properties": {"answer": {"type": "string"}}},
        "extra_headers": {"X-Trace": "t-1"},
    }
    return ModelRequest(**(fields | overrides))


def test_the_request_body_the_server_receives(server: ScriptedServer) -> None:
    provider = OpenAIProvider(server.url + "/v1/", "gpt-test-1", api_key="sk-test-123456")
    with provider:
        call_model(provider, full_request())
    (received,) = server.requests
    assert (received.method, received.path) == ("POST", "/v1/chat/completions")
    assert received.headers["authorization"] == "Bearer sk-test-123456"
    assert received.headers["x-trace"] == "t-1"
    assert received.headers["accept"] == "text/event-stream"
    assert received.json == {
        "model": "gpt-test-1",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in "},
                    {"type": "text", "text": "this picture?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
                    },
                    {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.jpg"}},
                ],
            },
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {
                        "type": "function",
                        "id": "call_1",
                        "function": {"name": "get_weather", "arguments": '{"city":"Zürich"}'},
                    },
                    {
                        "type": "function",
                        "id": "call_2",
                        "function": {"name": "now", "arguments": "{}"},
                    },
                ],
            },
            {"role": "tool", "content": "12 °C", "tool_call_id": "call_1"},
            {"role": "tool", "content": "boom", "tool_call_id": "call_2"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "type": "function",
                        "id": "call_3",
                        "function": {"name": "now", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "content": "noon", "tool_call_id": "call_3"},
            {"role": "user", "content": "Thanks. Summarise."},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather for a city.",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            },
            {
                "type": "function",
                "function": {
                    "name": "now",
                    "description": "",
                    "parameters": {"type": "object", "properties": {}},
                },
            },
        ],
        "tool_choice": "auto",
        "temperature": 0.2,
        "max_tokens": 300,
        "stop": ["END", "\n\n"],
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "response",
                "schema": {"type": "object", "properties": {"answer": {"type": "string"}}},
                "strict": True,
            },
        },
    }


@pytest.mark.parametrize(
    ("choice", "sent"),
    [
        ("none", "none"),
        ("required", "required"),
        ("get_weather", {"type": "function", "function": {"name": "get_weather"}}),
    ],
)
def test_tool_choice(server: ScriptedServer, choice: str, sent: object) -> None:
    request = ModelRequest(messages=HELLO.messages, tools=(WEATHER,), tool_choice=choice)
    with OpenAIProvider(server.url + "/v1", "m") as provider:
        call_model(provider, request)
    assert server.requests[0].json["tool_choice"] == sent


def test_a_minimal_request_sends_only_what_is_set() -> None:
    with (
        ScriptedServer(Reply.json(RECORDED_WHOLE)) as server,
        OpenAIProvider(server.url + "/v1", "m", api_key="") as provider,
    ):
        assert without_latency(call_model(provider, HELLO, stream=False)) == EXPECTED
    received = server.requests[0]
    assert received.json == {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
    assert received.headers["accept"] == "application/json"
    assert "authorization" not in received.headers


def test_base_url_model_and_key_from_the_environment(
    server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/v1")
    monkeypatch.setenv("OPENAI_MODEL", "env-model")
    monkeypatch.setenv("MY_KEY", "sk-from-env-0001")
    with OpenAIProvider(api_key_env="MY_KEY") as provider:
        assert provider.model == "env-model"
        call_model(provider, HELLO)
    assert server.requests[0].headers["authorization"] == "Bearer sk-from-env-0001"
    assert "sk-from-env-0001" not in repr(provider)


def test_no_model_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_MODEL", raising=False)
    with pytest.raises(ConfigurationError, match="model"):
        OpenAIProvider("http://127.0.0.1:9/v1")


def test_an_injected_client_is_not_closed_by_the_provider(server: ScriptedServer) -> None:
    client = httpx.Client()
    with OpenAIProvider(server.url + "/v1", "m", client=client) as provider:
        call_model(provider, HELLO)
    assert not client.is_closed
    client.close()


def test_fragments_without_an_index_continue_the_last_call() -> None:
    events = [
        chunk({"tool_calls": [{"id": "a", "function": {"name": "one", "arguments": '{"x"'}}]}),
        chunk({"tool_calls": [{"function": {"arguments": ": 1}"}}]}),
        chunk({"tool_calls": [{"id": "b", "function": {"name": "two", "arguments": "{}"}}]}),
        chunk({}, finish="tool_calls"),
        "[DONE]",
    ]
    response = call_model(mock_provider(streaming([sse(*events)])), HELLO)
    assert [(c.id, c.name, c.arguments) for c in response.tool_calls] == [
        ("a", "one", {"x": 1}),
        ("b", "two", {}),
    ]


def test_an_error_in_the_stream_never_shows_the_key() -> None:
    key = "sk-test-SECRET123"
    error = {"error": {"message": f"bad key {key}", "type": "auth", "code": 401}}
    provider = mock_provider(streaming([sse(json.dumps(error))]), api_key=key)
    with pytest.raises(AuthenticationError) as caught:
        deltas_of(provider)
    assert key not in str(caught.value) and "[redacted]" in str(caught.value)


def test_an_image_without_data_or_url_is_a_bad_request() -> None:
    calls: list[httpx.Request] = []

    def respond(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(500)

    image = ChatMessage(role="user", content=(ImageBlock(media_type="image/png"),))
    with pytest.raises(BadRequestError, match="image"):
        deltas_of(mock_provider(respond), ModelRequest(messages=(image,)))
    assert calls == []


def test_a_legacy_function_call_or_a_body_not_in_utf8_is_malformed() -> None:
    legacy = {"role": "assistant", "function_call": {"name": "add", "arguments": "{}"}}
    body = sse(chunk(legacy), chunk({}, finish="function_call"), "[DONE]")
    with pytest.raises(MalformedResponseError, match="legacy way"):
        call_model(mock_provider(streaming([body])), HELLO)
    latin = mock_provider(lambda request: httpx.Response(200, content=b'{"model": "caf\xe9"}'))
    with pytest.raises(MalformedResponseError, match="can't decode byte 0xe9"):
        latin.complete(HELLO)


def test_a_tool_call_cut_at_max_tokens_says_so() -> None:
    opening = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "add", "arguments": '{"a": 2, "b'},
    }
    body = sse(
        chunk({"role": "assistant", "tool_calls": [opening]}), chunk({}, finish="length"), "[DONE]"
    )
    provider = mock_provider(streaming([body]))
    with pytest.raises(MalformedResponseError, match=r"cut off at max_tokens.*'add'"):
        call_model(provider, HELLO)
