"""Faults on a real socket: each one and what the providers make of it.

Every test runs a real HTTP server on 127.0.0.1 (tests/sse_server.py) and, where the
fault is the same for both APIs, runs against both providers. Waits are on events
with timeouts; no test asserts an upper bound on time.
"""

from __future__ import annotations

import email.utils
import json
import logging
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import msgspec
import pytest

from moot.actors._anthropic import AnthropicProvider
from moot.actors._errors import (
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    ConnectionLostError,
    MalformedResponseError,
    NotFoundError,
    PermissionDeniedError,
    ProviderError,
    ProviderTimeout,
    RateLimitError,
    ServerError,
)
from moot.actors._http import HttpEndpoint, RetryPolicy, parse_retry_after, redact, secrets_of
from moot.actors._model import (
    Delta,
    Finished,
    ModelRequest,
    Provider,
    TextDelta,
    call_model,
)
from moot.actors._openai import OpenAIProvider
from moot.events import ChatMessage
from tests.sse_server import Reply, ScriptedServer, sse_body

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

SECRET = "sk-test-SECRET123"  # noqa: S105  a fake key: the tests check it never leaks
HELLO = ModelRequest(messages=(ChatMessage.text("user", "Hi"),))
FAST = RetryPolicy(initial_delay=0.01, max_delay=0.05)
ONCE = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class Api:
    """What differs between the two APIs for these tests."""

    name: str
    make: Callable[..., Provider]  # (server url, **provider options)
    #: A complete streamed reply whose text is "Hello".
    hello: list[bytes]
    #: The opening of a reply, up to and including the text "Hel".
    opening: list[bytes]
    #: What the server sends to keep an idle stream open.
    keepalive: bytes
    #: An event whose data is not JSON.
    malformed: bytes


#: Providers made by a test, closed after it (so no pooled socket outlives the test).
_opened: list[OpenAIProvider | AnthropicProvider] = []


@pytest.fixture(autouse=True)
def _close_providers() -> Iterator[None]:
    yield
    while _opened:
        _opened.pop().close()


def _openai(url: str, **options: Any) -> Provider:
    provider = OpenAIProvider(url + "/v1", "gpt-test", api_key=SECRET, **options)
    _opened.append(provider)
    return provider


def _anthropic(url: str, **options: Any) -> Provider:
    provider = AnthropicProvider("claude-test", api_key=SECRET, base_url=url, **options)
    _opened.append(provider)
    return provider


def _oa(delta: dict[str, Any], finish: str | None = None) -> str:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return json.dumps({"model": "gpt-test", "choices": [choice]})


def _an(kind: str, **fields: Any) -> tuple[str, str]:
    return kind, json.dumps({"type": kind, **fields})


