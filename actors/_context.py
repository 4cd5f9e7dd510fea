"""The dialogue context every participant is told: environment, talk style, extra context."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from ._errors import ConfigurationError

if TYPE_CHECKING:
    from moot.events import DialogueContext

__all__ = ["TALK_STYLES", "TalkStyle", "render_context"]


class TalkStyle(msgspec.Struct, frozen=True, kw_only=True):
    """A way of talking: a title, what the session is for, guidelines, expected behaviour."""

    title: str
    purpose: str
    guidelines: tuple[str, ...] = ()
    expected: tuple[str, ...] = ()

    def render(self) -> str:
        parts = [f"## Dialogue Style: {self.title}", self.purpose]
        if self.guidelines:
            parts.append("## Guidelines\n" + "\n".join(f"- {g}" for g in self.guidelines))
        if self.expected:
            parts.append("## Expected Behaviour\n" + "\n".join(f"- {e}" for e in self.expected))
        return "\n\n".join(parts)


#: The eight built-in talk styles, by the name used in ``DialogueContext.talk_style``.
TALK_STYLES: dict[str, TalkStyle] = {
    "brainstorm": TalkStyle(
        title="Brainstorming Session",
        purpose="A creative session: generate and explore ideas freely.",
        guidelines=(
            "Welcome bold and unconventional ideas.",
            "Build on and combine what others suggest.",
            "Generate first; judge later.",
            "Prefer many ideas to one polished one.",
            'Answer with "yes, and" rather than "no, but".',
        ),
        expected=("Offer several alternatives.", "Connect ideas in new ways."),
    ),
    "casual": TalkStyle(
        title="Casual Conversation",
        purpose="A relaxed, friendly conversation. Keep it natural.",
        guidelines=(
            "Talk naturally, without formality.",
            "Share your view and invite others'.",
            "Ask questions that show interest.",
        ),
        expected=("Keep the exchange light and engaging.",),
    ),
    "decision_making": TalkStyle(
        title="Decision-Making Discussion",
        purpose="A structured discussion that must end in a clear decision.",
        guidelines=(
            "Lay out the options and what each implies.",
            "Weigh the trade-offs openly.",
            "Ground recommendations in evidence.",
        ),
        expected=("Recommend a path and say why.", "Record the reasons for the decision."),
    ),
    "debate": TalkStyle(
        title="Constructive Debate",
        purpose="A respectful debate: challenge ideas and bring other perspectives.",
        guidelines=(
            "Question assumptions and test claims.",
            "Offer alternatives, backed by reasons.",
            "Disagree without being disagreeable.",
        ),
        expected=("Name weaknesses in proposals.", "Acknowledge strong points from others."),
    ),
    "problem_solving": TalkStyle(
        title="Problem-Solving Session",
        purpose="A focused session: be systematic and solution-oriented.",
        guidelines=(
            "Start from a clear statement of the problem.",
            "Break it into parts.",
            "Propose concrete, feasible solutions.",
        ),
        expected=("Identify next steps.",),
    ),
    "review": TalkStyle(
        title="Review and Critique",
        purpose="A constructive review: detailed, actionable feedback.",
        guidelines=(
            "Point at specific parts and examples.",
            "Note strengths as well as problems.",
            "Explain why, and suggest how to improve.",
        ),
        expected=("Keep the tone constructive.",),
    ),
    "planning": TalkStyle(
        title="Planning Session",
        purpose="A planning session: think ahead and produce an actionable plan.",
        guidelines=(
            "Anticipate needs, risks and dependencies.",
            "Turn goals into concrete steps.",
            "Account for time and resources.",
        ),
        expected=("Propose a sequence of steps with owners.",),
    ),
    "research": TalkStyle(
        title="Research Session",
        purpose="A fact-finding session: gather reliable information.",
        guidelines=(
            "Base claims on evidence and say where it comes from.",
            "Separate facts from interpretation.",
            "State how confident you are.",
        ),
        expected=("Cross-check sources when you can.",),
    ),
}


def render_context(context: DialogueContext | None) -> str | None:
    """The context as text for a prompt, or None when there is nothing to say.

    Raises:
        ConfigurationError: ``talk_style`` names no built-in style and no template is given.
    """
    if context is None:
        return None
    parts: list[str] = []
    if context.environment:
        parts.append(f"## Environment\n{context.environment}")
    if context.template:
        parts.append(context.template.strip())
    elif context.talk_style:
        style = TALK_STYLES.get(context.talk_style)
        if style is None:
            known = ", ".join(TALK_STYLES)
            raise ConfigurationError(f"unknown talk style {context.talk_style!r} (known: {known})")
        parts.append(style.render())
    if context.additional:
        parts.append(f"## Additional Context\n{context.additional}")
    if not parts:
        return None
    return "# Dialogue Context\n\n" + "\n\n".join(parts)
