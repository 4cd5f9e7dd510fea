"""A small, real, scriptable HTTP server on 127.0.0.1 for provider tests.

Each request takes the next scripted :class:`Reply` (the last one repeats) and gets
exactly that: a status, headers, a whole body, or a chunked stream whose pieces may be
held back by :class:`threading.Event` gates, and that may end by dropping the
connection or by sending keep-alives until the client leaves. Every request is recorded
(method, path, headers, body, arrival time) so tests can assert on what was sent.

    with ScriptedServer(Reply.sse(['{"a": 1}', "[DONE]"])) as server:
        httpx.post(server.url + "/v1/chat/completions", json={...})
        assert server.requests[0].json["model"] == "m"

Nothing here sleeps: pauses wait on events (with a bound, so that no thread outlives a
test by long), and the server releases every gate when it stops.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

__all__ = ["RecordedRequest", "Reply", "ScriptedServer", "sse_body"]

#: The longest any gate holds a handler thread (the server releases gates when it stops).
GATE_LIMIT = 10.0


def sse_body(events: Iterable[str | tuple[str, str]]) -> list[bytes]:
    """SSE frames for ``events``: a data string, or ``(event name, data)``."""
    frames = []
    for event in events:
        if isinstance(event, tuple):
            frames.append(f"event: {event[0]}\ndata: {event[1]}\n\n".encode())
        else:
            frames.append(f"data: {event}\n\n".encode())
    return frames


@dataclass
class Reply:
    """What the server answers to one request.

    Attributes:
        status: The HTTP status.
        headers: Extra response headers (e.g. ``Retry-After``).
        body: A whole body, sent with a Content-Length (when ``chunks`` is empty).
        chunks: Pieces of a chunked body, in order; a :class:`threading.Event` among
            them holds the rest back until it is set.
        content_type: The Content-Type header.
        hold_headers: If set, nothing at all (not even the status line) is sent until
            this event is set: a slow first byte.
        drop: After the chunks, cut the connection without ending the body.
        keepalive: After the chunks, send this piece again and again (every
            ``keepalive_every`` seconds) until the client goes away.
        keepalive_every: Seconds between keep-alive pieces.
        hang_up: Read the request, then close the connection without any answer (what
            a kept-alive connection that the server has just closed looks like).
    """

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    chunks: Sequence[bytes | threading.Event] = ()
    content_type: str = "text/event-stream"
    hold_headers: threading.Event | None = None
    drop: bool = False
    keepalive: bytes | None = None
    keepalive_every: float = 0.02
    hang_up: bool = False

    @classmethod
    def sse(cls, events: Iterable[str | tuple[str, str]], **kwargs: Any) -> Reply:
        """A stream of server-sent events (see :func:`sse_body`), one chunk per event."""
        return cls(chunks=sse_body(events), **kwargs)

    @classmethod
    def json(cls, obj: object, status: int = 200, **kwargs: Any) -> Reply:
        """A whole JSON body."""
        return cls(
            status=status,
            body=json.dumps(obj).encode(),
            content_type="application/json",
            **kwargs,
        )


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float  # time.monotonic() when the request had been read
    client_port: int  # the client's end of the connection (the same port = a reused connection)

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class ScriptedServer:
    """A threaded HTTP/1.1 server on 127.0.0.1, answering from a script.

    Attributes:
        url: ``http://127.0.0.1:PORT``.
        requests: Every request received, in order.
        replied_at: For each request, the :func:`time.monotonic` instant its reply (or
            its status line and headers, for streams) had been sent.
        disconnected: Set when a client went away before its reply was complete (a
            write failed, or the connection was closed under a keep-alive stream).
    """

    def __init__(self, *replies: Reply) -> None:
        self._replies: list[Reply] = list(replies)
        self._lock = threading.Lock()
        self._gates: list[threading.Event] = []
        self._arrived = threading.Condition(self._lock)
        self.requests: list[RecordedRequest] = []
        self.replied_at: list[float] = []
        self.disconnected = threading.Event()
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        # A short poll interval makes stop() quick (shutdown waits for the next poll).
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        host, port = self._httpd.server_address[:2]
        self.url = f"http://{host!s}:{port}"

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Release every gate, stop serving, and close the listening socket."""
        self._stopping.set()
        with self._lock:
            for gate in self._gates:
                gate.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def script(self, *replies: Reply) -> None:
        """Queue more replies."""
        with self._lock:
            self._replies.extend(replies)

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until ``count`` requests have arrived; False if they did not in time."""
        with self._arrived:
            return self._arrived.wait_for(lambda: len(self.requests) >= count, timeout)

    # -- called by handler threads

    def _take(self, request: RecordedRequest) -> Reply:
        with self._arrived:
            self.requests.append(request)
            self._arrived.notify_all()
            if not self._replies:
                return Reply.json({"error": {"message": "no reply scripted"}}, status=500)
            reply = self._replies.pop(0) if len(self._replies) > 1 else self._replies[0]
            for gate in (reply.hold_headers, *reply.chunks):
                if isinstance(gate, threading.Event):
                    self._gates.append(gate)
            return reply

    def _replied(self) -> None:
        with self._lock:
            self.replied_at.append(time.monotonic())


def _handler_for(server: ScriptedServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        scripted = server

    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    scripted: ScriptedServer

    def setup(self) -> None:
        super().setup()
        # Small writes go out at once, as real servers send them (no Nagle delay).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read ``requests``, not stderr."""

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        recorded = RecordedRequest(
            method=self.command,
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            received_at=time.monotonic(),
            client_port=self.client_address[1],
        )
        reply = self.scripted._take(recorded)
        try:
            self._answer(reply)
        except OSError:
            self.scripted.disconnected.set()
            self.close_connection = True

    def _answer(self, reply: Reply) -> None:
        if reply.hang_up:
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if reply.hold_headers is not None:
            reply.hold_headers.wait(GATE_LIMIT)
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if not reply.chunks and reply.keepalive is None:
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)
            self.scripted._replied()
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        self.scripted._replied()
        self._stream(reply)

    def _stream(self, reply: Reply) -> None:
        for piece in reply.chunks:
            if isinstance(piece, threading.Event):
                piece.wait(GATE_LIMIT)
            else:
                self._chunk(piece)
        if reply.drop:
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if reply.keepalive is not None:
            self._keep_alive(reply.keepalive, reply.keepalive_every)
            return
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, piece: bytes) -> None:
        self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")

    def _keep_alive(self, piece: bytes, every: float) -> None:
        """Send ``piece`` until the client closes the connection (or the server stops)."""
        while not self.scripted._stopping.is_set():
            readable, _, _ = select.select([self.connection], [], [], every)
            if readable and not self.connection.recv(1, socket.MSG_PEEK):
                break  # the client closed its end
            self._chunk(piece)
        self.scripted.disconnected.set()
        self.close_connection = True
