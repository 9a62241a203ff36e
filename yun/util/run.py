"""The one way Yun runs an external command: an argv list, a timeout, a log line.

Never ``shell=True``: arguments are passed as a list so that no name chosen by a
user can be interpreted by a shell.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger("yun.run")


class CommandError(RuntimeError):
    """A command exited non-zero, timed out or could not be started."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        what = "timed out" if returncode is None else f"exited {returncode}"
        detail = (stderr or stdout).strip().splitlines()
        tail = detail[-1] if detail else ""
        super().__init__(f"{argv[0]} {what}: {tail}".rstrip(": "))


@dataclass(frozen=True)
class Result:
    """What a finished command printed."""

    returncode: int
    stdout: str
    stderr: str


def run(
    argv: Sequence[str],
    *,
    timeout: float = 60.0,
    check: bool = True,
    input: str | bytes | None = None,
    env: dict[str, str] | None = None,
) -> Result:
    """Run ``argv`` synchronously and return its output.

    Raises :class:`CommandError` when ``check`` and the command fails or times out.
    """
    argv = [str(a) for a in argv]
    started = time.monotonic()
    data = input.encode() if isinstance(input, str) else input
    try:
        proc = subprocess.run(
            argv, input=data, capture_output=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired as exc:
        log.warning("command timed out", extra={"argv": argv, "timeout": timeout})
        raise CommandError(argv, None, _text(exc.stdout), _text(exc.stderr)) from exc
    except OSError as exc:
        raise CommandError(argv, -1, "", str(exc)) from exc
    result = Result(proc.returncode, _text(proc.stdout), _text(proc.stderr))
    log.debug(
        "ran %s rc=%d in %.3fs", argv[0], proc.returncode, time.monotonic() - started,
        extra={"argv": argv},
    )
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, result.stdout, result.stderr)
    return result


async def run_async(
    argv: Sequence[str],
    *,
    timeout: float = 60.0,
    check: bool = True,
    input: str | bytes | None = None,
    env: dict[str, str] | None = None,
) -> Result:
    """Like :func:`run`, without blocking the event loop."""
    return await asyncio.to_thread(run, argv, timeout=timeout, check=check, input=input, env=env)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data
