"""HTTP plumbing shared by the model providers: one client, timeouts, retries, SSE, errors.

Everything a provider sends over the network goes through one :class:`HttpEndpoint`,
so the rules live in one place:

* one pooled :class:`httpx.Client` per provider, or the one the caller injects (which
  the endpoint then never closes);
* a connect timeout, a read timeout (the longest silence between two reads, so a slow
  first token counts), and a total deadline for the whole call, retries included;
* HTTP statuses and httpx exceptions become :class:`ProviderError` subclasses here and
  nowhere else, always with ``raise ... from``::

      401 AuthenticationError   403 PermissionDeniedError   404 NotFoundError
      400/413/422 BadRequestError   408 ProviderTimeout   429 RateLimitError
      5xx/529 ServerError   timeouts ProviderTimeout   broken connections ConnectionLostError
      undecodable bodies and SSE framing MalformedResponseError

* a failed attempt is tried again while :class:`RetryPolicy` allows it: only retryable
  errors, at most ``max_attempts`` attempts, never sleeping past the deadline, and
  honouring a server's ``Retry-After`` (429, 503, 529, ...). A stream is retried only
  until its body starts: deltas already handed to the caller cannot be taken back;
* secrets (the values of credential headers) are scrubbed from every message this
  module builds or logs, and never appear in a ``repr``.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import logging
import os
import queue
import random
import threading
import time
from contextlib import closing, contextmanager
from typing import TYPE_CHECKING, Self

import httpx
import msgspec
from httpx_sse import EventSource, ServerSentEvent, SSEError

from ._errors import (
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
from ._model import parse_arguments, tool_call_block

if TYPE_CHECKING:
    from collections.abc import Generator, Iterator, Mapping

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_READ_TIMEOUT",
    "HttpEndpoint",
    "HttpProvider",
    "RetryPolicy",
    "build_client",
    "drain",
    "error_detail",
    "error_for_status",
    "map_http_errors",
    "parse_arguments",
    "tool_call_block",
    "parse_retry_after",
    "redact",
    "secrets_of",
]

logger = logging.getLogger("moot.actors.http")


class _Redacting(logging.Filter):
    """Scrubs the secrets of every endpoint made in this process from the records of
    httpx and httpcore, which log URLs (a password in the base URL) and, at DEBUG,
    response headers (a gateway may echo a key)."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def add(self, secrets: tuple[str, ...]) -> None:
        with self._lock:
            known = set(self.secrets) | set(secrets)
            self.secrets = tuple(sorted(known, key=len, reverse=True))

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = self.secrets
        if secrets:
            message = record.getMessage()
            cleaned = redact(message, secrets)
            if cleaned != message:
                record.msg, record.args = cleaned, None
        return True


_redacting = _Redacting()
# A logger's filters see only its own records, not its children's: each one by name.
for _name in ("httpx", "httpcore.connection", "httpcore.http11", "httpcore.http2",
              "httpcore.proxy", "httpcore.socks"):  # fmt: skip
    logging.getLogger(_name).addFilter(_redacting)

#: Seconds to wait for a TCP (and TLS) connection.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Seconds of silence allowed between two reads. Generous, because a big model's first
#: token can take a minute; a total limit belongs to the deadline, not to this.
DEFAULT_READ_TIMEOUT = 120.0

