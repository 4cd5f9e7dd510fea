"""moot.actors tools: schemas from signatures, the registry, validation, retries, time limits."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

from moot.actors._errors import ConfigurationError, ToolError
from moot.actors._tools import (
    Tool,
    ToolContext,
    ToolOutcome,
    ToolRegistry,
    ToolRetry,
    execute,
    load_tool,
    tool,
)
from moot.events import ToolCallBlock, ToolSpec
from tests import tools_fixture as fx

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

FAST = ToolRetry(max_retries=3, initial_delay=0.001, max_delay=0.001, jitter=0)


def call(name: str, call_id: str = "c1", **arguments: Any) -> ToolCallBlock:
    return ToolCallBlock(id=call_id, name=name, arguments=arguments)


def run(item: Tool | Callable[..., Any], name: str | None = None, **arguments: Any) -> ToolOutcome:
    registry = ToolRegistry([item])
    return execute(registry, call(name or registry.names[0], **arguments))


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """An event that hanging tools wait on; set when the test ends, so they finish."""
    event = threading.Event()
    yield event
    event.set()


# --- schemas --------------------------------------------------------------------------


def test_schema_of_a_typed_function() -> None:
    described = tool(fx.describe)
    schema = described.parameters
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert "$ref" not in schema
    assert "$defs" not in schema
    assert "title" not in schema
    assert schema["required"] == ["name", "count", "ratio", "enabled", "tags", "origin"]
    props = schema["properties"]
    assert list(props) == [
        "name", "count", "ratio", "enabled", "tags", "origin", "note", "unit", "weights"
    ]  # fmt: skip
    assert props["name"] == {"type": "string", "description": "The name of the thing."}
    assert props["count"] == {
        "type": "integer",
        "description": "How many there are; this description goes on over a second line.",
    }
    assert props["ratio"]["type"] == "number"
    assert props["enabled"] == {"type": "boolean"}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert props["note"] == {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None}
    assert props["unit"] == {
        "enum": ["km", "m"],  # msgspec sorts the values
        "default": "m",
        "description": "The unit of length.",
    }
    assert props["weights"] == {"type": "array", "items": {"type": "number"}, "default": [1.0, 2.0]}
    # The nested Struct is inlined, with its own title and description kept.
    assert props["origin"] == {
        "title": "Point",
        "description": "Where it starts.",
        "type": "object",
        "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
        "required": ["x", "y"],
    }
    # The schema is plain JSON all the way down.
    assert msgspec.json.decode(msgspec.json.encode(schema)) == schema


def test_description_is_the_docstring_without_its_sections() -> None:
    described = tool(fx.describe)
    assert described.description == (
        "Describe a thing with every kind of argument.\n\nThe body says more, over\ntwo lines."
    )
    assert tool(fx.add).description == "Add two integers."
    assert tool(fx.search).description == "A search request."  # the Struct's, as a fallback
    assert tool(description="Mine.")(fx.add).description == "Mine."


def lookup(term: str, ctx: ToolContext) -> str:
    """Look a term up.

    It understands:
      - plain words

    Args:
        term: What to look up.
        ctx: Not an argument.
    Returns:
        The definition.
    """
    return term


def test_a_line_ending_in_a_colon_is_not_a_section() -> None:
    made = tool(lookup)
    assert made.description == "Look a term up.\n\nIt understands:\n  - plain words"
    assert made.parameters["properties"] == {
        "term": {"type": "string", "description": "What to look up."}
    }


def test_context_remaining() -> None:
    assert ToolContext().remaining() is None
    assert ToolContext(deadline=time.monotonic() - 1).remaining() == 0
    assert 50 < (ToolContext(deadline=time.monotonic() + 60).remaining() or 0) <= 60


def test_context_parameter_is_left_out_of_the_schema_and_injected() -> None:
    described = tool(fx.describe)
    assert described.context_parameter == "context"
    assert "context" not in described.parameters["properties"]
    registry = ToolRegistry([described])
    arguments = {
        "name": "rod",
        "count": 2,
        "ratio": 0.5,
        "enabled": True,
        "tags": ["a"],
        "origin": {"x": 1, "y": 2.5},
    }
    outcome = execute(
        registry,
        ToolCallBlock(id="call-7", name="describe", arguments=arguments),
        context=ToolContext(stream="loop-1", call_id="ignored", depth=1),
    )
    assert not outcome.is_error, outcome.content
    assert msgspec.json.decode(outcome.content) == {
        **arguments,
        "origin": {"x": 1.0, "y": 2.5},
        "note": None,
        "unit": "m",
        "weights": [1.0, 2.0],
        "stream": "loop-1",
        "call_id": "call-7",
    }


def test_mutable_defaults_are_fresh_for_every_call() -> None:
    seen: list[list[int]] = []

    def collect(items: list[int] = [1, 2]) -> None:  # noqa: B006  the case under test
        items.append(3)
        seen.append(items)

    run(collect)
    run(collect)
    assert seen == [[1, 2, 3], [1, 2, 3]]
    assert seen[0] is not seen[1]


def test_schema_of_a_struct_parameter_function() -> None:
    searcher = tool(fx.search)
    assert searcher.struct_parameter == "request"
    assert searcher.parameters == {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "What to look for."},
            "limit": {"type": "integer", "default": 10, "description": "How many hits at most."},
        },
        "required": ["query"],
        "additionalProperties": False,
    }
    assert run(fx.search, query="q", limit=2).content == '["q-0","q-1"]'


def test_a_struct_that_allows_unknown_fields_still_rejects_them_at_the_top() -> None:
    outcome = run(fx.search, query="q", page=2)
    assert outcome.is_error
    assert (
        outcome.content
        == "Invalid arguments for tool 'search': Object contains unknown field `page`"
    )


def test_recursive_struct_keeps_its_defs() -> None:
    schema = tool(fx.plant).parameters
    assert schema["type"] == "object"
    assert schema["properties"]["children"]["items"] == {"$ref": "#/$defs/Node"}
    assert schema["$defs"]["Node"]["properties"]["children"]["items"] == {"$ref": "#/$defs/Node"}
    tree: dict[str, Any] = {
        "value": 1,
        "children": [{"value": 2}, {"value": 3, "children": [{"value": 4}]}],
    }
    assert run(fx.plant, **tree).content == "4"


def test_function_without_parameters() -> None:
    def ping() -> str:
        return "pong"

    made = tool(ping)
    assert made.parameters == {
        "type": "object",
        "properties": {},
        "required": [],
        "additionalProperties": False,
    }
    assert made.description == ""
    assert run(made).content == "pong"


def test_decorator_options() -> None:
    policy = ToolRetry(max_retries=1)

    @tool(name="renamed", timeout_s=2.5, retry=policy, idempotent=True)
    def original(x: int) -> int:
        return x

    assert isinstance(original, Tool)
    assert (original.name, original.timeout_s, original.retry, original.idempotent) == (
        "renamed",
        2.5,
        policy,
        True,
    )
    assert original(4) == 4  # a Tool still calls like its function
    assert original.spec == ToolSpec(name="renamed", description="", parameters=original.parameters)
    assert tool(fx.add).idempotent is False


@pytest.mark.parametrize(
    ("function", "message"),
    [
        (fx.star_args, "parameter 'values' is variadic positional"),
        (lambda x: x, "Invalid tool name '<lambda>'"),
    ],
)
def test_functions_that_cannot_be_tools(function: Callable[..., Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        tool(function)


def test_unresolvable_annotation_is_a_configuration_error() -> None:
    def broken(x: int) -> int:
        return x

    broken.__annotations__["x"] = "NoSuchType"
    with pytest.raises(ConfigurationError, match=r"Cannot build tool 'broken'.*NoSuchType"):
        tool(broken)


def test_type_msgspec_cannot_describe_is_a_configuration_error() -> None:
    def odd(x: threading.Event) -> None:
        pass

    with pytest.raises(ConfigurationError, match="Cannot build tool 'odd'"):
        tool(odd)


# --- registry -------------------------------------------------------------------------


def test_specs_are_sorted_by_name() -> None:
    registry = ToolRegistry([fx.search, fx.add, fx.shout_it, fx.describe])
    assert registry.names == ("add", "describe", "search", "shout")
    assert [spec.name for spec in registry.specs()] == ["add", "describe", "search", "shout"]
    assert [item.name for item in registry] == list(registry.names)
    assert len(registry) == 4
    assert "add" in registry
    assert "nope" not in registry
    assert registry.get("nope") is None


def test_duplicate_name_replaces() -> None:
    registry = ToolRegistry([fx.add])
    other = tool(name="add", description="Another add.")(fx.shout_it.function)
    assert registry.register(other) is other
    assert len(registry) == 1
    assert registry.get("add") is other


def test_only_and_without_return_new_registries() -> None:
    registry = ToolRegistry([fx.add, fx.search, fx.shout_it])
    only = registry.only(["shout", "add"])
    assert only.names == ("add", "shout")
    assert only.get("add") is registry.get("add")
    assert registry.without(["add", "unknown"]).names == ("search", "shout")
    assert registry.names == ("add", "search", "shout")


def test_only_with_unknown_names_fails_clearly() -> None:
    registry = ToolRegistry([fx.add])
    with pytest.raises(ConfigurationError) as caught:
        registry.only(["add", "zap", "bang"])
    assert str(caught.value) == "Unknown tools: bang, zap (known: add)"


# --- validation and results -----------------------------------------------------------


def test_valid_call_gives_content() -> None:
    outcome = run(fx.add, a=2, b=3)
    assert outcome.content == "5"
    assert not outcome.is_error
    assert outcome.attempts == 1
    assert outcome.duration_ms >= 0


def test_unknown_tool_is_an_error_result() -> None:
    outcome = execute(ToolRegistry([fx.add]), call("x"))
    assert (outcome.content, outcome.is_error, outcome.attempts) == ("Unknown tool: x", True, 0)


class Recorder:
    """A tool body that records that it ran."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, a: int, b: int = 0) -> int:
        self.calls += 1
        return a + b


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"a": "3"}, "Expected `int`, got `str` - at `$.a`"),
        ({"a": 3.5}, "Expected `int`, got `float` - at `$.a`"),
        ({"b": 1}, "Object missing required field `a`"),
        ({"a": 1, "c": 2}, "Object contains unknown field `c`"),
    ],
)
def test_invalid_arguments_are_an_error_result_and_the_tool_is_not_called(
    arguments: dict[str, Any], message: str
) -> None:
    body = Recorder()
    registry = ToolRegistry([tool(name="calc", retry=FAST)(body)])
    outcome = execute(registry, ToolCallBlock(id="c", name="calc", arguments=arguments))
    assert outcome.is_error
    assert outcome.content == f"Invalid arguments for tool 'calc': {message}"
    assert outcome.attempts == 0
    assert body.calls == 0


