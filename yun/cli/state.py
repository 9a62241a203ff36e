"""The state of one `yun` invocation: the root options and the client it made."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from yun.client import Client


class OutputFormat(StrEnum):
    TABLE = "table"
    JSON = "json"
    YAML = "yaml"


@dataclass
class State:
    """The root options, and the client once a command asked for one."""

    profile: str | None = None
    output: OutputFormat | None = None
    client: Client | None = None

    def close(self) -> None:
        """Close the client, if one was made."""
        if self.client is not None:
            self.client.close()
            self.client = None


_current = State()


def begin(new: State) -> None:
    """Make ``new`` the state of this invocation (the root callback calls it; one
    invocation runs at a time, in a process or a test's CliRunner)."""
    global _current
    _current.close()
    _current = new


def state() -> State:
    """The state of the running invocation."""
    return _current