#: Header names whose values are credentials, scrubbed from every message.
_SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "api-key", "cookie", "x-goog-api-key"}
)
#: Shorter strings are not scrubbed: redacting "a" from every message would help nobody.
_MIN_SECRET_LENGTH = 4
_REDACTED = "[redacted]"
#: How much of an error body goes into an exception message.
_MAX_DETAIL = 500


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How often and how patiently a failed model call is tried again.

    The wait before attempt ``n + 1`` is ``initial_delay * multiplier ** (n - 1)``, capped
    at ``max_delay``, then spread by ``±jitter`` of itself so that many clients do not
    retry in step. A server's ``Retry-After`` (on a 429, or a 503 / 529 / any retryable
    status) replaces the computed wait; one longer than ``max_delay``, or one that would
    end past the call's deadline, ends the call at once with the error (which carries
    ``retry_after`` for the caller).

    Attributes:
        max_attempts: Attempts in total, the first one included (1 = never retry).
        initial_delay: Seconds before the second attempt, before jitter.
        multiplier: Growth of the wait from one attempt to the next.
        max_delay: Upper bound of any wait, in seconds.
        jitter: Fraction of the wait (0 to 1) by which it is randomly spread.
    """

    max_attempts: int = 3
    initial_delay: float = 0.5
    multiplier: float = 2.0
    max_delay: float = 30.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError("RetryPolicy.max_attempts must be at least 1")
        if min(self.initial_delay, self.multiplier, self.max_delay) < 0:
            raise ConfigurationError("RetryPolicy delays and multiplier must not be negative")
        if not 0 <= self.jitter <= 1:
            raise ConfigurationError("RetryPolicy.jitter must be between 0 and 1")

    def backoff(self, attempt: int, *, spread: float | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based), jitter included.

        Args:
            attempt: The number of the attempt that just failed.
            spread: A number in [0, 1) standing for the random draw (for tests);
                ``None`` draws one.

        Returns:
            The wait in seconds, never more than ``max_delay``.
        """
        base = min(self.max_delay, self.initial_delay * self.multiplier ** (attempt - 1))
        draw = random.random() if spread is None else spread
        wait = base * (1 - self.jitter + 2 * self.jitter * draw)
        return max(0.0, min(self.max_delay, wait))

    def wait_before_retry(
        self, error: ProviderError, attempt: int, *, deadline: float | None, now: float
    ) -> float | None:
        """Seconds to wait before trying again after ``error``, or None to give up.

        Args:
            error: The error of the attempt that just failed.
            attempt: Its number (1-based).
            deadline: The :func:`time.monotonic` instant the call must end by, if any.
            now: The current :func:`time.monotonic` instant.

        Returns:
            The wait, or None when the error is final, the attempts are used up, the
            server asked for a wait longer than ``max_delay``, or the wait (plus any
            time at all for the next attempt) would not fit before the deadline.
        """
        if not error.retryable or attempt >= self.max_attempts:
            return None
        retry_after = error.retry_after
        if retry_after is not None:
            if retry_after > self.max_delay:
                return None
            wait = retry_after
        else:
            wait = self.backoff(attempt)
        if deadline is not None and now + wait >= deadline:
            return None
        return wait


def build_client(
    *,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    max_connections: int = 32,
) -> httpx.Client:
    """A pooled client for one provider. Redirects are not followed (an API never needs them).

    Args:
        connect_timeout: Seconds to establish a connection.
        read_timeout: Seconds of silence allowed between reads (also used for writes).
        max_connections: Upper bound of simultaneous connections (one per concurrent call).

    Returns:
        A new :class:`httpx.Client`; whoever builds it closes it.
    """
    return httpx.Client(
        timeout=httpx.Timeout(read_timeout, connect=connect_timeout, pool=connect_timeout),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=8),
        follow_redirects=False,
    )


def redact(text: str, secrets: tuple[str, ...]) -> str:
    """``text`` with every secret replaced by ``[redacted]``.

    Args:
        text: Any message.
        secrets: The strings to hide (shorter than 4 characters are left alone).

    Returns:
        The scrubbed text.
    """
    for secret in secrets:
        if len(secret) >= _MIN_SECRET_LENGTH and secret in text:
            text = text.replace(secret, _REDACTED)
    return text


_MASK = "***"


def shown_url(url: str) -> str:
    """``url`` fit to show: without a password in it, and without its query (which may
    carry a key, as in ``?api-key=...``)."""
    try:
        parts = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "<unparsable URL>"
    if parts.password:
        parts = parts.copy_with(username=parts.username, password=_MASK)
    if parts.query:
        parts = parts.copy_with(query=b"***")
    return str(parts)


