"""How every command prints what it got: a Rich table, the API's JSON, or YAML.

Data goes to stdout; progress, notes and errors go to stderr, so that
``yun -o json vm list | jq`` reads nothing but JSON."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

import typer
import yaml
from pydantic import BaseModel
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from yun.cli.state import OutputFormat, state


def output_format(output: OutputFormat | None) -> OutputFormat:
    """The command's ``-o``, else the root's ``-o`` / ``YUN_OUTPUT``, else a table."""
    return output or state().output or OutputFormat.TABLE


def to_data(value: Any) -> Any:
    """Models as the API writes them (``model_dump(mode="json")``, fields in API order)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [to_data(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_data(v) for k, v in value.items()}
    if isinstance(value, Enum):
        return value.value
    return value


def cell(value: Any) -> str:
    """One value as table text: tags as ``k=v``, nested records one per line."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k}={cell(v)}" for k, v in value.items())
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            return "\n".join(_record_line(v) for v in value)
        return ", ".join(cell(v) for v in value)
    return str(value)


def _record_line(record: dict[str, Any]) -> str:
    """A nested record on one line: its first field, then the others named
    (``vcpu: total=8 reserved=0 ratio=4.0 usable=32 used=3 free=29``)."""
    items = [(k, v) for k, v in record.items() if v not in (None, "")]
    if not items:
        return ""
    (_, first), rest = items[0], items[1:]
    named = " ".join(f"{k}={cell(v)}" for k, v in rest)
    return f"{cell(first)}: {named}" if named else cell(first)


def rows_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
               title: str | None = None, caption: str | None = None) -> Table:
    """A table with one row per record and the given columns (default: every field)."""
    columns = list(columns or (rows[0].keys() if rows else []))
    table = Table(title=title, caption=caption)
    for column in columns:
        table.add_column(column)
    for row in rows:
        # Text, not str: a tag value like "[red]" is data, not Rich markup.
        table.add_row(*(Text(cell(row.get(c))) for c in columns))
    return table


def fields_table(record: dict[str, Any], title: str | None = None) -> Table:
    """One record as a two-column field/value table."""
    table = Table(show_header=False, title=title)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in record.items():
        table.add_row(Text(key), Text(cell(value)))
    return table


def _page_caption(page: dict[str, Any]) -> str:
    shown = len(page["items"])
    caption = f"{shown} of {page['total']}" if page.get("total") is not None else f"{shown}"
    if page.get("next_cursor"):
        caption += f"; more with --all or --cursor {page['next_cursor']}"
    return caption


def default_table(data: Any, columns: Sequence[str] | None, title: str | None) -> RenderableType:
    """The table of a page, a list, or one record."""
    if isinstance(data, dict) and isinstance(data.get("items"), list) and "limit" in data:
        return rows_table(data["items"], columns, title, _page_caption(data))
    if isinstance(data, list):
        return rows_table(data, columns, title)
    if isinstance(data, dict):
        return fields_table(data, title)
    return Text(str(data))


def emit(value: Any, output: OutputFormat | None = None, *,
         columns: Sequence[str] | None = None, title: str | None = None,
         table: Callable[[], RenderableType] | None = None) -> None:
    """Print ``value`` (models, lists or pages of them, dicts, text) in the chosen format;
    ``table`` builds a custom table instead of the default one."""
    fmt = output_format(output)
    if fmt is OutputFormat.JSON:
        typer.echo(json.dumps(to_data(value), indent=2, ensure_ascii=False))
    elif fmt is OutputFormat.YAML:
        typer.echo(yaml.safe_dump(to_data(value), sort_keys=False, allow_unicode=True,
                                  default_flow_style=False), nl=False)
    elif isinstance(value, str) and table is None:
        typer.echo(value, nl=not value.endswith("\n"))
    else:
        Console().print(table() if table else default_table(to_data(value), columns, title))


def note(message: str) -> None:
    """A message for the user, on stderr."""
    typer.echo(message, err=True)


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` on stderr; raise the returned exit (code 1)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)
