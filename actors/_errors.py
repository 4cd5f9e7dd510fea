"""Errors raised by moot.actors, branched by what the caller can do about them.

::

    MootError (moot.events)
    ├── ConfigurationError         a scenario file or option is wrong; nothing ran
    ├── DialogueError              a dialogue was used wrongly (unknown participant, closed, ...)
    ├── ToolLoopError              a tool loop cannot go on (depth limit, bad state)
    ├── ToolError                  a tool failed (becomes an error result for the model)
    └── ProviderError              a model call failed; ``retryable`` says if trying again may help
        ├── AuthenticationError    401: the API key is missing or wrong
        ├── PermissionDeniedError  403
        ├── NotFoundError          404: wrong base URL or model
        ├── BadRequestError        400 / 413 / 422: the request itself is wrong
        ├── RateLimitError         429 (retryable; ``retry_after`` in seconds if the server said)
        ├── ServerError            5xx, 529 overloaded (retryable; ``retry_after`` too)
        ├── ProviderTimeout        connect, read or total timeout (retryable)
        ├── ConnectionLostError    the connection broke, also mid-stream (retryable)
        ├── MalformedResponseError the response could not be understood
        └── ScriptError            a scripted agent's reply was an error, or its replies ran out

Every error becomes an :class:`moot.events.Error` record in the log with
:func:`error_record`, which keeps its kind, message and retryability.
"""

from __future__ import annotations

import re

from moot.events import Error, MootError

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "ConfigurationError",
    "ConnectionLostError",
    "DialogueError",
    "MalformedResponseError",
    "NotFoundError",
    "PermissionDeniedError",
    "ProviderError",
    "ProviderTimeout",
    "RateLimitError",
    "ScriptError",
    "ServerError",
    "ToolError",
    "ToolLoopError",
    "error_record",
    "storable_text",
]


class ConfigurationError(MootError, ValueError):
    """A scenario file, agent spec or option is invalid. Raised before anything runs."""


class DialogueError(MootError):
    """A dialogue was asked to do something it cannot (unknown participant, closed, ...)."""


class ToolLoopError(MootError):
    """A tool loop cannot go on: its depth limit, or it was used in a bad state."""


class ToolError(MootError):
    """A tool failed. Raise it from a tool to send ``message`` to the model as an error."""


class ProviderError(MootError):
    """A model call failed.

    Attributes:
        retryable: Whether the same request may succeed if tried again.
        status_code: The HTTP status, when there was one.
        retry_after: Seconds the server asked to wait before trying again (its
            ``Retry-After``, on a 429, a 503, a 529, ...), when it said.
    """

    kind = "provider_error"
    retryable = False

    def __init__(
        self, message: str, *, status_code: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.retry_after = retry_after


class AuthenticationError(ProviderError):
    kind = "authentication"


class PermissionDeniedError(ProviderError):
    kind = "permission_denied"


class NotFoundError(ProviderError):
    kind = "not_found"


class BadRequestError(ProviderError):
    kind = "bad_request"


class RateLimitError(ProviderError):
    kind = "rate_limited"
    retryable = True

    def __init__(
        self, message: str, *, status_code: int | None = 429, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status_code=status_code, retry_after=retry_after)


class ServerError(ProviderError):
    kind = "server_error"
    retryable = True


class ProviderTimeout(ProviderError):
    kind = "timeout"
    retryable = True


class ConnectionLostError(ProviderError):
    kind = "connection_lost"
    retryable = True


class MalformedResponseError(ProviderError):
    kind = "malformed_response"


class ScriptError(ProviderError):
    """A scripted agent answered with an error entry, or has no replies left."""

    kind = "scripted"


def error_record(exc: BaseException) -> Error:
    """The log's record of an exception: its kind, message and whether a retry may help.

    The message is made storable (see :func:`storable_text`): an exception may quote a
    file name that is not UTF-8.
    """
    if isinstance(exc, ProviderError):
        return Error(kind=exc.kind, message=storable_text(str(exc)), retryable=exc.retryable)
    if isinstance(exc, TimeoutError):
        return Error(kind="timeout", message=storable_text(str(exc)) or "timed out", retryable=True)
    return Error(kind=type(exc).__name__, message=storable_text(str(exc)) or type(exc).__name__)


_SURROGATE = re.compile("[\ud800-\udfff]")


def storable_text(text: str) -> str:
    """``text`` with each lone surrogate (which UTF-8 cannot hold) replaced by U+FFFD.

    Python hands over bytes that are not UTF-8 (a file name from ``os.listdir``) as lone
    surrogates; written as they are, they would make the event impossible to record.
    """
    try:
        text.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text