OPENAI_OPENING = sse_body([_oa({"role": "assistant", "content": ""}), _oa({"content": "Hel"})])
ANTHROPIC_OPENING = sse_body(
    [
        _an("message_start", message={"model": "claude-test", "usage": {"input_tokens": 3}}),
        _an("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        _an("content_block_delta", index=0, delta={"type": "text_delta", "text": "Hel"}),
    ]
)

APIS = [
    Api(
        name="openai",
        make=_openai,
        opening=OPENAI_OPENING,
        hello=OPENAI_OPENING + sse_body([_oa({"content": "lo"}, finish="stop"), "[DONE]"]),
        keepalive=b": keep-alive\n\n",
        malformed=b'data: {"choices": [{"delta": {"content": "x"\n\n',
    ),
    Api(
        name="anthropic",
        make=_anthropic,
        opening=ANTHROPIC_OPENING,
        hello=ANTHROPIC_OPENING
        + sse_body(
            [
                _an("content_block_delta", index=0, delta={"type": "text_delta", "text": "lo"}),
                _an("content_block_stop", index=0),
                _an("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 2}),
                _an("message_stop"),
            ]
        ),
        keepalive=b'event: ping\ndata: {"type": "ping"}\n\n',
        malformed=b'event: content_block_delta\ndata: {"type": "content_block_delta", "ind\n\n',
    ),
]


@pytest.fixture(params=APIS, ids=lambda api: api.name)
def api(request: pytest.FixtureRequest) -> Api:
    chosen: Api = request.param
    return chosen


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as running:
        yield running


def error_json(message: str, kind: str = "error") -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def collect(provider: Provider, got: list[Delta], **kwargs: Any) -> None:
    """Stream into ``got`` (so a test can see what arrived before an error)."""
    for delta in provider.stream(HELLO, **kwargs):
        got.append(delta)


# ---------------------------------------------------------------- statuses and retries


def test_429_with_retry_after_waits_as_told_then_succeeds(api: Api, server: ScriptedServer) -> None:
    server.script(
        Reply.json(
            error_json("slow down", "rate_limit_error"), status=429, headers={"Retry-After": "1"}
        ),
        Reply(chunks=api.hello),
    )
    response = call_model(api.make(server.url), HELLO)
    assert response.text == "Hello"
    assert len(server.requests) == 2
    waited = server.requests[1].received_at - server.replied_at[0]
    assert waited >= 1.0


def test_an_overloaded_server_saying_when_to_come_back_is_waited_out(
    api: Api, server: ScriptedServer
) -> None:
    """Retry-After on a 503 (or Anthropic's 529) counts as on a 429: RFC 9110 allows it."""
    server.script(
        Reply.json(
            error_json("overloaded", "overloaded_error"), status=529, headers={"Retry-After": "1"}
        ),
        Reply.json(error_json("busy"), status=503, headers={"retry-after-ms": "600"}),
        Reply(chunks=api.hello),
    )
    provider = api.make(server.url, retry=RetryPolicy(initial_delay=0.01, jitter=0))
    assert call_model(provider, HELLO).text == "Hello"
    assert len(server.requests) == 3
    assert server.requests[1].received_at - server.replied_at[0] >= 1.0
    assert server.requests[2].received_at - server.replied_at[1] >= 0.6


def test_a_503_whose_wait_would_pass_the_deadline_gives_up_at_once(
    api: Api, server: ScriptedServer
) -> None:
    server.script(Reply.json(error_json("busy"), status=503, headers={"Retry-After": "30"}))
    with pytest.raises(ServerError) as caught:
        call_model(api.make(server.url), HELLO, deadline=time.monotonic() + 5)
    assert caught.value.retry_after == 30 and caught.value.status_code == 503
    assert len(server.requests) == 1


def test_429_whose_wait_would_pass_the_deadline_gives_up_at_once(
    api: Api, server: ScriptedServer
) -> None:
    server.script(Reply.json(error_json("later"), status=429, headers={"Retry-After": "30"}))
    provider = api.make(server.url, retry=RetryPolicy(max_delay=60))
    with pytest.raises(RateLimitError) as caught:
        call_model(provider, HELLO, deadline=time.monotonic() + 5)
    assert caught.value.retry_after == 30
    assert caught.value.retryable
    assert len(server.requests) == 1


def test_429_asking_for_more_than_max_delay_gives_up_at_once(server: ScriptedServer) -> None:
    server.script(Reply.json(error_json("later"), status=429, headers={"retry-after-ms": "45000"}))
    with pytest.raises(RateLimitError) as caught:
        call_model(_openai(server.url), HELLO)
    assert caught.value.retry_after == 45.0
    assert len(server.requests) == 1


def test_500_three_times_gives_up_with_a_retryable_server_error(
    api: Api, server: ScriptedServer
) -> None:
    server.script(Reply.json(error_json("boom", "api_error"), status=500))
    with pytest.raises(ServerError, match="boom") as caught:
        call_model(api.make(server.url, retry=FAST), HELLO)
    assert caught.value.retryable
    assert caught.value.status_code == 500
    assert len(server.requests) == 3


def test_529_overloaded_then_success(server: ScriptedServer) -> None:
    api = APIS[1]
    server.script(
        Reply.json(error_json("Overloaded", "overloaded_error"), status=529),
        Reply(chunks=api.hello),
    )
    assert call_model(api.make(server.url, retry=FAST), HELLO).text == "Hello"
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (422, BadRequestError),
    ],
)
def test_client_errors_are_not_retried(
    api: Api, server: ScriptedServer, status: int, error_type: type[ProviderError]
) -> None:
    server.script(Reply.json(error_json("no"), status=status))
    with pytest.raises(error_type) as caught:
        call_model(api.make(server.url, retry=FAST), HELLO)
    assert not caught.value.retryable
    assert caught.value.status_code == status
    assert len(server.requests) == 1


