"""A stand-in for a live model, loaded by scenario files as ``tests.fake_live:provider``.

It answers identical requests differently ("answer 1", "answer 2", ...), so a re-drive
must serve the recorded answers in order; every call it gets is counted, so a test can
show that a re-drive never calls it.
"""

from __future__ import annotations

import itertools
import os
from typing import TYPE_CHECKING, Any

from moot.actors import Finished, ModelRequest, ModelResponse, TextDelta, UsageDelta
from moot.actors._errors import ProviderTimeout
from moot.actors._model import Delta, assemble
from moot.events import Usage

if TYPE_CHECKING:
    from collections.abc import Iterator

CALLS: list[ModelRequest] = []


class CountingProvider:
    name = "counting"
    model: str | None = "counting-1"

    def __init__(self) -> None:
        self._numbers = itertools.count(1)

    def stream(self, request: ModelRequest, *, deadline: float | None = None) -> Iterator[Delta]:
        CALLS.append(request)
        path = os.environ.get("MOOT_TEST_LIVE_CALLS")
        if path:
            with open(path, "a") as f:
                f.write("call\n")
        yield TextDelta(text=f"answer {next(self._numbers)}")
        yield UsageDelta(usage=Usage(input_tokens=3, output_tokens=2))
        yield Finished(model="counting-1")

    def complete(self, request: ModelRequest, *, deadline: float | None = None) -> ModelResponse:
        return assemble(self.stream(request, deadline=deadline))


def provider(table: dict[str, Any]) -> CountingProvider:
    return CountingProvider()


class TimingOutProvider:
    """A live model whose call fails at once with a read timeout, long before any loop
    deadline (loaded as ``tests.fake_live:timing_out``)."""

    name = "timing-out"
    model: str | None = "timing-out-1"

    def stream(self, request: ModelRequest, *, deadline: float | None = None) -> Iterator[Delta]:
        CALLS.append(request)
        raise ProviderTimeout("fake: read timeout")
        yield  # a generator, as a provider's stream is

    def complete(self, request: ModelRequest, *, deadline: float | None = None) -> ModelResponse:
        return assemble(self.stream(request, deadline=deadline))


def timing_out(table: dict[str, Any]) -> TimingOutProvider:
    return TimingOutProvider()
