"""The pure decisions of a turn, a few lines per case."""

from __future__ import annotations

import pytest

from moot.actors._context import TALK_STYLES, render_context
from moot.actors._decide import (
    ModeratorChoice,
    history_for_joiner,
    mentioned,
    parse_moderator_choice,
    should_react,
    speaking_order,
    validate_order,
)
from moot.actors._errors import ConfigurationError, DialogueError
from moot.events import DialogueContext, DialogueMessage, JoiningStrategy, Speaker

PEOPLE = ["ann", "bob", "cy"]


def test_speaking_order() -> None:
    assert speaking_order("completion", PEOPLE) == PEOPLE
    assert speaking_order("participant_order", PEOPLE) == PEOPLE
    assert speaking_order("explicit", PEOPLE, ["cy", "ann"]) == ["cy", "ann", "bob"]
    assert speaking_order("explicit", PEOPLE, ["gone", "bob", "bob"]) == ["bob", "ann", "cy"]


def test_validate_order() -> None:
    validate_order("broadcast", "explicit", ["bob"], PEOPLE)
    with pytest.raises(DialogueError, match=r"unknown participant.*zed"):
        validate_order("broadcast", "explicit", ["zed"], PEOPLE)
    with pytest.raises(DialogueError, match="unknown mode"):
        validate_order("chaos", "completion", [], PEOPLE)
    with pytest.raises(DialogueError, match="sequential"):
        validate_order("sequential", "completion", [], PEOPLE)
    with pytest.raises(DialogueError, match="needs names"):
        validate_order("broadcast", "explicit", [], PEOPLE)


def test_mentions_exact_word() -> None:
    names = ["Ali", "Alice", "Bob", "太郎"]
    assert mentioned("@Ali, what do you think?", names) == ["Ali"]
    assert mentioned("ping @Bob's idea and @太郎 too", names) == ["Bob", "太郎"]
    assert mentioned("no mention here", names) == []
    assert mentioned("@bob is lowercase", names) == []  # case-sensitive
    assert mentioned("@太郎さん", names) == []  # the honorific is part of the token


def test_mentions_full_name_and_partial() -> None:
    names = ["Ayaka", "Ayaka Nakamura", "Ayaka Tanaka", "Bob"]
    assert mentioned("@Ayaka Nakamura, please", names, "name") == ["Ayaka Nakamura"]
    assert mentioned("@Ayaka and @Bob", names, "name") == ["Ayaka", "Bob"]
    assert mentioned("@Aya please", names, "partial") == ["Ayaka Nakamura"]
    assert mentioned("@B hi", names, "partial") == ["Bob"]
    assert mentioned("@al hi", ["alice", "al"], "partial") == ["al"]  # the name it is wins
    assert mentioned("@a hi", ["alice", "al"], "partial") == ["alice"]
    assert mentioned("@あやか なかむら さん", ["あやか なかむら"], "name") == ["あやか なかむら"]


def msg(kind: str, message_type: str = "conversational") -> DialogueMessage:
    return DialogueMessage(
        turn=1,
        speaker=Speaker(kind=kind, name=kind),  # type: ignore[arg-type]
        content="x",
        origin="incoming",
        message_type=message_type,
    )


def test_reaction_strategies() -> None:
    user, system, agent = msg("user"), msg("system"), msg("agent")
    info = msg("user", "context_info")
    for strategy in (None, "always", "except_context_info", "user_only", "conversational"):
        assert not should_react(strategy, [info])  # context only never reacts
        assert should_react(strategy, [user, info])
    assert not should_react("user_only", [system])
    assert should_react("agent_only", [agent]) and not should_react("agent_only", [user])
    assert not should_react("except_system", [system]) and should_react("except_system", [agent])
    assert not should_react("conversational", [msg("user", "notification")])
    with pytest.raises(DialogueError):
        should_react("sometimes", [user])


def history() -> list[DialogueMessage]:
    return [
        DialogueMessage(
            turn=t, speaker=Speaker(kind="user", name="u"), content=str(t), origin="incoming"
        )
        for t in range(1, 8)
    ]


def turns(strategy: JoiningStrategy, current: int = 7) -> list[int]:
    return [m.turn for m in history_for_joiner(strategy, history(), current)]


def test_joining_strategies() -> None:
    assert turns(JoiningStrategy.fresh()) == []
    assert turns(JoiningStrategy.full()) == [1, 2, 3, 4, 5, 6]
    assert turns(JoiningStrategy.recent()) == [2, 3, 4, 5, 6]  # default 5
    assert turns(JoiningStrategy.recent(2)) == [5, 6]
    assert turns(JoiningStrategy.range(3, 5)) == [3, 4]  # end exclusive
    assert turns(JoiningStrategy.range(3)) == [3, 4, 5, 6]
    assert turns(JoiningStrategy.range(5, 5)) == []


def test_moderator_choices() -> None:
    assert parse_moderator_choice("Broadcast.", PEOPLE) == ModeratorChoice("broadcast")
    assert parse_moderator_choice("let's go sequential", PEOPLE) == ModeratorChoice(
        "sequential", "as_added"
    )
    choice = parse_moderator_choice(
        '{"mode": "sequential", "order": "explicit", "names": ["cy", "ann"]}', PEOPLE
    )
    assert choice == ModeratorChoice("sequential", "explicit", ("cy", "ann"))
    with pytest.raises(DialogueError, match="recurse"):
        parse_moderator_choice("moderator", PEOPLE)
    with pytest.raises(DialogueError, match="names no mode"):
        parse_moderator_choice("pizza", PEOPLE)
    with pytest.raises(DialogueError, match="unknown participant"):
        parse_moderator_choice('{"mode": "broadcast", "order": "explicit", "names": ["x"]}', PEOPLE)


def test_context_rendering() -> None:
    assert render_context(None) is None
    assert render_context(DialogueContext()) is None
    text = render_context(
        DialogueContext(environment="prod", additional="be brief", talk_style="brainstorm")
    )
    assert text is not None
    assert text.index("## Environment") < text.index("Brainstorming") < text.index("be brief")
    custom = render_context(DialogueContext(talk_style="mine", template="## Style: terse"))
    assert custom is not None and "terse" in custom
    assert len(TALK_STYLES) == 8
    with pytest.raises(ConfigurationError, match="unknown talk style"):
        render_context(DialogueContext(talk_style="mine"))
