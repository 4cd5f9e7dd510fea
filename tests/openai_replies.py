"""Chat Completions replies as an OpenAI-compatible server sends them, for a ScriptedServer.

    with ScriptedServer(text_reply("moot", model="served-model")) as server: ...

A streamed reply is the ``chat.completion.chunk`` events a server writes: a first chunk
with the role, the content (or a tool call's arguments) in several pieces, a chunk with
the finish reason, a last chunk with usage and no choices, then ``data: [DONE]``.
"""

from __future__ import annotations

import json
from typing import Any

from tests.sse_server import Reply

__all__ = [
    "chunk",
    "error_reply",
    "text_reply",
    "tool_call_reply",
    "usage",
]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """A usage object as servers send it."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chunk(
    delta: dict[str, Any] | None = None,
    *,
    finish: str | None = None,
    model: str,
    **extra: Any,
) -> str:
    """One ``chat.completion.chunk`` as JSON (no choices when ``delta`` is None)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    body = {
        "id": "chatcmpl-e2e",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": choices,
        **extra,
    }
    return json.dumps(body, ensure_ascii=False)


def text_reply(
    text: str,
    *,
    model: str,
    prompt_tokens: int = 21,
    completion_tokens: int = 5,
    pieces: int = 3,
) -> Reply:
    """A streamed text reply, its content split into about ``pieces`` deltas."""
    size = max(1, -(-len(text) // pieces))
    parts = [text[i : i + size] for i in range(0, len(text), size)] or [""]
    events = [chunk({"role": "assistant", "content": ""}, model=model)]
    events += [chunk({"content": part}, model=model) for part in parts]
    events.append(chunk({}, finish="stop", model=model))
    events.append(chunk(None, model=model, usage=usage(prompt_tokens, completion_tokens)))
    events.append("[DONE]")
    return Reply.sse(events)


def tool_call_reply(
    name: str,
    argument_pieces: list[str],
    *,
    call_id: str,
    model: str,
    prompt_tokens: int = 40,
    completion_tokens: int = 12,
) -> Reply:
    """A streamed reply with one tool call whose JSON arguments arrive in the given pieces."""
    opening = {
        "index": 0,
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": ""},
    }
    events = [chunk({"role": "assistant", "content": None, "tool_calls": [opening]}, model=model)]
    for piece in argument_pieces:
        fragment = {"index": 0, "function": {"arguments": piece}}
        events.append(chunk({"tool_calls": [fragment]}, model=model))
    events.append(chunk({}, finish="tool_calls", model=model))
    events.append(chunk(None, model=model, usage=usage(prompt_tokens, completion_tokens)))
    events.append("[DONE]")
    return Reply.sse(events)


def error_reply(status: int, message: str, **kwargs: Any) -> Reply:
    """An error status with an OpenAI-style JSON error body."""
    kind = "rate_limit_error" if status == 429 else "server_error"
    return Reply.json({"error": {"message": message, "type": kind}}, status=status, **kwargs)
