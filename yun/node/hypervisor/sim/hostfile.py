"""What a simulated host keeps on disk, so a restarted sim node remembers like a real one.

A libvirt host keeps its persistent domains, its disk files and its DHCP leases across a
restart of the node process or of the whole host. The sim backends keep theirs in one
file, ``<node state dir>/sim-host.json``, one top-level section per backend::

    {"domains": {"<vm uuid>": {"state": "<DomainState>", "disk_ids": [...], "macs": [...],
                               "spec": {...}, "disks": [...], "nics": [...],
                               "sizes": {"<disk id>": <bytes after resize_disk>}}},
     "disks":   {"<vm uuid>/<disk id>": {"vm_uuid": "...", "disk_id": "...",
                                         "size_gb": N, "image_id": ..., "bus": "..."}},
     "images":  {"<image id>": {"sha256": "...", "size": N, "format": "..."}},
     "ports":   {"<mac>": {"vm_uuid": "...", "ip": "...", "nic_id": "...",
                           "hostname": "...", "tap": "..."}}}

Each write rewrites the file atomically (a temporary file renamed over it), so a process
killed at any moment leaves either the old or the new content, never half of one. Each
write reads the file first and replaces only its own sections: the backends may hold
separate :class:`SimHostFile` objects for one path. Everything runs in one event loop
thread and a write never awaits, so two writes cannot interleave.

By default every change is written at once. With ``flush_delay`` > 0 (the many nodes of
``yun serve sim-nodes``) a change only marks its sections dirty: they are built and
written together at most ``flush_delay`` seconds later, once for all changes meanwhile,
and at :meth:`SimHostFile.flush` (the node's stop). A kill -9 of such a process may lose
the changes of the last ``flush_delay`` seconds, as a host crash loses what was not yet
on disk; a reader in the same process (:meth:`SimHostFile.read`) sees them at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("yun.node.sim")

FILE_NAME = "sim-host.json"


class SimHostFileError(RuntimeError):
    """The sim host's state file cannot be read; its path and the reason are named."""


class SimHostFile:
    """One sim host's state file: read whole, written one section at a time."""

    def __init__(self, path: Path, *, flush_delay: float = 0.0) -> None:
        self.path = Path(path)
        self.flush_delay = flush_delay
        # owner -> what builds its sections, for changes not written yet (flush_delay > 0).
        self._pending: dict[str, Callable[[], dict[str, dict[str, Any]]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.writes = 0  # files written so far (the batching is measured by it)

    @classmethod
    def in_dir(cls, state_dir: Path) -> SimHostFile:
        """The state file of the sim host whose node keeps its state in ``state_dir``."""
        return cls(Path(state_dir) / FILE_NAME)

    def read(self) -> dict[str, Any]:
        """The whole file (empty when it does not exist yet), changes not yet written
        included."""
        if self._pending:
            self.flush()
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise SimHostFileError(f"cannot read sim host state {self.path}: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SimHostFileError(f"sim host state {self.path} is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise SimHostFileError(f"sim host state {self.path} is not a JSON object")
        return data

    def section(self, key: str) -> dict[str, Any]:
        """One backend's section (empty when absent)."""
        value = self.read().get(key, {})
        if not isinstance(value, dict):
            raise SimHostFileError(f"section {key!r} of {self.path} is not a JSON object")
        return value

    def save(self, owner: str, build: Callable[[], dict[str, dict[str, Any]]]) -> None:
        """Persist the sections ``build()`` returns: now, or within ``flush_delay``
        seconds together with every other change meanwhile (``build`` is called then, so
        a burst of changes builds and writes the sections once). ``owner`` names the
        backend: its latest ``build`` replaces an earlier one not yet flushed."""
        if self.flush_delay <= 0:
            self.write(build())
            return
        self._pending[owner] = build
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop (a script, a test): nothing would flush
                self.flush()
                return
            self._timer = loop.call_later(self.flush_delay, self._flush_from_timer)

    def _flush_from_timer(self) -> None:
        self._timer = None
        try:
            self.flush()
        except SimHostFileError as exc:
            # Kept pending by flush: the next change or the stop tries again.
            log.error("sim host state not written: %s", exc, extra={"file": str(self.path)})

    def flush(self) -> None:
        """Write every change not written yet (at once; nothing to do when none)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        sections: dict[str, dict[str, Any]] = {}
        for build in pending.values():
            sections.update(build())
        try:
            self.write(sections)
        except SimHostFileError:
            # Not lost: the same builders run again at the next flush.
            self._pending = {**pending, **self._pending}
            raise

    def write(self, sections: dict[str, dict[str, Any]]) -> None:
        """Replace ``sections`` in the file, keeping the others; atomic."""
        data = self.read()
        data.update(sections)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}")
        try:
            # No fsync: the sim simulates a host crash by killing its process, and the
            # page cache outlives a process. A renamed file is complete or absent.
            tmp.write_text(json.dumps(data, sort_keys=True))
            os.replace(tmp, self.path)
            self.writes += 1
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise SimHostFileError(f"cannot write sim host state {self.path}: {exc}") from exc


def host_file(state_file: Path | SimHostFile | None) -> SimHostFile | None:
    """The state file a sim backend writes: one shared with the host's other backends
    (one batch and one write for all of them), or its own for a path."""
    if state_file is None or isinstance(state_file, SimHostFile):
        return state_file
    return SimHostFile(state_file)
