"""Rendering the log for people (``moot show``, ``moot events``) and machines (``--jsonl``)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import msgspec
from rich.markup import escape
from rich.text import Text

from moot.events import (
    ApprovalRequested,
    DialogueClosed,
    DialogueMessage,
    DialogueStarted,
    Done,
    IterationStart,
    LlmResponse,
    LoopDetected,
    LoopFailed,
    LoopStarted,
    MessagesInjected,
    ObservationsMasked,
    ParticipantFailed,
    ParticipantJoined,
    ParticipantRemoved,
    ReasoningBlock,
    TextBlock,
    ToolCallBlock,
    ToolCallDecided,
    ToolExecutionEnd,
    TurnCompleted,
    TurnStarted,
    text_of,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from rich.console import Console

    from moot.store import LogBase, Record, StoredEvent

__all__ = ["event_line", "jsonl_line", "show_stream", "text_table"]

_json = msgspec.json.Encoder()
#: Checks that stored data is JSON without building it (decoding into Raw still parses).
_check = msgspec.json.Decoder(msgspec.Raw)


def text_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: frozenset[int] = frozenset()
) -> list[str]:
    """Rows as aligned plain-text lines (a thousand rows in milliseconds, unlike rich)."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return [line(headers), *(line(row) for row in rows)]


def jsonl_line(row: StoredEvent) -> str:
    """One event as a JSON object on one line (the ``--jsonl`` format).

    ``data`` is the stored JSON as it is. A row whose data is not JSON (a damaged or
    altered database) still gives a valid line: its data as a string, and
    ``"invalid": "data is not JSON"``.
    """
    body: dict[str, object] = {
        "position": row.position,
        "stream": row.stream,
        "seq": row.seq,
        "type": row.type,
        "version": row.version,
        "recorded_at": row.recorded_at,
    }
    data: object = row.data
    if isinstance(data, str):
        text = data.encode()
        with contextlib.suppress(msgspec.DecodeError):
            _check.decode(text)
            body["data"] = msgspec.Raw(text)
            return _json.encode(body).decode()
    body["data"] = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
    body["invalid"] = "data is not JSON"
    return _json.encode(body).decode()


def event_line(row: StoredEvent, width: int = 100) -> str:
    """One event as a short line for people: position, stream#seq, type, a data excerpt."""
    data = row.data
    excerpt = data if len(data) <= width else data[: width - 1] + "…"
    return f"{row.position:>7} {row.recorded_at} {row.stream}#{row.seq} {row.type} {excerpt}"


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else _json.encode(value).decode()
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def show_stream(log: LogBase, stream: str, console: Console) -> None:
    """Print a stream as a transcript: dialogues by turn, tool loops nested under replies."""
    info = log.stream_info(stream)
    if info.kind == "loop":
        _show_loop(log, stream, console, indent="")
    else:
        _show_dialogue(log, stream, console)
    console.print(f"[dim]{info.status} · {info.last_seq} events · updated {info.updated_at}[/dim]")


def _show_dialogue(log: LogBase, stream: str, console: Console) -> None:
    shown = 0  # a turn's header comes before its first message (its inputs)
    for record in log.read(stream):
        turn = getattr(record.event, "turn", 0)
        if isinstance(record.event, DialogueMessage | TurnStarted) and turn > shown:
            shown = turn
            console.print()
            console.print(f"[bold cyan]── Turn {turn} ──[/bold cyan]")
        for line in _dialogue_lines(record):
            console.print(line)
        event = record.event
        if isinstance(event, DialogueMessage) and event.loop:
            _show_loop(log, event.loop, console, indent="      ")


