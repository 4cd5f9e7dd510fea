"""Dialogues: the Python API over a coordinator actor and its participants.

::

    log = EventLog("moot.db")
    with Dialogue.create(log, participants=[Participant("alice", agent_a),
                                            Participant("bob", agent_b)]) as d:
        for reply in d.session("Name the project."):   # as each reply allows
            print(reply.participant, reply.content)
        replies = d.run("Now criticise the names.")      # the whole turn, in order

Calls on a :class:`Dialogue` are thread-safe; they talk to the coordinator actor with
``ask`` and wait at most ``timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar

import msgspec
import pykka

from moot.events import (
    DialogueContext,
    DialogueMessage,
    DialogueStarted,
    DialogueState,
    JoiningStrategy,
    ParticipantFailed,
    ParticipantInfo,
    PayloadDelivered,
    Speaker,
    TurnStarted,
    checked,
)

from ._agents import Agent, AgentMemory
from ._context import render_context
from ._coordinator import MODERATOR, Ask, Coordinator, StartTurn
from ._decide import MENTION_STRATEGIES, REACTIONS, validate_order
from ._errors import DialogueError
from ._lease import StreamBusy, lease
from ._session import Channel, Session, TurnReply

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from moot.store import LogBase

__all__ = ["Dialogue", "Input", "Participant", "new_stream_id"]

_STOPPED = "the dialogue's coordinator has stopped"
_TURN_IN_PROGRESS = "the turn in progress did not end within {wait} s"
_NO_ANSWER = "the coordinator did not answer within {wait} s"
_CLOSE_QUEUED = (
    "the turn in progress did not end within {wait} s; the dialogue closes when it does "
    "(stop() to give it up)"
)


@dataclass(frozen=True)
class Participant:
    """A participant to add: its name, the agent behind it, and how others see it."""

    name: str
    agent: Agent
    role: str | None = None
    description: str | None = None
    capabilities: tuple[str, ...] = ()
    #: What kind of agent it is, for the record (e.g. "scripted", "openai").
    kind: str | None = None

    @property
    def info(self) -> ParticipantInfo:
        return ParticipantInfo(
            name=self.name,
            role=self.role,
            description=self.description,
            capabilities=self.capabilities,
            agent=self.kind or type(self.agent).__name__,
        )


@dataclass(frozen=True)
class Input:
    """A message given to the dialogue (a plain ``str`` is a user message)."""

    content: str
    speaker: str = "user"
    kind: Literal["system", "user", "agent"] = "user"
    message_type: str = "conversational"
    metadata: dict[str, Any] | None = field(default=None)

    def message(self) -> DialogueMessage:
        return DialogueMessage(
            turn=0,
            speaker=Speaker(kind=self.kind, name=self.speaker),
            content=self.content,
            origin="incoming",
            message_type=self.message_type,
            metadata=self.metadata,
        )


def new_stream_id(kind: str = "dialogue") -> str:
    """A fresh, sortable stream id such as ``dialogue-20261123-101500-3fa2c1``."""
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


class Dialogue:
    """A running dialogue: its stream in the log, its coordinator, its participants.

    Create one with :meth:`create`, or pick up an unfinished one with :meth:`resume`.
    """

    def __init__(
        self,
        log: LogBase,
        stream: str,
        ref: pykka.ActorRef[Any],
        timeout: float,
        stopped: threading.Event,
    ) -> None:
        self.log = log
        self.stream = stream
        self._ref = ref
        #: Set once the coordinator has stopped its participants and given the lease back.
        self._stopped = stopped
        self.timeout = timeout
        self._closed = False
        #: stop() was called: a close asked for before it is given up.
        self._stopping = False
        self._lock = threading.Lock()
        #: The close under way, once asked for.
        self._closing: concurrent.futures.Future[Any] | None = None

    def __repr__(self) -> str:
        return f"<Dialogue {self.stream}>"

    # ---------------------------------------------------------------- making

    @classmethod
    def create(
        cls,
        log: LogBase,
        *,
        participants: Sequence[Participant],
        mode: str = "broadcast",
        order: str | None = None,
        names: Sequence[str] = (),
        context: DialogueContext | None = None,
        reaction: str | None = None,
        moderator: Agent | None = None,
        mention_strategy: Literal["exact_word", "name", "partial"] = "exact_word",
        stream: str | None = None,
        metadata: dict[str, Any] | None = None,
        timeout: float = 60.0,
    ) -> Dialogue:
        """Start a new dialogue: records DialogueStarted and starts the actors.

        Args:
            log: Where every event goes.
            participants: The initial participants, in insertion order.
            mode: broadcast, sequential, mentioned or moderator.
            order: How a turn's replies are yielded: completion (default),
                participant_order or explicit; sequential: as_added (default) or explicit.
            names: The explicit order (unlisted participants follow in insertion order).
            context: Environment, talk style and extra context for every participant.
            reaction: When an input gets a reply: always (default), user_only,
                agent_only, except_system, conversational, except_context_info.
            moderator: The agent that picks each turn's mode (moderator mode only).
            mention_strategy: How ``@name`` is matched in mentioned mode.
            stream: The stream id (default: a new one).
            timeout: Seconds to wait for the coordinator on each call.

        Raises:
            DialogueError: an invalid combination (unknown mode or order, an explicit
                order naming a stranger, duplicate names, moderator mode without a
                moderator). Nothing is recorded then.
        """
        order = order or ("as_added" if mode == "sequential" else "completion")
        if isinstance(names, str):  # a str is a sequence too: "ab" would be a and b
            raise DialogueError(f"names is a list of participant names, not a string: {names!r}")
        roster = [p.name for p in participants]
        validate_order(mode, order, names, roster)
        if len(set(roster)) != len(roster):
            raise DialogueError("participant names must be unique")
        if MODERATOR in roster:
            raise DialogueError(f"{MODERATOR!r} is reserved for the moderator agent")
        if mode == "moderator" and moderator is None:
            raise DialogueError("a moderator dialogue needs a moderator agent")
        if reaction is not None and reaction not in REACTIONS:
            raise DialogueError(f"unknown reaction strategy {reaction!r}")
        _check_mention_strategy(mention_strategy)
        render_context(context)  # an unknown talk style fails here, before anything is recorded
        stream = stream or new_stream_id()
        started = _checked(
            DialogueStarted(
                mode=mode,  # type: ignore[arg-type]
                order=order,  # type: ignore[arg-type]
                names=tuple(names),
                participants=tuple(p.info for p in participants),
                context=context,
                reaction=reaction,
                metadata=metadata,
                # The default is not written, so a dialogue reads as it did before
                # the field existed (and re-drives of older logs still match).
                mention_strategy=None if mention_strategy == "exact_word" else mention_strategy,
            )
        )
        log.append(stream, [started], expected_seq=0)
        state = log.replay(stream)
        assert isinstance(state, DialogueState)
        agents = {p.name: p.agent for p in participants}
        stopped = threading.Event()
        release = _signalling(_lease(log, stream), stopped)
        try:
            ref = Coordinator.start(
                log,
                stream,
                state,
                agents,
                moderator=moderator,
                mention_strategy=mention_strategy,
                release=release,
            )
        except BaseException:
            release()
            raise
        return cls(log, stream, ref, timeout, stopped)

    @classmethod
    def resume(
        cls,
        log: LogBase,
        stream: str,
        agents: Mapping[str, Agent],
        *,
        moderator: Agent | None = None,
        mention_strategy: Literal["exact_word", "name", "partial"] | None = None,
        timeout: float = 60.0,
    ) -> Dialogue:
        """Pick up a dialogue from its log, e.g. after a crash.

        Each agent is given its memory (what it was delivered, what it answered, how
        many model calls are on record) when it has a ``restore`` method. Call
        :meth:`finish_turn` to complete a turn the crash interrupted. Without
        ``mention_strategy``, the one the dialogue recorded is used.

        Raises:
            DialogueError: the stream is not a dialogue, is closed, or a participant
                has no agent.
        """
        stopped = threading.Event()
        # One driver per stream, also across processes.
        release = _signalling(_lease(log, stream), stopped)
        try:
            return cls._resume(
                log, stream, agents, moderator, mention_strategy, timeout, release, stopped
            )
        except BaseException:
            release()
            raise

    @classmethod
    def _resume(
        cls,
        log: LogBase,
        stream: str,
        agents: Mapping[str, Agent],
        moderator: Agent | None,
        mention_strategy: str | None,
        timeout: float,
        release: Callable[[], None],
        stopped: threading.Event,
    ) -> Dialogue:
        state = log.replay(stream)  # read once the lease is ours
        if not isinstance(state, DialogueState):
            raise DialogueError(f"stream {stream!r} is not a dialogue")
        if state.status == "closed":
            raise DialogueError(f"dialogue {stream!r} is closed")
        missing = [name for name in state.participants if name not in agents]
        if missing:
            raise DialogueError(f"no agent for participant(s): {', '.join(missing)}")
        if state.mode == "moderator" and moderator is None:
            raise DialogueError("a moderator dialogue needs a moderator agent")
        chosen = {name: agents[name] for name in state.participants}
        memories = _memories(log, stream, list(chosen), moderated=state.mode == "moderator")
        for name, agent in chosen.items():
            _restore(agent, memories[name])
        if moderator is not None:
            _restore(moderator, memories[MODERATOR])
        strategy = mention_strategy or state.mention_strategy or "exact_word"
        _check_mention_strategy(strategy)
        ref = Coordinator.start(
            log,
            stream,
            state,
            chosen,
            moderator=moderator,
            mention_strategy=strategy,
            release=release,
        )
        return cls(log, stream, ref, timeout, stopped)

    # --------------------------------------------------------------- talking

    def session(self, *inputs: str | Input) -> Session:
        """Start a turn on ``inputs`` and return its session (replies as they come).

        A turn waits for the one before it to finish. Inputs that do not start a turn
        (context-only, or filtered by the reaction strategy) are stored and delivered
        with the next turn that runs; the session then yields nothing.
        """
        if not inputs:
            raise DialogueError("a turn needs at least one input")
        messages = tuple(
            _checked((Input(i) if isinstance(i, str) else i).message()) for i in inputs
        )
        return self._start(messages)

    def finish_turn(self) -> Session:
        """The session of a turn a crash interrupted (after :meth:`resume`).

        It yields the replies already on record, then the ones still to come. If no
        turn was interrupted, it yields nothing.
        """
        return self._start(None)

    def _start(self, inputs: tuple[DialogueMessage, ...] | None) -> Session:
        self._check_open()
        channel = Channel()
        self._tell(StartTurn(inputs, channel), lambda: channel.failed(_STOPPED))
        return Session(channel)

    def run(self, *inputs: str | Input, timeout: float | None = None) -> list[TurnReply]:
        """Run one turn and return all its replies, in the turn's yield order.

        Raises:
            TimeoutError: the turn did not end within ``timeout`` seconds (it goes on,
                and its replies are recorded).
        """
        return self.session(*inputs).all(timeout)

    async def run_async(
        self, *inputs: str | Input, timeout: float | None = None
    ) -> list[TurnReply]:
        """:meth:`run` for asyncio: never blocks the event loop."""
        return await self.session(*inputs).all_async(timeout)

    # ------------------------------------------------------------ membership

    def join(
        self,
        participant: Participant,
        strategy: JoiningStrategy | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        """Add a participant; on its first turn it gets history per ``strategy``.

        The default strategy is ``JoiningStrategy.recent()`` (the last 5 turns).
        Waits for a turn in progress to end first. If that takes longer than
        ``timeout`` (default: the dialogue's), a DialogueError says so; the join stays
        queued and happens when the turn ends.
        """
        self._wait(self._join(participant, strategy), timeout)

    async def join_async(
        self,
        participant: Participant,
        strategy: JoiningStrategy | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        """:meth:`join` for asyncio: waits without blocking the event loop (a join given
        up, by a timeout or a cancelled task, stays queued)."""
        await self._wait_async(self._join(participant, strategy), timeout)

    def _join(
        self, participant: Participant, strategy: JoiningStrategy | None
    ) -> concurrent.futures.Future[Any]:
        strategy = _checked(strategy or JoiningStrategy.recent())
        info = _checked(participant.info)
        return self._send("join", info, strategy, participant.agent)

    def remove(self, name: str, *, timeout: float | None = None) -> None:
        """Remove a participant (after a turn in progress ends; as with :meth:`join`, a
        removal that times out waiting stays queued)."""
        self._wait(self._remove(name), timeout)

    async def remove_async(self, name: str, *, timeout: float | None = None) -> None:
        """:meth:`remove` for asyncio: waits without blocking the event loop."""
        await self._wait_async(self._remove(name), timeout)

    def _remove(self, name: str) -> concurrent.futures.Future[Any]:
        if not isinstance(name, str):
            raise DialogueError(f"a participant's name is text, not {type(name).__name__}")
        return self._send("remove", name)

    # --------------------------------------------------------------- looking

    def state(self) -> DialogueState:
        """A copy of the live state (equal to ``log.replay(stream)`` between turns)."""
        state: DialogueState = self._wait(self._send("state"), busy=_NO_ANSWER)
        return state

    async def state_async(self) -> DialogueState:
        """:meth:`state` for asyncio: waits without blocking the event loop."""
        state: DialogueState = await self._wait_async(self._send("state"), busy=_NO_ANSWER)
        return state

    # --------------------------------------------------------------- closing

    def close(self, reason: str = "closed", *, timeout: float | None = None) -> None:
        """Record DialogueClosed once the current turn is over, and stop every actor.

        If the turn in progress does not end within ``timeout`` (default: the
        dialogue's), a DialogueError says so; the close stays queued, as with
        :meth:`join`: the turn's replies are recorded, then the close, and the actors
        stop then. A second call (from any thread) waits for the same close.
        """
        closing = self._closing_future(reason)
        if closing is None:
            return
        wait = self.timeout if timeout is None else timeout
        try:
            self._wait(closing, wait, busy=_CLOSE_QUEUED)
        finally:
            if closing.done():  # closed, or the close failed: nothing is left to wait for
                self._stop_actors(wait)

    async def close_async(self, reason: str = "closed", *, timeout: float | None = None) -> None:
        """:meth:`close` for asyncio: waits without blocking the event loop."""
        closing = self._closing_future(reason)
        if closing is None:
            return
        wait = self.timeout if timeout is None else timeout
        try:
            await self._wait_async(closing, wait, busy=_CLOSE_QUEUED)
        finally:
            if closing.done():
                await asyncio.to_thread(self._stop_actors, wait)

    def _closing_future(self, reason: str) -> concurrent.futures.Future[Any] | None:
        """The close under way (asked for now if it is the first call), or None if this
        object was stopped without a close."""
        if not isinstance(reason, str):
            raise DialogueError(f"a close reason is text, not {type(reason).__name__}")
        with self._lock:
            if self._stopping:  # stop() gave the dialogue up: nothing is left to close
                return None
            if self._closing is None:
                if self._closed:
                    return None
                try:
                    self._closing = self._send("close", reason)
                finally:
                    self._closed = True
                # However long the callers wait, the actors stop once the close is
                # recorded (or has failed): in the coordinator's thread, without blocking.
                self._closing.add_done_callback(lambda _: _stop_soon(self._ref))
            return self._closing

    def _stop_actors(self, wait: float | None) -> None:
        """Stop the coordinator (if nobody has yet) and wait until it has stopped its
        participants and given the stream back."""
        _stop_soon(self._ref)
        self._stopped.wait(wait)

    def stop(self) -> None:
        """Stop the actors without recording a close (the dialogue stays open); also
        after a :meth:`close` that timed out, to give up the turn it waits for."""
        with self._lock:
            self._closed = self._stopping = True
        stuck = DialogueError(f"the dialogue's actors did not stop within {self.timeout} s")
        if self._ref.is_alive():
            try:
                self._ref.stop(timeout=self.timeout)
            except pykka.Timeout as exc:  # an agent still busy: its actor stops after it
                raise stuck from exc
            except pykka.ActorDeadError:
                pass  # stopping already (a close that ended, say): wait for it below
        if not self._stopped.wait(self.timeout):
            raise stuck

    async def stop_async(self) -> None:
        """:meth:`stop` for asyncio (the actors are stopped from a worker thread)."""
        await asyncio.to_thread(self.stop)

    def _send(self, what: str, *args: Any) -> concurrent.futures.Future[Any]:
        """Tell the coordinator a request; the future is settled when it has run."""
        self._check_open()
        reply: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._tell(Ask(what, args, reply), lambda: _fail_future(reply))
        return reply

    def _tell(self, message: Any, lost: Callable[[], None]) -> None:
        """Tell the coordinator; if it stopped meanwhile, call ``lost`` once it has.

        pykka checks that an actor is alive, then queues the message: one that arrives
        after a stopping coordinator last looked at its inbox is dropped unread, so
        whoever waits for it is told here instead (telling twice is harmless).
        """
        try:
            self._ref.tell(message)
        except pykka.ActorDeadError as exc:
            raise DialogueError("the dialogue's coordinator has stopped") from exc
        if not self._ref.is_alive() and self._stopped.wait(self.timeout):
            lost()

    def _wait(
        self,
        future: concurrent.futures.Future[Any],
        timeout: float | None = None,
        *,
        busy: str = _TURN_IN_PROGRESS,
    ) -> Any:
        """The request's answer, waiting at most ``timeout`` (default: the dialogue's)."""
        wait = self.timeout if timeout is None else timeout
        try:
            return future.result(wait)
        except concurrent.futures.TimeoutError as exc:
            raise DialogueError(busy.format(wait=wait)) from exc

    async def _wait_async(
        self,
        future: concurrent.futures.Future[Any],
        timeout: float | None = None,
        *,
        busy: str = _TURN_IN_PROGRESS,
    ) -> Any:
        wait = self.timeout if timeout is None else timeout
        try:
            # shield: giving up waiting must not cancel the request (it stays queued)
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), wait)
        except TimeoutError as exc:
            raise DialogueError(busy.format(wait=wait)) from exc

    def _check_open(self) -> None:
        if self._closed:
            raise DialogueError("this dialogue object is closed")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close_async()


def _signalling(release: Callable[[], None], stopped: threading.Event) -> Callable[[], None]:
    """``release``, then ``stopped`` set: the coordinator calls it last when it stops."""

    def released() -> None:
        try:
            release()
        finally:
            stopped.set()

    return released


def _fail_future(future: concurrent.futures.Future[Any]) -> None:
    if not future.done():
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            future.set_exception(DialogueError(_STOPPED))


def _stop_soon(ref: pykka.ActorRef[Any]) -> None:
    with contextlib.suppress(pykka.ActorDeadError):
        ref.stop(block=False)


def _lease(log: LogBase, stream: str) -> Callable[[], None]:
    try:
        return lease(log, stream)
    except StreamBusy as exc:
        raise DialogueError(str(exc)) from None


def _check_mention_strategy(strategy: str) -> None:
    if strategy not in MENTION_STRATEGIES:
        known = ", ".join(MENTION_STRATEGIES)
        raise DialogueError(f"unknown mention strategy {strategy!r} (known: {known})")


_S = TypeVar("_S", bound=msgspec.Struct)


def _checked(value: _S) -> _S:
    """``value`` with every field checked (see :func:`moot.events.checked`).

    Raises:
        DialogueError: a field has the wrong type; nothing is recorded.
    """
    try:
        return checked(value)
    except ValueError as exc:
        raise DialogueError(str(exc)) from None


def _restore(agent: Agent, memory: AgentMemory) -> None:
    restore = getattr(agent, "restore", None)
    if callable(restore):
        restore(memory)


def _memories(
    log: LogBase, stream: str, names: list[str], *, moderated: bool
) -> dict[str, AgentMemory]:
    """Each participant's past, from the log: payloads, its replies, its recorded calls."""
    messages: dict[int, DialogueMessage] = {}
    payloads: dict[str, list[tuple[int, tuple[int, ...]]]] = {n: [] for n in names}
    replies: dict[tuple[str, int], str] = {}
    calls = dict.fromkeys([*names, MODERATOR], 0)
    for record in log.read(stream):
        event = record.event
        if isinstance(event, DialogueMessage):
            messages[record.seq] = event
            if event.origin == "agent" and event.speaker.name in calls:
                replies[(event.speaker.name, event.turn)] = event.content
                calls[event.speaker.name] += 1
        elif isinstance(event, PayloadDelivered) and event.participant in payloads:
            payloads[event.participant].append((event.turn, event.messages))
        elif isinstance(event, ParticipantFailed) and event.participant in calls:
            calls[event.participant] += 1
        elif isinstance(event, TurnStarted) and moderated:
            calls[MODERATOR] += 1
    out = {}
    for name in names:
        exchanges = tuple(
            (tuple(messages[s] for s in seqs), replies[(name, turn)])
            for turn, seqs in payloads[name]
            if (name, turn) in replies
        )
        out[name] = AgentMemory(name=name, exchanges=exchanges, calls=calls[name], stream=stream)
    out[MODERATOR] = AgentMemory(name=MODERATOR, calls=calls[MODERATOR], stream=stream)
    return out