def secrets_of(headers: Mapping[str, str]) -> tuple[str, ...]:
    """The credential values among ``headers``: whole values and bearer tokens alone."""
    found: list[str] = []
    for name, value in headers.items():
        if name.lower() in _SECRET_HEADERS and value:
            scheme, _, token = value.partition(" ")
            values = [value, value.strip()]
            if token and scheme.lower() in {"bearer", "basic", "token"}:
                values += [token, token.strip()]
            for v in values:
                # As is, and as an error message may quote it: escaped (a header value
                # with a newline is refused with its repr, b'sk-...\n').
                found += [v, v.encode("unicode_escape").decode("ascii")]
    # Longest first, so a whole "Bearer sk-..." is replaced before the bare token.
    return tuple(sorted(set(found), key=len, reverse=True))


def _url_secrets(url: str) -> tuple[str, ...]:
    """The password of a URL's user info, as is and as httpx sends it (Basic auth)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return ()
    if not parsed.password:
        return ()
    basic = base64.b64encode(f"{parsed.username}:{parsed.password}".encode()).decode()
    raw = parsed.userinfo.decode("ascii", "replace").partition(":")[2]  # percent-encoded
    found = {parsed.password, raw, basic, f"Basic {basic}"}
    return tuple(sorted(found, key=len, reverse=True))


def _check_headers(provider: str, headers: Mapping[str, str], secrets: tuple[str, ...]) -> None:
    """Refuse header values HTTP cannot carry (only ASCII), naming no secret.

    Raises:
        ConfigurationError: a value with a character outside ASCII (a key pasted with
            a typographic dash, say).
    """
    for name, value in headers.items():
        if not isinstance(value, str) or not value.isascii():
            shown = "the value" if redact(value, secrets) != value else repr(value)
            raise ConfigurationError(
                f"{provider}: header {name!r}: {shown} has characters HTTP headers cannot "
                "carry (only ASCII)"
            )


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """The wait a server asked for, in seconds: ``retry-after-ms``, else ``Retry-After``.

    ``Retry-After`` may be a number of seconds or an HTTP date.

    Args:
        headers: The response headers (case-insensitive lookup is the caller's: pass
            an :class:`httpx.Headers` or lower-case names).
        now: The current wall-clock time (``time.time()``) for HTTP dates; for tests.

    Returns:
        Seconds (never negative), or None when the server did not say or said nonsense.
    """
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class _ErrorDetail(msgspec.Struct):
    message: str | None = None
    type: str | None = None
    code: str | int | None = None


class _ErrorBody(msgspec.Struct):
    """An error body: ``{"error": {"message", "type"}}``, ``{"error": "..."}``, ``{"message"}``."""

    error: _ErrorDetail | str | None = None
    message: str | None = None


_error_body_decoder = msgspec.json.Decoder(_ErrorBody)


def error_detail(content: bytes | str, secrets: tuple[str, ...] = ()) -> str:
    """The human part of an error body: its message (and type), else its raw text; the
    ``secrets`` redacted, then shortened (a secret cut in two would not be found)."""
    try:
        body = _error_body_decoder.decode(content)
    except (msgspec.DecodeError, UnicodeDecodeError):
        raw = content.decode("utf-8", "replace") if isinstance(content, bytes) else content
        return _shorten(redact(raw.strip(), secrets))
    if isinstance(body.error, _ErrorDetail):
        detail = body.error.message or ""
        if body.error.type and body.error.type not in detail:
            detail = f"{body.error.type}: {detail}" if detail else body.error.type
        return _shorten(redact(detail, secrets))
    return _shorten(redact(body.error or body.message or "", secrets))


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def error_for_status(
    status: int,
    detail: str,
    *,
    provider: str,
    retry_after: float | None = None,
) -> ProviderError:
    """The :class:`ProviderError` for an HTTP status (or an in-stream error with a status).

    Args:
        status: The HTTP status code.
        detail: What the server said (already scrubbed of secrets).
        provider: The provider's name, for the message.
        retry_after: The wait the server asked for (kept on a retryable error).

    Returns:
        The error to raise; its ``status_code`` is ``status``.
    """
    message = f"{provider}: HTTP {status}" + (f": {detail}" if detail else "")
    if status == 429:
        return RateLimitError(message, status_code=status, retry_after=retry_after)
    if status >= 500:
        return ServerError(message, status_code=status, retry_after=retry_after)
    if status == 408:
        return ProviderTimeout(message, status_code=status, retry_after=retry_after)
    error_type: type[ProviderError] = {
        400: BadRequestError,
        401: AuthenticationError,
        403: PermissionDeniedError,
        404: NotFoundError,
        413: BadRequestError,
        422: BadRequestError,
    }.get(status, ProviderError)
    return error_type(message, status_code=status)


class HttpProvider:
    """What both HTTP providers share: the model and key they were given (or found in
    the environment), one endpoint with its pool, a repr that never shows the key."""

    name = "http"
    model: str | None

    def _setup(
        self,
        *,
        model: str | None,
        model_env: str,
        key: str | None,
        url: str,
        headers: dict[str, str],
        client: httpx.Client | None,
        retry: RetryPolicy | None,
        connect_timeout: float,
        read_timeout: float,
        timeout: float | None,
    ) -> None:
        resolved = model or os.environ.get(model_env)
        if not resolved:
            kind = type(self).__name__
            raise ConfigurationError(f"{kind} needs a model (or ${model_env})")
        self.model = resolved
        self._model = resolved
        self._has_key = bool(key)
        self._endpoint = HttpEndpoint(
            self.name,
            url,
            headers=headers,
            client=client,
            retry=retry,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            timeout=timeout,
        )

    def __repr__(self) -> str:
        key = "'***'" if self._has_key else "None"
        base = shown_url(getattr(self, "base_url", ""))
        return f"{type(self).__name__}(model={self.model!r}, base_url={base!r}, api_key={key})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool (unless the client was injected)."""
        self._endpoint.close()


