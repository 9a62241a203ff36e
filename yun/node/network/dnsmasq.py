"""dnsmasq for the node's sandbox network: one daemon for every sandbox tap, static leases.

It listens on every tap of the wildcard interface name (``ys*``) with ``--bind-dynamic``,
so taps made after it started are served without a restart; each tap holds the node's
gateway address with the subnet's netmask (and no prefix route), which is how dnsmasq
finds the ``dhcp-range`` of a tap.

Files under the network's state directory::

    dnsmasq.pid       the daemon's pid (it forks itself: VMs keep their DHCP server
                      when the agent restarts)
    dnsmasq.leases    its lease database
    dnsmasq.log       its log, with every DHCP exchange (--log-dhcp)
    hosts/<vm_uuid>   one file per VM: its ports, one ``MAC,IP,hostname`` line each

dnsmasq reads a new or changed file of ``hosts/`` by itself (inotify); a record that
was removed or changed stays known until SIGHUP, so removals are followed by one.
A lease already granted survives both: dnsmasq would then refuse the address to the
next VM given it ("it is leased to ..."), so releasing a port that holds a lease
restarts dnsmasq with that lease struck out of the database.

Each port's line is preceded by a comment carrying what dnsmasq does not need but Yun
does (the NIC id and its tap), so that ``hosts/`` alone is the whole port state.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import signal
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from yun.util.run import run

log = logging.getLogger("yun.node.network.dnsmasq")

DNSMASQ = "dnsmasq"
_STOP_WAIT = 5.0  # seconds between SIGTERM and SIGKILL
_START_WAIT = 5.0  # seconds for the pid file to appear
_POLL = 0.05
_COMMENT_RE = re.compile(r"^#\s*nic=(?P<nic>\S+)\s+tap=(?P<tap>\S+)"
                         r"(?:\s+exposure=(?P<exposure>\S+))?(?:\s+extra=(?P<extra>\S*))?\s*$")


# --------------------------------------------------------------------------- hosts files


@dataclass(frozen=True)
class PortRecord:
    """One VM port as dnsmasq serves it: MAC → IP (and the hostname offered)."""

    nic_id: str
    mac: str
    ip: str
    hostname: str
    tap: str
    #: what reaches the VM from outside (sandbox exposure: private, mono, share)
    exposure: str = "private"
    #: more addresses routed to the tap (not served by DHCP)
    extra_ips: tuple[str, ...] = ()

    def line(self) -> str:
        return f"{self.mac},{self.ip},{self.hostname}"


def render_hosts_file(vm_uuid: str, records: list[PortRecord]) -> str:
    """The hosts file of one VM (``--dhcp-hostsdir`` format plus Yun's comments)."""
    out = [f"# yun vm={vm_uuid}"]
    for rec in records:
        out.append(f"# nic={rec.nic_id} tap={rec.tap} exposure={rec.exposure} "
                   f"extra={','.join(rec.extra_ips)}")
        out.append(rec.line())
    return "\n".join(out) + "\n"


def parse_hosts_file(text: str) -> list[PortRecord]:
    """The records of a file written by :func:`render_hosts_file`.

    A line without Yun's comment before it (written by hand) still counts, with an
    empty NIC id and tap.
    """
    records: list[PortRecord] = []
    nic = tap = ""
    exposure, extra = "private", ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            m = _COMMENT_RE.match(line)
            if m:
                nic, tap = m.group("nic"), m.group("tap")
                exposure = m.group("exposure") or "private"
                extra = m.group("extra") or ""
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) >= 2:
            hostname = fields[2] if len(fields) > 2 else ""
            records.append(PortRecord(nic, fields[0].lower(), fields[1], hostname, tap,
                                      exposure, tuple(x for x in extra.split(",") if x)))
        nic = tap = ""
        exposure, extra = "private", ""
    return records


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class DnsmasqConfig:
    """Everything that decides how the node's sandbox dnsmasq runs."""

    #: the interfaces it serves: a name or a wildcard (``ys*``)
    interface: str
    subnet: ipaddress.IPv4Network
    gateway: str
    state_dir: Path
    lease_time: str = "1h"
    #: dnsmasq drops root for this user once its sockets are open.
    user: str = "nobody"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "dnsmasq.pid"

    @property
    def lease_file(self) -> Path:
        return self.state_dir / "dnsmasq.leases"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "dnsmasq.log"

    @property
    def hosts_dir(self) -> Path:
        return self.state_dir / "hosts"


def dnsmasq_argv(cfg: DnsmasqConfig, binary: str = DNSMASQ) -> list[str]:
    """The command line of the sandbox dnsmasq (DHCP only, on the sandbox taps only)."""
    return [
        binary,
        "--conf-file=/dev/null",  # never pick up a system-wide /etc/dnsmasq.conf
        f"--pid-file={cfg.pid_file}",
        f"--user={cfg.user}",
        f"--interface={cfg.interface}",
        # bind-dynamic: taps that appear later are served at once (a wildcard with
        # --bind-interfaces would only see the taps present at start).
        "--bind-dynamic",
        "--except-interface=lo",
        "--port=0",  # no DNS
        # "static": only MACs listed in hosts/ get an address, never one from a pool.
        f"--dhcp-range={cfg.subnet.network_address},static,{cfg.subnet.netmask},"
        f"{cfg.lease_time}",
        f"--dhcp-option=option:router,{cfg.gateway}",
        f"--dhcp-hostsdir={cfg.hosts_dir}",
        f"--dhcp-leasefile={cfg.lease_file}",
        # The only DHCP server on these taps: answer a rebooted VM's stale lease at once.
        "--dhcp-authoritative",
        f"--log-facility={cfg.log_file}",
        "--log-dhcp",
    ]


