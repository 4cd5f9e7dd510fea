"""Each package exports exactly what it means to (pinned here, so nothing slips out)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

EXPECTED = {
    "moot.store": [
        "GENESIS",
        "SCHEMA_VERSION",
        "Anchor",
        "ConcurrencyError",
        "DatabaseError",
        "EventLog",
        "IntegrityError",
        "LogBase",
        "MemoryEventLog",
        "Record",
        "StoreError",
        "StoredEvent",
        "StreamInfo",
        "Subscription",
        "UnknownStreamError",
        "VerifyReport",
        "chain_hash",
        "check_stream_id",
    ],
}


@pytest.mark.parametrize("name", ["moot.events", "moot.store", "moot.actors"])
def test_all_is_sorted_unique_and_real(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(set(exported)) == len(exported)
    for member in exported:
        assert hasattr(module, member), member
    public = {n for n in dir(module) if not n.startswith("_")} - {"annotations", "logging"}
    modules = {n for n in public if type(getattr(module, n)).__name__ == "module"}
    assert public - modules == set(exported), "exported names differ from public names"


def test_store_exports_are_pinned() -> None:
    import moot.store

    assert sorted(moot.store.__all__) == sorted(EXPECTED["moot.store"])


def test_the_imports_go_one_way() -> None:
    """events imports nothing of ours; store imports events only; actors both."""
    root = Path(__file__).resolve().parent.parent
    forbidden = {"events": ("store", "actors"), "store": ("actors",)}
    for folder, banned in forbidden.items():
        for path in (root / folder).glob("*.py"):
            for line in path.read_text().splitlines():
                match = re.match(r"\s*(?:from|import)\s+moot\.(\w+)", line)
                assert match is None or match.group(1) not in banned, (path, line)
