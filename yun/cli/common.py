"""Options and helpers the command modules share: lists, long operations, tags."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Annotated, Any, Protocol, TypeVar

import typer
from rich.console import Console, RenderableType
from rich.table import Table

from yun.cli.context import client
from yun.cli.output import emit, fail, fields_table, note, rows_table
from yun.cli.state import OutputFormat
from yun.client import Client, TaskFailed
from yun.client._base import Tags
from yun.client._runners import SyncRunner
from yun.proto.resources import Accepted, Page, Task

M = TypeVar("M")

Output = Annotated[OutputFormat | None, typer.Option(
    "--output", "-o", case_sensitive=False,
    help="table, json (the API's JSON) or yaml; default: the global -o / YUN_OUTPUT")]
Query = Annotated[str | None, typer.Option(
    "--query", "-q", help="filter, e.g. \"state=running and tag:env=prod\"")]
Sort = Annotated[str | None, typer.Option(help="fields, '-' for descending: -created_at,name")]
Limit = Annotated[int, typer.Option(min=1, max=1000, help="items per page")]
Cursor = Annotated[str | None, typer.Option(help="continue after a page (its next_cursor)")]
All = Annotated[bool, typer.Option("--all", help="every page, not just the first")]
WaitOpt = Annotated[bool, typer.Option("--wait/--no-wait",
                                       help="follow the task until it ends")]
WaitTimeout = Annotated[float, typer.Option(help="seconds to follow the task")]
IdempotencyKey = Annotated[str | None, typer.Option(
    help="makes a retry of this request harmless (the first answer is replayed)")]
RefArg = Annotated[str, typer.Argument(help="name or uuid")]
TagArgs = Annotated[list[str] | None, typer.Option(
    "--tag", help="KEY=VALUE, repeatable")]


class Lister(Protocol[M]):
    """What a list command needs of a namespace."""

    def list(self, q: str | None = None, sort: str | None = None, limit: int = 100,
             cursor: str | None = None) -> Page[M]: ...

    def iterate(self, q: str | None = None, sort: str | None = None,
                page_size: int = 100) -> Iterable[M]: ...


class Browsable(Lister[M], Protocol[M]):
    """What the list and show commands need of a namespace."""

    def get(self, ref: str) -> M: ...


def add_list_and_show(app: typer.Typer, noun: str, title: str, columns: list[str],
                      namespace_of: Callable[[Client], Browsable[Any]],
                      list_help: str | None = None) -> None:
    """Register ``list`` (filtered, sorted, paged) and ``show REF`` on ``app``."""

    @app.command("list", help=list_help or f"List {title}.")
    def list_(q: Query = None, sort: Sort = None, limit: Limit = 100, cursor: Cursor = None,
              every: All = False, output: Output = None) -> None:
        show_list(namespace_of(client()), q, sort, limit, cursor, every, output, columns,
                  title)

    @app.command("show", help=f"Show one {noun}.")
    def show(ref: RefArg, output: Output = None) -> None:
        emit(namespace_of(client()).get(ref), output)


def show_list(namespace: Lister[Any], q: str | None, sort: str | None, limit: int,
              cursor: str | None, every: bool, output: OutputFormat | None,
              columns: list[str], title: str) -> None:
    """Print one page, or with ``every`` all of them as one page (``next_cursor`` null)."""
    if every:
        items = list(namespace.iterate(q=q, sort=sort, page_size=limit))
        page: Page[Any] = Page[Any](items=items, total=len(items), limit=limit)
    else:
        page = namespace.list(q=q, sort=sort, limit=limit, cursor=cursor)
    emit(page, output, columns=columns, title=title)


def parse_tags(pairs: Iterable[str]) -> dict[str, str]:
    """``["env=prod", "team=web"]`` as a mapping."""
    tags: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r}: write KEY=VALUE")
        tags[key] = value
    return tags


def accepted(answer: Accepted | Task | None) -> Accepted | None:
    """The SDK's answer to a long operation sent without ``wait``: never a Task."""
    if isinstance(answer, Task):  # the CLI follows tasks itself, to show their progress
        raise TypeError("a long operation was waited for by the SDK")
    return answer


def finish(answer: Accepted | None, what: str, wait: bool, timeout: float,
           output: OutputFormat | None, show: Callable[[], Any] | None = None,
           table: Callable[[Any], RenderableType] | None = None) -> None:
    """Report a long operation: follow its task (with a spinner on stderr) when ``wait``,
    then print ``show()`` (the resource as it is now, as ``table(resource)`` if given)
    or the task.

    ``answer`` None means it was done at once (a 204)."""

    def print_shown(shown: Any) -> None:
        emit(shown, output, table=(lambda: table(shown)) if table is not None else None)

    if answer is None or answer.task is None:
        note(f"{what}: {answer.message if answer and answer.message else 'done'}")
        if show is not None:
            print_shown(show())
        elif answer is not None:
            emit(answer, output)
        return
    task = answer.task
    if not wait:
        note(f"{what}: task {task.uuid} {task.state.value}")
        emit(answer, output, table=lambda: fields_table(task.model_dump(mode="json")))
        return
    with Console(stderr=True).status(f"{what}…") as status:

        def update(t: Task) -> None:
            status.update(f"{what}: {t.state.value} ({t.current_step or 'queued'})")

        try:
            task = client().tasks.wait(task.uuid, timeout, on_update=update)
        except TaskFailed as exc:
            raise fail(f"{what} failed: {exc.task.error or 'no detail'} "
                       f"(task {exc.task.uuid})") from exc
    note(f"{what}: done")
    if show is not None:
        print_shown(show())
    else:
        emit(task, output)


def add_tag_commands(app: typer.Typer, noun: str,
                     tags_of: Callable[[Client], Tags[SyncRunner]]) -> None:
    """Register ``tag REF KEY=VALUE…`` and ``untag REF KEY…`` on ``app``."""

    @app.command("tag", help=f"Add or change tags of a {noun} (other tags are kept).")
    def tag(ref: RefArg,
            pairs: Annotated[list[str], typer.Argument(help="KEY=VALUE …")],
            idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
        result = tags_of(client()).set(ref, parse_tags(pairs), idempotency_key=idempotency_key)
        emit(result, output, table=lambda: _tags_table(result))

    @app.command("untag", help=f"Remove tags of a {noun}.")
    def untag(ref: RefArg,
              keys: Annotated[list[str], typer.Argument(help="KEY …")],
              idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
        result = tags_of(client()).remove(ref, keys, idempotency_key=idempotency_key)
        emit(result, output, table=lambda: _tags_table(result))


def _tags_table(tags: dict[str, str]) -> Table:
    return rows_table([{"key": k, "value": v} for k, v in tags.items()], ["key", "value"],
                      "tags")
