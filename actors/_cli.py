"""The ``moot`` command: a thin click shell over the library (DESIGN section 8).

Every command opens the log, calls the library, prints. Exit codes: 0 success; 1 the
command ran and found a problem (a failed session, a broken chain, a divergence);
2 bad usage or unreadable input. Errors are one line on stderr, never a traceback.
Read-only commands open the database read-only and never change it.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

import click
import msgspec

from moot.events import MootError

from ._errors import DialogueError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from moot.store import Anchor, EventLog, StoredEvent

__all__ = ["cli", "main"]


class Problem(Exception):
    """The command ran and found a problem: print ``message`` and exit 1."""


def _stream_arg(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A STREAM argument, checked as a stream id (text a log can hold) before any use."""
    if value is None:
        return None
    from moot.store import check_stream_id

    try:
        check_stream_id(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return value


def _db_path(ctx: click.Context) -> str:
    path: str = ctx.obj["db"]
    return path


def open_log(ctx: click.Context, *, readonly: bool = True) -> EventLog:
    """Open the database named by ``--db`` / ``$MOOT_DB`` (read-only unless asked)."""
    from moot.store import EventLog

    key = os.environ.get("MOOT_AUDIT_KEY") or None
    log = EventLog(_db_path(ctx), readonly=readonly, audit_key=key)
    ctx.call_on_close(log.close)
    return log


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    metavar="PATH",
    envvar="MOOT_DB",
    default="moot.db",
    show_default="$MOOT_DB, else ./moot.db",
    help="The event log database.",
)
@click.version_option(package_name="moot", prog_name="moot")
@click.pass_context
def cli(ctx: click.Context, db: str) -> None:
    """moot: multi-agent dialogues and tool loops, every step on the record."""
    ctx.obj = {"db": db}


# ------------------------------------------------------------------ inspection


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON array of objects.")
@click.pass_context
def sessions(ctx: click.Context, as_json: bool) -> None:
    """List streams: id, kind, status, events, updated."""
    heads = open_log(ctx).streams()
    if as_json:
        rows = [
            {
                "stream": h.stream,
                "kind": h.kind,
                "parent": h.parent,
                "status": h.status,
                "events": h.last_seq,
                "created_at": h.created_at,
                "updated_at": h.updated_at,
            }
            for h in heads
        ]
        click.echo(msgspec.json.encode(rows))  # bytes: JSON is UTF-8 whatever the terminal
        return
    from ._render import text_table

    table = [
        (h.stream, h.kind, h.status, str(h.last_seq), h.updated_at, h.parent or "") for h in heads
    ]
    headers = ("stream", "kind", "status", "events", "updated", "parent")
    for line in text_table(headers, table, right=frozenset({3})):
        click.echo(line)


@cli.command()
@click.argument("stream", callback=_stream_arg)
@click.pass_context
def show(ctx: click.Context, stream: str) -> None:
    """The transcript of STREAM for people, tool loops nested under their messages."""
    from ._render import show_stream

    show_stream(open_log(ctx), stream, _console())


@cli.command()
@click.argument("stream", required=False, callback=_stream_arg)
@click.option("--type", "types", multiple=True, metavar="T", help="Only events of this type.")
@click.option("--after", type=int, default=0, metavar="POSITION", help="Only after this position.")
@click.option("--jsonl", is_flag=True, help="One JSON object per line.")
@click.pass_context
def events(
    ctx: click.Context, stream: str | None, types: tuple[str, ...], after: int, jsonl: bool
) -> None:
    """Raw events, of all streams or of STREAM, in log order."""
    from ._render import event_line, jsonl_line

    log = open_log(ctx)
    if stream is not None:
        log.stream_info(stream)  # an unknown stream is an error, not an empty list
    wanted = set(types)
    for row in log.read_rows(after, stream=stream):
        if wanted and row.type not in wanted:
            continue
        click.echo(jsonl_line(row).encode() if jsonl else event_line(row))


