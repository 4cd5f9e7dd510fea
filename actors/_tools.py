"""Tools that a model can call from a tool loop: definition, registry, validation, execution.

A :class:`Tool` is a Python callable plus what the model sees of it (name, description,
JSON Schema of the arguments) and how it is run (timeout, retry policy, idempotence).
:func:`tool` builds one from a typed function; :func:`load_tool` from an import path
such as ``"mytools:search"``; a :class:`ToolRegistry` holds the tools of a loop and
lists them sorted by name, which is the order the model and the log see.

:func:`execute` runs one :class:`moot.events.ToolCallBlock` and never raises for
anything the model or the tool did wrong:

- an unknown tool name gives the error result ``Unknown tool: NAME``;
- arguments that do not match the schema give ``Invalid arguments for tool 'NAME': ...``
  with msgspec's message; the tool is not called and nothing is retried;
- an exception from the tool gives its message as an error result (a :class:`ToolError`'s
  message as is, any other exception as ``TypeName: message``), after the retries of the
  tool's :class:`ToolRetry` policy;
- a tool still running after ``timeout_s`` or at the deadline gives
  ``Tool 'NAME' timed out after X s``.

Arguments are checked strictly, as JSON Schema would: ``"3"`` is not an ``int`` and
``3.5`` is not an ``int`` either (an ``int`` is accepted for a ``float``). The model sees
the schema, so a strict check gives it an exact message to correct its call with.

Threads: :func:`execute` runs in the caller's thread (a loop actor). A sync tool with no
time limit runs right there; a tool with a time limit (its ``timeout_s`` or a deadline)
and every async tool run in a fresh daemon worker thread, so that the caller can stop
waiting. Python cannot kill a thread: a sync tool that overruns its limit is abandoned,
keeps running in the background until it returns by itself, and its result is
discarded. An async tool that overruns is cancelled in its event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import importlib
import inspect
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, overload

import msgspec

from moot.events import ToolCallBlock, ToolSpec

from ._errors import ConfigurationError, ToolError

__all__ = [
    "Tool",
    "ToolContext",
    "ToolOutcome",
    "ToolRegistry",
    "ToolRetry",
    "execute",
    "load_tool",
    "tool",
]

logger = logging.getLogger("moot.actors.tools")

#: What OpenAI and Anthropic accept as a tool name.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_REF_PREFIX = "#/$defs/"


# --- policies and values ------------------------------------------------------------


class ToolRetry(msgspec.Struct, frozen=True, kw_only=True):
    """When and how fast to run a failing tool again.

    The delay before retry ``n`` (0-based) is
    ``min(initial_delay * multiplier ** n, max_delay)``, multiplied by a random factor in
    ``[1 - jitter, 1]``: 0.1 s, 0.2 s, 0.4 s ... with the defaults. A retry that could
    not start before the deadline is not made. Invalid arguments are never retried, and
    a timed-out attempt is retried only for an idempotent tool (the abandoned attempt
    may still be running).

    Attributes:
        max_retries: Retries after the first attempt (3 means up to 4 attempts).
        initial_delay: Seconds before the first retry.
        multiplier: Growth of the delay from one retry to the next.
        max_delay: Upper bound of a delay, before jitter.
        jitter: Spread of the random factor; 0 makes the delays exact.
        retry_if: Called with the exception of a failed attempt; a retry happens only
            if it returns True. None retries every error.
    """

    max_retries: int = 3
    initial_delay: float = 0.1
    multiplier: float = 2.0
    max_delay: float = 5.0
    jitter: float = 0.5
    retry_if: Callable[[BaseException], bool] | None = None

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ConfigurationError(f"ToolRetry.max_retries must be >= 0, not {self.max_retries}")
        if self.initial_delay < 0 or self.max_delay < 0:
            raise ConfigurationError("ToolRetry delays must be >= 0")
        if self.multiplier < 1:
            raise ConfigurationError(f"ToolRetry.multiplier must be >= 1, not {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ConfigurationError(f"ToolRetry.jitter must be within [0, 1], not {self.jitter}")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0-based), jitter included.

        Args:
            retry: 0 for the wait after the first attempt, 1 after the second, ...

        Returns:
            The delay in seconds.
        """
        # The exponent is capped so that a large retry count cannot overflow the float.
        base = min(self.initial_delay * self.multiplier ** min(retry, 64), self.max_delay)
        if self.jitter > 0:
            base *= random.uniform(1 - self.jitter, 1)
        return base


