"""Scenario files (DESIGN section 9): TOML that ``moot run`` executes.

Loading validates everything before anything runs: a bad file is one
:class:`ConfigurationError` with a one-line reason, and nothing is written.
"""

from __future__ import annotations

import importlib
import os
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from moot.events import (
    DialogueContext,
    DialogueState,
    JoiningStrategy,
    LoopDetectionInfo,
    LoopState,
    ToolCallBlock,
)

from ._agents import Agent, CallableAgent, LlmAgent
from ._anthropic import AnthropicProvider
from ._context import TALK_STYLES
from ._decide import MODES, REACTIONS, validate_order
from ._dialogue import Dialogue, Input, Participant
from ._errors import ConfigurationError, DialogueError
from ._loop import (
    Approval,
    Failed,
    LoopResult,
    Paused,
    ToolLoop,
    ToolLoopConfig,
    ToolLoopHandle,
    approve,
    ask_person,
)
from ._loop_agent import ToolLoopAgent
from ._model import Provider
from ._openai import OpenAIProvider
from ._scripted import ScriptedProvider, parse_replies
from ._tools import ToolRegistry, load_tool

if TYPE_CHECKING:
    from moot.store import LogBase

    from ._session import TurnReply

__all__ = [
    "AgentSpec",
    "LoopScenario",
    "Scenario",
    "load_scenario",
    "loop_config",
    "resume_dialogue",
    "resume_loop",
    "run_dialogue",
    "run_loop",
]

_AGENT_KEYS = {
    "agent",
    "replies",
    "base_url",
    "model",
    "api_key_env",
    "temperature",
    "max_tokens",
    "stream",
    "instructions",
    "tools",
    "loop",
    "history_turns",
    "timeout_s",
}
_PARTICIPANT_KEYS = _AGENT_KEYS | {
    "name",
    "role",
    "description",
    "capabilities",
    "joins_at",
    "strategy",
}
_DIALOGUE_KEYS = {
    "mode",
    "order",
    "names",
    "context",
    "turns",
    "reaction",
    "mention_strategy",
    "id",
    "metadata",
}


_Count = Annotated[int, msgspec.Meta(ge=0)]
_Positive = Annotated[int, msgspec.Meta(ge=1)]
#: Seconds or a temperature: finite (TOML allows inf and nan) and not negative.
_Amount = Annotated[float, msgspec.Meta(ge=0, le=1e9)]
_Text = Annotated[str, msgspec.Meta(min_length=1)]


class _AgentTable(msgspec.Struct, kw_only=True):
    """The types of an agent's keys (which keys a table may have is checked apart)."""

    agent: _Text | None = None
    base_url: _Text | None = None
    model: _Text | None = None
    api_key_env: _Text | None = None
    temperature: _Amount | None = None
    max_tokens: _Positive | None = None
    stream: bool | None = None
    instructions: str | None = None
    tools: list[_Text] | None = None
    loop: dict[str, Any] | None = None
    history_turns: _Count | None = None
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=1e9)] | None = None


class _ParticipantTable(_AgentTable, kw_only=True):
    name: _Text
    role: str | None = None
    description: str | None = None
    capabilities: list[str] | None = None
    joins_at: _Positive | None = None


class _DialogueTable(msgspec.Struct, kw_only=True):
    mode: str | None = None
    order: str | None = None
    names: list[str] | None = None
    reaction: str | None = None
    mention_strategy: str | None = None
    id: _Text | None = None
    metadata: dict[str, Any] | None = None


class _StandaloneTable(msgspec.Struct, kw_only=True):
    prompt: _Text
    system: str | None = None
    id: _Text | None = None