@cli.command()
@click.argument("stream", callback=_stream_arg)
@click.option(
    "--until",
    type=click.IntRange(min=1),
    default=None,
    metavar="SEQ",
    help="Fold events up to SEQ.",
)
@click.option("--json", "as_json", is_flag=True, help="Compact JSON on one line.")
@click.pass_context
def replay(ctx: click.Context, stream: str, until: int | None, as_json: bool) -> None:
    """The state of STREAM rebuilt from its events, as JSON."""
    from ._render import complete

    state = open_log(ctx).replay(stream, until_seq=until)
    encoded = msgspec.json.encode(complete(state))
    click.echo(encoded if as_json else msgspec.json.format(encoded, indent=2))  # UTF-8 bytes


@cli.command()
@click.argument("stream", required=False, callback=_stream_arg)
@click.option(
    "--anchor",
    "anchor_path",
    metavar="FILE",
    help="Also check that nothing an earlier --save-anchor recorded was removed or rewritten.",
)
@click.option(
    "--save-anchor",
    metavar="FILE",
    help="When all is well, record what was verified in FILE (keep it outside the database).",
)
@click.pass_context
def verify(
    ctx: click.Context, stream: str | None, anchor_path: str | None, save_anchor: str | None
) -> None:
    """Check the hash chains (of STREAM, or of every stream)."""
    anchor = _read_anchor(anchor_path) if anchor_path else None
    log = open_log(ctx)
    report = log.verify(stream, anchor=anchor)
    if stream is not None and report.ok and report.checked == 0:
        log.stream_info(stream)  # no events and no head: no such stream (exit 2)
    if not report.ok:
        where = "" if report.first_bad is None else f" at position {report.first_bad}"
        raise Problem(f"broken{where}: {report.reason}")
    if save_anchor:
        assert report.anchor is not None
        _write_anchor(save_anchor, report.anchor)
    _say(f"ok {report.checked} events")


def _read_anchor(path: str) -> Anchor:
    from moot.store import Anchor

    try:
        with open(path, "rb") as f:
            return msgspec.json.decode(f.read(), type=Anchor)
    except OSError as exc:
        raise click.UsageError(f"{path}: cannot read the anchor ({exc.strerror})") from None
    except msgspec.DecodeError as exc:
        raise click.UsageError(f"{path}: not a moot anchor ({exc})") from None


