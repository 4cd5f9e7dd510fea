"""Tools for the example scenarios (scenario files name them as example_tools:add)."""

from __future__ import annotations

from moot.actors import tool


@tool
def add(a: float, b: float) -> float:
    """Add two numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


@tool
def multiply(a: float, b: float) -> float:
    """Multiply two numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a * b


@tool(idempotent=True)
def unit_price(item: str) -> str:
    """Look up the price of one item (a read: safe to run again after a crash)."""
    prices = {"apple": 0.5, "pear": 0.75}
    return str(prices.get(item, "unknown"))
