"""moot.actors: participants, the coordinator, tool loops, model providers, tools, the CLI."""

from __future__ import annotations

__all__: list[str] = []