def test_401_is_not_retried_and_never_shows_the_key(
    api: Api, server: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    # A server that echoes the key it was sent, as some do.
    server.script(Reply.json(error_json(f"Incorrect API key provided: {SECRET}"), status=401))
    provider = api.make(server.url)
    with caplog.at_level(logging.DEBUG), pytest.raises(AuthenticationError) as caught:
        call_model(provider, HELLO)
    assert len(server.requests) == 1
    assert SECRET in server.requests[0].headers.get("x-api-key", "") + server.requests[
        0
    ].headers.get("authorization", "")
    assert "Incorrect API key provided" in str(caught.value)
    for text in (str(caught.value), repr(caught.value), repr(provider), caplog.text):
        assert SECRET not in text


def test_secrets_stay_out_of_retry_logs_and_errors(
    api: Api, server: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.script(Reply.json(error_json(f"upstream saw Bearer {SECRET}"), status=503))
    provider = api.make(server.url, retry=FAST)
    with caplog.at_level(logging.DEBUG), pytest.raises(ServerError) as caught:
        call_model(provider, HELLO)
    assert len(server.requests) == 3
    assert "retrying" in caplog.text
    records = [r.getMessage() for r in caplog.records] + [str(caught.value), repr(caught.value)]
    assert records and all(SECRET not in text for text in records)
    assert "[redacted]" in str(caught.value)


def test_a_key_read_from_a_file_works_and_a_broken_header_never_shows_it(
    server: ScriptedServer,
) -> None:
    server.script(Reply(chunks=APIS[0].hello))
    with OpenAIProvider(server.url + "/v1", "gpt-test", api_key=SECRET + "\n") as provider:
        assert call_model(provider, HELLO).text == "Hello"  # the newline was trimmed
        assert server.requests[0].headers["authorization"] == f"Bearer {SECRET}"
        # A header value httpx refuses, and quotes (escaped) in its error.
        bad = msgspec.structs.replace(HELLO, extra_headers={"x-api-key": SECRET + "\r\n"})
        with pytest.raises(ProviderError) as caught:
            call_model(provider, bad)
    chain = "".join(traceback.format_exception(caught.value))
    assert "Illegal header value" in chain and "[redacted]" in chain
    for text in (str(caught.value), repr(caught.value), chain):
        assert SECRET not in text


# ---------------------------------------------------------------- broken streams


def test_a_connection_dropped_mid_stream_is_a_lost_connection(
    api: Api, server: ScriptedServer
) -> None:
    server.script(Reply(chunks=api.opening, drop=True))
    got: list[Delta] = []
    with pytest.raises(ConnectionLostError, match="connection lost") as caught:
        collect(api.make(server.url), got)
    assert caught.value.retryable
    assert TextDelta(text="Hel") in got  # what arrived before the drop was delivered
    assert len(server.requests) == 1  # a started stream is not retried


def test_a_malformed_json_chunk_is_a_malformed_response(api: Api, server: ScriptedServer) -> None:
    server.script(Reply(chunks=[*api.opening, api.malformed, *api.hello]))
    with pytest.raises(MalformedResponseError, match="not valid") as caught:
        call_model(api.make(server.url), HELLO)
    assert not caught.value.retryable


def test_a_first_byte_slower_than_the_read_timeout_is_a_timeout(
    api: Api, server: ScriptedServer
) -> None:
    held = threading.Event()  # never set: the server releases it when it stops
    server.script(Reply(chunks=api.hello, hold_headers=held))
    provider = api.make(server.url, read_timeout=0.2, retry=ONCE)
    with pytest.raises(ProviderTimeout, match="read timeout") as caught:
        call_model(provider, HELLO)
    assert caught.value.retryable


def test_a_stall_after_the_first_events_is_a_timeout(api: Api, server: ScriptedServer) -> None:
    stall = threading.Event()
    server.script(Reply(chunks=[*api.opening, stall, *api.hello]))
    got: list[Delta] = []
    with pytest.raises(ProviderTimeout):
        collect(api.make(server.url, read_timeout=0.2), got)
    assert TextDelta(text="Hel") in got


def test_the_read_timeout_is_retried_before_the_stream_starts(
    api: Api, server: ScriptedServer
) -> None:
    server.script(Reply(chunks=api.hello, hold_headers=threading.Event()), Reply(chunks=api.hello))
    response = call_model(api.make(server.url, read_timeout=0.2, retry=FAST), HELLO)
    assert response.text == "Hello"
    assert len(server.requests) == 2


def test_a_never_ending_stream_is_cut_by_the_total_timeout(
    api: Api, server: ScriptedServer
) -> None:
    server.script(Reply(chunks=api.opening, keepalive=api.keepalive))
    got: list[Delta] = []
    with pytest.raises(ProviderTimeout, match="deadline"):
        collect(api.make(server.url, timeout=0.3), got)
    assert TextDelta(text="Hel") in got
    assert server.disconnected.wait(5)


def test_a_never_ending_stream_is_cut_by_the_callers_deadline(
    api: Api, server: ScriptedServer
) -> None:
    server.script(Reply(chunks=api.opening, keepalive=api.keepalive))
    with pytest.raises(ProviderTimeout):
        call_model(api.make(server.url), HELLO, deadline=time.monotonic() + 0.3)
    assert server.disconnected.wait(5)


def test_a_never_ending_stream_is_cut_by_the_requests_timeout(server: ScriptedServer) -> None:
    api = APIS[0]
    server.script(Reply(chunks=api.opening, keepalive=api.keepalive))
    request = ModelRequest(messages=HELLO.messages, timeout_s=0.3)
    with pytest.raises(ProviderTimeout):
        call_model(api.make(server.url), request)


def test_a_deadline_already_past_sends_nothing(api: Api, server: ScriptedServer) -> None:
    with pytest.raises(ProviderTimeout, match="deadline"):
        call_model(api.make(server.url), HELLO, deadline=time.monotonic() - 1)
    assert server.requests == []


def test_closing_the_delta_iterator_early_closes_the_connection(
    api: Api, server: ScriptedServer
) -> None:
    server.script(Reply(chunks=api.opening, keepalive=api.keepalive))
    deltas = api.make(server.url).stream(HELLO)
    for delta in deltas:
        if isinstance(delta, TextDelta):
            break
    assert not server.disconnected.is_set()
    deltas.close()  # type: ignore[attr-defined]
    assert server.disconnected.wait(5)


def test_nobody_listening_is_a_retryable_lost_connection() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on `port` now.
    with pytest.raises(ConnectionLostError) as caught:
        call_model(_openai(f"http://127.0.0.1:{port}", retry=FAST), HELLO)
    assert caught.value.retryable


def test_a_kept_alive_connection_closed_by_the_server_is_resent_at_once(
    api: Api, server: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The second request arrives on the kept-alive connection, which the server closes
    # without an answer; it goes again on a new connection, costing no attempt.
    server.script(Reply(chunks=api.hello), Reply(hang_up=True), Reply(chunks=api.hello))
    provider = api.make(server.url, retry=ONCE)
    with caplog.at_level(logging.WARNING):
        assert call_model(provider, HELLO).text == "Hello"
        assert call_model(provider, HELLO).text == "Hello"
    assert len(server.requests) == 3
    assert server.requests[1].client_port == server.requests[0].client_port
    assert server.requests[2].client_port != server.requests[1].client_port
    assert "retrying" not in caplog.text


def test_a_server_that_never_answers_still_fails(api: Api, server: ScriptedServer) -> None:
    server.script(Reply(hang_up=True))
    with pytest.raises(ConnectionLostError, match="without sending a response"):
        call_model(api.make(server.url, retry=FAST), HELLO)
    # Three attempts, each sent once: on a new connection, no answer is a failure (the
    # request may have been acted on), not a stale kept-alive connection to resend on.
    assert len(server.requests) == 3
    with pytest.raises(ConnectionLostError):
        call_model(api.make(server.url, retry=ONCE), HELLO)
    assert len(server.requests) == 4  # one attempt: one request


def test_the_connection_is_reused_across_calls(api: Api, server: ScriptedServer) -> None:
    server.script(Reply(chunks=api.hello))
    provider = api.make(server.url)
    for _ in range(3):
        assert call_model(provider, HELLO).text == "Hello"
    assert len(server.requests) == 3
    ports = {r.client_port for r in server.requests}
    assert len(ports) == 1


def test_many_threads_share_one_provider(api: Api, server: ScriptedServer) -> None:
    server.script(Reply(chunks=api.hello))
    provider = api.make(server.url)
    results: list[str] = []
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            results.append(call_model(provider, HELLO).text)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert errors == [] and results == ["Hello"] * 8


def test_finished_comes_last_and_once(api: Api, server: ScriptedServer) -> None:
    server.script(Reply(chunks=api.hello))
    deltas = list(api.make(server.url).stream(HELLO))
    assert [type(d) for d in deltas].count(Finished) == 1
    assert isinstance(deltas[-1], Finished)


# ---------------------------------------------------------------- the pieces


def test_backoff_grows_is_capped_and_jitters_within_bounds() -> None:
    policy = RetryPolicy()
    assert policy.backoff(1, spread=0.5) == 0.5
    assert policy.backoff(2, spread=0.5) == 1.0
    assert policy.backoff(3, spread=0.0) == 1.0  # 2.0 minus half of it
    assert policy.backoff(3, spread=0.999) == pytest.approx(2.998)
    assert policy.backoff(20, spread=0.999) == 30.0  # capped, jitter included
    assert all(0.25 <= policy.backoff(1) <= 0.75 for _ in range(200))


def test_when_a_retry_is_allowed() -> None:
    policy = RetryPolicy(max_attempts=3)
    now = 100.0
    busy = ServerError("busy", status_code=503)
    assert policy.wait_before_retry(busy, 1, deadline=None, now=now) is not None
    assert policy.wait_before_retry(busy, 3, deadline=None, now=now) is None  # attempts used up
    assert policy.wait_before_retry(BadRequestError("no"), 1, deadline=None, now=now) is None
    assert policy.wait_before_retry(busy, 1, deadline=now + 0.1, now=now) is None  # no time left
    told = RateLimitError("slow", retry_after=2.0)
    assert policy.wait_before_retry(told, 1, deadline=None, now=now) == 2.0
    assert policy.wait_before_retry(told, 1, deadline=now + 2.0, now=now) is None
    assert (
        policy.wait_before_retry(RateLimitError("x", retry_after=31), 1, deadline=None, now=now)
        is None
    )
    busy_told = ServerError("busy", status_code=503, retry_after=2.0)
    assert policy.wait_before_retry(busy_told, 1, deadline=None, now=now) == 2.0


def test_retry_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=2)


def test_retry_after_in_seconds_dates_and_milliseconds() -> None:
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 7, usegmt=True)
    assert parse_retry_after(httpx.Headers({"Retry-After": "3"})) == 3.0
    assert parse_retry_after(httpx.Headers({"Retry-After": "1.5"})) == 1.5
    assert parse_retry_after(httpx.Headers({"Retry-After": date}), now=now) == 7.0
    assert parse_retry_after(httpx.Headers({"Retry-After": date}), now=now + 60) == 0.0
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "250", "Retry-After": "9"})) == 0.25
    assert parse_retry_after(httpx.Headers({"Retry-After": "soon"})) is None
    assert parse_retry_after(httpx.Headers({})) is None