def _typed(where: str, table: dict[str, Any], kind: type[msgspec.Struct]) -> None:
    """Check the types and ranges of ``table``'s keys; the message names the key."""
    try:
        msgspec.convert(table, kind)
    except msgspec.ValidationError as exc:
        raise ConfigurationError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class AgentSpec:
    """How to build one agent (a participant's or the moderator's), from its table."""

    where: str
    table: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.table.get("agent", "scripted"))

    def validate(self) -> None:
        """Check the table without building anything that reaches out (no network)."""
        _typed(self.where, self.table, _AgentTable)
        kind = self.kind
        if kind == "scripted":
            parse_replies(self.table.get("replies"), self.where)
        elif kind in ("openai", "anthropic"):
            env = "OPENAI_MODEL" if kind == "openai" else "ANTHROPIC_MODEL"
            if not self.table.get("model") and not os.environ.get(env):
                raise ConfigurationError(f"{self.where}: agent {kind!r} needs a model (or ${env})")
        elif ":" in kind:
            _import(kind, self.where)
        else:
            raise ConfigurationError(
                f"{self.where}: unknown agent {kind!r} "
                "(expected scripted, openai, anthropic or module:factory)"
            )
        self.tools()
        self.loop_config()

    def tools(self) -> ToolRegistry | None:
        """The participant's tools (None: a plain participant, not a tool loop)."""
        paths = self.table.get("tools")
        if paths is None:
            return None
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ConfigurationError(f"{self.where}: tools must be a list of import paths")
        try:
            return ToolRegistry([load_tool(p) for p in paths])
        except ConfigurationError as exc:
            raise ConfigurationError(f"{self.where}: {exc}") from exc

    def loop_config(self) -> ToolLoopConfig:
        """The loop settings: the ``loop`` sub-table of a participant, or the [loop] table."""
        raw = self.table.get("loop", self.table if self.standalone else {})
        if not isinstance(raw, dict):
            raise ConfigurationError(f"{self.where}: loop must be a table")
        if not self.standalone:
            _no_unknown(raw, _LOOP_KEYS, f"{self.where}: loop")
        return loop_config(self.where, raw)

    @property
    def standalone(self) -> bool:
        return "prompt" in self.table

    def provider(self) -> Provider:
        """The model behind this agent."""
        kind, t = self.kind, self.table
        if kind == "scripted":
            label = str(t.get("name", "scripted"))
            return ScriptedProvider(parse_replies(t.get("replies"), self.where), label=label)
        if kind == "openai":
            return OpenAIProvider(
                t.get("base_url"),
                t.get("model"),
                api_key_env=t.get("api_key_env", "OPENAI_API_KEY"),
                timeout=t.get("timeout_s"),
            )
        if kind == "anthropic":
            return AnthropicProvider(
                t.get("model"),
                base_url=t.get("base_url"),
                api_key_env=t.get("api_key_env", "ANTHROPIC_API_KEY"),
                timeout=t.get("timeout_s"),
            )
        if ":" in kind:
            made = _made(kind, self.where, t)
            if isinstance(made, Provider):
                return made
            raise ConfigurationError(
                f"{self.where}: {kind} made a {type(made).__name__}; a model is needed here"
            )
        raise ConfigurationError(f"{self.where}: agent {kind!r} has no provider")

    def build(
        self,
        log: LogBase,
        *,
        provider: Provider | None = None,
        tools: ToolRegistry | None = None,
        config: ToolLoopConfig | None = None,
    ) -> Agent:
        """The agent, ready to answer (a tool loop when it has tools).

        ``provider`` and ``tools`` replace the ones the table describes (re-drive
        serves recorded replies and results this way).
        """
        tools = tools if tools is not None else self.tools()
        if tools is not None:
            return ToolLoopAgent(
                provider or self.provider(),
                tools,
                log,
                config=config or self.loop_config(),
                instructions=self.table.get("instructions"),
                history_turns=self.table.get("history_turns", 20),
            )
        if provider is not None:
            return self._llm(provider)
        if ":" in self.kind:
            made = _made(self.kind, self.where, self.table)
            if isinstance(made, Provider):
                return self._llm(made)
            if hasattr(made, "respond"):
                return made  # type: ignore[no-any-return]
            if callable(made):
                return CallableAgent(made)
            raise ConfigurationError(f"{self.where}: {self.kind} returned {type(made).__name__}")
        return self._llm(self.provider())

    def _llm(self, provider: Provider) -> LlmAgent:
        t = self.table
        history = t.get("history_turns", 20)
        return LlmAgent(
            provider,
            instructions=t.get("instructions"),
            stream=bool(t.get("stream", True)),
            history_turns=history,
            temperature=t.get("temperature"),
            max_tokens=t.get("max_tokens"),
        )


_LOOP_KEYS = {
    "max_iterations",
    "parallel_tool_execution",
    "timeout_s",
    "max_depth",
    "loop_detection",
    "mask_keep_iterations",
    "approval",
    "stream",
    "temperature",
    "max_tokens",
}


