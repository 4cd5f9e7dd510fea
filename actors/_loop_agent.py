"""Dialogue participants answered by a tool loop.

Each turn runs a loop in its own stream, ``<dialogue>/<participant>/t<turn>``, whose
``LoopStarted.parent`` points at the dialogue and at the PayloadDelivered it answers;
the reply's ``DialogueMessage.loop`` points back. The stream id is fixed by the turn,
so a participant re-run after a crash picks up its loop instead of starting another,
and a loop that had finished is not run again.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from moot.events import LoopParent, LoopState
from moot.store import UnknownStreamError

from ._agents import AgentMemory, AgentReply, LlmAgent, Payload
from ._errors import ToolLoopError
from ._loop import (
    Completed,
    LoopResult,
    Paused,
    ToolLoop,
    ToolLoopConfig,
    ToolLoopHandle,
    model_calls,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from moot.store import LogBase

    from ._model import Delta, Provider
    from ._tools import ToolRegistry

__all__ = ["ToolLoopAgent", "loop_stream_id"]


def loop_stream_id(dialogue: str, participant: str, turn: int) -> str:
    """The stream of the loop that answers ``participant`` in ``turn`` of ``dialogue``."""
    return f"{dialogue}/{participant}/t{turn}"


class ToolLoopAgent:
    """A participant whose every turn is a tool loop over ``provider`` and ``tools``.

    The prompt (persona, participants, context, recent exchanges) is rendered as for
    :class:`LlmAgent`; the loop's final answer is the reply.
    """

    def __init__(
        self,
        provider: Provider,
        tools: ToolRegistry,
        log: LogBase,
        *,
        config: ToolLoopConfig | None = None,
        on_pause: Callable[[ToolLoopHandle, Paused], None] | None = None,
        instructions: str | None = None,
        history_turns: int | None = 20,
        on_delta: Callable[[Delta], None] | None = None,
    ) -> None:
        self.provider = provider
        self.tools = tools
        self.log = log
        self.config = config or ToolLoopConfig()
        self.on_delta = on_delta
        #: Who decides when a loop pauses for approval (default: wait for a person).
        self.on_pause = on_pause
        self._prompt = LlmAgent(provider, instructions=instructions, history_turns=history_turns)
        self.loops: list[str] = []
        #: The loop answering the turn in progress (closed by interrupt).
        self._current: ToolLoopHandle | None = None

    def __repr__(self) -> str:
        return f"ToolLoopAgent({self.provider!r}, {len(self.tools)} tools)"

    def interrupt(self) -> None:
        """Give up the turn in progress (its dialogue is stopping): the loop's handle is
        closed, so a wait for a decision ends; the loop stays resumable."""
        handle = self._current
        if handle is not None:
            with contextlib.suppress(TimeoutError, ToolLoopError):
                handle.close(timeout=5)

    def restore(self, memory: AgentMemory) -> None:
        """Rebuild the chat history, and skip script entries used by earlier loops."""
        self._prompt.restore(AgentMemory(name=memory.name, exchanges=memory.exchanges))
        skip = getattr(self.provider, "skip", None)
        if callable(skip):
            skip(self._model_calls_on_record(memory.stream, memory.name))

    def _model_calls_on_record(self, dialogue: str, name: str) -> int:
        """Model calls of this participant's loops in this dialogue (not another's)."""
        prefix = loop_stream_id(dialogue, name, 0)[:-1]
        return sum(
            model_calls(self.log, head.stream)
            for head in self.log.streams()
            if head.parent == dialogue and head.stream.startswith(prefix)
        )

    def respond(self, payload: Payload) -> AgentReply:
        name = payload.participant.name
        stream = loop_stream_id(payload.stream, name, payload.turn)
        handle = self._open(stream, payload)
        self._current = handle
        try:
            result = self._finish(handle)
        finally:
            self._current = None
            handle.close()
        self._prompt.remember(payload.text, result.text)
        self.loops.append(stream)
        return AgentReply(
            content=result.text,
            usage=result.usage,
            model=result.model,
            loop=stream,
        )

    def _open(self, stream: str, payload: Payload) -> ToolLoopHandle:
        parent = LoopParent(
            stream=payload.stream,
            seq=payload.delivered_seq or 0,
            turn=payload.turn,
            participant=payload.participant.name,
        )
        if _exists(self.log, stream):
            # This participant's loop for this turn, left by a crash; nothing else may
            # stand in for it (a stream given that id by hand, say).
            state = self.log.replay(stream)
            if not isinstance(state, LoopState) or state.parent != parent:
                raise ToolLoopError(
                    f"stream {stream!r} exists but is not the loop of "
                    f"{payload.participant.name!r} for turn {payload.turn} of {payload.stream!r}"
                )
            return ToolLoop.resume(
                self.log, stream, self.provider, self.tools, self.config, on_delta=self.on_delta
            )
        request = self._prompt.request(payload)
        return ToolLoop.start(
            self.log,
            self.provider,
            self.tools,
            messages=request.messages,
            system=request.system,
            config=self.config,
            stream=stream,
            parent=parent,
            on_delta=self.on_delta,
        )

    def _finish(self, handle: ToolLoopHandle) -> LoopResult:
        """Run the loop to its end (or read the end of a loop that had finished)."""
        state = self.log.replay(handle.stream)
        assert isinstance(state, LoopState)
        if state.error is not None:
            raise ToolLoopError(state.error.message)
        if state.finished:
            turn = handle.next_turn(timeout=60)
            assert isinstance(turn, Completed)
            return turn.result
        # The loop's own deadline (config.timeout_s) ends it with Done(timeout); no
        # second clock here, which would race it.
        return handle.run(on_pause=self.on_pause)


def _exists(log: LogBase, stream: str) -> bool:
    try:
        log.stream_info(stream)
    except UnknownStreamError:
        return False
    return True
