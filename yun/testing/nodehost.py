"""A node host for tests: a network namespace with its own libvirtd and virtlogd.

Each :class:`NodeHost` runs, inside a network namespace of a test topology, a private
mount namespace (``ip netns exec NS unshare -m --propagation private``) in which
directories of its own are bound over the paths libvirt keeps state in::

    <root>/run   -> /run                 pid files, sockets, /run/libvirt/qemu
    <root>/lib   -> /var/lib/libvirt
    <root>/log   -> /var/log/libvirt     libvirtd.log, qemu/<domain>.log
    <root>/cache -> /var/cache/libvirt
    <root>/etc   -> /etc/libvirt         copy of the host's config, own host_uuid

and starts ``virtlogd -d`` and ``libvirtd -d`` there. Nothing global changes: two
node hosts side by side know nothing of each other or of the machine's own libvirtd.
QEMU processes started by this libvirtd live in the node's network namespace, so
their taps and bridges are there too.

``<root>/run`` stays reachable from the root mount namespace under its real path, so
a node agent in the test process connects with :attr:`NodeHost.libvirt_uri`
(``qemu:///system?socket=<root>/run/libvirt/libvirt-sock``). Put the VMs' disks in
:attr:`NodeHost.disk_dir` and the driver's state in :attr:`NodeHost.state_dir`: both
are outside the private mounts (seen the same from both sides) and on a path QEMU,
which runs as ``libvirt-qemu`` as on a real node, may traverse.

A process belongs to a node host when its ``/run`` is the host's ``<root>/run``
(``/proc/PID/root/run/.yun-nodehost`` holds the host's id); :meth:`NodeHost.stop`
kills exactly those (libvirtd, virtlogd, every QEMU, whatever they spawned), which
frees the mount namespace and with it every bind mount, then removes ``<root>``.
An ``owner.json`` marker lets :func:`cleanup_stale` stop the hosts of killed runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import time
import uuid as uuidlib
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from yun.util.procs import pid_alive, start_time
from yun.util.run import CommandError, run

if TYPE_CHECKING:
    from yun.node.hypervisor.libvirt.driver import LibvirtDriver

log = logging.getLogger("yun.testing.nodehost")

DEFAULT_BASE_DIR = Path("/var/tmp/yun-nodehost")
LIBVIRT_ETC = Path("/etc/libvirt")
HOST_CAPS_CACHE = Path("/var/cache/libvirt/qemu/capabilities")
MARKER = ".yun-nodehost"  # in <root>/run, i.e. /run/.yun-nodehost inside the host
_KILL_WAIT = 10.0  # seconds between SIGTERM and SIGKILL (libvirtd stops its QEMUs)

# Runs inside "ip netns exec NS unshare -m --propagation private sh -c SCRIPT sh ROOT".
# Paths come in as "$1", never spliced into the script text.
# "ip netns exec" mounts a fresh /sys for the namespace, without the cgroup file systems
# under it; the host's hierarchies (type, mount point, options: the arguments after ROOT)
# are mounted again so that libvirt can put its QEMUs in cgroups (cputune, CPU stats).
_START_SCRIPT = r"""
set -eu
R="$1"
shift
while [ $# -ge 3 ]; do
    mkdir -p "$2"
    mount -t "$1" -o "$3" "$1" "$2"
    shift 3
done
mount --bind "$R/run" /run
mkdir -p /run/lock /run/user /run/libvirt
mount --bind "$R/lib" /var/lib/libvirt
mount --bind "$R/log" /var/log/libvirt
mount --bind "$R/cache" /var/cache/libvirt
mount --bind "$R/etc" /etc/libvirt
virtlogd -d
libvirtd -d
"""


class NodeHostError(RuntimeError):
    """A node host could not be started."""


class NodeHost:
    """libvirtd + virtlogd of one test node, in network namespace ``netns``.

    Use as a context manager, or call :meth:`start` and (always) :meth:`stop`.
    """

    def __init__(
        self,
        netns: str,
        *,
        name: str = "node",
        base_dir: Path = DEFAULT_BASE_DIR,
        host_uuid: str | None = None,
        qemu_as_root: bool = False,
        start_timeout: float = 30.0,
    ) -> None:
        self.netns = netns
        self.name = name
        self.id = f"{name}-{secrets.token_hex(4)}"
        self.base_dir = Path(base_dir)
        self.root = self.base_dir / self.id
        self.host_uuid = host_uuid or str(uuidlib.uuid4())
        self.qemu_as_root = qemu_as_root
        self.start_timeout = start_timeout
        self._started = False

    def __repr__(self) -> str:
        return f"NodeHost({self.id!r}, netns={self.netns!r})"

    # -- paths

    @property
    def run_dir(self) -> Path:
        """The host's /run, seen from outside."""
        return self.root / "run"

    @property
    def socket_path(self) -> Path:
        return self.run_dir / "libvirt" / "libvirt-sock"

    @property
    def libvirt_uri(self) -> str:
        """The URI a node agent outside uses to reach this host's libvirtd."""
        return f"qemu:///system?socket={self.socket_path}"

    @property
    def state_dir(self) -> Path:
        """A node agent's state directory (console logs …) for this host."""
        return self.root / "state"

    @property
    def disk_dir(self) -> Path:
        """Where tests put this host's VM disks (QEMU can read it)."""
        return self.root / "disks"

    @property
    def log_dir(self) -> Path:
        """This host's /var/log/libvirt (libvirtd.log, qemu/<domain>.log)."""
        return self.root / "log"

    def driver_options(self, **overrides: object) -> dict[str, object]:
        """Options for ``load_driver("libvirt", ...)`` aimed at this host."""
        options: dict[str, object] = {
            "uri": self.libvirt_uri,
            "state_dir": self.state_dir,
            "vnc_listen": "127.0.0.1",
        }
        options.update(overrides)
        return options

    @contextlib.asynccontextmanager
    async def libvirt_driver(self, **overrides: object) -> AsyncIterator[LibvirtDriver]:
        """A libvirt driver connected to this host's libvirtd, closed on exit."""
        from yun.node.hypervisor.libvirt.driver import LibvirtDriver

        driver = LibvirtDriver(**self.driver_options(**overrides))  # type: ignore[arg-type]
        await driver.open()
        try:
            yield driver
        finally:
            await driver.close()

    # -- lifecycle

    def __enter__(self) -> NodeHost:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> NodeHost:
        """Prepare the directories, start the daemons and wait until libvirtd answers."""
        if self._started:
            return self
        self._started = True  # from here on stop() has something to clean
        try:
            self._prepare()
            try:
                run(
                    ["ip", "netns", "exec", self.netns, "unshare", "-m", "--propagation",
                     "private", "sh", "-c", _START_SCRIPT, "sh", str(self.root),
                     *cgroup_mounts()],
                    timeout=self.start_timeout,
                )
            except CommandError as exc:
                raise NodeHostError(
                    f"{self}: daemons did not start: {exc}\n{self.daemon_log()}"
                ) from exc
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("node host up", extra={"nodehost": self.id, "netns": self.netns,
                                        "host_uuid": self.host_uuid})
        return self

    def _prepare(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.base_dir.chmod(0o755)
        self.root.mkdir(mode=0o755)
        self.root.chmod(0o755)  # QEMU (libvirt-qemu) must traverse to disk_dir
        (self.root / "owner.json").write_text(json.dumps(
            {"pid": os.getpid(), "start": start_time(os.getpid()), "netns": self.netns}
        ))
        for sub in ("run", "lib", "log", "cache", "etc", "state", "disks"):
            (self.root / sub).mkdir(mode=0o755)
        (self.run_dir / MARKER).write_text(self.id)
        etc = self.root / "etc"
        # Only the top-level config files: the host's own domain, network and filter
        # definitions must not appear on every test node.
        for src in LIBVIRT_ETC.iterdir():
            if src.is_file():
                shutil.copy2(src, etc / src.name)
        for sub in ("qemu/networks/autostart", "qemu/autostart", "storage", "nwfilter",
                    "hooks", "secrets"):
            (etc / sub).mkdir(parents=True, exist_ok=True)
        with (etc / "libvirtd.conf").open("a") as conf:
            conf.write(
                "\n# yun.testing.nodehost\n"
                f'host_uuid = "{self.host_uuid}"\n'
                # only root can reach the socket (0700 parent dirs are root's)
                'auth_unix_rw = "none"\nauth_unix_ro = "none"\n'
                'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
            )
        if self.qemu_as_root:
            with (etc / "qemu.conf").open("a") as conf:
                conf.write('\nuser = "root"\ngroup = "root"\n')
        # QEMU's capabilities are probed per libvirtd (~1 s); reuse the host's cache.
        if HOST_CAPS_CACHE.is_dir():
            shutil.copytree(HOST_CAPS_CACHE, self.root / "cache" / "qemu" / "capabilities")

    def _wait_ready(self) -> None:
        import libvirt  # only the node-host tests need the binding

        deadline = time.monotonic() + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            if self.socket_path.exists():
                try:
                    conn = libvirt.open(self.libvirt_uri)
                    try:
                        conn.getHostname()
                        return
                    finally:
                        conn.close()
                except libvirt.libvirtError as exc:
                    last = str(exc)
            time.sleep(0.1)
        raise NodeHostError(
            f"{self}: libvirtd did not answer within {self.start_timeout:.0f} s: {last}\n"
            f"{self.daemon_log()}"
        )

    def daemon_log(self, max_bytes: int = 4000) -> str:
        """The tail of this host's libvirtd.log (for error messages)."""
        path = self.log_dir / "libvirtd.log"
        try:
            return path.read_bytes()[-max_bytes:].decode(errors="replace")
        except OSError:
            return ""

    def pids(self) -> list[int]:
        """Every process of this host: its /run is this host's run directory."""
        return _pids_with_marker(self.id)

    def stop(self) -> None:
        """Destroy the domains, kill every process of the host, remove its directory.

        Safe to call twice, and after a half-done start.
        """
        if not self._started:
            return
        if self.socket_path.exists() and self.pids():
            self._destroy_domains()
        _kill(self.pids(), f"node host {self.id}")
        if self.root.exists():
            self._unmount_leftovers()
            shutil.rmtree(self.root, ignore_errors=True)
        if self.root.exists():
            log.warning("node host directory not removed", extra={"path": str(self.root)})
        self._started = False
        log.info("node host down", extra={"nodehost": self.id})

    def _destroy_domains(self) -> None:
        """Power off every domain first, so QEMU exits through libvirt (clean state)."""
        try:
            import libvirt

            conn = libvirt.open(self.libvirt_uri)
        except Exception as exc:  # a half-started libvirtd: killing will do
            log.warning("cannot reach libvirtd to destroy domains: %s", exc,
                        extra={"nodehost": self.id})
            return
        try:
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
        except libvirt.libvirtError as exc:
            log.warning("listing domains failed: %s", exc, extra={"nodehost": self.id})
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def _unmount_leftovers(self) -> None:
        """The binds live in the private namespace and die with it; check none leaked."""
        prefix = str(self.root) + "/"
        with open("/proc/self/mounts") as f:
            points = [line.split()[1] for line in f]
        for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
            log.warning("unmounting leaked mount", extra={"path": point})
            run(["umount", "-l", point], check=False, timeout=15)


def cgroup_mounts(mounts: str = "/proc/self/mounts") -> list[str]:
    """(type, mount point, options) of each cgroup file system of this host, flattened,
    in mount order (the tmpfs holding v1 hierarchies before them)."""
    out: list[str] = []
    with open(mounts) as f:
        for line in f:
            _src, point, fstype, options, *_ = line.split()
            if point != "/sys/fs/cgroup" and not point.startswith("/sys/fs/cgroup/"):
                continue
            if fstype in ("tmpfs", "cgroup", "cgroup2"):
                out += [fstype, point, options]
    return out


def _pids_with_marker(host_id: str) -> list[int]:
    """Processes whose ``/run`` holds the marker of node host ``host_id``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/root/run/{MARKER}") as f:
                if f.read() == host_id:
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def _kill(pids: list[int], what: str) -> None:
    """SIGTERM ``pids``, SIGKILL the survivors after a grace period."""
    if not pids:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _KILL_WAIT
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    left = [p for p in pids if pid_alive(p)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + _KILL_WAIT
    while time.monotonic() < deadline and any(pid_alive(p) for p in left):
        time.sleep(0.05)
    if left:
        log.warning("%s: %d processes needed SIGKILL", what, len(left))






def cleanup_stale(base_dir: Path = DEFAULT_BASE_DIR) -> list[str]:
    """Stop node hosts left by test processes that died; returns their ids.

    A host whose owner process still runs (same pid *and* start time) is left alone.
    """
    stopped: list[str] = []
    if not base_dir.is_dir():
        return stopped
    for root in sorted(base_dir.iterdir()):
        if not root.is_dir():
            continue
        try:
            owner = json.loads((root / "owner.json").read_text())
        except (OSError, ValueError):
            owner = {}
        pid = owner.get("pid")
        if isinstance(pid, int) and pid_alive(pid) and start_time(pid) == owner.get("start"):
            continue
        host = NodeHost(str(owner.get("netns", "")), base_dir=base_dir)
        host.id, host.root, host._started = root.name, root, True
        host.stop()
        stopped.append(root.name)
    return stopped
