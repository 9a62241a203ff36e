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

Each change rewrites the file atomically (a temporary file renamed over it), so a process
killed at any moment leaves either the old or the new content, never half of one. Each
write reads the file first and replaces only its own section: the three backends may
hold separate :class:`SimHostFile` objects for one path. Everything runs in one event
loop thread and a write never awaits, so two writes cannot interleave.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

log = logging.getLogger("yun.node.sim")

FILE_NAME = "sim-host.json"


class SimHostFileError(RuntimeError):
    """The sim host's state file cannot be read; its path and the reason are named."""


class SimHostFile:
    """One sim host's state file: read whole, written one section at a time."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def in_dir(cls, state_dir: Path) -> SimHostFile:
        """The state file of the sim host whose node keeps its state in ``state_dir``."""
        return cls(Path(state_dir) / FILE_NAME)

    def read(self) -> dict[str, Any]:
        """The whole file (empty when it does not exist yet)."""
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
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise SimHostFileError(f"cannot write sim host state {self.path}: {exc}") from exc