def test_arguments_override_replaces_the_model_arguments() -> None:
    registry = ToolRegistry([fx.add])
    outcome = execute(registry, call("add", a=1, b=1), arguments_override={"a": 10, "b": 5})
    assert outcome.content == "15"


def test_hand_built_tool_without_arguments_type_gets_the_dict() -> None:
    raw = Tool(name="raw", parameters={"type": "object"}, function=lambda **kw: sorted(kw))
    assert run(raw, x=1, a=2).content == '["a","x"]'


class Weather(msgspec.Struct):
    city: str
    celsius: float


@pytest.mark.parametrize(
    ("value", "content"),
    [
        ("plain text", "plain text"),
        (None, ""),
        (42, "42"),
        (1.5, "1.5"),
        (True, "true"),
        ({"b": [1, 2], "a": None}, '{"b":[1,2],"a":null}'),
        ([1, "x"], '[1,"x"]'),
        (Weather(city="Oslo", celsius=-3.5), '{"city":"Oslo","celsius":-3.5}'),
    ],
)
def test_return_values_become_content(value: object, content: str) -> None:
    def give() -> object:
        return value

    outcome = run(give)
    assert (outcome.content, outcome.is_error) == (content, False)


def test_unencodable_return_value_is_an_error_result() -> None:
    def give() -> object:
        return threading.Lock()

    outcome = run(give)
    assert outcome.is_error
    assert outcome.content.startswith("Tool 'give' returned a value that cannot be encoded as JSON")


