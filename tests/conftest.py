"""Shared fixtures: event logs on every backend, and clean-up of actors after each test."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from moot.store import EventLog, LogBase, MemoryEventLog

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

BACKENDS = ["memory", "sqlite-memory", "sqlite-file"]


def open_log(kind: str, tmp_path: Path, **kwargs: object) -> LogBase:
    if kind == "memory":
        return MemoryEventLog(**kwargs)  # type: ignore[arg-type]
    if kind == "sqlite-memory":
        return EventLog(":memory:", **kwargs)  # type: ignore[arg-type]
    return EventLog(tmp_path / "moot.db", **kwargs)  # type: ignore[arg-type]


@pytest.fixture(params=BACKENDS)
def log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LogBase]:
    """An empty event log on each backend in turn."""
    opened = open_log(request.param, tmp_path)
    yield opened
    opened.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "moot.db"


@pytest.fixture(autouse=True)
def _stop_actors() -> Iterator[None]:
    """Stop every pykka actor a test left running."""
    yield
    import pykka

    pykka.ActorRegistry.stop_all(timeout=10)