def test_redaction() -> None:
    secrets = secrets_of({"Authorization": f"Bearer {SECRET}", "x-api-key": "k2-abcdef", "a": "b"})
    assert secrets == (f"Bearer {SECRET}", SECRET, "k2-abcdef")
    said = redact(f"sent Bearer {SECRET}, also {SECRET} and k2-abcdef", secrets)
    assert said == "sent [redacted], also [redacted] and [redacted]"
    assert redact("abc", ("abc",)) == "abc"  # too short to be a secret worth hiding


def test_reprs_do_not_show_the_key() -> None:
    openai = OpenAIProvider("http://127.0.0.1:9/v1", "m", api_key=SECRET)
    anthropic = AnthropicProvider("m", api_key=SECRET, base_url="http://127.0.0.1:9")
    endpoint = HttpEndpoint("x", "http://127.0.0.1:9", headers={"x-api-key": SECRET})
    for thing in (openai, anthropic, endpoint):
        assert SECRET not in repr(thing)
        assert SECRET not in str(thing)
    assert "api_key='***'" in repr(openai)
    # A key in the base URL (as a password, or in the query as some gateways want it),
    # or in a request's extra headers.
    in_url = OpenAIProvider(f"http://user:{SECRET}@127.0.0.1:9/v1?api-key={SECRET}", "m")
    request = ModelRequest(messages=(), extra_headers={"authorization": f"Bearer {SECRET}"})
    for thing in (in_url, in_url._endpoint, request):
        assert SECRET not in repr(thing) and SECRET not in str(thing)
    assert "base_url='http://user:***@127.0.0.1:9/v1?***'" in repr(in_url)
    assert "extra_headers={'authorization': '***'}" in repr(request)
    for thing in (openai, anthropic, endpoint, in_url):
        thing.close()