def test_tool_error_message_passes_through_and_other_errors_name_their_type() -> None:
    def refuse() -> None:
        raise ToolError("no such file: a.txt")

    def crash() -> None:
        raise KeyError("k")

    def bare() -> None:
        raise RuntimeError

    assert (run(refuse).content, run(refuse).is_error) == ("no such file: a.txt", True)
    assert run(crash).content == "KeyError: 'k'"
    assert run(bare).content == "RuntimeError"


def test_async_function_tool() -> None:
    threads: list[str] = []

    async def fetch(key: str, context: ToolContext) -> dict[str, str]:
        """Fetch a key."""
        await asyncio.sleep(0)
        threads.append(threading.current_thread().name)
        return {"key": key, "call": context.call_id}

    made = tool(fetch)
    assert made.is_async
    assert made.parameters["properties"] == {"key": {"type": "string"}}
    outcome = execute(ToolRegistry([made]), call("fetch", call_id="c9", key="k"))
    assert (outcome.content, outcome.is_error) == ('{"key":"k","call":"c9"}', False)
    assert threads == ["moot-tool-fetch"]


def test_async_tool_error() -> None:
    async def fail() -> None:
        raise ToolError("async failure")

    assert run(fail).content == "async failure"


# --- retries --------------------------------------------------------------------------


