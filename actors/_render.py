"""Rendering the log for people (``moot show``, ``moot events``) and machines (``--jsonl``)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import msgspec
from rich.cells import cell_len
from rich.markup import escape as _markup_escape
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

#: Control characters shown as escapes: text from models, users or a damaged log must
#: not move the cursor, clear the screen or retitle the terminal. Tabs and newlines are
#: kept in running text (continuation lines are indented, so none can pass for a line
#: of the transcript), escaped in names and one-line fields.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0))}
_LINE_CONTROLS = {**_CONTROLS, 0x09: "\\t", 0x0A: "\\n"}


def clean(text: str) -> str:
    """Running text with its control characters (but tabs and newlines) escaped."""
    return text.translate(_CONTROLS)


def clean_line(text: str) -> str:
    """A name or one-line field with every control character escaped."""
    return text.translate(_LINE_CONTROLS)


def escape(text: str) -> str:
    """``text`` for rich markup: one line, controls escaped, markup escaped."""
    return _markup_escape(clean_line(text))


#: Checks that stored data is JSON without building it (decoding into Raw still parses).
_check = msgspec.json.Decoder(msgspec.Raw)


def text_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: frozenset[int] = frozenset()
) -> list[str]:
    """Rows as aligned plain-text lines (a thousand rows in milliseconds, unlike rich)."""
    rows = [[clean_line(cell) for cell in row] for row in rows]
    widths = [cell_len(h) for h in headers]
    for row in rows:  # in terminal cells: a wide character takes two
        widths = [max(w, cell_len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = []
        for i, (cell, w) in enumerate(zip(cells, widths, strict=True)):
            pad = " " * (w - cell_len(cell))
            parts.append(pad + cell if i in right else cell + pad)
        return "  ".join(parts).rstrip()

    return [line(headers), *(line(row) for row in rows)]


def complete(value: Any) -> Any:
    """``value`` as JSON-ready builtins with every field, defaults included.

    Events and their parts leave out fields at their defaults when stored (that keeps
    rows small); a state printed for a reader or a program shows them all.
    """
    if isinstance(value, msgspec.Struct):
        config = value.__struct_config__
        out: dict[str, Any] = {}
        if isinstance(config.tag_field, str):
            out[config.tag_field] = config.tag
        for name in value.__struct_fields__:
            out[name] = complete(getattr(value, name))
        return out
    if isinstance(value, dict):
        return {key: complete(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [complete(item) for item in value]
    return value


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
    line = f"{row.position:>7} {row.recorded_at} {row.stream}#{row.seq} {row.type} {excerpt}"
    return clean_line(line)  # JSON escapes them in data; a damaged row or an id might not


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else _json.encode(value).decode()
    text = clean_line(" ".join(text.split()))
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
    # A participant's loop that failed is shown under its failure (a reply names it).
    children = {h.stream for h in log.streams() if h.parent == stream}
    for record in log.read(stream):
        turn = getattr(record.event, "turn", 0)
        if isinstance(record.event, DialogueMessage | TurnStarted) and turn > shown:
            shown = turn
            console.print()
            console.print(f"[bold cyan]── Turn {turn} ──[/bold cyan]")
        for line in _dialogue_lines(record):
            _emit(console, line)
        event = record.event
        if isinstance(event, DialogueMessage) and event.loop:
            _show_loop(log, event.loop, console, indent="      ")
        elif isinstance(event, ParticipantFailed):
            from ._loop_agent import loop_stream_id

            loop = loop_stream_id(stream, event.participant, event.turn)
            if loop in children:
                _show_loop(log, loop, console, indent="      ")


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
            head.append(clean(event.content))
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
            _emit(console, line, indent + "  ")


def _emit(console: Console, line: str | Text, indent: str = "") -> None:
    """Print a line; its continuation lines (a reply of several lines) are indented
    under it, so that no text can pass for a line of the transcript."""
    text = Text(indent) + (Text.from_markup(line) if isinstance(line, str) else line)
    if "\n" in text.plain:
        text = Text("\n" + indent + "    ").join(text.split("\n"))
    console.print(text)


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
                    lines.append(Text("  " + clean(block.text)))
                elif isinstance(block, ToolCallBlock):
                    call = f"{clean_line(block.name)}({_short(block.arguments)})"
                    lines.append(Text(f"  → {call} [{clean_line(block.id)}]"))
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
