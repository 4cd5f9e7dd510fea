"""Pure decisions of a dialogue turn: who speaks, in which order, who was mentioned,
whether an input gets a reaction, what a late joiner is shown, what a moderator chose.

Nothing here does I/O or touches actors; the coordinator calls these and records
their outcome as events.
"""

from __future__ import annotations

import re
import typing
from typing import TYPE_CHECKING, Literal

import msgspec

from ._errors import DialogueError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from moot.events import DialogueMessage, JoiningStrategy

__all__ = [
    "MENTION_STRATEGIES",
    "MODES",
    "ORDERS",
    "REACTIONS",
    "ModeratorChoice",
    "history_for_joiner",
    "mentioned",
    "parse_moderator_choice",
    "should_react",
    "speaking_order",
    "validate_order",
]

MODES = ("broadcast", "sequential", "mentioned", "moderator")
ORDERS = ("completion", "participant_order", "explicit", "as_added")
REACTIONS = (
    "always",
    "user_only",
    "agent_only",
    "except_system",
    "conversational",
    "except_context_info",
)
MentionStrategy = Literal["exact_word", "name", "partial"]
MENTION_STRATEGIES: tuple[str, ...] = typing.get_args(MentionStrategy)


def validate_order(
    mode: str, order: str, names: Sequence[str], participants: Sequence[str]
) -> None:
    """Refuse an order that does not fit the mode, or an explicit order naming a stranger.

    Raises:
        DialogueError: the combination is invalid.
    """
    if mode not in MODES:
        raise DialogueError(f"unknown mode {mode!r} (expected one of {', '.join(MODES)})")
    if order not in ORDERS:
        raise DialogueError(f"unknown order {order!r} (expected one of {', '.join(ORDERS)})")
    if mode == "sequential" and order not in ("as_added", "explicit"):
        raise DialogueError(
            f"a sequential dialogue is ordered 'as_added' or 'explicit', not {order!r}"
        )
    if mode != "sequential" and order == "as_added":
        raise DialogueError("order 'as_added' is for sequential dialogues")
    if order == "explicit":
        if not names:
            raise DialogueError("order 'explicit' needs names")
        strangers = [n for n in names if n not in participants]
        if strangers:
            raise DialogueError(
                f"explicit order names unknown participant(s): {', '.join(strangers)}"
            )


def speaking_order(order: str, participants: Sequence[str], names: Sequence[str] = ()) -> list[str]:
    """The order in which a turn's replies are yielded (or, sequentially, given).

    ``completion`` and ``participant_order`` and ``as_added`` list the participants in
    insertion order (completion order is only known as replies arrive); ``explicit``
    lists ``names`` first, then everyone else in insertion order. Names not among the
    participants (someone since removed) are skipped.
    """
    if order != "explicit":
        return list(participants)
    present = set(participants)
    first = list(dict.fromkeys(n for n in names if n in present))
    return first + [p for p in participants if p not in first]


# ------------------------------------------------------------------- mentions

# A mention token runs until whitespace or an ASCII delimiter; anything else (including
# multibyte letters) is part of the name.
_TOKEN = re.compile(r"@([^\s@,.!?;:()\[\]{}<>\"'`/\\|]+)")


def mentioned(
    text: str, participants: Sequence[str], strategy: MentionStrategy = "exact_word"
) -> list[str]:
    """The participants ``text`` mentions with ``@``, in participant order.

    Strategies: ``exact_word`` (``@Bob`` matches only "Bob"), ``name`` (full names,
    spaces allowed: ``@Ayaka Nakamura``; a name that is the prefix of another matched
    name is dropped), ``partial`` (``@Aya`` matches the name it is, else the longest
    name starting with it).
    Matching is case-sensitive; an empty list means nobody was mentioned.
    """
    found: set[str] = set()
    if strategy == "name":
        for name in participants:
            if re.search(rf"@{re.escape(name)}(?=\s|[,.!?;:]|$)", text):
                found.add(name)
        found = {n for n in found if not any(o != n and o.startswith(n) for o in found)}
    else:
        for token in _TOKEN.findall(text):
            if strategy == "exact_word":
                if token in participants:
                    found.add(token)
            else:
                candidates = [p for p in participants if p.startswith(token)]
                if token in participants:  # "@al" is al, even beside alice
                    found.add(token)
                elif candidates:
                    found.add(max(candidates, key=len))
    return [p for p in participants if p in found]