#: Events read after a reply's end before its connection is given up on.
_DRAIN_LIMIT = 16
#: How long a caller waits for the end of a finished stream to be read (servers send
#: it at once; the connection is then back in the pool for the caller's next call).
_DRAIN_WAIT = 0.05
_drains: queue.SimpleQueue[tuple[Iterator[ServerSentEvent], threading.Event]] = queue.SimpleQueue()
#: Drain threads waiting for work; when none is, one more is started, so a server that
#: keeps a body open holds its own thread, never another stream's drain (and its
#: connection).
_idle_drainers = 0
_drainer_lock = threading.Lock()


#: What httpcore says when a connection closed before any byte of a response came.
_NO_RESPONSE = "Server disconnected without sending a response."


def drain(events: Iterator[ServerSentEvent]) -> None:
    """Read what is left of a finished stream, then close it, so that its connection can
    be reused; the reading is done by a background thread.

    Servers end the body right after the last event, and the caller waits for that
    (briefly: see ``_DRAIN_WAIT``). One that keeps the body open (pinging, or silent)
    holds the background thread until the read timeout or a few events more, never
    the caller, whose reply is complete. An error while reading that end changes
    nothing about the reply, so it is only logged. The caller must not use the
    iterator again.
    """
    global _idle_drainers  # noqa: PLW0603  the pool's one counter
    with _drainer_lock:
        if _idle_drainers:
            _idle_drainers -= 1  # that one takes this work
        else:
            threading.Thread(target=_drain_forever, name="moot-drain", daemon=True).start()
    ended = threading.Event()
    _drains.put((events, ended))
    ended.wait(_DRAIN_WAIT)


def _forget_drainers() -> None:
    """In a forked child: the parent's drain threads are not there (nor their work)."""
    global _idle_drainers, _drains, _drainer_lock  # noqa: PLW0603
    _idle_drainers = 0
    _drains = queue.SimpleQueue()
    _drainer_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_drainers)


