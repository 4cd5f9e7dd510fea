"""Tools used by the scenario tests (imported by path, as a user's tools would be)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from moot.actors import ToolContext, ToolRegistry, tool


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def _slow(label: str) -> str:
    """Count the run in $MOOT_TEST_RUNS, say so on stderr, then take a long time
    unless $MOOT_TEST_FAST is set (the test kills the process meanwhile)."""
    runs = Path(os.environ["MOOT_TEST_RUNS"])
    with runs.open("a") as f:
        f.write(label + "\n")
    sys.stderr.write(f"{label} started\n")
    sys.stderr.flush()
    if not os.environ.get("MOOT_TEST_FAST"):
        time.sleep(60)  # simulated work, cut short by SIGKILL
    return f"{label} done"


@tool(idempotent=True)
def fetch() -> str:
    """A slow read: safe to run again."""
    return _slow("fetch")


@tool
def transfer() -> str:
    """A slow payment: never run twice."""
    return _slow("transfer")


@tool(idempotent=True)
def lookup(key: str) -> str:
    """Look a key up (the answer comes from $MOOT_TEST_LOOKUP: tests change it)."""
    return f"{key}={os.environ.get('MOOT_TEST_LOOKUP', 'v1')}"


@tool(idempotent=True)
def research(topic: str, context: ToolContext) -> str:
    """Ask a helper loop about a topic: a nested loop on its own (live) model, with
    ``lookup`` as its tool; ``$MOOT_TEST_TOPIC`` changes what the helper is asked."""
    from tests import fake_live

    prompt = f"Research {os.environ.get('MOOT_TEST_TOPIC', topic)}."
    result = context.runtime.run(
        context, fake_live.CountingProvider(), ToolRegistry([lookup]), prompt=prompt
    )
    return f"{topic}: {result.text}"


@tool(idempotent=True)
def delegate(context: ToolContext) -> str:
    """Hand the job to a helper loop (scripted, labelled "helper" in the call log) that
    runs ``fetch`` and then answers."""
    from moot.actors import ScriptedCall, ScriptedProvider, ScriptedReply

    helper = ScriptedProvider(
        [ScriptedReply(tool_calls=(ScriptedCall(name="fetch"),)), ScriptedReply(text="fetched")],
        label="helper",
    )
    result = context.runtime.run(context, helper, ToolRegistry([fetch]), prompt="Fetch it.")
    return f"helper: {result.text}"