# ------------------------------------------------------------------- reaction


def should_react(strategy: str | None, inputs: Sequence[DialogueMessage]) -> bool:
    """Whether these inputs start a turn. Context-only inputs never do.

    A non-reacting input is still stored, and is delivered with the next turn that runs.
    """
    if not inputs:
        return strategy != "agent_only"
    live = [m for m in inputs if m.message_type != "context_info"]
    if not live:
        return False
    kinds = {m.speaker.kind for m in live}
    match strategy or "always":
        case "always" | "except_context_info":
            return True
        case "user_only":
            return "user" in kinds
        case "agent_only":
            return "agent" in kinds
        case "except_system":
            return bool(kinds - {"system"})
        case "conversational":
            return any(
                m.message_type == "conversational" and m.speaker.kind != "system" for m in live
            )
        case other:
            raise DialogueError(f"unknown reaction strategy {other!r}")


# -------------------------------------------------------------------- joiners


def history_for_joiner(
    strategy: JoiningStrategy, messages: Iterable[DialogueMessage], current_turn: int
) -> list[DialogueMessage]:
    """The messages of earlier turns a late joiner is shown, in order.

    ``fresh``: none; ``full``: every earlier turn; ``recent``: the last ``turns`` turns
    (default 5); ``range``: turns ``start`` up to ``end`` (exclusive; default the
    current turn). The current turn is never part of the history: it is delivered as
    everyone's input.
    """
    match strategy.kind:
        case "fresh":
            return []
        case "full":
            low, high = 0, current_turn
        case "recent":
            turns = 5 if strategy.turns is None else strategy.turns
            low, high = max(0, current_turn - turns), current_turn
        case _:
            low = strategy.start or 0
            high = current_turn if strategy.end is None else min(strategy.end, current_turn)
    return [m for m in messages if low <= m.turn < high]


# ------------------------------------------------------------------ moderator


class ModeratorChoice(msgspec.Struct, frozen=True):
    """What a moderator decided for one turn."""

    mode: str
    order: str = "completion"
    names: tuple[str, ...] = ()


def parse_moderator_choice(answer: str, participants: Sequence[str]) -> ModeratorChoice:
    """Read a moderator's answer: a mode name, or JSON ``{"mode", "order"?, "names"?}``.

    Raises:
        DialogueError: the answer names no known mode, chooses ``moderator`` (it would
            recurse), or an invalid order.
    """
    text = answer.strip()
    if text.startswith("{"):
        try:
            choice = msgspec.json.decode(text, type=ModeratorChoice)
        except msgspec.DecodeError as exc:
            raise DialogueError(f"moderator answered invalid JSON: {exc}") from exc
    else:
        word = re.findall(r"[a-z_]+", text.lower())
        mode = next((w for w in word if w in MODES), None)
        if mode is None:
            raise DialogueError(f"moderator answered {text[:80]!r}, which names no mode")
        choice = ModeratorChoice(
            mode=mode, order="as_added" if mode == "sequential" else "completion"
        )
    if choice.mode == "moderator":
        raise DialogueError("moderator cannot choose the moderator mode (it would recurse)")
    order = choice.order
    if choice.mode == "sequential" and order == "completion":
        order = "as_added"
    validate_order(choice.mode, order, choice.names, participants)
    return ModeratorChoice(mode=choice.mode, order=order, names=choice.names)