def _drain_forever() -> None:
    global _idle_drainers  # noqa: PLW0603
    while True:
        events, ended = _drains.get()
        try:
            for count, _ in enumerate(events, 1):
                if count >= _DRAIN_LIMIT:
                    break
        except Exception as exc:  # noqa: BLE001  the reply is complete: nothing to report
            logger.debug("ignoring an error after the end of a reply: %s", exc)
        finally:
            with contextlib.suppress(Exception):
                getattr(events, "close", lambda: None)()
            ended.set()
            with _drainer_lock:
                _idle_drainers += 1


@contextmanager
def map_http_errors(provider: str, secrets: tuple[str, ...]) -> Iterator[None]:
    """Translate httpx's and httpx-sse's exceptions into :class:`ProviderError` (the boundary).

    Args:
        provider: The provider's name, for messages.
        secrets: Strings to scrub from messages.

    Raises:
        ProviderError: the subclass that says what the caller can do.
    """
    try:
        yield
    except (httpx.HTTPError, SSEError) as exc:
        error = _translate(provider, exc, secrets)
        # The original stays attached as the cause, unless its message holds a secret:
        # a traceback would print it.
        said = str(exc)
        raise error from (exc if redact(said, secrets) == said else None)


def _translate(provider: str, exc: Exception, secrets: tuple[str, ...]) -> ProviderError:
    if isinstance(exc, httpx.ConnectTimeout):
        return ProviderTimeout(_say(provider, "connect timeout", exc, secrets))
    if isinstance(exc, httpx.PoolTimeout):
        return ProviderTimeout(_say(provider, "no free connection in time", exc, secrets))
    if isinstance(exc, httpx.TimeoutException):
        return ProviderTimeout(_say(provider, "read timeout", exc, secrets))
    if isinstance(exc, httpx.RemoteProtocolError | httpx.NetworkError):
        return ConnectionLostError(_say(provider, "connection lost", exc, secrets))
    if isinstance(exc, httpx.DecodingError):
        return MalformedResponseError(_say(provider, "undecodable body", exc, secrets))
    if isinstance(exc, SSEError):
        return MalformedResponseError(_say(provider, "not an event stream", exc, secrets))
    return ProviderError(_say(provider, type(exc).__name__, exc, secrets))


def _say(provider: str, what: str, exc: BaseException, secrets: tuple[str, ...]) -> str:
    said = str(exc)
    return redact(f"{provider}: {what}" + (f" ({said})" if said else ""), secrets)


class _DeadlineStream(httpx.SyncByteStream):
    """A response body that ends with :class:`ProviderTimeout` once the deadline has passed.

    httpx's read timeout bounds each silence, not the whole body: a server that keeps
    sending keep-alive comments would otherwise hold a call forever. Checking at every
    chunk that arrives bounds such a stream. A chunk that never arrives is bounded by
    the read timeout, which :meth:`HttpEndpoint._timeouts` caps at the time that was
    left when the attempt began (httpx fixes it per request), so a body that stalls
    overruns the deadline by at most the time the attempt had already taken.
    """

    def __init__(self, inner: httpx.SyncByteStream, deadline: float, provider: str) -> None:
        self._inner = inner
        self._deadline = deadline
        self._provider = provider

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            if time.monotonic() >= self._deadline:
                raise ProviderTimeout(f"{self._provider}: the call's deadline passed mid-response")
            yield chunk

    def close(self) -> None:
        self._inner.close()