# ----------------------------------------------------- the end of a reply, odd servers


def test_a_body_kept_open_after_the_reply_does_not_hold_the_reply(
    api: Api, server: ScriptedServer
) -> None:
    """A server (or proxy) that keeps pinging after the last event: the reply is whole
    at its last event, and the caller gets it then, not at the read timeout."""
    server.script(Reply(chunks=api.hello, keepalive=api.keepalive))
    provider = api.make(server.url)
    for _ in range(2):  # and the next call is not stuck behind the first
        assert call_model(provider, HELLO).text == "Hello"
    assert len(server.requests) == 2


class _Raw:
    """A raw HTTP/1.1 server: the n-th request (from 1) gets ``answers[n - 1]``, sent
    as bytes; the connection is closed after an answer that ends with ``close``."""

    def __init__(self, answers: list[tuple[bytes, bool]]) -> None:
        self.answers = answers
        self.requests = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader:
            while True:
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if not line:
                    return
                reader.read(length)
                self.requests += 1
                answer, close = self.answers[min(self.requests, len(self.answers)) - 1]
                conn.sendall(answer)
                if close:
                    return


def _http_json(body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(data),
        data,
    )


def test_a_broken_answer_on_a_kept_alive_connection_is_not_sent_again() -> None:
    """Only a connection that closed before any byte of an answer is stale; a broken
    answer was an answer: sending the call again would repeat it."""
    whole = {"model": "m", "choices": [{"index": 0, "message": {"content": "one"}}]}
    raw = _Raw(
        [
            (_http_json(whole), False),
            (b"HTTP/1.1 200 OK\r\nContent-Length: zz\r\n\r\n", True),  # broken
        ]
    )
    provider = OpenAIProvider(
        raw.url + "/v1", "m", api_key=SECRET, retry=RetryPolicy(max_attempts=1)
    )
    _opened.append(provider)
    assert provider.complete(HELLO).text == "one"
    with pytest.raises(ConnectionLostError, match="Content-Length"):
        provider.complete(HELLO)
    assert raw.requests == 2
    raw.listener.close()