def loop_config(where: str, raw: dict[str, Any]) -> ToolLoopConfig:
    """A ToolLoopConfig from a scenario table (unknown keys are left to the caller).

    ``approval`` is "auto" (the default), "ask" (a person decides every call), or a list of
    tool names a person must decide; the others run.

    Raises:
        ConfigurationError: a value is invalid.
    """
    settings = {k: v for k, v in raw.items() if k in _LOOP_KEYS}
    approval = settings.pop("approval", "auto")
    detection = settings.pop("loop_detection", None)
    try:
        checked = None if detection is None else msgspec.convert(detection, _Detection)
        config = msgspec.convert(settings, _LoopSettings)
    except msgspec.ValidationError as exc:
        raise ConfigurationError(f"{where}: invalid loop settings ({exc})") from exc
    info = None if checked is None else LoopDetectionInfo(checked.threshold, checked.action)
    return ToolLoopConfig(
        max_iterations=config.max_iterations,
        parallel_tool_execution=config.parallel_tool_execution,
        timeout_s=config.timeout_s,
        max_depth=config.max_depth,
        loop_detection=info,
        mask_keep_iterations=config.mask_keep_iterations,
        approval=_approval(where, approval),
        stream=config.stream,
        temperature=config.temperature,
        max_tokens=config.max_tokens,
    )


class _LoopSettings(msgspec.Struct, forbid_unknown_fields=True):
    max_iterations: _Positive = 10
    parallel_tool_execution: bool = True
    timeout_s: _Amount | None = None
    max_depth: _Count | None = 3
    mask_keep_iterations: _Count | None = None
    stream: bool = True
    temperature: _Amount | None = None
    max_tokens: _Positive | None = None


class _Detection(msgspec.Struct, forbid_unknown_fields=True):
    threshold: Annotated[int, msgspec.Meta(ge=2)] = 3
    action: Literal["warn", "stop", "inject_warning"] = "warn"


def _approval(where: str, raw: Any) -> Callable[[ToolCallBlock], Approval] | None:
    if raw == "auto":
        return None
    if raw == "ask":
        return lambda call: ask_person("the scenario asks a person to decide every call")
    if isinstance(raw, list) and all(isinstance(n, str) for n in raw):
        names = frozenset(raw)
        return lambda call: (
            ask_person(f"{call.name} needs approval") if call.name in names else approve()
        )
    raise ConfigurationError(f"{where}: approval must be 'auto', 'ask' or a list of tool names")


def _import(path: str, where: str) -> Callable[..., Any]:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"{where}: {path!r} is not of the form module:attribute")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an error while importing a user's module is theirs to see
        reason = f"{type(exc).__name__}: {exc}"
        raise ConfigurationError(f"{where}: cannot import {module_name!r} ({reason})") from exc
    target = getattr(module, attr, None)
    if not callable(target):
        raise ConfigurationError(f"{where}: {path!r} is not a callable in {module_name!r}")
    return target  # type: ignore[no-any-return]


def _made(path: str, where: str, table: dict[str, Any]) -> Any:
    """Call the ``module:factory`` named by ``path`` with the table; errors are the file's."""
    factory = _import(path, where)
    try:
        return factory(dict(table))
    except Exception as exc:
        raise ConfigurationError(f"{where}: {path} failed: {type(exc).__name__}: {exc}") from exc


AgentMaker = Callable[[AgentSpec], Agent]


@dataclass(frozen=True)
class ParticipantSpec:
    name: str
    info: dict[str, Any]
    agent: AgentSpec
    joins_at: int | None = None
    strategy: JoiningStrategy = field(default_factory=JoiningStrategy.recent)

    def participant(self, make: AgentMaker) -> Participant:
        return Participant(
            name=self.name,
            agent=make(self.agent),
            role=self.info.get("role"),
            description=self.info.get("description"),
            capabilities=tuple(self.info.get("capabilities", ())),
            kind=self.agent.kind,
        )


@dataclass(frozen=True)
class Scenario:
    """A validated scenario file."""

    path: str
    mode: str
    order: str
    names: tuple[str, ...]
    context: DialogueContext | None
    reaction: str | None
    mention_strategy: str
    turns: tuple[Input, ...]
    participants: tuple[ParticipantSpec, ...]
    moderator: AgentSpec | None
    stream: str | None = None
    metadata: dict[str, Any] | None = None

    def initial(self) -> list[ParticipantSpec]:
        return [p for p in self.participants if p.joins_at is None]


