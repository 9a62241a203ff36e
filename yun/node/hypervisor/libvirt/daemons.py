"""Starting virtlogd and libvirtd where no service manager does (bare hosts, CI, containers)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from yun.util.run import CommandError, run

log = logging.getLogger("yun.libvirt")


def libvirt_answers(uri: str = "qemu:///system") -> bool:
    try:
        run(["virsh", "-c", uri, "version"], timeout=15)
    except CommandError:
        return False
    return True


def _running(pidfile: Path) -> bool:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return False
    return Path(f"/proc/{pid}").exists()


def ensure_libvirt_daemons(timeout: float = 30.0) -> None:
    """Have the system libvirtd (and its virtlogd) running and answering."""
    if libvirt_answers():
        return
    Path("/var/log/libvirt").mkdir(parents=True, exist_ok=True)
    for daemon in ("virtlogd", "libvirtd"):
        # The pid file, not pgrep: daemons of namespaced test hosts run on this machine too.
        if not _running(Path(f"/run/{daemon}.pid")):
            log.info("starting %s", daemon)
            run([daemon, "-d"], timeout=30)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if libvirt_answers():
            return
        time.sleep(0.3)
    raise RuntimeError("libvirtd does not answer on qemu:///system; see /var/log/libvirt")