class Flaky:
    """Fails ``failures`` times, then answers."""

    def __init__(self, failures: int, error: type[Exception] = ConnectionError) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error(f"failure {self.calls}")
        return "ok"


def test_flaky_tool_succeeds_within_its_retries() -> None:
    body = Flaky(failures=2)
    outcome = run(tool(name="flaky", retry=FAST)(body))
    assert (outcome.content, outcome.is_error, outcome.attempts) == ("ok", False, 3)
    assert body.calls == 3


def test_exhausted_retries_give_the_last_error() -> None:
    body = Flaky(failures=10)
    outcome = run(tool(name="flaky", retry=FAST)(body))
    assert outcome.is_error
    assert outcome.content == "ConnectionError: failure 4"
    assert outcome.attempts == FAST.max_retries + 1 == body.calls


def test_no_retry_policy_means_one_attempt() -> None:
    body = Flaky(failures=1)
    outcome = run(tool(name="flaky")(body))
    assert (outcome.content, outcome.attempts) == ("ConnectionError: failure 1", 1)


def test_retry_if_saying_no_stops_after_one_attempt() -> None:
    seen: list[BaseException] = []

    def only_connection_errors(exc: BaseException) -> bool:
        seen.append(exc)
        return isinstance(exc, ConnectionError)

    policy = msgspec.structs.replace(FAST, retry_if=only_connection_errors)
    body = Flaky(failures=5, error=ValueError)
    outcome = run(tool(name="flaky", retry=policy)(body))
    assert (outcome.content, outcome.attempts, body.calls) == ("ValueError: failure 1", 1, 1)
    assert [type(e) for e in seen] == [ValueError]

    body = Flaky(failures=2, error=ConnectionError)
    assert run(tool(name="flaky", retry=policy)(body)).attempts == 3


def test_a_raising_retry_if_means_no_retry() -> None:
    def broken(exc: BaseException) -> bool:
        raise RuntimeError("bug in the predicate")

    body = Flaky(failures=2)
    outcome = run(tool(name="flaky", retry=msgspec.structs.replace(FAST, retry_if=broken))(body))
    assert (outcome.content, outcome.attempts) == ("ConnectionError: failure 1", 1)


def test_retry_delays() -> None:
    policy = ToolRetry(initial_delay=0.1, multiplier=2.0, max_delay=0.3, jitter=0)
    assert [policy.delay(n) for n in range(4)] == [0.1, 0.2, 0.3, 0.3]
    assert policy.delay(10_000) == 0.3
    jittered = ToolRetry(initial_delay=1.0, jitter=0.5)
    assert all(0.5 <= jittered.delay(0) <= 1.0 for _ in range(200))
    assert ToolRetry().max_retries == 3