def load_scenario(path: str | os.PathLike[str]) -> Scenario | LoopScenario:
    """Read and validate a scenario file.

    Raises:
        ConfigurationError: unreadable or invalid TOML, or anything the scenario
            format does not allow; the message says where.
    """
    where = os.fspath(path)
    _importable(Path(path))
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"{where}: cannot read ({exc.strerror})") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{where}: invalid TOML ({exc})") from exc
    if "loop" in raw:
        if set(raw) - {"loop"}:
            raise ConfigurationError(f"{where}: a [loop] scenario has only the [loop] table")
        return _loop(where, raw["loop"])
    dialogue = raw.get("dialogue")
    if not isinstance(dialogue, dict):
        raise ConfigurationError(f"{where}: needs a [dialogue] table (or a [loop] table)")
    unknown = set(raw) - {"dialogue", "participant", "moderator"}
    if unknown:
        raise ConfigurationError(f"{where}: unknown table(s): {', '.join(sorted(unknown))}")
    return _dialogue(where, dialogue, raw.get("participant", []), raw.get("moderator"))


def _importable(path: Path) -> None:
    """Let ``module:attr`` paths name modules next to the scenario or in the current
    directory, as they would for ``python -m`` (appended: installed packages win)."""
    for folder in (str(Path.cwd()), str(path.resolve().parent)):
        if folder not in sys.path:
            sys.path.append(folder)


def _dialogue(where: str, d: dict[str, Any], people: Any, moderator: Any) -> Scenario:
    _no_unknown(d, _DIALOGUE_KEYS, f"{where}: [dialogue]")
    _typed(f"{where}: [dialogue]", d, _DialogueTable)
    mode = str(d.get("mode", "broadcast"))
    if mode not in MODES:
        raise ConfigurationError(f"{where}: unknown mode {mode!r} (expected {', '.join(MODES)})")
    order = str(d.get("order", "as_added" if mode == "sequential" else "completion"))
    if not isinstance(people, list) or not people:
        raise ConfigurationError(f"{where}: needs at least one [[participant]]")
    specs = [_participant(where, i, p) for i, p in enumerate(people)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"{where}: participant names must be unique")
    initial = [s.name for s in specs if s.joins_at is None]
    try:
        validate_order(mode, order, tuple(d.get("names", ())), initial)
    except DialogueError as exc:
        raise ConfigurationError(f"{where}: {exc}") from exc
    reaction = d.get("reaction")
    if reaction is not None and reaction not in REACTIONS:
        raise ConfigurationError(f"{where}: unknown reaction {reaction!r}")
    mention = str(d.get("mention_strategy", "exact_word"))
    if mention not in ("exact_word", "name", "partial"):
        raise ConfigurationError(f"{where}: unknown mention_strategy {mention!r}")
    mod_spec = None
    if moderator is not None:
        if not isinstance(moderator, dict):
            raise ConfigurationError(f"{where}: [moderator] must be a table")
        if mode != "moderator":
            raise ConfigurationError(f"{where}: a [moderator] table needs mode 'moderator'")
        _no_unknown(moderator, _AGENT_KEYS - {"tools", "loop"}, f"{where}: [moderator]")
        mod_spec = AgentSpec(f"{where}: [moderator]", {"name": "moderator", **moderator})
        mod_spec.validate()
    if mode == "moderator" and mod_spec is None:
        raise ConfigurationError(f"{where}: mode 'moderator' needs a [moderator] table")
    return Scenario(
        path=where,
        mode=mode,
        order=order,
        names=tuple(d.get("names", ())),
        context=_context(where, d.get("context")),
        reaction=reaction,
        mention_strategy=mention,
        turns=_turns(where, d.get("turns")),
        participants=tuple(specs),
        moderator=mod_spec,
        stream=d.get("id"),
        metadata=_metadata(where, d.get("metadata")),
    )


def _metadata(where: str, raw: Any) -> dict[str, Any] | None:
    if raw is not None and not isinstance(raw, dict):
        raise ConfigurationError(f"{where}: [dialogue] metadata must be a table")
    return raw