def _write_anchor(path: str, anchor: Anchor) -> None:
    """Write the anchor whole or not at all (a crash leaves the old file as it was)."""
    partial = f"{path}.partial"
    try:
        with open(partial, "wb") as f:
            f.write(msgspec.json.format(msgspec.json.encode(anchor), indent=2) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise click.UsageError(f"{path}: cannot write the anchor ({exc.strerror})") from None


@cli.command()
@click.option(
    "-n",
    "--lines",
    "count",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="How many recent events to print first.",
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing events as they are appended.")
@click.option("--jsonl", is_flag=True, help="One JSON object per line.")
@click.pass_context
def tail(ctx: click.Context, count: int, follow: bool, jsonl: bool) -> None:
    """The last events, and with --follow new ones as any process appends them."""
    from ._render import event_line, jsonl_line

    log = open_log(ctx)
    start = max(0, log.last_position() - count)

    def fmt(row: StoredEvent) -> str | bytes:
        return jsonl_line(row).encode() if jsonl else event_line(row)

    position = start
    for row in log.read_rows(start):
        click.echo(fmt(row))
        position = row.position
    if not follow:
        return
    with log.subscribe(after_position=position) as sub:
        for_ever = iter(lambda: sub.next_row(timeout=None), None)
        for row in for_ever:
            click.echo(fmt(row))
            sys.stdout.flush()


# -------------------------------------------------------------------- running


def _print_reply(reply: Any) -> None:
    if reply.error is not None:
        _say(f"turn {reply.turn}  {reply.participant} failed: {reply.error.message}")
    else:
        text = " ".join((reply.content or "").split())
        _say(f"turn {reply.turn}  {reply.participant}: {text}")
    sys.stdout.flush()


def _print_loop_turn(stream: str) -> Any:
    from ._loop import Completed, Failed, Paused, Yielded

    def show(turn: Any) -> None:
        match turn:
            case Yielded():
                results = {r.tool_call_id: r for r in turn.results}
                for call in turn.calls:
                    args = msgspec.json.encode(call.arguments).decode()
                    got = results.get(call.id)
                    outcome = "?" if got is None else " ".join(got.content.split())
                    verb = "failed:" if got is not None and got.is_error else "->"
                    _say(f"iteration {turn.iteration}  {call.name}({args}) {verb} {outcome}")
            case Paused():
                for call in turn.calls:
                    args = msgspec.json.encode(call.arguments).decode()
                    _say(f"awaiting approval: {call.id}  {call.name}({args})")
                _say(f"  decide with: moot approve {stream} CALL_ID  (or moot deny ...)")
            case Completed():
                final = turn.result
                _say(f"answer: {' '.join(final.text.split())}")
                detail = f": {final.termination.detail}" if final.termination.detail else ""
                _say(
                    f"done ({final.termination.reason}{detail}) after "
                    f"{final.iterations} iteration(s)"
                )
            case Failed():
                _say(f"failed: {turn.error.message}")
        sys.stdout.flush()

    return show


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--id", "stream_id", metavar="ID", help="The new stream's id (default: generated).")
@click.pass_context
def run(ctx: click.Context, file: str, stream_id: str | None) -> None:
    """Run the scenario in FILE, printing each reply (or loop iteration) as it comes."""
    from ._loop import Failed
    from ._scenario import LoopScenario, load_scenario, run_dialogue, run_loop

    scenario = load_scenario(file)  # a bad file fails here, before the log is touched
    if stream_id is not None:
        _check_new_id(stream_id)
    log = open_log(ctx, readonly=False)
    chosen = stream_id or scenario.stream
    if chosen is not None and chosen in {h.stream for h in log.streams()}:
        raise click.UsageError(
            f"stream {chosen!r} already exists (to continue it: moot resume {chosen} FILE)"
        )

    def started(stream: str) -> None:
        _say(f"stream {stream}")
        sys.stdout.flush()

    if isinstance(scenario, LoopScenario):
        shown: dict[str, Any] = {}

        def on_start(stream: str) -> None:
            started(stream)
            shown["print"] = _print_loop_turn(stream)

        outcome = run_loop(
            scenario,
            log,
            stream=stream_id,
            on_start=on_start,
            on_turn=lambda turn: shown["print"](turn),  # noqa: PLW0108  set by on_start
        )
        if isinstance(outcome, Failed):
            raise Problem(f"the loop failed: {outcome.error.message}")
        _say(f"completed {outcome.stream}")
        return
    try:
        stream = run_dialogue(
            scenario, log, stream=stream_id, on_start=started, on_reply=_print_reply
        )
    except DialogueError as exc:  # a turn could not run: the session failed
        raise Problem(str(exc)) from exc
    _say(f"completed {stream}")


@cli.command()
@click.argument("stream", callback=_stream_arg)
@click.argument("file", type=click.Path(dir_okay=False))
@click.pass_context
def resume(ctx: click.Context, stream: str, file: str) -> None:
    """Continue the unfinished STREAM with the agents (or model and tools) of FILE."""
    from ._loop import Failed
    from ._scenario import LoopScenario, load_scenario, resume_dialogue, resume_loop

    scenario = load_scenario(file)
    log = open_log(ctx, readonly=False)
    head = log.stream_info(stream)
    _say(f"stream {stream}")
    if head.status in ("completed", "failed", "closed"):
        _say(f"nothing to resume: {stream} is {head.status}")
        if head.status == "failed":
            raise Problem(f"{stream} failed before")
        return
    if isinstance(scenario, LoopScenario):
        outcome = resume_loop(scenario, log, stream, on_turn=_print_loop_turn(stream))
        if isinstance(outcome, Failed):
            raise Problem(f"the loop failed: {outcome.error.message}")
    else:
        try:
            resume_dialogue(scenario, log, stream, on_reply=_print_reply)
        except DialogueError as exc:
            raise Problem(str(exc)) from exc
    _say(f"completed {stream}")


def _check_new_id(stream: str) -> None:
    """Refuse an id the log could not store, before the log is opened."""
    from moot.store import check_stream_id

    try:
        check_stream_id(stream)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def _decide(
    ctx: click.Context, stream: str, call_id: str, decision: str, reason: str | None
) -> None:
    from moot.events import LoopState
    from moot.store import ConcurrencyError

    from ._errors import ToolLoopError
    from ._loop import decision_event

    log = open_log(ctx, readonly=False)
    for _ in range(5):  # the loop may append at the same moment: read again and retry
        state = log.replay(stream)
        if not isinstance(state, LoopState):
            raise click.UsageError(f"{stream} is a dialogue; decisions are for tool loops")
        try:
            event = decision_event(state, call_id, decision, reason)
        except ToolLoopError as exc:
            raise click.UsageError(str(exc)) from exc
        try:
            log.append(stream, [event], expected_seq=state.seq)
        except ConcurrencyError:
            continue
        _say(f"{decision}d {call_id} in {stream}".replace("denyd", "denied"))
        return
    raise Problem(f"{stream} kept changing; the decision was not recorded")


@cli.command()
@click.argument("stream", callback=_stream_arg)
@click.argument("call_id")
@click.option("--reason", default=None, help="Why (recorded with the decision).")
@click.pass_context
def approve(ctx: click.Context, stream: str, call_id: str, reason: str | None) -> None:
    """Approve CALL_ID, a tool call the loop STREAM is waiting on."""
    _decide(ctx, stream, call_id, "approve", reason)


@cli.command()
@click.argument("stream", callback=_stream_arg)
@click.argument("call_id")
@click.option("--reason", default=None, help="Why (sent to the model with the refusal).")
@click.pass_context
def deny(ctx: click.Context, stream: str, call_id: str, reason: str | None) -> None:
    """Deny CALL_ID: the loop STREAM sends the model an error result instead."""
    _decide(ctx, stream, call_id, "deny", reason)


@cli.command()
@click.argument("stream", callback=_stream_arg)
@click.argument("file", type=click.Path(dir_okay=False))
@click.pass_context
def redrive(ctx: click.Context, stream: str, file: str) -> None:
    """Run FILE again against STREAM's recorded replies and tool results, and compare.

    Exit 0 when the new run reproduces the log; 1 with the first divergence. The log
    is only read, and no live model is called.
    """
    from ._redrive import redrive as run_redrive
    from ._scenario import load_scenario

    scenario = load_scenario(file)
    log = open_log(ctx)
    log.stream_info(stream)
    report = run_redrive(scenario, log, stream)
    if report.ok:
        _say(f"reproduced {report.compared} events of {stream}")
        return
    d = report.divergence
    assert d is not None
    where = f"position {d.position}" if d.position is not None else "the end of the log"
    _say(f"diverged at {where} in {d.stream}")
    _say(f"  expected: {d.expected}")
    _say(f"  actual:   {d.actual}")
    raise Problem(f"diverged at {where} in {d.stream}")


# ---------------------------------------------------------------------- main


def _console() -> Any:
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError  # a reader that went away: exit 0, as every command

    # Piped output is not cut to 80 columns: tables and transcripts stay whole.
    width = None if sys.stdout.isatty() else 1_000
    return _Console(highlight=False, soft_wrap=True, width=width)


def _say(text: str) -> None:
    """One line for people: names, replies and errors come from models and users, so
    their control characters are shown escaped."""
    from ._render import clean_line

    click.echo(clean_line(text))


def _fail(message: str, code: int) -> NoReturn:
    from ._render import clean_line

    first = message.strip().splitlines()[0] if message.strip() else "error"
    click.echo(f"moot: {clean_line(first)}", err=True)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the CLI: one-line errors on stderr, exit 0 / 1 / 2, never a traceback."""
    if sys.stdout is None:  # started with its standard output closed
        _fail("cannot write the output: standard output is closed", 2)
    if isinstance(sys.stdout, io.TextIOWrapper):
        # A terminal or pipe that cannot show a character gets an escape, not a crash.
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        cli.main(
            args=list(argv) if argv is not None else None, prog_name="moot", standalone_mode=False
        )
        sys.stdout.flush()  # inside the try: a reader that went away is not an error
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except SystemExit:
        # click turns a reader that went away (``moot events | head``) into exit 1 after
        # wrapping stdout; that is not a problem the command found.
        if type(sys.stdout).__name__ == "_PacifyFlushWrapper":
            sys.exit(0)
        raise
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except click.ClickException as exc:
        _fail(exc.format_message(), 2)
    except Problem as exc:
        _fail(str(exc), 1)
    except MootError as exc:
        _fail(str(exc), 2)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (``moot events | head``): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
    except OSError as exc:  # the output could not be written (a full disk), say
        with contextlib.suppress(OSError):  # nor will the interpreter's last flush
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(f"{where}{exc.strerror or exc}", 2)
