"""Shared value types: speakers, participants, usage, chat messages and content blocks.

Every type here is a frozen msgspec Struct. Sequences are tuples, so a value is
immutable all the way down and can be hashed, compared and shared between threads.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = [
    "ChatMessage",
    "ContentBlock",
    "Error",
    "ImageBlock",
    "ParticipantInfo",
    "ReasoningBlock",
    "Speaker",
    "TextBlock",
    "ToolCallBlock",
    "ToolResultBlock",
    "Usage",
    "text_of",
]


class Value(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Base of the plain value types (no tag)."""


class Speaker(Value, frozen=True):
    """Who said something: the system, a user, or a named agent."""

    kind: Literal["system", "user", "agent"]
    name: str
    role: str | None = None


class ParticipantInfo(Value, frozen=True):
    """A dialogue participant as the log knows it (the agent behind it lives in code)."""

    name: str
    role: str | None = None
    description: str | None = None
    capabilities: tuple[str, ...] = ()
    agent: str | None = None


class Usage(Value, frozen=True):
    """Token counts of one model call, or a sum of several."""

    input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            reasoning_tokens=_add_optional(self.reasoning_tokens, other.reasoning_tokens),
            cache_read_tokens=_add_optional(self.cache_read_tokens, other.cache_read_tokens),
            cache_write_tokens=_add_optional(self.cache_write_tokens, other.cache_write_tokens),
        )

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def _add_optional(a: int | None, b: int | None) -> int | None:
    if a is None and b is None:
        return None
    return (a or 0) + (b or 0)


class Error(Value, frozen=True):
    """A failure as recorded in the log: what kind, what it said, and whether a retry may help."""

    kind: str
    message: str
    retryable: bool = False


class _Block(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", omit_defaults=True):
    """Base of the content blocks, tagged by ``kind``."""


class TextBlock(_Block, frozen=True, tag="text"):
    text: str


class ToolCallBlock(_Block, frozen=True, tag="tool_call"):
    id: str
    name: str
    arguments: dict[str, Any] = {}
    #: The arguments as the model sent them, when they were not a JSON object
    #: (``arguments`` is then empty): the call gets an error result, not a crash.
    invalid_arguments: str | None = None


class ToolResultBlock(_Block, frozen=True, tag="tool_result"):
    tool_call_id: str
    content: str
    is_error: bool = False


class ReasoningBlock(_Block, frozen=True, tag="reasoning"):
    text: str
    #: Provider-specific proof of the reasoning (Anthropic's thinking signature),
    #: which must be sent back unchanged on the next request.
    signature: str | None = None
    #: Reasoning the provider keeps encrypted (Anthropic's ``redacted_thinking``
    #: data): ``text`` is empty, and this goes back unchanged on the next request.
    redacted: str | None = None


class ImageBlock(_Block, frozen=True, tag="image"):
    media_type: str
    data: str | None = None
    url: str | None = None


ContentBlock = TextBlock | ToolCallBlock | ToolResultBlock | ReasoningBlock | ImageBlock


class ChatMessage(Value, frozen=True):
    """One message of a chat history, as a model call sees it."""

    role: Literal["system", "user", "assistant", "tool"]
    content: tuple[ContentBlock, ...] = ()

    @classmethod
    def text(cls, role: Literal["system", "user", "assistant", "tool"], text: str) -> ChatMessage:
        """A message holding one text block."""
        return cls(role=role, content=(TextBlock(text=text),))


def text_of(blocks: tuple[ContentBlock, ...] | list[ContentBlock]) -> str:
    """The concatenated text of the text blocks (reasoning and tool blocks are left out)."""
    return "".join(b.text for b in blocks if isinstance(b, TextBlock))