# --------------------------------------------------------------------------- the daemon


def _alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text.rsplit(")", 1)[1].split()[0] != "Z"


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _traversable_by_others(path: Path) -> Path | None:
    """The first directory on the way to ``path`` that ``others`` cannot enter, if any."""
    for parent in [*reversed(path.parents), path]:
        with contextlib.suppress(OSError):
            if not parent.stat().st_mode & stat.S_IXOTH:
                return parent
    return None


class DnsmasqError(RuntimeError):
    """dnsmasq could not be started or its files could not be written."""


class Dnsmasq:
    """The sandbox dnsmasq of a node: started once, kept, restarted only when needed."""

    def __init__(self, cfg: DnsmasqConfig, binary: str = DNSMASQ) -> None:
        self.cfg = cfg
        self.binary = binary

    @property
    def argv(self) -> list[str]:
        return dnsmasq_argv(self.cfg, self.binary)

    # -- process

    def pid(self) -> int | None:
        """The pid of our dnsmasq if it runs: the pid file names a live dnsmasq with our
        pid file on its command line (a recycled pid is never taken for it)."""
        try:
            pid = int(self.cfg.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if not _alive(pid):
            return None
        args = _cmdline(pid)
        if not args or Path(args[0]).name != Path(self.binary).name:
            return None
        if f"--pid-file={self.cfg.pid_file}" not in args:
            return None
        return pid

    def running_as_wanted(self) -> bool:
        pid = self.pid()
        return pid is not None and _cmdline(pid)[1:] == self.argv[1:]

    def prepare(self) -> None:
        """Create the state files with modes the unprivileged daemon can use."""
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.cfg.hosts_dir.mkdir(exist_ok=True)
        # dnsmasq re-reads hosts/ after dropping root: it must be able to get there.
        os.chmod(self.cfg.state_dir, 0o755)
        os.chmod(self.cfg.hosts_dir, 0o755)
        if self.cfg.user != "root":
            blocked = _traversable_by_others(self.cfg.hosts_dir)
            if blocked is not None:
                raise DnsmasqError(
                    f"dnsmasq runs as {self.cfg.user!r} and cannot enter {blocked} "
                    f"(mode {stat.S_IMODE(blocked.stat().st_mode):o}) on the way to "
                    f"{self.cfg.hosts_dir}: choose a state directory others can traverse"
                )
        self.cfg.lease_file.touch(exist_ok=True)

    def ensure_running(self) -> bool:
        """Start dnsmasq unless ours already runs with the wanted arguments.

        Returns True when it (re)started the daemon.
        """
        if self.running_as_wanted():
            return False
        self.stop()  # ours with other arguments (the subnet changed): replace it
        self.prepare()
        self.cfg.pid_file.unlink(missing_ok=True)
        # dnsmasq forks and its parent exits once the daemon is up, reporting any
        # startup error (address in use, bad option) through its exit status.
        run(self.argv, timeout=30.0)
        deadline = time.monotonic() + _START_WAIT
        while self.pid() is None:  # bounded by the deadline
            if time.monotonic() > deadline:
                raise DnsmasqError(f"dnsmasq for {self.cfg.interface} did not write "
                                   f"{self.cfg.pid_file}; see {self.cfg.log_file}")
            time.sleep(_POLL)
        log.info("dnsmasq started", extra={"interface": self.cfg.interface, "pid": self.pid()})
        return True

    def stop(self) -> None:
        """Stop our dnsmasq (SIGTERM, then SIGKILL); no error when none runs."""
        pid = self.pid()
        if pid is None:
            self.cfg.pid_file.unlink(missing_ok=True)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_WAIT
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(_POLL)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.cfg.pid_file.unlink(missing_ok=True)
        log.info("dnsmasq stopped", extra={"interface": self.cfg.interface, "pid": pid})

    def reload(self) -> None:
        """SIGHUP: forget removed or changed host records (new ones need no signal)."""
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    # -- hosts files

    def hosts_path(self, vm_uuid: str) -> Path:
        return self.cfg.hosts_dir / vm_uuid

    def read_hosts(self, vm_uuid: str) -> list[PortRecord]:
        try:
            return parse_hosts_file(self.hosts_path(vm_uuid).read_text())
        except FileNotFoundError:
            return []

    def all_hosts(self) -> dict[str, list[PortRecord]]:
        """Every VM's records, read from ``hosts/``."""
        out: dict[str, list[PortRecord]] = {}
        if not self.cfg.hosts_dir.is_dir():
            return out
        for path in sorted(self.cfg.hosts_dir.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue  # our temporary files (dnsmasq ignores dot-files too)
            with contextlib.suppress(FileNotFoundError):
                out[path.name] = parse_hosts_file(path.read_text())
        return out

    def write_hosts(self, vm_uuid: str, records: list[PortRecord]) -> None:
        """Replace the VM's file atomically (write a dot-file, rename it into place)."""
        self.cfg.hosts_dir.mkdir(parents=True, exist_ok=True)
        path = self.hosts_path(vm_uuid)
        old = path.read_text() if path.exists() else None
        text = render_hosts_file(vm_uuid, records)
        if old == text:
            return
        tmp = self.cfg.hosts_dir / f".{vm_uuid}.tmp"
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        tmp.replace(path)  # dnsmasq sees IN_MOVED_TO and reads the whole file
        if old is not None and parse_hosts_file(old) and not _only_added(old, text):
            self.reload()

    def retired_path(self, vm_uuid: str) -> Path:
        return self.cfg.hosts_dir / f".{vm_uuid}.released"

    def retire_hosts(self, vm_uuid: str) -> list[PortRecord]:
        """Hide the VM's file from dnsmasq (rename it to a dot-file, SIGHUP) and return
        its records; a file retired by an earlier, interrupted call is read again."""
        path, retired = self.hosts_path(vm_uuid), self.retired_path(vm_uuid)
        if path.exists():
            path.replace(retired)
            self.reload()
        try:
            return parse_hosts_file(retired.read_text())
        except FileNotFoundError:
            return []

    def drop_retired(self, vm_uuid: str) -> None:
        self.retired_path(vm_uuid).unlink(missing_ok=True)

    # -- leases

    def leases(self) -> list[tuple[str, str]]:
        """``(mac, ip)`` of every lease in the database."""
        out = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.cfg.lease_file.read_text().splitlines():
                fields = line.split()
                if len(fields) >= 3 and fields[0].isdigit():
                    out.append((fields[1].lower(), fields[2]))
        return out

    def _settled_leases(self) -> list[tuple[str, str]]:
        """The lease database once dnsmasq is not rewriting it.

        dnsmasq rewrites the file in place (truncate, then write) on every lease
        change and on every SIGHUP, which our own hosts changes send just before a
        release: read in between, the file is empty or cut short. Read until the file
        stays unchanged over a poll interval (bounded)."""
        def stamp() -> tuple[int, int] | None:
            try:
                st = self.cfg.lease_file.stat()
            except FileNotFoundError:
                return None
            return st.st_mtime_ns, st.st_size

        leases = self.leases()
        for _ in range(int(_STOP_WAIT / _POLL)):
            before = stamp()
            time.sleep(_POLL)
            if stamp() == before:
                break
            leases = self.leases()
        return leases

    def forget_leases(self, records: list[PortRecord]) -> bool:
        """Strike the leases of ``records`` out of the database; True when any was there.

        dnsmasq keeps its leases in memory and offers no way to drop one that works
        from the host (a DHCPRELEASE sent locally arrives on ``lo``, not the tap),
        so the daemon is stopped, the file edited, and the daemon started again — only
        when one of these ports really holds a lease. VMs renewing meanwhile retry.
        """
        macs = {r.mac.lower() for r in records}
        ips = {r.ip for r in records}
        leases = self._settled_leases()
        if leases and not any(mac in macs or ip in ips for mac, ip in leases):
            return False
        # An empty database read while the daemon runs proves nothing (see
        # _settled_leases): the stopped daemon's file is read again below.
        was_running = self.pid() is not None
        self.stop()
        try:
            lines = self.cfg.lease_file.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        if not any(len(f := ln.split()) >= 3 and (f[1].lower() in macs or f[2] in ips)
                   for ln in lines):
            if was_running:
                self.ensure_running()
            return False
        kept = [ln for ln in lines
                if not (len(f := ln.split()) >= 3 and (f[1].lower() in macs or f[2] in ips))]
        tmp = self.cfg.lease_file.with_name(".dnsmasq.leases.tmp")
        tmp.write_text("".join(f"{ln}\n" for ln in kept))
        tmp.replace(self.cfg.lease_file)
        if was_running:
            self.ensure_running()
        log.info("leases released", extra={"interface": self.cfg.interface,
                                           "macs": ",".join(sorted(macs))})
        return True

    def remove_files(self) -> None:
        """Delete the daemon's state files (the log is kept for post-mortems)."""
        for path in (self.cfg.pid_file, self.cfg.lease_file):
            path.unlink(missing_ok=True)
        if self.cfg.hosts_dir.is_dir():
            for child in self.cfg.hosts_dir.iterdir():
                child.unlink(missing_ok=True)
            self.cfg.hosts_dir.rmdir()


def _only_added(old: str, new: str) -> bool:
    """True when ``new`` keeps every record line of ``old`` (dnsmasq then needs no HUP)."""
    old_lines = {ln.strip() for ln in old.splitlines() if ln.strip() and not ln.startswith("#")}
    new_lines = {ln.strip() for ln in new.splitlines() if ln.strip() and not ln.startswith("#")}
    return old_lines <= new_lines