def _no_unknown(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise ConfigurationError(f"{where}: unknown key(s): {', '.join(sorted(unknown))}")


def _participant(where: str, index: int, p: Any) -> ParticipantSpec:
    here = f"{where}: participant[{index}]"
    if not isinstance(p, dict) or not isinstance(p.get("name"), str) or not p["name"]:
        raise ConfigurationError(f"{here}: needs a name")
    here = f"{where}: participant {p['name']!r}"
    _no_unknown(p, _PARTICIPANT_KEYS, here)
    _typed(here, p, _ParticipantTable)
    spec = AgentSpec(here, p)
    spec.validate()
    joins_at = p.get("joins_at")
    if joins_at is not None and (not isinstance(joins_at, int) or joins_at < 1):
        raise ConfigurationError(f"{here}: joins_at must be a turn number >= 1")
    strategy = _strategy(here, p.get("strategy"))
    return ParticipantSpec(p["name"], p, spec, joins_at, strategy)


def _strategy(where: str, raw: Any) -> JoiningStrategy:
    if raw is None:
        return JoiningStrategy.recent()
    if isinstance(raw, str):
        raw = {"kind": raw}
    if isinstance(raw, dict):
        _no_unknown(raw, set(JoiningStrategy.__struct_fields__), f"{where}: strategy")
    try:
        strategy = msgspec.convert(raw, JoiningStrategy)
    except msgspec.ValidationError as exc:
        raise ConfigurationError(f"{where}: invalid strategy ({exc})") from exc
    if strategy.kind == "range" and strategy.start is None:
        raise ConfigurationError(f"{where}: a range strategy needs start")
    try:  # the same rules as the API's
        if strategy.kind == "recent" and strategy.turns is not None:
            JoiningStrategy.recent(strategy.turns)
        if strategy.kind == "range" and strategy.start is not None:
            JoiningStrategy.range(strategy.start, strategy.end)
    except ValueError as exc:
        raise ConfigurationError(f"{where}: invalid strategy ({exc})") from exc
    return strategy


def _context(where: str, raw: Any) -> DialogueContext | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        return DialogueContext(additional=raw)
    if isinstance(raw, dict):
        _no_unknown(raw, set(DialogueContext.__struct_fields__), f"{where}: context")
    try:
        context = msgspec.convert(raw, DialogueContext)
    except msgspec.ValidationError as exc:
        raise ConfigurationError(f"{where}: invalid context ({exc})") from exc
    if context.talk_style and not context.template and context.talk_style not in TALK_STYLES:
        raise ConfigurationError(f"{where}: unknown talk_style {context.talk_style!r}")
    return context


def _turns(where: str, raw: Any) -> tuple[Input, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigurationError(f"{where}: [dialogue] needs a non-empty 'turns' list")
    out = []
    for i, t in enumerate(raw):
        if isinstance(t, str):
            out.append(Input(t))
            continue
        try:
            out.append(msgspec.convert(t, _TurnSpec).input())
        except msgspec.ValidationError as exc:
            raise ConfigurationError(f"{where}: turns[{i}]: {exc}") from exc
    return tuple(out)


class _TurnSpec(msgspec.Struct, forbid_unknown_fields=True):
    content: str
    speaker: str = "user"
    kind: str = "user"
    message_type: str = "conversational"

    def input(self) -> Input:
        if self.kind not in ("system", "user", "agent"):
            raise msgspec.ValidationError(f"kind must be system, user or agent, not {self.kind!r}")
        return Input(self.content, self.speaker, self.kind, self.message_type)  # type: ignore[arg-type]


# ------------------------------------------------------------------- running


def run_dialogue(
    scenario: Scenario,
    log: LogBase,
    *,
    stream: str | None = None,
    on_start: Callable[[str], None] | None = None,
    on_reply: Callable[[TurnReply], None] | None = None,
    make_agent: AgentMaker | None = None,
) -> str:
    """Run a dialogue scenario from its first turn; returns the stream id.

    ``make_agent`` builds each agent from its spec (default: as the file says).
    """
    make = make_agent or (lambda spec: spec.build(log))
    dialogue = Dialogue.create(
        log,
        participants=[p.participant(make) for p in scenario.initial()],
        mode=scenario.mode,
        order=scenario.order,
        names=scenario.names,
        context=scenario.context,
        reaction=scenario.reaction,
        moderator=make(scenario.moderator) if scenario.moderator else None,
        mention_strategy=scenario.mention_strategy,  # type: ignore[arg-type]
        stream=stream or scenario.stream,
        metadata=scenario.metadata,
    )
    if on_start is not None:
        on_start(dialogue.stream)
    _play(scenario, dialogue, 0, on_reply, make)
    return dialogue.stream


def resume_dialogue(
    scenario: Scenario,
    log: LogBase,
    stream: str,
    *,
    on_reply: Callable[[TurnReply], None] | None = None,
) -> str:
    """Continue an unfinished dialogue with the scenario's agents, from where it stopped."""
    state = log.replay(stream)
    if not isinstance(state, DialogueState):
        raise ConfigurationError(f"stream {stream!r} is a tool loop, not a dialogue")
    agents = {
        p.name: p.agent.build(log) for p in scenario.participants if p.name in state.participants
    }
    dialogue = Dialogue.resume(
        log,
        stream,
        agents,
        moderator=scenario.moderator.build(log) if scenario.moderator else None,
        mention_strategy=scenario.mention_strategy,  # type: ignore[arg-type]
    )
    try:
        for reply in dialogue.finish_turn():
            if on_reply is not None:
                on_reply(reply)
    except BaseException:
        dialogue.stop()
        raise
    _play(scenario, dialogue, state.input_turn, on_reply, lambda spec: spec.build(log))
    return stream


def _play(
    scenario: Scenario,
    dialogue: Dialogue,
    done: int,
    on_reply: Callable[[TurnReply], None] | None,
    make: AgentMaker,
) -> None:
    """Play turns ``done + 1`` onwards, joining late participants as they come due."""
    try:
        present = set(dialogue.state().participants)
        for number, turn_input in enumerate(scenario.turns[done:], start=done + 1):
            for spec in scenario.participants:
                if spec.joins_at == number and spec.name not in present:
                    dialogue.join(spec.participant(make), spec.strategy)
                    present.add(spec.name)
            for reply in dialogue.session(turn_input):
                if on_reply is not None:
                    on_reply(reply)
    except BaseException:
        dialogue.stop()
        raise
    dialogue.close("completed")


# --------------------------------------------------------------- loop files

_STANDALONE_KEYS = (
    (_AGENT_KEYS - {"loop", "history_turns"})
    | _LOOP_KEYS
    | {
        "prompt",
        "system",
        "id",
        "name",
    }
)


@dataclass(frozen=True)
class LoopScenario:
    """A validated ``[loop]`` scenario: one standalone tool loop."""

    path: str
    prompt: str
    system: str | None
    agent: AgentSpec
    stream: str | None = None


def _loop(where: str, table: Any) -> LoopScenario:
    here = f"{where}: [loop]"
    if not isinstance(table, dict):
        raise ConfigurationError(f"{here} must be a table")
    _no_unknown(table, _STANDALONE_KEYS, here)
    prompt = table.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ConfigurationError(f"{here} needs a prompt")
    _typed(here, table, _StandaloneTable)
    spec = AgentSpec(here, {"tools": [], **table})
    spec.validate()
    return LoopScenario(where, prompt, table.get("system"), spec, table.get("id"))


def run_loop(
    scenario: LoopScenario,
    log: LogBase,
    *,
    stream: str | None = None,
    on_start: Callable[[str], None] | None = None,
    on_turn: Callable[[Any], None] | None = None,
    provider: Provider | None = None,
    tools: ToolRegistry | None = None,
    config: ToolLoopConfig | None = None,
    on_pause: Callable[[ToolLoopHandle, Paused], None] | None = None,
) -> LoopResult | Failed:
    """Run a standalone loop scenario to its end; paused loops wait for decisions.

    ``provider`` and ``tools`` replace the ones the file describes.
    """
    spec = scenario.agent
    handle = ToolLoop.start(
        log,
        provider or spec.provider(),
        tools if tools is not None else spec.tools(),
        prompt=scenario.prompt,
        system=scenario.system,
        config=config or spec.loop_config(),
        stream=stream or scenario.stream,
    )
    if on_start is not None:
        on_start(handle.stream)
    return _drive(handle, on_turn, on_pause)


def resume_loop(
    scenario: LoopScenario,
    log: LogBase,
    stream: str,
    *,
    on_turn: Callable[[Any], None] | None = None,
) -> LoopResult | Failed:
    """Continue an unfinished loop with the scenario's model and tools."""
    state = log.replay(stream)
    if not isinstance(state, LoopState):
        raise ConfigurationError(f"stream {stream!r} is a dialogue, not a tool loop")
    if state.parent is not None and log.stream_info(state.parent.stream).kind == "dialogue":
        raise ConfigurationError(
            f"loop {stream!r} answers dialogue {state.parent.stream!r}; resume the dialogue"
        )
    spec = scenario.agent
    handle = ToolLoop.resume(log, stream, spec.provider(), spec.tools(), spec.loop_config())
    return _drive(handle, on_turn)


def _drive(
    handle: ToolLoopHandle,
    on_turn: Callable[[Any], None] | None,
    on_pause: Callable[[ToolLoopHandle, Paused], None] | None = None,
) -> LoopResult | Failed:
    try:
        return handle.drive(on_turn=on_turn, on_pause=on_pause)
    finally:
        handle.close()