def _dialogue_lines(record: Record) -> list[str | Text]:
    event = record.event
    match event:
        case DialogueStarted():
            names = ", ".join(
                p.name + (f" ({p.role})" if p.role else "") for p in event.participants
            )
            lines: list[str | Text] = [
                f"[bold]Dialogue {escape(record.stream)}[/bold] · {event.mode} · {event.order}",
                f"[dim]participants:[/dim] {escape(names) or '-'}",
            ]
            if event.context is not None and event.context.environment:
                lines.append(f"[dim]context:[/dim] {escape(event.context.environment)}")
            return lines
        case DialogueMessage():
            who = event.speaker.name + (f" ({event.speaker.role})" if event.speaker.role else "")
            style = "green" if event.origin == "agent" else "yellow"
            tag = (
                ""
                if event.message_type == "conversational"
                else f" [dim]{escape('[' + event.message_type + ']')}[/dim]"
            )
            head = Text.from_markup(f"  [{style}]{escape(who)}[/{style}]{tag}: ")
            head.append(event.content)
            return [head]
        case ParticipantFailed():
            return [
                f"  [red]{escape(event.participant)} failed:[/red] {escape(event.error.message)}"
            ]
        case ParticipantJoined():
            return [f"  [dim]{escape(event.participant.name)} joined ({event.strategy.kind})[/dim]"]
        case ParticipantRemoved():
            return [f"  [dim]{escape(event.name)} left[/dim]"]
        case TurnCompleted() if event.failed:
            return [f"  [dim]turn {event.turn}: {len(event.failed)} failed[/dim]"]
        case DialogueClosed():
            return ["", f"[dim]closed: {escape(event.reason)}[/dim]"]
        case _:
            return []


def _show_loop(log: LogBase, stream: str, console: Console, indent: str) -> None:
    console.print(f"{indent}[magenta]└ loop {escape(stream)}[/magenta]")
    for record in log.read(stream):
        for line in _loop_lines(record):
            console.print(
                Text(indent + "  ") + (Text.from_markup(line) if isinstance(line, str) else line)
            )


def _loop_lines(record: Record) -> list[str | Text]:
    event = record.event
    match event:
        case LoopStarted():
            tools = ", ".join(t.name for t in event.tools) or "none"
            prompt = next(
                (text_of(m.content) for m in reversed(event.messages) if m.role == "user"), ""
            )
            return [f"[dim]tools: {escape(tools)}[/dim]", Text("prompt: " + _short(prompt))]
        case IterationStart():
            return [f"[bold]iteration {event.iteration}[/bold]"]
        case LlmResponse():
            lines: list[str | Text] = []
            for block in event.content:
                if isinstance(block, ReasoningBlock) and block.redacted:
                    lines.append(Text("  thinking: (redacted by the provider)", style="dim"))
                elif isinstance(block, ReasoningBlock) and block.text:
                    lines.append(Text("  thinking: " + _short(block.text), style="dim"))
                elif isinstance(block, TextBlock):
                    lines.append(Text("  " + block.text))
                elif isinstance(block, ToolCallBlock):
                    lines.append(Text(f"  → {block.name}({_short(block.arguments)}) [{block.id}]"))
            return lines
        case ApprovalRequested():
            ids = escape(", ".join(c.id for c in event.calls))
            return [f"  [yellow]awaiting approval: {ids}[/yellow]"]
        case ToolCallDecided():
            return [
                f"  [yellow]{event.decision} {escape(event.call_id)}[/yellow]"
                + (f" ({escape(event.reason)})" if event.reason else "")
            ]
        case ToolExecutionEnd():
            mark = "[red]✗[/red]" if event.is_error else "[green]=[/green]"
            return [
                Text.from_markup(f"  {mark} {escape(event.tool_name)}: ").append(
                    _short(event.content)
                )
            ]
        case LoopDetected():
            what = f"{escape(event.tool_name)} x{event.consecutive_count} ({event.action})"
            return [f"  [red]loop detected: {what}[/red]"]
        case MessagesInjected():
            return [f"  [dim]injected {len(event.messages)} message(s) ({event.source})[/dim]"]
        case ObservationsMasked():
            return [f"  [dim]masked {event.masked_count} old result(s)[/dim]"]
        case Done():
            detail = f": {event.termination.detail}" if event.termination.detail else ""
            return [
                f"[bold green]done[/bold green] ({event.termination.reason}{escape(detail)}) "
                f"after {event.iterations} iteration(s)"
            ]
        case LoopFailed():
            return [f"[bold red]failed[/bold red]: {escape(event.error.message)}"]
        case _:
            return []
