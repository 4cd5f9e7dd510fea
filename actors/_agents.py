"""Agents: what stands behind a dialogue participant.

An agent gets a :class:`Payload` (the messages delivered to it this turn, the
participants, the context) and returns a reply. Three kinds come with moot: any Python
callable (:class:`CallableAgent`), an LLM over a provider (:class:`LlmAgent`), and, in
``moot.actors``' tool-loop module, an LLM running a tool loop.

An agent runs in its participant's actor thread: one call at a time.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import msgspec

from moot.events import (
    ChatMessage,
    ContentBlock,
    DialogueMessage,
    ParticipantInfo,
    Usage,
)

from ._model import Delta, ModelRequest, Provider, call_model, request_digest

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "Agent",
    "AgentMemory",
    "AgentReply",
    "CallableAgent",
    "LlmAgent",
    "Payload",
    "render_messages",
    "render_persona",
]


class Payload(msgspec.Struct, frozen=True, kw_only=True):
    """What a participant is given for one turn (its ``PayloadDelivered``, resolved)."""

    stream: str
    turn: int
    participant: ParticipantInfo
    participants: tuple[ParticipantInfo, ...]
    messages: tuple[DialogueMessage, ...]
    #: The seq of each message (its id in the dialogue stream), in the same order.
    seqs: tuple[int, ...]
    context: str | None = None
    #: The seq of the PayloadDelivered that recorded this payload.
    delivered_seq: int | None = None

    @property
    def text(self) -> str:
        """The delivered messages as lines of text (see :func:`render_messages`)."""
        return render_messages(self.messages, self.participant.name)


class AgentReply(msgspec.Struct, frozen=True, kw_only=True):
    """An agent's answer for one turn."""

    content: str
    usage: Usage | None = None
    model: str | None = None
    latency_ms: float | None = None
    attachments: tuple[ContentBlock, ...] = ()
    #: The tool-loop stream that produced this reply, if any.
    loop: str | None = None
    metadata: dict[str, Any] | None = None
    #: The digest of the model request behind the reply (see request_digest).
    request_digest: str | None = None


class AgentMemory(msgspec.Struct, frozen=True, kw_only=True):
    """An agent's past, rebuilt from the log when a dialogue resumes.

    ``exchanges`` are (delivered messages, own reply) pairs in order; ``calls`` counts
    the model calls whose outcome (reply or error) is on record.
    """

    name: str
    exchanges: tuple[tuple[tuple[DialogueMessage, ...], str], ...] = ()
    calls: int = 0
    #: The dialogue stream the memory comes from.
    stream: str = ""


@runtime_checkable
class Agent(Protocol):
    """Anything that can answer a payload. Runs in its participant's thread."""

    def respond(self, payload: Payload) -> AgentReply | str:
        """Answer one turn. Raise to fail the turn (recorded as ParticipantFailed)."""
        ...


class CallableAgent:
    """An agent from a plain function ``fn(payload) -> str | AgentReply``."""

    def __init__(self, fn: Callable[[Payload], AgentReply | str]) -> None:
        self.fn = fn

    def __repr__(self) -> str:
        return f"CallableAgent({getattr(self.fn, '__name__', self.fn)!r})"

    def respond(self, payload: Payload) -> AgentReply | str:
        return self.fn(payload)


def render_persona(me: ParticipantInfo, participants: tuple[ParticipantInfo, ...]) -> str:
    """Who the agent is, and who else takes part (marking "you" and the allies)."""
    lines = [f"You are {me.name}" + (f", the {me.role}" if me.role else "") + "."]
    if me.description:
        lines.append(me.description)
    if me.capabilities:
        lines.append("Your capabilities: " + ", ".join(me.capabilities) + ".")
    lines.append("")
    lines.append("# Participants")
    for p in participants:
        relation = "you" if p.name == me.name else "ally"
        role = f" - {p.role}" if p.role else ""
        about = f": {p.description}" if p.description else ""
        lines.append(f"- {p.name} ({relation}){role}{about}")
    return "\n".join(lines)


def render_messages(messages: tuple[DialogueMessage, ...] | list[DialogueMessage], me: str) -> str:
    """Delivered messages as ``[speaker (role)]: content`` lines."""
    out = []
    for m in messages:
        who = m.speaker.name + (" (you)" if m.speaker.name == me else "")
        if m.speaker.role:
            who += f", {m.speaker.role}"
        tag = "" if m.message_type == "conversational" else f" ({m.message_type})"
        out.append(f"[{who}]{tag}: {m.content}")
    return "\n".join(out)


class LlmAgent:
    """A participant answered by a model: persona, participants, context and history
    rendered into a chat request.

    Args:
        provider: The model.
        instructions: Extra system instructions, after the persona and context.
        stream: Use the streaming API (deltas go to ``on_delta``).
        history_turns: How many past exchanges to send back to the model (None: all).
            The log holds the whole history; this bounds the prompt and the heap.
        temperature, max_tokens: Passed with every request.
        on_delta: Called with each streamed delta (in the participant's thread).
    """

    def __init__(
        self,
        provider: Provider,
        *,
        instructions: str | None = None,
        stream: bool = True,
        history_turns: int | None = 20,
        temperature: float | None = None,
        max_tokens: int | None = None,
        on_delta: Callable[[Delta], None] | None = None,
    ) -> None:
        self.provider = provider
        self.instructions = instructions
        self.stream = stream
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.on_delta = on_delta
        self._history: collections.deque[tuple[str, str]] = collections.deque(maxlen=history_turns)

    def __repr__(self) -> str:
        return f"LlmAgent({self.provider!r})"

    def restore(self, memory: AgentMemory) -> None:
        """Rebuild the chat history from the log, and skip script entries already used."""
        self._history.clear()
        for messages, reply in memory.exchanges:
            self._history.append((render_messages(messages, memory.name), reply))
        skip = getattr(self.provider, "skip", None)
        if callable(skip):
            skip(memory.calls)

    def request(self, payload: Payload) -> ModelRequest:
        """The chat request for one turn (no I/O)."""
        system = render_persona(payload.participant, payload.participants)
        if payload.context:
            system += "\n\n" + payload.context
        if self.instructions:
            system += "\n\n" + self.instructions
        messages: list[ChatMessage] = []
        for said, answered in self._history:
            messages.append(ChatMessage.text("user", said))
            messages.append(ChatMessage.text("assistant", answered))
        messages.append(ChatMessage.text("user", payload.text or "(no new messages)"))
        return ModelRequest(
            messages=tuple(messages),
            system=system,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
        )

    def remember(self, said: str, answered: str) -> None:
        """Add one exchange to the history sent with later requests."""
        self._history.append((said, answered))

    def respond(self, payload: Payload) -> AgentReply:
        request = self.request(payload)
        response = call_model(self.provider, request, stream=self.stream, on_delta=self.on_delta)
        self.remember(payload.text, response.text)
        return AgentReply(
            content=response.text,
            usage=response.usage,
            model=response.model,
            latency_ms=response.latency_ms,
            request_digest=request_digest(request),
        )