@pytest.mark.parametrize(
    "options",
    [{"max_retries": -1}, {"initial_delay": -1.0}, {"multiplier": 0.5}, {"jitter": 1.5}],
)
def test_invalid_retry_policies(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        ToolRetry(**options)


def test_a_retry_that_would_start_after_the_deadline_is_not_made() -> None:
    body = Flaky(failures=5)
    slow = ToolRetry(max_retries=5, initial_delay=30.0, max_delay=30.0, jitter=0)
    registry = ToolRegistry([tool(name="flaky", retry=slow)(body)])
    started = time.monotonic()
    outcome = execute(registry, call("flaky"), deadline=started + 5)
    assert (outcome.content, outcome.attempts, body.calls) == ("ConnectionError: failure 1", 1, 1)


# --- time limits ----------------------------------------------------------------------


def hanging(release: threading.Event, *, timeout_s: float | None = None, **options: Any) -> Tool:
    def hang() -> str:
        release.wait(30)
        return "finally"

    return tool(name="hang", timeout_s=timeout_s, **options)(hang)


def test_timeout_cuts_a_hanging_tool(release: threading.Event) -> None:
    started = time.monotonic()
    outcome = run(hanging(release, timeout_s=0.05))
    elapsed = time.monotonic() - started
    assert outcome.is_error
    assert outcome.content == "Tool 'hang' timed out after 0.05 s"
    assert outcome.attempts == 1
    assert elapsed >= 0.04
    assert not release.is_set()  # it came back while the tool still hung
    assert outcome.duration_ms >= 40


def test_deadline_cuts_a_hanging_tool(release: threading.Event) -> None:
    registry = ToolRegistry([hanging(release, timeout_s=60)])
    started = time.monotonic()
    outcome = execute(registry, call("hang"), deadline=started + 0.05)
    assert outcome.is_error
    assert outcome.content.startswith("Tool 'hang' timed out after ")
    assert outcome.content.endswith(" s (deadline reached)")


def test_deadline_from_the_context_counts_and_reaches_the_tool(release: threading.Event) -> None:
    seen: list[float | None] = []

    def hang(context: ToolContext) -> None:
        seen.append(context.deadline)
        release.wait(30)

    deadline = time.monotonic() + 0.05
    registry = ToolRegistry([tool(hang)])
    outcome = execute(registry, call("hang"), context=ToolContext(deadline=deadline))
    assert outcome.content.endswith("(deadline reached)")
    assert seen == [deadline]


def test_a_passed_deadline_does_not_run_the_tool() -> None:
    body = Recorder()
    registry = ToolRegistry([tool(name="calc")(body)])
    outcome = execute(registry, call("calc", a=1), deadline=time.monotonic() - 1)
    assert outcome.is_error
    assert outcome.content == "Tool 'calc' timed out after 0 s (deadline reached)"
    assert (outcome.attempts, body.calls) == (0, 0)


def test_timed_out_attempts_are_retried_only_for_idempotent_tools(release: threading.Event) -> None:
    once = run(hanging(release, timeout_s=0.02, retry=FAST))
    assert (once.is_error, once.attempts) == (True, 1)
    again = run(hanging(release, timeout_s=0.02, retry=FAST, idempotent=True))
    assert (again.is_error, again.attempts) == (True, FAST.max_retries + 1)


def test_a_tool_that_overran_is_abandoned_and_its_result_discarded(
    release: threading.Event,
) -> None:
    finished = threading.Event()

    def slow() -> str:
        release.wait(30)
        finished.set()
        return "late"

    outcome = run(tool(timeout_s=0.02)(slow))
    assert outcome.content == "Tool 'slow' timed out after 0.02 s"
    assert not finished.is_set()  # still running in the background
    release.set()
    assert finished.wait(5)  # it ends by itself; nobody hears of its result


def test_an_async_tool_that_overran_is_cancelled() -> None:
    cancelled = threading.Event()

    async def wait_forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    outcome = run(tool(timeout_s=0.02)(wait_forever))
    assert outcome.content == "Tool 'wait_forever' timed out after 0.02 s"
    assert cancelled.wait(5)


def test_a_fast_tool_under_a_limit_runs_in_a_worker_thread() -> None:
    def where() -> str:
        return threading.current_thread().name

    assert run(tool(where)).content == threading.current_thread().name
    assert run(tool(timeout_s=5)(where)).content == "moot-tool-where"


# --- loading --------------------------------------------------------------------------


def test_load_a_function_by_path() -> None:
    loaded = load_tool("tests.tools_fixture:add")
    assert isinstance(loaded, Tool)
    assert loaded.name == "add"
    assert loaded.function is fx.add
    assert run(loaded, a=1, b=2).content == "3"


def test_load_a_tool_object_by_path() -> None:
    assert load_tool("tests.tools_fixture:shout_it") is fx.shout_it
    # A dotted attribute reaches inside the module: here the function behind the Tool.
    assert load_tool("tests.tools_fixture:shout_it.function").name == "shout_it"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (
            "tests.tools_fixture",
            "Invalid tool path 'tests.tools_fixture': expected 'module:attribute'",
        ),
        (":add", "Invalid tool path ':add': expected 'module:attribute'"),
        ("tests.tools_fixture:", "Invalid tool path 'tests.tools_fixture:'"),
        (
            "no_such_module_for_moot:add",
            "Cannot load tool 'no_such_module_for_moot:add': "
            "ModuleNotFoundError: No module named 'no_such_module_for_moot'",
        ),
        (
            "tests.tools_fixture:subtract",
            "Cannot load tool 'tests.tools_fixture:subtract': "
            "'tests.tools_fixture' has no attribute 'subtract'",
        ),
        (
            "tests.tools_fixture:NOT_A_TOOL",
            "Cannot load tool 'tests.tools_fixture:NOT_A_TOOL': "
            "not a tool or a function but a 'int' object",
        ),
        (
            "tests.tools_fixture:star_args",
            "Cannot load tool 'tests.tools_fixture:star_args': Cannot build tool 'star_args'",
        ),
    ],
)
def test_load_tool_errors(path: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_tool(path)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_load_tool_from_a_module_that_fails_to_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "moot_broken_tools.py").write_text("raise RuntimeError('boom\\nsecond line')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigurationError) as caught:
        load_tool("moot_broken_tools:x")
    assert str(caught.value) == (
        "Cannot load tool 'moot_broken_tools:x': RuntimeError: boom second line"
    )
