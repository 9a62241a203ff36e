"""What a command invocation shares: the global options, the SDK client, and turning
the SDK's errors into ``error: …`` on stderr with exit code 1."""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import ValidationError
from typer.core import TyperGroup

from yun.cli.config import ConfigError, Connection, resolve
from yun.cli.output import fail
from yun.cli.state import state
from yun.client import ApiError, Client, ClientError, TaskFailed, TaskTimeout

TRANSPORT: httpx.BaseTransport | None = None
"""The HTTP transport of every client the CLI makes; None is the network (tests set one)."""


def make_client(connection: Connection) -> Client:
    """A client for ``connection`` (over :data:`TRANSPORT`)."""
    return Client(connection.url, connection.auth, transport=TRANSPORT)


def client() -> Client:
    """The client of this invocation, connected as the options, environment and profiles
    say (see :func:`yun.cli.config.resolve`); closed when the command ends."""
    current = state()
    if current.client is None:
        current.client = make_client(resolve(current.profile))
    return current.client


def describe_validation(exc: ValidationError) -> str:
    """A Pydantic error in one line per field: ``name: String should have …``."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}"
                     for e in exc.errors())


def describe_api_error(exc: ApiError) -> str:
    """``<title> (<status>): <detail>``, then what the problem lists, one per line."""
    lines = [str(exc)]
    for item in exc.errors or []:
        where = item.get("loc") or item.get("parameter") or item.get("field")
        where = ".".join(str(p) for p in where) if isinstance(where, list) else where
        message = item.get("msg") or item.get("message") or item.get("detail") or item
        lines.append(f"  {where}: {message}" if where else f"  {message}")
    if exc.request_id and exc.status >= 500:
        lines.append(f"  request id: {exc.request_id}")
    return "\n".join(lines)


class YunGroup(TyperGroup):
    """The root command group: reports the SDK's errors plainly instead of a traceback."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except ApiError as exc:
            raise fail(describe_api_error(exc)) from exc
        except TaskFailed as exc:
            raise fail(f"task {exc.task.uuid} ({exc.task.kind}) failed: "
                       f"{exc.task.error or 'no detail'}") from exc
        except (TaskTimeout, ClientError) as exc:
            raise fail(str(exc)) from exc
        except ConfigError as exc:
            raise fail(str(exc)) from exc
        except ValidationError as exc:
            raise fail(f"invalid input: {describe_validation(exc)}") from exc
        except OSError as exc:  # a file to upload that vanished, a config dir not writable
            if isinstance(exc, BrokenPipeError):
                raise  # `yun … | head`: click ends quietly
            raise fail(str(exc)) from exc
