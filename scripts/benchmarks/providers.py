"""Model-provider benchmarks, each next to a bare httpx baseline measured in the same run.

    python scripts/benchmarks/providers.py [--chunks 20000] [--calls 300] [--runs 5]

A local HTTP/1.1 server on 127.0.0.1 (in its own process, so that it does not share
the GIL with the client) serves recorded replies. Figures are medians of --runs runs:

  * SSE parsing: a large streamed reply (--chunks events) read through each provider's
    ``stream()`` (SSE framing, msgspec decoding, deltas), next to httpx's ``iter_lines``
    over the same bytes from the same server. The ratio compares the time to read the
    same bytes (1.0 = as fast as splitting lines; below 1 = slower by that factor). The
    SSE framing alone (httpx-sse's ``iter_sse``, no decoding) is shown too, since it is
    most of the cost;
  * per-call overhead: a small reply answered at once, through ``call_model`` (streamed
    and not), next to a bare ``httpx.Client.post`` of the same body to the same URL.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import statistics
import threading
import time
from typing import TYPE_CHECKING, Any

import httpx
from httpx_sse import EventSource

from moot.actors._anthropic import AnthropicProvider
from moot.actors._model import ModelRequest, Provider, call_model
from moot.actors._openai import OpenAIProvider
from moot.events import ChatMessage

if TYPE_CHECKING:
    from collections.abc import Callable
    from multiprocessing.process import BaseProcess

REQUEST = ModelRequest(messages=(ChatMessage.text("user", "Tell me a long story."),))
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog,", "—", "東京", "🌍"]

# ------------------------------------------------------------------ recorded replies


def openai_chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
    choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-bench",
        "system_fingerprint": "fp_0",
        "choices": choices,
        **extra,
    }
    return "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"


def openai_stream(chunks: int) -> bytes:
    parts = [openai_chunk({"role": "assistant", "content": ""})]
    parts += [openai_chunk({"content": WORDS[i % len(WORDS)] + " "}) for i in range(chunks)]
    parts.append(openai_chunk({}, finish="stop"))
    usage = {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks}
    parts.append("data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n")
    parts.append("data: [DONE]\n\n")
    return "".join(parts).encode()


def anthropic_event(kind: str, **fields: Any) -> str:
    return (
        f"event: {kind}\ndata: " + json.dumps({"type": kind, **fields}, ensure_ascii=False) + "\n\n"
    )


def anthropic_stream(chunks: int) -> bytes:
    message: dict[str, Any] = {
        "id": "msg_bench",
        "type": "message",
        "role": "assistant",
        "model": "claude-bench",
        "content": [],
        "stop_reason": None,
        "usage": {"input_tokens": 12, "output_tokens": 1},
    }
    parts = [anthropic_event("message_start", message=message)]
    parts.append(
        anthropic_event("content_block_start", index=0, content_block={"type": "text", "text": ""})
    )
    parts += [
        anthropic_event(
            "content_block_delta",
            index=0,
            delta={"type": "text_delta", "text": WORDS[i % len(WORDS)] + " "},
        )
        for i in range(chunks)
    ]
    parts.append(anthropic_event("content_block_stop", index=0))
    parts.append(
        anthropic_event(
            "message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": chunks}
        )
    )
    parts.append(anthropic_event("message_stop"))
    return "".join(parts).encode()


def openai_json() -> bytes:
    message = {"role": "assistant", "content": "Hello there."}
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "model": "gpt-bench",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
    }
    return json.dumps(body).encode()


def anthropic_json() -> bytes:
    body = {
        "id": "msg_bench",
        "type": "message",
        "role": "assistant",
        "model": "claude-bench",
        "content": [{"type": "text", "text": "Hello there."}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 12, "output_tokens": 3},
    }
    return json.dumps(body).encode()


def routes(chunks: int) -> dict[str, tuple[str, bytes]]:
    """Path -> (content type, body). Providers append their own endpoint paths."""
    sse, js = "text/event-stream", "application/json"
    return {
        "/big/openai/v1/chat/completions": (sse, openai_stream(chunks)),
        "/small/openai/v1/chat/completions": (sse, openai_stream(3)),
        "/json/openai/v1/chat/completions": (js, openai_json()),
        "/big/anthropic/v1/messages": (sse, anthropic_stream(chunks)),
        "/small/anthropic/v1/messages": (sse, anthropic_stream(3)),
        "/json/anthropic/v1/messages": (js, anthropic_json()),
    }


# ------------------------------------------------------------------ the server


def serve(chunks: int, port_out: Any) -> None:
    """Run the recorded-reply server (in a child process) and report its port.

    A minimal HTTP/1.1 keep-alive server on raw sockets, one thread per connection:
    http.server's request parsing would cost more than what is being measured.
    """
    table = {
        path.encode(): (
            f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
        for path, (content_type, body) in routes(chunks).items()
    }
    listener = socket.create_server(("127.0.0.1", 0))
    port_out.put(listener.getsockname()[1])
    while True:
        connection, _ = listener.accept()
        threading.Thread(target=answer, args=(connection, table), daemon=True).start()


def answer(connection: socket.socket, table: dict[bytes, bytes]) -> None:
    """Answer every request on one connection from ``table`` (path -> whole response)."""
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = b""
    with connection:
        while True:
            while b"\r\n\r\n" not in buffer:
                data = connection.recv(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buffer) < length:
                buffer += connection.recv(65536)
            buffer = buffer[length:]
            path = head.split(b" ", 2)[1]
            connection.sendall(table[path])


def start_server(chunks: int) -> tuple[BaseProcess, str]:
    context = multiprocessing.get_context("spawn")
    port_out = context.Queue()
    process = context.Process(target=serve, args=(chunks, port_out), daemon=True)
    process.start()
    port = port_out.get(timeout=60)
    return process, f"http://127.0.0.1:{port}"


# ------------------------------------------------------------------ measurements


def paired(fns: list[Callable[[], float]], runs: int) -> list[float]:
    """Medians of ``runs`` timings of each function, taken in turns so that a change of
    load on the machine weighs on all of them alike."""
    for fn in fns:
        fn()  # warm-up: connections, caches
    timings: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, times in zip(fns, timings, strict=True):
            times.append(fn())
    return [statistics.median(times) for times in timings]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def consume(provider: Provider) -> None:
    for _ in provider.stream(REQUEST):
        pass


def iter_lines(client: httpx.Client, url: str, body: bytes) -> None:
    with client.stream("POST", url, content=body) as response:
        for _ in response.iter_lines():
            pass


def iter_sse(client: httpx.Client, url: str, body: bytes) -> None:
    with client.stream("POST", url, content=body) as response:
        for _ in EventSource(response).iter_sse():
            pass


def parse_throughput(name: str, provider: Provider, url: str, recorded: bytes, runs: int) -> None:
    events, lines, mb = recorded.count(b"\n\n"), recorded.count(b"\n"), len(recorded) / 1e6
    request_body = json.dumps({"model": "x", "stream": True}).encode()
    with httpx.Client() as client:
        base, framing, ours = paired(
            [
                lambda: timed(lambda: iter_lines(client, url, request_body)),
                lambda: timed(lambda: iter_sse(client, url, request_body)),
                lambda: timed(lambda: consume(provider)),
            ],
            runs,
        )
    print(
        f"{name} sse parse: {events / ours:,.0f} chunks/s ({mb / ours:.1f} MB/s)  "
        f"baseline httpx iter_lines: {lines / base:,.0f} lines/s ({mb / base:.1f} MB/s)  "
        f"ratio {base / ours:.2f}  "
        f"(httpx-sse framing alone: {events / framing:,.0f} events/s, ratio {base / framing:.2f})"
    )


def call_overhead(
    name: str, make: Callable[[str], Provider], root: str, calls: int, runs: int
) -> None:
    streamed, whole = make(f"{root}/small/{name}"), make(f"{root}/json/{name}")
    endpoint = "/v1/chat/completions" if name == "openai" else "/v1/messages"
    body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "hi"}]}).encode()
    client = httpx.Client()

    def bare(path: str) -> Callable[[], float]:
        url = f"{root}/{path}/{name}{endpoint}"
        return lambda: timed(lambda: [client.post(url, content=body).read() for _ in range(calls)])

    def ours(provider: Provider, *, stream: bool) -> Callable[[], float]:
        return lambda: timed(
            lambda: [call_model(provider, REQUEST, stream=stream) for _ in range(calls)]
        )

    figures = paired(
        [bare("small"), ours(streamed, stream=True), bare("json"), ours(whole, stream=False)], runs
    )
    base_sse, ours_sse, base_json, ours_json = (f / calls * 1e6 for f in figures)
    client.close()
    print(
        f"{name} call overhead: stream {ours_sse:,.0f} µs/call "
        f"(bare httpx POST {base_sse:,.0f} µs/call, {ours_sse - base_sse:+,.0f} µs)  "
        f"complete {ours_json:,.0f} µs/call "
        f"(bare httpx POST {base_json:,.0f} µs/call, {ours_json - base_json:+,.0f} µs)"
    )


def make_openai(base: str) -> Provider:
    return OpenAIProvider(base + "/v1", "gpt-bench", api_key="sk-bench")


def make_anthropic(base: str) -> Provider:
    return AnthropicProvider("claude-bench", api_key="sk-bench", base_url=base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=20_000, help="events in the big reply")
    parser.add_argument("--calls", type=int, default=500, help="calls per overhead run")
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (median)")
    args = parser.parse_args()

    process, root = start_server(args.chunks)
    try:
        table = routes(args.chunks)
        makers = {"openai": make_openai, "anthropic": make_anthropic}
        for name, make in makers.items():
            path = next(p for p in table if p.startswith(f"/big/{name}/"))
            recorded = table[path][1]
            parse_throughput(name, make(f"{root}/big/{name}"), root + path, recorded, args.runs)
        for name, make in makers.items():
            call_overhead(name, make, root, args.calls, args.runs)
    finally:
        process.terminate()
        process.join(timeout=5)


if __name__ == "__main__":
    main()
