"""The participant actor: one thread per participant, running its agent one turn at a time."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import msgspec
import pykka

from moot.events import Error, checked

from ._agents import AgentReply, Payload
from ._errors import error_record

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._agents import Agent

__all__ = ["Outcome", "ParticipantActor"]


class Outcome(msgspec.Struct, frozen=True):
    """How one participant's turn ended: a reply or an error."""

    name: str
    turn: int
    reply: AgentReply | None = None
    error: Error | None = None


class ParticipantActor(pykka.ThreadingActor):
    """Runs an agent on each payload it is told, and posts the outcome.

    ``post`` is called in this actor's thread with the :class:`Outcome`; it must be
    thread-safe (the coordinator's mailbox is). An agent's exception becomes an
    outcome with an error: it never stops the actor and never reaches another
    participant.
    """

    use_daemon_thread = True

    def __init__(self, name: str, agent: Agent, post: Callable[[Outcome], None]) -> None:
        super().__init__()
        self.name = name
        self.agent = agent
        self._post = post

    def on_receive(self, message: Any) -> None:
        if isinstance(message, Payload):
            self._post(self._run(message))

    def _run(self, payload: Payload) -> Outcome:
        started = time.monotonic()
        try:
            answer: object = self.agent.respond(payload)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001  an agent's failure is recorded, not raised
            # BaseException too (SystemExit, asyncio.CancelledError from an agent's own
            # event loop): pykka would take one for a crash and stop every actor in the
            # process, other dialogues' included.
            return Outcome(self.name, payload.turn, error=error_record(exc))
        if isinstance(answer, str | AgentReply):
            # An AgentReply's fields are not checked when it is made, and a str may hold
            # text JSON cannot (a lone surrogate): either would fail the turn's append.
            try:
                reply = _checked(answer)
            except ValueError as exc:
                error = Error(kind="bad_reply", message=f"agent returned a bad reply: {exc}")
                return Outcome(self.name, payload.turn, error=error)
        else:  # the protocol is not enforced at run time
            kind = type(answer).__name__
            error = Error(kind="bad_reply", message=f"agent returned {kind}, not str or AgentReply")
            return Outcome(self.name, payload.turn, error=error)
        if reply.latency_ms is None:
            latency = round((time.monotonic() - started) * 1000, 3)
            reply = msgspec.structs.replace(reply, latency_ms=latency)
        return Outcome(self.name, payload.turn, reply=reply)


def _checked(answer: str | AgentReply) -> AgentReply:
    """The answer as a reply the log can hold.

    Raises:
        ValueError: a field has the wrong type, or text JSON cannot encode.
    """
    if isinstance(answer, AgentReply):
        return checked(answer)
    try:
        answer.encode()  # all a str can get wrong, and cheaper than a round trip
    except UnicodeEncodeError as exc:
        raise ValueError(f"invalid text: {exc}") from None
    return AgentReply(content=answer)