class ToolContext(msgspec.Struct, frozen=True, kw_only=True):
    """What a tool may know about the call it serves. Never part of a tool's schema.

    A tool receives it by declaring a parameter annotated ``ToolContext``.

    Attributes:
        stream: The id of the tool-loop stream that made the call.
        call_id: The id of the tool call being served.
        depth: The depth of that loop (0 for a loop that no other loop started).
        deadline: The ``time.monotonic()`` instant by which the call must be done, or None.
        runtime: An object of the loop runtime with which a tool can start nested loops.
        extras: Anything else the embedding application wants to hand to its tools.
    """

    stream: str = ""
    call_id: str = ""
    depth: int = 0
    deadline: float | None = None
    runtime: Any = None
    extras: dict[str, Any] = {}

    def remaining(self) -> float | None:
        """Seconds left until the deadline (never negative), or None without a deadline."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())


class ToolOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """The result of executing one tool call, as it goes to the model and the log.

    Attributes:
        content: The result text (or the error message when ``is_error``).
        is_error: Whether the call failed.
        attempts: How many times the tool ran; 0 when it never did (unknown tool,
            invalid arguments, deadline already passed).
        duration_ms: Wall time of the whole execution, retries and waits included.
    """

    content: str
    is_error: bool = False
    attempts: int = 1
    duration_ms: float = 0.0


# --- the tool -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, eq=False, slots=True)
class Tool:
    """A tool the model can call. Build one with :func:`tool` rather than by hand.

    Calling a Tool calls its function, so a decorated function stays usable in code.
    Tools compare by identity.

    Attributes:
        name: The name the model calls it by (letters, digits, ``_`` and ``-``, at most 64).
        description: What the tool does, for the model.
        parameters: The JSON Schema of the arguments (an object schema).
        function: The callable that does the work; sync or async.
        timeout_s: Seconds one attempt may take, or None for no limit of its own.
        retry: The retry policy, or None to never retry.
        idempotent: Whether running it again is safe after a crash interrupted it.
        arguments_type: The Struct the arguments are validated and converted with;
            None passes the arguments unchecked as keyword arguments.
        struct_parameter: When set, the function takes the converted Struct as this
            one parameter instead of one parameter per field.
        context_parameter: The parameter that receives the :class:`ToolContext`, if any.
    """

    name: str
    description: str = ""
    parameters: dict[str, Any]
    function: Callable[..., Any]
    timeout_s: float | None = None
    retry: ToolRetry | None = None
    idempotent: bool = False
    arguments_type: type[msgspec.Struct] | None = None
    struct_parameter: str | None = None
    context_parameter: str | None = None

    def __post_init__(self) -> None:
        _check_name(self.name)
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ConfigurationError(f"Tool {self.name!r}: timeout_s must be > 0")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    @property
    def spec(self) -> ToolSpec:
        """What the model (and ``LoopStarted.tools``) sees of this tool."""
        return ToolSpec(name=self.name, description=self.description, parameters=self.parameters)

    @property
    def is_async(self) -> bool:
        """Whether the function is a coroutine function (run with ``asyncio.run``)."""
        return inspect.iscoroutinefunction(self.function)

    def bind(self, arguments: Mapping[str, Any], context: ToolContext) -> Callable[[], Any]:
        """Validate the arguments and return the call, ready to run, without running it.

        Args:
            arguments: The arguments as the model sent them (decoded JSON).
            context: Given to the function if it declared a ToolContext parameter.

        Returns:
            A function of no arguments that calls the tool (and returns, for an async
            tool, the coroutine).

        Raises:
            ToolError: ``Invalid arguments for tool 'NAME': ...`` when they do not match.
        """
        try:
            kwargs = self._convert(arguments)
        except msgspec.ValidationError as exc:
            raise ToolError(f"Invalid arguments for tool '{self.name}': {exc}") from exc
        if self.context_parameter is not None:
            kwargs[self.context_parameter] = context
        function = self.function
        return lambda: function(**kwargs)

    def _convert(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        if self.arguments_type is None:
            if not isinstance(arguments, Mapping):
                raise msgspec.ValidationError(
                    f"Expected `object`, got `{type(arguments).__name__}`"
                )
            return dict(arguments)
        if self.struct_parameter is not None:
            _check_unknown_fields(arguments, self.arguments_type)
            value = msgspec.convert(arguments, self.arguments_type, strict=True)
            return {self.struct_parameter: value}
        value = msgspec.convert(arguments, self.arguments_type, strict=True)
        return {name: getattr(value, name) for name in self.arguments_type.__struct_fields__}


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ConfigurationError(
            f"Invalid tool name {name!r}: use 1 to 64 letters, digits, '_' or '-' (pass name=...)"
        )


def _check_unknown_fields(arguments: Any, struct: type[msgspec.Struct]) -> None:
    """Reject fields a user Struct does not declare, as the schema's top level promises."""
    if struct.__struct_config__.forbid_unknown_fields or not isinstance(arguments, Mapping):
        return
    known = {f.encode_name for f in msgspec.structs.fields(struct)}
    if tag_field := struct.__struct_config__.tag_field:
        known.add(tag_field)
    for key in arguments:
        if key not in known:
            raise msgspec.ValidationError(f"Object contains unknown field `{key}`")


