"""The coordinator actor: runs a dialogue's turns, and is the only writer of its stream.

Every change goes the same way: decide (pure code in ``_decide``), stage the events
(folding them into the state with the same ``evolve`` that replay uses), commit them
with one append, and only then act: tell participants to run, hand replies to the
session. If an append fails, the state is rebuilt from the log, so it never holds an
event the log does not.

The coordinator never waits for a participant: participants post their outcomes into
a mailbox and wake the coordinator, which drains every outcome waiting and records
them in one append (group commit at the dialogue level), so a hundred participants
finishing together cost a few commits.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import queue
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec
import pykka

from moot.events import (
    Backlog,
    DialogueClosed,
    DialogueMessage,
    DialogueState,
    Error,
    Event,
    JoiningStrategy,
    ParticipantFailed,
    ParticipantInfo,
    ParticipantJoined,
    ParticipantRemoved,
    PayloadDelivered,
    Speaker,
    TurnCompleted,
    TurnStarted,
)

from ._agents import Payload
from ._context import render_context
from ._decide import (
    history_for_joiner,
    mentioned,
    parse_moderator_choice,
    should_react,
    speaking_order,
)
from ._errors import DialogueError
from ._journal import Journal
from ._participant import Outcome, ParticipantActor
from ._session import Channel, TurnReply

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from moot.store import LogBase

    from ._agents import Agent

__all__ = ["MODERATOR", "Ask", "Coordinator", "StartTurn"]

logger = logging.getLogger("moot.actors.coordinator")

#: The name the moderator agent runs under (never a participant's name).
MODERATOR = "moderator"

_MODERATOR_BRIEF = (
    "You are the moderator. Decide how the participants take this turn. Answer with one "
    "word - broadcast, sequential or mentioned - or with JSON such as "
    '{"mode": "sequential", "order": "explicit", "names": ["..."]}.'
)


class StartTurn(msgspec.Struct, frozen=True):
    """Run a turn on these inputs, or finish the open turn when ``inputs`` is None."""

    inputs: tuple[DialogueMessage, ...] | None
    channel: Channel


class Ask(NamedTuple):
    """A request from the Dialogue facade; the coordinator settles ``reply`` (with the
    answer, or the action's outcome once it has run), whoever waits for it and however."""

    what: str
    args: tuple[Any, ...]
    reply: concurrent.futures.Future[Any]


class _Flush(msgspec.Struct, frozen=True):
    """Wake-up: outcomes are waiting in the mailbox."""


class _Run:
    """The turn in progress: bookkeeping for the coordinator (the facts are in the state)."""

    def __init__(self, turn: int, mode: str, order: str, channel: Channel) -> None:
        self.turn = turn
        self.mode = mode
        self.order = order
        self.channel = channel
        self.speakers: list[str] = []
        self.running: set[str] = set()
        #: Sequential: the speakers still to run, in order.
        self.waiting: list[str] = []
        self.inputs: tuple[DialogueMessage, ...] = ()


class Coordinator(pykka.ThreadingActor):
    """Owns one dialogue stream: its state, its participants' actors, its turns.

    The :class:`moot.actors.Dialogue` facade talks to it with ``ask``/``tell``; every
    method here runs in the coordinator's thread.
    """

    use_daemon_thread = True

    def __init__(
        self,
        log: LogBase,
        stream: str,
        state: DialogueState,
        agents: dict[str, Agent],
        *,
        moderator: Agent | None = None,
        mention_strategy: str = "exact_word",
        release: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__()
        #: Gives the stream's lease back (when the coordinator stops).
        self._release = release
        self.log = log
        self.stream = stream
        self.journal = Journal(log, stream, state)
        self.mention_strategy = mention_strategy
        self._agents = dict(agents)
        self._moderator = moderator
        self._actors: dict[str, pykka.ActorRef[Any]] = {}
        self._mailbox: collections.deque[Outcome] = collections.deque()
        #: A _Flush is on its way: outcomes posted meanwhile ride along with it.
        self._flush_told = False
        self._run: _Run | None = None
        #: Participants to start once the staged payloads are committed.
        self._after_commit: list[tuple[pykka.ActorRef[Any], Payload]] = []
        #: The context as every participant is told it (fixed when the dialogue starts).
        self._context = render_context(state.context)
        self._roster: tuple[int, tuple[ParticipantInfo, ...]] = (-1, ())
        self._draining_queue = False
        self._queued: collections.deque[
            tuple[Callable[[], None], concurrent.futures.Future[Any], Channel | None]
        ] = collections.deque()

    # ------------------------------------------------------------- lifecycle

    def on_start(self) -> None:
        try:
            for name, agent in self._agents.items():
                self._spawn(name, agent)
            if self._moderator is not None:
                self._spawn(MODERATOR, self._moderator)
        except BaseException:  # pykka calls neither on_stop nor on_failure then
            self._shut_down()
            raise

    def on_stop(self) -> None:
        """Stop the participants; whoever still waits on this coordinator hears so."""
        self._shut_down()

    def on_failure(self, *_: object) -> None:
        """A crash (pykka calls no on_stop then): the same, so that nobody waits for ever
        and the stream may be driven again."""
        self._shut_down()

    def _shut_down(self) -> None:
        stopped = DialogueError("the dialogue's coordinator has stopped")
        if self._run is not None:
            self._run.channel.failed(str(stopped))
            self._run = None
        while self._queued:
            _, future, channel = self._queued.popleft()
            if channel is not None:
                channel.failed(str(stopped))
            _settle_future(future, error=stopped)
        # Requests told but not yet received: pykka drops told messages when an actor
        # stops, and whoever waits on them would wait for ever.
        inbox = self.actor_inbox
        unread = []
        if isinstance(inbox, queue.Queue):  # a ThreadingActor's inbox
            with inbox.mutex:
                unread = [envelope.message for envelope in inbox.queue]
        for message in unread:
            if isinstance(message, StartTurn):
                message.channel.failed(str(stopped))
            elif isinstance(message, Ask):
                _settle_future(message.reply, error=stopped)
        agents = [*self._agents.values(), *([self._moderator] if self._moderator else [])]
        for agent in agents:  # an agent blocked in a wait of its own (a loop paused for
            interrupt = getattr(agent, "interrupt", None)  # approval) gives it up
            if callable(interrupt):
                try:
                    interrupt()
                except Exception:
                    logger.exception("dialogue %s: an agent failed to stop", self.stream)
        for ref in self._actors.values():
            ref.stop(block=False)
        try:
            for ref in self._actors.values():
                ref.actor_stopped.wait(30)
        finally:
            self._release()

    def _spawn(self, name: str, agent: Agent) -> None:
        self._actors[name] = ParticipantActor.start(name, agent, self._post)

    def _post(self, outcome: Outcome) -> None:
        """Called in participant threads: queue the outcome and wake the coordinator.

        One wake-up serves every outcome posted before it is handled, so a hundred
        participants finishing together do not queue a hundred of them. (The flag is
        read after the append and cleared before the drain: an outcome either finds a
        wake-up still to come, or tells a new one. Two threads may both tell; harmless.)
        """
        self._mailbox.append(outcome)
        if not self._flush_told:
            self._flush_told = True
            with contextlib.suppress(pykka.ActorDeadError):  # stopped: nobody to tell
                self.actor_ref.tell(_Flush())

    # ------------------------------------------------------ the one funnel

    @property
    def state(self) -> DialogueState:
        return self.journal.state

    def _stage(self, events: Sequence[Event]) -> int:
        return self.journal.stage(events)

    def _commit(self) -> None:
        self.journal.commit()

    # ------------------------------------------------------------- messages

    def on_receive(self, message: Any) -> Any:
        match message:
            case _Flush():
                self._flush_told = False
                self._guarded(self._drain)
                if self._mailbox and not self._flush_told:  # left for later by the drain
                    self._flush_told = True
                    self.actor_ref.tell(_Flush())
            case StartTurn():
                turn = concurrent.futures.Future[None]()  # its outcome goes to its channel
                self._when_idle(lambda: self._start(message), turn, message.channel)
            case Ask("join", (ParticipantInfo() as info, JoiningStrategy() as how, agent), reply):
                self._when_idle(lambda: self._join(info, how, agent), reply)
            case Ask("remove", (str(name),), reply):
                self._when_idle(lambda: self._remove(name), reply)
            case Ask("close", (str(reason),), reply):
                self._when_idle(lambda: self._close(reason), reply)
            case Ask("state", (), reply):
                copy = msgspec.convert(msgspec.to_builtins(self.state), DialogueState)
                _settle_future(reply, value=copy)
            case Ask(what, args, reply):  # a request this coordinator cannot run
                _settle_future(reply, error=DialogueError(f"invalid request {what}{args!r}"))
            case _:  # not for us: a stray message must not stop the dialogue
                logger.warning("dialogue %s: ignored the message %r", self.stream, message)
        return None

    def _when_idle(
        self,
        action: Callable[[], None],
        future: concurrent.futures.Future[Any],
        channel: Channel | None = None,
    ) -> None:
        """Run ``action`` now if no turn is in progress, else once it ends (turns never
        overlap). The future tells the caller how it went, whenever that is."""
        self._queued.append((action, future, channel))
        self._run_queued()

    def _run_queued(self) -> None:
        if self._draining_queue:  # an action that ends at once comes back here: let the
            return  # outer loop go on instead of recursing once per queued turn
        self._draining_queue = True
        try:
            self._run_queue()
        finally:
            self._draining_queue = False

    def _run_queue(self) -> None:
        while self._run is None and self._queued:
            action, future, channel = self._queued.popleft()
            try:
                action()
            except Exception as exc:  # noqa: BLE001  routed to whoever asked
                self._abort(exc, channel)
                _settle_future(future, error=exc)
            else:
                _settle_future(future)

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run a step of a turn; if it fails, fail the turn rather than the coordinator."""
        try:
            step()
        except Exception as exc:  # noqa: BLE001  routed to the turn's session
            self._abort(exc, None)
            self._run_queued()

    def _abort(self, exc: BaseException, channel: Channel | None) -> None:
        """Give up the turn in progress: the session hears why first, then nothing staged
        is kept and nobody is started; the state is the log's again. Never raises: if
        the log cannot even be read now, the journal reloads before its next write."""
        self._after_commit.clear()
        run, self._run = self._run, None
        message = str(exc) or type(exc).__name__
        for target in {id(c): c for c in (channel, run.channel if run else None) if c}.values():
            target.failed(message)
        self._roster = (-1, ())
        try:
            self.journal.discard()
        except Exception:
            logger.exception("dialogue %s: could not reload its state after an error", self.stream)

    # ---------------------------------------------------------- membership

    def _join(self, info: ParticipantInfo, strategy: JoiningStrategy, agent: Agent) -> None:
        if info.name in self.state.participants or info.name == MODERATOR:
            raise DialogueError(f"participant {info.name!r} is already in the dialogue")
        self._stage([ParticipantJoined(participant=info, strategy=strategy, turn=self._turn())])
        self._commit()
        self._agents[info.name] = agent
        self._spawn(info.name, agent)

    def _remove(self, name: str) -> None:
        if name not in self.state.participants:
            raise DialogueError(f"cannot remove {name!r}: no such participant")
        self._stage([ParticipantRemoved(name=name, turn=self._turn())])
        self._commit()
        self._agents.pop(name, None)
        ref = self._actors.pop(name, None)
        if ref is not None:
            ref.stop(block=False)

    def _close(self, reason: str) -> None:
        if self.state.status != "closed":
            self._stage([DialogueClosed(reason=reason)])
            self._commit()

    def _turn(self) -> int:
        return max(self.state.current.turn, self.state.input_turn)

    # ---------------------------------------------------------------- turns

    def _start(self, command: StartTurn) -> None:
        if self.state.status == "closed":
            raise DialogueError("the dialogue is closed")
        if command.inputs is None:
            self._resume(command.channel)
        else:
            self._begin(command.inputs, command.channel)

    def _begin(self, inputs: tuple[DialogueMessage, ...], channel: Channel) -> None:
        unfinished = self._unfinished()
        if unfinished:  # an error interrupted it: its replies would be lost under a new one
            raise DialogueError(
                f"turn {unfinished} did not finish (an error interrupted it); "
                "finish it first with finish_turn()"
            )
        turn = self._turn() + 1
        stamped = [msgspec.structs.replace(m, turn=turn) for m in inputs]
        if not should_react(self.state.reaction, stamped):
            self._stage(list(stamped))
            self._commit()
            channel.done(reacted=False)
            return
        if self.state.mode == "moderator":
            self._stage(list(stamped))
            self._commit()
            self._ask_moderator(turn, tuple(stamped), channel)
            return
        self._open(turn, self.state.mode, self.state.order, self.state.names, stamped, channel)

    def _open(
        self,
        turn: int,
        mode: str,
        order: str,
        names: tuple[str, ...],
        inputs: list[DialogueMessage],
        channel: Channel,
    ) -> None:
        """Record the turn's inputs (unless already recorded) and start, then its speakers."""
        participants = [p for p in self.state.participants if p in self._actors]
        speakers = speaking_order(order, participants, names)
        if mode == "mentioned":
            text = self._mention_text(inputs or self._inputs_of(turn))
            chosen = mentioned(text, participants, self.mention_strategy)  # type: ignore[arg-type]
            speakers = [s for s in speakers if s in chosen] or speakers
        run = _Run(turn, mode, order, channel)
        run.speakers = speakers
        self._run = run
        self._stage(
            [*inputs, TurnStarted(turn=turn, speakers=tuple(speakers), mode=mode, order=run.order)]
        )
        channel.started(turn, tuple(speakers), run.order)
        if mode == "sequential":
            run.waiting = list(speakers)
            self._next_in_chain(run)
        else:
            self._deliver(run, speakers)
        self._settle(run, [])

    def _unfinished(self) -> int:
        """The turn an error left open or never started (0 if none): its inputs are on
        record and would get a reply, but the turn is not over."""
        state = self.state
        if state.current.open:
            return state.current.turn
        pending = state.input_turn
        if pending > max(state.current.turn, state.failed_turn) and should_react(
            state.reaction, self._inputs_of(pending)
        ):
            return pending
        return 0

    def _inputs_of(self, turn: int) -> list[DialogueMessage]:
        return [
            m for m in self.state.messages.values() if m.origin == "incoming" and m.turn == turn
        ]

    def _mention_text(self, inputs: list[DialogueMessage]) -> str:
        """Inputs plus the last replies: agents may hand over to each other by @name."""
        last = self.state.last_agent_turn
        replies = [
            m.content
            for m in self.state.messages.values()
            if m.origin == "agent" and m.turn == last
        ]
        return "\n".join([m.content for m in inputs] + replies)

    def _deliver(self, run: _Run, names: list[str]) -> None:
        """Stage the payloads of ``names``; they run once the payloads are committed.

        A payload depends only on its own participant's deliveries, so all of them are
        built first and staged together.
        """
        backlog = Backlog(self.state)
        first = self.state.seq + 1
        payloads = [
            self._payload(name, run.turn, backlog=backlog, delivered_seq=first + offset)
            for offset, name in enumerate(names)
        ]
        staged = self._stage(
            [
                PayloadDelivered(turn=run.turn, participant=p.participant.name, messages=p.seqs)
                for p in payloads
            ]
        )
        assert staged == first
        for payload in payloads:
            name = payload.participant.name
            run.running.add(name)
            self._after_commit.append((self._actors[name], payload))

    def _next_in_chain(self, run: _Run) -> None:
        while run.waiting:
            name = run.waiting.pop(0)
            if name in self._actors:
                self._deliver(run, [name])
                return

    def _payload(
        self,
        name: str,
        turn: int,
        seqs: tuple[int, ...] | None = None,
        *,
        backlog: Backlog | None = None,
        delivered_seq: int | None = None,
    ) -> Payload:
        """What ``name`` is given now: all it has not received, plus a joiner's history
        (or, with ``seqs``, those messages: a payload recorded before)."""
        state = self.state
        if seqs is None:
            seqs, messages = (backlog or Backlog(state)).of(name)
            strategy = state.pending_joiners.get(name)
            if strategy is not None:
                # A joiner gets the turn's input even when it was on record before the
                # join (a turn a crash left unstarted), and its history per strategy.
                extra = {
                    s
                    for s, m in state.messages.items()
                    if m.origin == "incoming" and m.turn == turn and m.speaker.name != name
                }
                if strategy.kind != "fresh":
                    extra.update(self._history(name, strategy, turn))
                if not extra <= set(seqs):
                    seqs = tuple(sorted(set(seqs) | extra))
                    messages = self._messages(seqs)
        else:
            messages = self._messages(seqs)
        if self._roster[0] != state.seq:  # the same tuple for every payload of a turn
            self._roster = (state.seq, tuple(state.participants.values()))
        return Payload(
            stream=self.stream,
            turn=turn,
            participant=state.participants[name],
            participants=self._roster[1],
            messages=messages,
            seqs=seqs,
            context=self._context,
            delivered_seq=delivered_seq,
        )

    def _history(self, name: str, strategy: JoiningStrategy, turn: int) -> list[int]:
        """A late joiner's history, read from the log (the state keeps no history)."""
        earlier = [
            (r.seq, r.event)
            for r in self.log.read(self.stream)
            if isinstance(r.event, DialogueMessage) and r.event.speaker.name != name
        ]
        chosen = {id(m) for m in history_for_joiner(strategy, [m for _, m in earlier], turn)}
        return [seq for seq, m in earlier if id(m) in chosen]

    def _messages(self, seqs: tuple[int, ...]) -> tuple[DialogueMessage, ...]:
        """The messages with these seqs: from the state, or from the log for older ones."""
        kept = self.state.messages
        missing = [s for s in seqs if s not in kept]
        found: dict[int, DialogueMessage] = {}
        if missing:
            for r in self.log.read(self.stream, min(missing) - 1, until_seq=max(missing)):
                if isinstance(r.event, DialogueMessage):
                    found[r.seq] = r.event
        return tuple(kept[s] if s in kept else found[s] for s in seqs)

    # ------------------------------------------------------------- outcomes

    def _drain(self) -> None:
        run = self._run
        if run is None:
            self._mailbox.clear()
            return
        outcomes: list[Outcome] = []
        while self._mailbox:
            outcome = self._mailbox.popleft()
            if outcome.name == MODERATOR and run.mode == "moderator":
                self._moderated(run, outcome)
                return
            if outcome.turn == run.turn and outcome.name in run.running:
                run.running.discard(outcome.name)
                outcomes.append(outcome)
        if not outcomes:
            return
        replies_so_far = len(self.state.current.replies)
        index = {name: i for i, name in enumerate(self.state.participants)}
        events: list[Event] = []
        for outcome in outcomes:
            event = self._record(run, outcome, replies_so_far, index)
            replies_so_far += isinstance(event, DialogueMessage)
            events.append(event)
        first = self._stage(events)
        if run.mode == "sequential" and not run.running:
            self._next_in_chain(run)
        self._settle(run, [(first + i, e) for i, e in enumerate(events)])

    def _record(
        self, run: _Run, outcome: Outcome, completion_index: int, index: dict[str, int]
    ) -> Event:
        """The event for one outcome; ``index`` is each participant's insertion index."""
        if outcome.reply is None:
            assert outcome.error is not None
            return ParticipantFailed(turn=run.turn, participant=outcome.name, error=outcome.error)
        reply = outcome.reply
        info = self.state.participants.get(outcome.name)
        return DialogueMessage(
            turn=run.turn,
            speaker=Speaker(kind="agent", name=outcome.name, role=info.role if info else None),
            content=reply.content,
            origin="agent",
            participant_index=index.get(outcome.name),
            completion_index=completion_index,
            attachments=reply.attachments,
            usage=reply.usage,
            model=reply.model,
            latency_ms=reply.latency_ms,
            loop=reply.loop,
            metadata=reply.metadata,
            request_digest=reply.request_digest,
        )

    def _settle(self, run: _Run, recorded: list[tuple[int, Event]]) -> None:
        """Close the turn if nothing is left to run; commit; then act on what was committed."""
        over = not run.running and not run.waiting
        if over:
            current = self.state.current
            replied = list(current.replies)
            if run.order != "completion" or run.mode == "sequential":
                replied = [n for n in run.speakers if n in current.replies]
            self._stage(
                [
                    TurnCompleted(
                        turn=run.turn, yielded=tuple(replied), failed=tuple(current.failures)
                    )
                ]
            )
        tell, self._after_commit = self._after_commit, []  # dropped if the commit fails
        self._commit()
        for ref, payload in tell:
            try:
                ref.tell(payload)
            except pykka.ActorDeadError:
                name = payload.participant.name
                raise DialogueError(f"participant {name!r} has stopped") from None
        if recorded:
            run.channel.replies([_reply(run.turn, seq, event) for seq, event in recorded])
        if over:
            self._run = None
            run.channel.done()
            self._run_queued()

    # ------------------------------------------------------------ moderator

    def _ask_moderator(
        self, turn: int, inputs: tuple[DialogueMessage, ...], channel: Channel
    ) -> None:
        if MODERATOR not in self._actors:
            raise DialogueError("a moderator dialogue needs a moderator agent")
        run = _Run(turn, "moderator", "completion", channel)
        run.inputs = inputs
        self._run = run
        kept = self.state.messages
        seqs = tuple(s for s, m in kept.items() if m.origin == "incoming" and m.turn == turn)
        info = ParticipantInfo(
            name=MODERATOR,
            role="moderator",
            description="Chooses how the participants take each turn.",
        )
        payload = Payload(
            stream=self.stream,
            turn=turn,
            participant=info,
            participants=tuple(self.state.participants.values()),
            messages=tuple(kept[s] for s in seqs),
            seqs=seqs,
            context=_MODERATOR_BRIEF,
        )
        try:
            self._actors[MODERATOR].tell(payload)
        except pykka.ActorDeadError:
            raise DialogueError("the moderator has stopped") from None

    def _moderated(self, run: _Run, outcome: Outcome) -> None:
        """Open the turn as the moderator chose, or record that it failed to choose."""
        error = outcome.error
        if outcome.reply is not None:
            try:
                choice = parse_moderator_choice(
                    outcome.reply.content, list(self.state.participants)
                )
            except DialogueError as exc:
                error = Error(kind="bad_choice", message=str(exc))
            else:
                self._run = None
                self._open(run.turn, choice.mode, choice.order, choice.names, [], run.channel)
                return
        assert error is not None
        self._stage([ParticipantFailed(turn=run.turn, participant=MODERATOR, error=error)])
        self._commit()
        self._run = None
        run.channel.failed(f"the moderator failed: {error.message}")
        self._run_queued()

    # --------------------------------------------------------------- resume

    def _resume(self, channel: Channel) -> None:
        """Finish what a crash interrupted; replies already on record are not asked again."""
        state = self.state
        current = state.current
        if not current.open and self._unfinished():  # inputs recorded, turn never started
            inputs = self._inputs_of(state.input_turn)
            if state.mode == "moderator":
                self._ask_moderator(state.input_turn, tuple(inputs), channel)
            else:
                self._open(state.input_turn, state.mode, state.order, state.names, [], channel)
            return
        if not current.open:
            channel.done(reacted=False)
            return
        run = _Run(current.turn, current.mode or state.mode, current.order or state.order, channel)
        run.speakers = list(current.speakers)
        self._run = run
        channel.started(run.turn, current.speakers, run.order)
        for name in current.speakers:  # what is on record comes first
            if name in current.replies:
                seq = current.replies[name]
                channel.reply(_reply(run.turn, seq, self._messages((seq,))[0]))
            elif name in current.failures:
                channel.reply(
                    TurnReply(turn=run.turn, participant=name, error=current.failures[name])
                )
        done = set(current.replies) | set(current.failures)
        for name in current.speakers:  # a reply was in flight: ask again, same payload
            if name in current.payloads and name not in done and name in self._actors:
                run.running.add(name)
                payload = self._payload(
                    name,
                    run.turn,
                    current.payloads[name],
                    delivered_seq=current.delivered_at.get(name),
                )
                self._after_commit.append((self._actors[name], payload))
        if run.mode == "sequential":
            run.waiting = [
                n for n in current.speakers if n not in done and n not in current.payloads
            ]
            if not run.running:
                self._next_in_chain(run)
        self._settle(run, [])


def _settle_future(
    future: concurrent.futures.Future[Any], value: Any = None, error: BaseException | None = None
) -> None:
    """Tell whoever waits how a request went (unless they gave up waiting: cancelled;
    or it was told already)."""
    if future.done() or not future.set_running_or_notify_cancel():
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)


def _reply(turn: int, seq: int, event: Event) -> TurnReply:
    if isinstance(event, ParticipantFailed):
        return TurnReply(turn=turn, participant=event.participant, error=event.error, seq=seq)
    assert isinstance(event, DialogueMessage)
    return TurnReply(
        turn=turn,
        participant=event.speaker.name,
        content=event.content,
        seq=seq,
        completion_index=event.completion_index,
        participant_index=event.participant_index,
        message=event,
    )