class HttpEndpoint:
    """One provider's HTTP side: a URL, its headers, a pooled client, timeouts and retries.

    Safe to use from several threads at once (an :class:`httpx.Client` is).

    Args:
        provider: The provider's name, for messages and logs.
        url: The absolute URL every call is POSTed to.
        headers: Headers of every call (credentials included: they are kept private).
        client: An :class:`httpx.Client` to use instead of building one; the endpoint
            never closes a client it did not build.
        retry: When to try a failed attempt again.
        connect_timeout: Seconds to connect.
        read_timeout: Seconds of silence allowed between reads.
        timeout: Seconds a whole call may take, retries included (None: no limit but the
            request's and the caller's deadlines).
    """

    def __init__(
        self,
        provider: str,
        url: str,
        *,
        headers: Mapping[str, str],
        client: httpx.Client | None = None,
        retry: RetryPolicy | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        timeout: float | None = None,
    ) -> None:
        self.provider = provider
        self.url = url
        self.retry = retry or RetryPolicy()
        self._headers = dict(headers)
        self._secrets = secrets_of(self._headers) + _url_secrets(url)
        _redacting.add(self._secrets)
        _check_headers(provider, self._headers, self._secrets)
        try:
            httpx.URL(url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise ConfigurationError(
                f"{provider}: invalid base URL {shown_url(str(url))!r} ({exc})"
            ) from None
        self._owns_client = client is None
        self._client = client or build_client(
            connect_timeout=connect_timeout, read_timeout=read_timeout
        )
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"<HttpEndpoint {self.provider} {shown_url(str(self.url))}>"

    def redact(self, text: str) -> str:
        """``text`` without this endpoint's secrets."""
        return redact(text, self._secrets)

    def close(self) -> None:
        """Close the connection pool, if this endpoint built it."""
        if self._owns_client:
            self._client.close()

    def deadline(self, request_timeout: float | None, deadline: float | None) -> float | None:
        """The :func:`time.monotonic` instant a call starting now must end by.

        Args:
            request_timeout: The request's own limit in seconds (``timeout_s``), if any.
            deadline: The caller's deadline, if any.

        Returns:
            The earliest of the two and of this endpoint's total timeout; None if none.
        """
        now = time.monotonic()
        candidates = [d for d in (deadline,) if d is not None]
        candidates += [now + t for t in (request_timeout, self._timeout) if t is not None]
        return min(candidates) if candidates else None

    def post(
        self, body: bytes, *, headers: Mapping[str, str] | None = None, deadline: float | None
    ) -> bytes:
        """POST ``body`` (JSON) and return the successful response's body, retrying as allowed.

        Raises:
            ProviderError: the call failed (after any retries).
        """
        call_headers = self._call_headers(headers, stream=False)
        secrets = self._call_secrets(call_headers)
        for attempt in range(1, self.retry.max_attempts + 1):
            try:
                response = self._open(body, call_headers, secrets, deadline)
                with closing(response), map_http_errors(self.provider, secrets):
                    return response.read()
            except ProviderError as exc:
                self._pause_or_raise(exc, attempt, deadline)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def events(
        self, body: bytes, *, headers: Mapping[str, str] | None = None, deadline: float | None
    ) -> Generator[ServerSentEvent, None, None]:
        """POST ``body`` (JSON) and yield the server-sent events of the response.

        Opening the stream is retried as allowed; once the body has started, an error
        ends the iteration. Closing the iterator closes the connection.

        Raises:
            ProviderError: the call failed, before or during the stream.
        """
        call_headers = self._call_headers(headers, stream=True)
        secrets = self._call_secrets(call_headers)
        response = self._open_with_retries(body, call_headers, secrets, deadline)
        with closing(response), map_http_errors(self.provider, secrets):
            yield from EventSource(response).iter_sse()

    def _open_with_retries(
        self,
        body: bytes,
        headers: dict[str, str],
        secrets: tuple[str, ...],
        deadline: float | None,
    ) -> httpx.Response:
        for attempt in range(1, self.retry.max_attempts + 1):
            try:
                return self._open(body, headers, secrets, deadline)
            except ProviderError as exc:
                self._pause_or_raise(exc, attempt, deadline)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _pause_or_raise(self, error: ProviderError, attempt: int, deadline: float | None) -> None:
        """Sleep before the next attempt, or re-raise ``error`` (the caller's current exception)."""
        wait = self.retry.wait_before_retry(error, attempt, deadline=deadline, now=time.monotonic())
        if wait is None:
            raise error
        logger.warning(
            "%s: attempt %d of %d failed (%s); retrying in %.2f s",
            self.provider,
            attempt,
            self.retry.max_attempts,
            error,  # messages are built scrubbed
            wait,
        )
        time.sleep(wait)

    def _open(
        self,
        body: bytes,
        headers: dict[str, str],
        secrets: tuple[str, ...],
        deadline: float | None,
    ) -> httpx.Response:
        """One attempt: send, and return the streaming response if its status is a success."""
        request = self._client.build_request(
            "POST", self.url, content=body, headers=headers, timeout=self._timeouts(deadline)
        )
        with map_http_errors(self.provider, secrets):
            response = self._send(request)
        if deadline is not None and isinstance(response.stream, httpx.SyncByteStream):
            response.stream = _DeadlineStream(response.stream, deadline, self.provider)
        if response.is_success:
            return response
        with closing(response), map_http_errors(self.provider, secrets):
            content = response.read()
        raise error_for_status(
            response.status_code,
            error_detail(content, secrets),
            provider=self.provider,
            retry_after=parse_retry_after(response.headers),
        )

    def _send(self, request: httpx.Request) -> httpx.Response:
        """Send once, and once more at once if a kept-alive connection turns out closed.

        Some servers (llama.cpp's, for one) close the connection after every stream
        without saying so; the pool may hand it out again before the close is seen, and
        the request then gets no answer at all. Sending it again on a new connection is
        not a retry of a failed call, so it costs no attempt and no wait.
        """
        reused = self._may_reuse_a_connection()
        try:
            return self._client.send(request, stream=True)
        except httpx.RemoteProtocolError as exc:
            # A new connection that got no answer is a failure, not staleness; so is an
            # answer that came but was broken (it was received: sending again would
            # repeat the call).
            if not reused or str(exc) != _NO_RESPONSE:
                raise
            logger.debug(
                "%s: no answer on a kept-alive connection (%s); resending", self.provider, exc
            )
            return self._client.send(request, stream=True)

    def _may_reuse_a_connection(self) -> bool:
        """Whether the client's pool holds an idle connection this request may be given.

        Looks into httpx's transport (httpcore's pool); a client whose transport cannot
        be looked into (an injected one) is taken to have one.
        """
        pool = getattr(getattr(self._client, "_transport", None), "_pool", None)
        connections = getattr(pool, "connections", None)
        if not isinstance(connections, list):
            return True
        return any(getattr(c, "is_idle", lambda: True)() for c in connections)

    def _timeouts(self, deadline: float | None) -> httpx.Timeout:
        """This attempt's timeouts: the configured ones, none longer than the time left."""
        connect, read = self._connect_timeout, self._read_timeout
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProviderTimeout(f"{self.provider}: the call's deadline passed")
            connect, read = min(connect, left), min(read, left)
        return httpx.Timeout(read, connect=connect, pool=connect)

    def _call_headers(self, extra: Mapping[str, str] | None, *, stream: bool) -> dict[str, str]:
        headers = {
            "content-type": "application/json",
            "accept": "text/event-stream" if stream else "application/json",
        }
        if stream:
            headers["cache-control"] = "no-store"
        headers.update(self._headers)
        if extra:
            for name, value in extra.items():
                if not isinstance(value, str) or not value.isascii():
                    raise BadRequestError(
                        f"{self.provider}: extra header {name!r} has a value HTTP headers "
                        "cannot carry (only ASCII text)"
                    )
            headers.update(extra)
        return headers

    def _call_secrets(self, headers: Mapping[str, str]) -> tuple[str, ...]:
        extra = secrets_of(headers)
        if set(extra) <= set(self._secrets):
            return self._secrets
        return tuple(sorted(set(extra) | set(self._secrets), key=len, reverse=True))