@overload
def tool(function: Callable[..., Any], /) -> Tool: ...


@overload
def tool(
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_s: float | None = None,
    retry: ToolRetry | None = None,
    idempotent: bool = False,
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    function: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_s: float | None = None,
    retry: ToolRetry | None = None,
    idempotent: bool = False,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Turn a typed function into a :class:`Tool`; usable as ``@tool`` or ``@tool(...)``.

    The function either takes one parameter per argument (each annotated; defaults make
    an argument optional), or a single parameter annotated with a ``msgspec.Struct``,
    whose fields are then the arguments. A parameter annotated :class:`ToolContext`
    receives the call's context and is not an argument. The JSON Schema is msgspec's,
    with every reference to a Struct inlined (a recursive Struct keeps a ``$defs``
    entry) and unknown fields rejected. The description is the docstring without its
    sections; a Google-style ``Args:`` section describes the arguments (for a Struct
    parameter, the Struct's ``Attributes:`` section does). Annotations are resolved in
    the function's module, so the types they name must be importable from there.

    Args:
        function: The function, when used as a bare decorator or called directly.
        name: The tool's name; the function's name by default.
        description: The description; the docstring's by default.
        timeout_s: Seconds one attempt may take.
        retry: The retry policy; None never retries.
        idempotent: Whether running it again after an interrupted run is safe.

    Returns:
        The Tool, or a decorator that makes one.

    Raises:
        ConfigurationError: The signature cannot become a schema (``*args``, an
            unresolvable annotation, a type msgspec cannot describe, no usable name).
    """

    def make(f: Callable[..., Any]) -> Tool:
        return _tool_from_function(
            f,
            name=name,
            description=description,
            timeout_s=timeout_s,
            retry=retry,
            idempotent=idempotent,
        )

    return make if function is None else make(function)


def _tool_from_function(
    function: Callable[..., Any],
    *,
    name: str | None,
    description: str | None,
    timeout_s: float | None,
    retry: ToolRetry | None,
    idempotent: bool,
) -> Tool:
    tool_name = name if name is not None else getattr(function, "__name__", None)
    if not isinstance(tool_name, str):
        raise ConfigurationError(f"Cannot name a tool for {function!r}: pass name=...")
    _check_name(tool_name)
    summary, arg_docs = _parse_docstring(inspect.getdoc(function))
    shape = _signature_shape(function, tool_name)
    if shape.struct_parameter is not None:
        struct_summary, arg_docs = _parse_docstring(shape.arguments_type.__doc__)
        summary = summary or struct_summary
    parameters = _object_schema(shape.arguments_type, tool_name, arg_docs, shape.factory_defaults)
    return Tool(
        name=tool_name,
        description=description if description is not None else summary,
        parameters=parameters,
        function=function,
        timeout_s=timeout_s,
        retry=retry,
        idempotent=idempotent,
        arguments_type=shape.arguments_type,
        struct_parameter=shape.struct_parameter,
        context_parameter=shape.context_parameter,
    )


# --- from a signature to a schema -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Shape:
    arguments_type: type[msgspec.Struct]
    struct_parameter: str | None
    context_parameter: str | None
    #: Defaults msgspec cannot show in the schema because they come from a factory.
    factory_defaults: dict[str, Any]


def _signature_shape(function: Callable[..., Any], name: str) -> _Shape:
    """The argument Struct of a function, and which parameters are special."""
    try:
        signature = inspect.signature(function, eval_str=True)
    except (NameError, TypeError, ValueError, SyntaxError) as exc:
        raise ConfigurationError(f"Cannot build tool {name!r}: {exc}") from exc
    context_parameter = None
    parameters: list[inspect.Parameter] = []
    for parameter in signature.parameters.values():
        if parameter.kind not in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
            raise ConfigurationError(
                f"Cannot build tool {name!r}: parameter {parameter.name!r} is "
                f"{parameter.kind.description}; tools take named parameters only"
            )
        if _is_context(parameter.annotation):
            context_parameter = parameter.name
        else:
            parameters.append(parameter)
    if len(parameters) == 1 and _is_struct(parameters[0].annotation):
        struct: type[msgspec.Struct] = parameters[0].annotation
        return _Shape(struct, parameters[0].name, context_parameter, {})
    arguments_type, factory_defaults = _arguments_struct(name, parameters)
    return _Shape(arguments_type, None, context_parameter, factory_defaults)


def _is_context(annotation: Any) -> bool:
    return annotation is ToolContext or annotation == (ToolContext | None)


def _is_struct(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, msgspec.Struct)


def _arguments_struct(
    name: str, parameters: list[inspect.Parameter]
) -> tuple[type[msgspec.Struct], dict[str, Any]]:
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    factory_defaults: dict[str, Any] = {}
    for parameter in parameters:
        annotation = Any if parameter.annotation is parameter.empty else parameter.annotation
        default = parameter.default
        if default is parameter.empty:
            fields.append((parameter.name, annotation))
        elif isinstance(default, list | dict | set | bytearray) and default:
            # msgspec refuses a non-empty mutable default: each call gets its own copy.
            fields.append(
                (parameter.name, annotation, msgspec.field(default_factory=_copier(default)))
            )
            factory_defaults[parameter.name] = default
        else:
            fields.append((parameter.name, annotation, default))
    struct = msgspec.defstruct(
        f"{name}_arguments", fields, kw_only=True, forbid_unknown_fields=True
    )
    return struct, factory_defaults


def _copier(value: Any) -> Callable[[], Any]:
    return lambda: copy.deepcopy(value)


def _object_schema(
    struct: type[msgspec.Struct],
    name: str,
    descriptions: dict[str, str],
    factory_defaults: dict[str, Any],
) -> dict[str, Any]:
    """The self-contained JSON Schema object for the arguments of a tool."""
    try:
        (top,), components = msgspec.json.schema_components(
            [struct], ref_template=_REF_PREFIX + "{name}"
        )
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"Cannot build tool {name!r}: {exc}") from exc
    top_name = top["$ref"].removeprefix(_REF_PREFIX)
    if components[top_name].get("type") != "object":
        raise ConfigurationError(f"Cannot build tool {name!r}: its arguments are not a JSON object")
    properties = components[top_name].setdefault("properties", {})
    for key, value in factory_defaults.items():
        properties[key]["default"] = value
    # Set before inlining, so that a parameter's own words beat its Struct's docstring,
    # and a description given with msgspec.Meta beats both.
    for key, text in descriptions.items():
        if key in properties:
            properties[key].setdefault("description", text)
    schema: dict[str, Any] = msgspec.to_builtins(_inline_top(top_name, components))
    schema.pop("title", None)
    schema.pop("description", None)
    schema["additionalProperties"] = False
    schema.setdefault("required", [])
    return schema


def _inline_top(top: str, components: dict[str, Any]) -> dict[str, Any]:
    """Inline every ``$ref``; only references back into a Struct being inlined stay."""
    kept: set[str] = set()
    schema: dict[str, Any] = _inline(components[top], components, (top,), kept)
    defs: dict[str, Any] = {}
    while pending := kept - defs.keys():
        for ref in sorted(pending):
            defs[ref] = _inline(components[ref], components, (ref,), kept)
    if defs:
        schema["$defs"] = defs
    return schema


def _inline(node: Any, components: dict[str, Any], inside: tuple[str, ...], kept: set[str]) -> Any:
    if isinstance(node, list):
        return [_inline(item, components, inside, kept) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith(_REF_PREFIX):
        target = ref.removeprefix(_REF_PREFIX)
        if target in inside:
            kept.add(target)
            return dict(node)
        resolved = _inline(components[target], components, (*inside, target), kept)
        siblings = {k: _inline(v, components, inside, kept) for k, v in node.items() if k != "$ref"}
        return {**resolved, **siblings}
    return {key: _inline(value, components, inside, kept) for key, value in node.items()}


_ARG_SECTIONS = ("Args", "Arguments", "Parameters", "Params", "Attributes", "Keyword Args")
_OTHER_SECTIONS = ("Returns", "Return", "Yields", "Yield", "Raises", "Examples", "Example")
_MORE_SECTIONS = ("Notes", "Note", "See Also", "Warnings", "Warning", "Todo", "References")
_SECTION = re.compile(rf"^({'|'.join(_ARG_SECTIONS + _OTHER_SECTIONS + _MORE_SECTIONS)}):\s*$")
_ARG_LINE = re.compile(r"^\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def _parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """The text before the first section, and the argument descriptions (Google style)."""
    if not doc:
        return "", {}
    body: list[str] = []
    arguments: dict[str, list[str]] = {}
    section: str | None = None
    current: list[str] | None = None
    entry_indent: int | None = None
    for line in inspect.cleandoc(doc).splitlines():
        if match := _SECTION.match(line):
            section, current, entry_indent = match.group(1), None, None
        elif section is None:
            body.append(line)
        elif section in _ARG_SECTIONS and line.strip():
            indent = len(line) - len(line.lstrip())
            entry_indent = indent if entry_indent is None else entry_indent
            entry = _ARG_LINE.match(line.strip())
            if indent <= entry_indent and entry:
                current = arguments.setdefault(entry.group(1), [])
                current.append(entry.group(2))
            elif current is not None:
                current.append(line.strip())
    summary = "\n".join(body).strip()
    return summary, {key: " ".join(p for p in parts if p) for key, parts in arguments.items()}


# --- the registry ---------------------------------------------------------------------


class ToolRegistry:
    """The tools of a loop, by name. Lists them sorted by name, as the model sees them.

    Build it before the loop runs: registering is not synchronised with executions.

    Args:
        tools: Tools, or functions to wrap with :func:`tool`.
    """

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for item in tools:
            self.register(item)

    def register(self, tool_or_function: Tool | Callable[..., Any]) -> Tool:
        """Add a tool; one with the same name is replaced.

        Args:
            tool_or_function: A Tool, or a function to wrap with :func:`tool`.

        Returns:
            The registered Tool.

        Raises:
            ConfigurationError: A function could not be made into a tool.
        """
        item = tool_or_function if isinstance(tool_or_function, Tool) else tool(tool_or_function)
        self._tools[item.name] = item
        return item

    def get(self, name: str) -> Tool | None:
        """The tool called ``name``, or None."""
        return self._tools.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def __iter__(self) -> Iterator[Tool]:
        """The tools, sorted by name."""
        return iter([self._tools[name] for name in self.names])

    def __repr__(self) -> str:
        return f"ToolRegistry({list(self.names)!r})"

    @property
    def names(self) -> tuple[str, ...]:
        """The tool names, sorted."""
        return tuple(sorted(self._tools))

    def specs(self) -> tuple[ToolSpec, ...]:
        """What the model sees: one spec per tool, sorted by name."""
        return tuple(item.spec for item in self)

    def only(self, names: Iterable[str]) -> ToolRegistry:
        """A new registry with only the named tools.

        Args:
            names: The tools to keep.

        Returns:
            The new registry (the tools are shared, not copied).

        Raises:
            ConfigurationError: A name is not in this registry.
        """
        wanted = set(names)
        if missing := wanted - self._tools.keys():
            known = ", ".join(self.names) or "none"
            raise ConfigurationError(
                f"Unknown tools: {', '.join(sorted(missing))} (known: {known})"
            )
        return ToolRegistry(item for item in self if item.name in wanted)

    def without(self, names: Iterable[str]) -> ToolRegistry:
        """A new registry without the named tools; names it does not hold are ignored.

        Args:
            names: The tools to leave out.

        Returns:
            The new registry (the tools are shared, not copied).
        """
        unwanted = set(names)
        return ToolRegistry(item for item in self if item.name not in unwanted)

    def execute(
        self,
        call: ToolCallBlock,
        *,
        context: ToolContext | None = None,
        deadline: float | None = None,
        arguments_override: Mapping[str, Any] | None = None,
    ) -> ToolOutcome:
        """Run one tool call; the same as :func:`execute` with this registry."""
        return execute(
            self, call, context=context, deadline=deadline, arguments_override=arguments_override
        )


# --- execution ------------------------------------------------------------------------


class _TimedOut(ToolError):
    """An attempt overran its time limit (and was abandoned, or cancelled if async)."""

    def __init__(self, name: str, limit: float, *, by_deadline: bool) -> None:
        reason = " (deadline reached)" if by_deadline else ""
        super().__init__(f"Tool '{name}' timed out after {_seconds(limit)} s{reason}")
        self.by_deadline = by_deadline


def execute(
    registry: ToolRegistry,
    call: ToolCallBlock,
    *,
    context: ToolContext | None = None,
    deadline: float | None = None,
    arguments_override: Mapping[str, Any] | None = None,
) -> ToolOutcome:
    """Run one tool call: validate, run with retries and time limits, encode the result.

    Never raises for an unknown tool, invalid arguments or a failing tool: those are
    error outcomes for the model. Runs in the caller's thread, and in a worker thread
    as described in the module docstring. Only a ``BaseException`` that is not an
    ``Exception`` (KeyboardInterrupt, SystemExit) raised by the tool propagates.

    Args:
        registry: Where to find the tool.
        call: The model's call (its ``id`` goes into the context).
        context: What the tool may know; its ``call_id`` and ``deadline`` are filled in.
        deadline: A ``time.monotonic()`` instant bounding every attempt and retry
            wait; the earlier of it and ``context.deadline`` applies.
        arguments_override: Arguments to use instead of ``call.arguments`` (an
            approval that modified them).

    Returns:
        The outcome: content, error flag, attempts and duration.
    """
    started = time.perf_counter()
    item = registry.get(call.name)
    if item is None:
        return _outcome(f"Unknown tool: {call.name}", True, 0, started)
    deadline = _earliest(deadline, context.deadline if context is not None else None)
    context = msgspec.structs.replace(context or ToolContext(), call_id=call.id, deadline=deadline)
    if call.invalid_arguments is not None and not arguments_override:
        raw = call.invalid_arguments
        shown = raw if len(raw) <= 200 else raw[:199] + "…"
        message = f"Invalid arguments for tool {call.name!r}: not a JSON object: {shown}"
        return _outcome(message, True, 0, started)
    arguments = call.arguments if arguments_override is None else arguments_override
    # A copy: a tool that changes what it was given must not change the call on record
    # (the loop's history, the next request) behind the log's back.
    arguments = _json_copy(arguments)
    try:
        prepared = item.bind(arguments, context)
    except ToolError as exc:
        return _outcome(str(exc), True, 0, started)
    if deadline is not None and deadline <= time.monotonic():
        return _outcome(str(_TimedOut(item.name, 0, by_deadline=True)), True, 0, started)
    value, error, attempts = _run_with_retries(item, prepared, deadline)
    if error is not None:
        return _outcome(_error_message(error), True, attempts, started)
    content, is_error = _content(item.name, value)
    return _outcome(content, is_error, attempts, started)


def _json_copy(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of JSON arguments (a msgspec round trip: faster than copy.deepcopy)."""
    copied: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(arguments))
    return copied


def _outcome(content: str, is_error: bool, attempts: int, started: float) -> ToolOutcome:
    duration_ms = (time.perf_counter() - started) * 1000
    return ToolOutcome(
        content=content, is_error=is_error, attempts=attempts, duration_ms=duration_ms
    )


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return a if b is None else b
    return min(a, b)


def _run_with_retries(
    item: Tool, prepared: Callable[[], Any], deadline: float | None
) -> tuple[Any, BaseException | None, int]:
    """Run until an attempt succeeds or the policy says stop: (value, error, attempts).

    A BaseException the tool raises (SystemExit, asyncio.CancelledError, ...) is its
    failure too, and is not retried: let through, pykka would take it for a crash of
    the loop's actor and stop every actor in the process.
    """
    attempts = 0
    while True:
        attempts += 1
        try:
            return _run_once(item, prepared, deadline), None, attempts
        except Exception as exc:  # noqa: BLE001  every tool failure becomes a result
            delay = _retry_delay(item, exc, attempts, deadline)
            if delay is None:
                return None, exc, attempts
            logger.debug(
                "tool %s failed (attempt %d), retrying in %.3f s", item.name, attempts, delay
            )
            time.sleep(delay)
        except BaseException as exc:  # noqa: BLE001  see the docstring; never retried
            return None, exc, attempts


def _retry_delay(item: Tool, exc: Exception, attempts: int, deadline: float | None) -> float | None:
    """Seconds to wait before the next attempt, or None when there is none."""
    policy = item.retry
    if policy is None or attempts > policy.max_retries:
        return None
    if isinstance(exc, _TimedOut) and (exc.by_deadline or not item.idempotent):
        return None
    if policy.retry_if is not None and not _predicate_says_retry(policy.retry_if, item.name, exc):
        return None
    delay = policy.delay(attempts - 1)
    if deadline is not None and time.monotonic() + delay >= deadline:
        return None
    return delay


def _predicate_says_retry(
    retry_if: Callable[[BaseException], bool], name: str, exc: Exception
) -> bool:
    try:
        return bool(retry_if(exc))
    except Exception:  # a broken predicate must not crash the loop: log it, do not retry
        logger.exception("retry_if of tool %s raised; not retrying", name)
        return False


def _run_once(item: Tool, prepared: Callable[[], Any], deadline: float | None) -> Any:
    """One attempt, inline when nothing limits it, else in a daemon worker thread."""
    limit, by_deadline = _limit(item.timeout_s, deadline)
    if limit is None and not item.is_async:
        return _resolve(prepared())
    if limit is not None and limit <= 0:
        raise _TimedOut(item.name, 0, by_deadline=True)
    return _run_in_worker(item.name, prepared, limit, by_deadline=by_deadline)


def _limit(timeout_s: float | None, deadline: float | None) -> tuple[float | None, bool]:
    """Seconds this attempt may take, and whether the deadline is what sets them."""
    if deadline is None:
        return timeout_s, False
    remaining = deadline - time.monotonic()
    if timeout_s is None or remaining < timeout_s:
        return remaining, True
    return timeout_s, False


# Per-call overhead of execute() for an instant tool, CPython 3.11 on 2 cores (medians of
# 5 x 2000 calls): 8 us inline; 0.2 ms in a fresh daemon thread (when a limit applies);
# 0.6 ms for an async tool (a new event loop per call). A shared ThreadPoolExecutor
# round trip measured 0.13 ms on the same machine, but an abandoned tool would hold a
# pool worker for good, and the interpreter joins pool workers at exit, so one hung tool
# would keep the process from exiting. A daemon thread blocks neither, and 0.1 ms is
# nothing next to a model call.
def _run_in_worker(
    name: str, prepared: Callable[[], Any], limit: float | None, *, by_deadline: bool
) -> Any:
    future: Future[Any] = Future()
    handle = _AsyncHandle()
    worker = threading.Thread(
        target=_work, args=(prepared, future, handle), name=f"moot-tool-{name}", daemon=True
    )
    worker.start()
    try:
        future.exception(timeout=limit)
    except TimeoutError:
        handle.cancel()
        logger.warning("tool %s overran %s s; abandoned", name, _seconds(limit or 0))
        raise _TimedOut(name, limit or 0, by_deadline=by_deadline) from None
    return future.result()


class _AsyncHandle:
    """Where an async tool's event loop and task are, so that the caller can cancel them.

    The caller sets ``abandoned`` before it looks for the task, and the worker
    publishes the task before it looks at ``abandoned``: whichever comes second sees
    the other's write, so a cancellation that races the loop's start is not lost.
    """

    __slots__ = ("abandoned", "loop", "task")

    def __init__(self) -> None:
        self.abandoned = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[Any] | None = None

    def cancel(self) -> None:
        self.abandoned = True
        if self.loop is not None and self.task is not None:
            with contextlib.suppress(RuntimeError):  # the loop may have finished meanwhile
                self.loop.call_soon_threadsafe(self.task.cancel)


def _work(prepared: Callable[[], Any], future: Future[Any], handle: _AsyncHandle) -> None:
    """The worker thread's body: run the call and hand over its value or exception."""
    try:
        future.set_result(_resolve(prepared(), handle))
    except BaseException as exc:  # noqa: BLE001  handed to the waiting caller, who decides
        future.set_exception(exc)


def _resolve(value: Any, handle: _AsyncHandle | None = None) -> Any:
    """The value itself, or for an awaitable its result, run in a new event loop."""
    if not inspect.isawaitable(value):
        return value

    async def main() -> Any:
        if handle is not None:
            handle.loop, handle.task = asyncio.get_running_loop(), asyncio.current_task()
            if handle.abandoned:
                handle.cancel()  # cancelled at the tool's first await
        return await value

    return asyncio.run(main())


def _content(name: str, value: Any) -> tuple[str, bool]:
    """A tool's return value as result text: str as is, None empty, the rest as JSON."""
    if isinstance(value, str):
        return value, False
    if value is None:
        return "", False
    try:
        return msgspec.json.encode(value).decode(), False
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        return f"Tool '{name}' returned a value that cannot be encoded as JSON: {exc}", True


def _error_message(exc: BaseException) -> str:
    if isinstance(exc, ToolError):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _seconds(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".") or "0"


# --- loading --------------------------------------------------------------------------


def load_tool(path: str) -> Tool:
    """The tool named by an import path ``"module:attribute"`` (the attribute may be dotted).

    Args:
        path: For example ``"mytools:search"``. The attribute is a Tool, returned as
            is, or a function, wrapped with :func:`tool`.

    Returns:
        The Tool.

    Raises:
        ConfigurationError: With a one-line reason naming the path: a malformed path,
            a module that cannot be imported, a missing attribute, something that is
            neither a tool nor a function, or a function that cannot be a tool.
    """
    module_name, _, attribute = path.partition(":")
    if not module_name.strip() or not attribute.strip():
        raise ConfigurationError(f"Invalid tool path {path!r}: expected 'module:attribute'")
    target = _resolve_attribute(path, _import(path, module_name), attribute)
    if isinstance(target, Tool):
        return target
    if not callable(target):
        kind = type(target).__name__
        raise ConfigurationError(
            f"Cannot load tool {path!r}: not a tool or a function but a {kind!r} object"
        )
    try:
        return tool(target)
    except ConfigurationError as exc:
        raise ConfigurationError(f"Cannot load tool {path!r}: {exc}") from exc


def _import(path: str, module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except Exception as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ConfigurationError(f"Cannot load tool {path!r}: {reason}") from exc


def _resolve_attribute(path: str, module: Any, attribute: str) -> Any:
    target = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigurationError(
                f"Cannot load tool {path!r}: {module.__name__!r} has no attribute {attribute!r}"
            ) from None
    return target