def test_what_http_cannot_carry_is_refused_before_any_call() -> None:
    with pytest.raises(
        ConfigurationError, match="'authorization': the value has characters"
    ) as got:
        OpenAIProvider("http://127.0.0.1:9/v1", "m", api_key="sk-SECRET\u2013dash")
    assert "SECRET" not in str(got.value)
    with pytest.raises(ConfigurationError, match="'x-api-key'"):
        AnthropicProvider("m", api_key="sk-ant-\u00e9", base_url="http://127.0.0.1:9")
    with pytest.raises(ConfigurationError, match="invalid base URL"):
        OpenAIProvider("http://127.0.0.1:1:bad/v1", "m", api_key="k")
    provider = OpenAIProvider("http://127.0.0.1:9/v1", "m", api_key="k")
    _opened.append(provider)
    odd = msgspec.structs.replace(HELLO, extra_headers={"x-note": "caf\u00e9"})
    with pytest.raises(BadRequestError, match="extra header 'x-note'"):
        provider.complete(odd)


def test_a_key_quoted_where_a_long_error_is_cut_is_still_redacted(server: ScriptedServer) -> None:
    quoted = ("x" * 470 + f" Bearer {SECRET} " + "y" * 100).encode()
    server.script(Reply(status=400, body=quoted, content_type="text/plain"))
    with pytest.raises(BadRequestError) as got:
        call_model(_openai(server.url), HELLO)
    message = str(got.value)
    assert "[redacted]" in message and SECRET[:8] not in message


def test_httpx_logs_never_show_a_password_in_the_base_url(
    server: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.script(Reply.json(error_json("nope"), status=401))
    url = server.url.replace("http://", "http://user:PASSWORD123%2Fp%40ss@") + "/v1"
    provider = OpenAIProvider(url, "m", api_key=SECRET)
    _opened.append(provider)
    with caplog.at_level(logging.DEBUG), pytest.raises(AuthenticationError):
        provider.complete(HELLO)
    assert caplog.records  # httpx did log the request
    assert not [r for r in caplog.records if "PASSWORD123" in r.getMessage()]  # either form


def test_a_body_kept_open_holds_no_other_streams_connection(
    api: Api, server: ScriptedServer
) -> None:
    """Each stuck end of a body is read by a thread of its own: the calls of another
    provider go on, and do not run out of pooled connections behind it."""
    with ScriptedServer(Reply(chunks=api.hello, keepalive=api.keepalive)) as stuck:
        assert call_model(api.make(stuck.url), HELLO).text == "Hello"
        server.script(Reply(chunks=api.hello))
        provider = api.make(server.url)
        for _ in range(40):  # more than a pool's connections
            assert call_model(provider, HELLO).text == "Hello"
