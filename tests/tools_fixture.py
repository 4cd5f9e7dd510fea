"""Example tools for the tool tests, importable by path (``tests.tools_fixture:add``)."""

from __future__ import annotations

from typing import Literal

import msgspec

from moot.actors._tools import ToolContext, tool


class Point(msgspec.Struct):
    """A point in the plane."""

    x: float
    y: float


class Node(msgspec.Struct):
    """A tree node."""

    value: int
    children: list[Node] = []


class Search(msgspec.Struct, forbid_unknown_fields=False):
    """A search request.

    Attributes:
        query: What to look for.
        limit: How many hits at most.
    """

    query: str
    limit: int = 10


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first addend.
        b: The second addend.

    Returns:
        The sum.
    """
    return a + b


def describe(
    name: str,
    count: int,
    ratio: float,
    enabled: bool,
    tags: list[str],
    origin: Point,
    note: str | None = None,
    unit: Literal["m", "km"] = "m",
    weights: list[float] = [1.0, 2.0],  # noqa: B006  a tool default, copied per call by moot
    context: ToolContext | None = None,
) -> dict[str, object]:
    """Describe a thing with every kind of argument.

    The body says more, over
    two lines.

    Args:
        name: The name of the thing.
        count (int): How many there are; this description
            goes on over a second line.
        ratio: A fraction.
        origin: Where it starts.
        unit: The unit of length.

    Returns:
        Everything it was given.
    """
    return {
        "name": name,
        "count": count,
        "ratio": ratio,
        "enabled": enabled,
        "tags": tags,
        "origin": origin,
        "note": note,
        "unit": unit,
        "weights": weights,
        "stream": context.stream if context else None,
        "call_id": context.call_id if context else None,
    }


def search(request: Search) -> list[str]:
    return [f"{request.query}-{i}" for i in range(request.limit)]


def plant(root: Node) -> int:
    """Count the nodes of a tree."""
    return 1 + sum(plant(child) for child in root.children)


@tool(name="shout", description="Upper-case a text.", idempotent=True)
def shout_it(text: str) -> str:
    return text.upper()


NOT_A_TOOL = 42


def _unnamed(x: int) -> int:
    return x


def star_args(*values: int) -> int:
    return sum(values)
