"""Writing files that must never be seen half written or by the wrong users."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes | str, *, mode: int = 0o600,
                 dir_mode: int | None = None) -> None:
    """Replace ``path`` by a file of ``mode`` holding ``data``, atomically and durably.

    The bytes go to a temporary file in the same directory (made 0600 by ``mkstemp``, so
    a secret is never readable by others, not even for a moment), flushed to disk, then
    renamed over ``path`` and the directory synced: a reader or a crash sees the old
    file or the new one, never half of one. ``dir_mode`` also sets the directory's mode
    (e.g. 0700 for a folder of secrets).
    """
    if dir_mode is None:
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        path.parent.mkdir(mode=dir_mode, parents=True, exist_ok=True)
        os.chmod(path.parent, dir_mode)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data.encode() if isinstance(data, str) else data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)
