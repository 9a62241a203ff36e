"""A test data centre built out of network namespaces on one machine.

A :class:`Topology` owns everything it creates and deletes it on exit, even when
the ``with`` block raises::

    with Topology() as topo:
        lan = topo.lan                      # a namespace holding bridge "br0": the switch
        a = topo.add_host("node1")          # a namespace with "eth0" on the LAN
        b = topo.add_host("node2")
        a.run(["ping", "-c", "1", b.ip])    # (use ping_argv() for the bounded form)
        http_get_in(a.ns.name, f"http://{b.ip}:8080/")

Layout for run id ``1a2b3c`` and prefix ``yt``:

* namespace ``yt1a2b3c-lan`` with bridge ``br0`` (no address: a plain switch);
* namespace ``yt1a2b3c-<host>`` per host; its LAN interface is ``eth0`` with address
  ``172.31.K.<10+n>/24`` and ``lo`` up; no default route, so a stray packet to an
  address outside the test LAN fails at once instead of leaving the machine;
* optionally a veth ``yt1a2b3cr`` in the root namespace, address ``172.31.K.1/24``,
  whose peer is a port of ``br0``, so the test process can reach the hosts.

Interfaces created inside a namespace never collide with anything outside it, so
only the namespace names and the one root-side link carry the run id. ``K`` is
chosen from the run id and claimed with a lock file so that parallel runs do not
share a subnet; a marker file records the owning process, so that
:func:`cleanup_stale` removes leftovers of killed runs and never a live run's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from yun.util.procs import pid_alive, start_time
from yun.util.run import CommandError, Result, run

log = logging.getLogger("yun.testing.netns")

DEFAULT_PREFIX = "yt"
#: Where run markers and subnet claims live; /run is a tmpfs, so a reboot clears it.
STATE_DIR = Path("/run/yun-testing")
#: The test LANs are /24 blocks of this /16.
SUPERNET = ipaddress.IPv4Network("172.31.0.0/16")
LAN_BRIDGE = "br0"
HOST_IFACE = "eth0"
IFNAMSIZ = 15  # Linux interface names are at most 15 characters
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_KILL_WAIT = 5.0  # seconds a process in a namespace gets between SIGTERM and SIGKILL


class TopologyError(RuntimeError):
    """A test topology could not be built."""


def _ip(*args: str, timeout: float = 15.0, check: bool = True) -> Result:
    return run(["ip", *args], timeout=timeout, check=check)


def _ip_json(*args: str) -> list[dict[str, Any]]:
    """``ip -j ...`` parsed; iproute2 prints nothing at all for an empty list."""
    out = _ip("-j", *args).stdout.strip()
    return json.loads(out) if out else []


# --------------------------------------------------------------------------- namespaces


class Namespace:
    """A named network namespace (``ip netns``): create, run commands inside, delete."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"

    def create(self) -> Namespace:
        """Create the namespace and bring its loopback up (daemons bind 127.0.0.1)."""
        _ip("netns", "add", self.name)
        self.run(["ip", "link", "set", "lo", "up"])
        return self

    def exists(self) -> bool:
        return self.name in list_namespaces()

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` inside this namespace."""
        return ["ip", "netns", "exec", self.name, *[str(a) for a in argv]]

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 60.0,
        check: bool = True,
        input: str | bytes | None = None,
        env: dict[str, str] | None = None,
    ) -> Result:
        """Run ``argv`` inside the namespace through :func:`yun.util.run.run`."""
        return run(self.exec_argv(argv), timeout=timeout, check=check, input=input, env=env)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a long-running process inside the namespace (a server, a daemon).

        The caller owns the process; :meth:`delete` kills whatever still runs inside.
        """
        return subprocess.Popen(self.exec_argv(argv), **kwargs)

    def pids(self) -> list[int]:
        """Processes whose network namespace is this one."""
        res = _ip("netns", "pids", self.name, check=False)
        return [int(p) for p in res.stdout.split() if p.isdigit()]

    def kill_processes(self, wait: float = _KILL_WAIT) -> None:
        """SIGTERM every process inside, then SIGKILL the ones still there after ``wait``.

        A namespace with a process inside outlives ``ip netns del`` (with its veths and
        addresses), so the processes must go first.
        """
        pids = self.pids()
        if not pids:
            return
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.05)
        for pid in pids:
            if pid_alive(pid):
                _signal(pid, signal.SIGKILL)

    def delete(self) -> None:
        """Kill what runs inside and delete the namespace; no error if it is gone."""
        if not self.exists():
            return
        self.kill_processes()
        _ip("netns", "del", self.name, check=False)


def list_namespaces() -> list[str]:
    """Names of every named network namespace."""
    return [entry["name"] for entry in _ip_json("netns", "list")]


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)






# --------------------------------------------------------------------------- LAN and hosts


@dataclass
class Host:
    """A machine on the test LAN: a namespace with one interface on the switch.

    ``ns.name`` is what ``ip netns exec`` needs; ``iface`` is the LAN interface inside
    the namespace; ``ip``/``prefixlen`` its address; ``port`` the switch port (in the
    LAN namespace) its cable is plugged into.
    """

    name: str
    ns: Namespace
    ip: str
    prefixlen: int
    iface: str
    port: str
    lan: Lan

    @property
    def cidr(self) -> str:
        return f"{self.ip}/{self.prefixlen}"

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return self.ns.exec_argv(argv)

    def run(self, argv: Sequence[str], **kwargs: Any) -> Result:
        return self.ns.run(argv, **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return self.ns.popen(argv, **kwargs)


@dataclass
class Lan:
    """The LAN switch: a namespace holding a Linux bridge with no address of its own."""

    ns: Namespace
    subnet: ipaddress.IPv4Network
    bridge: str = LAN_BRIDGE
    hosts: list[Host] = field(default_factory=list)
    _next_port: int = 0

    def create(self) -> None:
        self.ns.create()
        self.ns.run(["ip", "link", "add", self.bridge, "type", "bridge"])
        self.ns.run(["ip", "link", "set", self.bridge, "up"])

    def new_port(self) -> str:
        """A fresh switch-port name, unique within the LAN namespace."""
        self._next_port += 1
        return f"p{self._next_port}"

    def plug(self, port: str) -> None:
        """Enslave ``port`` (already inside the LAN namespace) to the bridge and bring it up."""
        self.ns.run(["ip", "link", "set", port, "master", self.bridge])
        self.ns.run(["ip", "link", "set", port, "up"])

    def host_address(self, index: int) -> str:
        """Address of the ``index``-th host (1-based): .11, .12, ... (.1 is the root side)."""
        if not 1 <= index <= 200:
            raise TopologyError(f"a test LAN holds at most 200 hosts, asked for #{index}")
        return str(self.subnet.network_address + 10 + index)


# --------------------------------------------------------------------------- the topology


class Topology:
    """Builds a test data centre and deletes all of it on exit (sync context manager).

    ``root_link`` adds a veth from the root namespace into the LAN, so the test process
    can reach services inside the hosts at :attr:`root_ip`.
    """

    def __init__(
        self,
        *,
        prefix: str = DEFAULT_PREFIX,
        run_id: str | None = None,
        root_link: bool = True,
        state_dir: Path = STATE_DIR,
    ) -> None:
        self.run_id = run_id or secrets.token_hex(3)
        self.tag = f"{prefix}{self.run_id}"
        # The root-side link is the longest name this topology puts outside a namespace.
        if len(self.tag) + 1 > IFNAMSIZ or not re.fullmatch(r"[a-z0-9]+", self.tag):
            raise TopologyError(f"prefix+run id {self.tag!r} must be short lowercase alnum")
        self.prefix = prefix
        self.want_root_link = root_link
        self.state_dir = state_dir
        self.namespaces: list[Namespace] = []
        self.hosts: dict[str, Host] = {}
        self.root_link: str | None = None
        self.root_ip: str | None = None
        self._lan: Lan | None = None
        self._claim: Path | None = None
        self._marker = state_dir / f"{self.tag}.json"

    # -- lifecycle

    def __enter__(self) -> Topology:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # The marker comes first and goes last: whatever exists with our tag and no
        # live owner is a leftover that cleanup_stale may remove.
        self._write_marker(subnet=None)
        subnet = self._claim_subnet()
        self._write_marker(subnet=str(subnet))
        lan = Lan(ns=Namespace(f"{self.tag}-lan"), subnet=subnet)
        self.namespaces.append(lan.ns)
        lan.create()
        self._lan = lan
        if self.want_root_link:
            self._add_root_link(lan)
        log.info("topology up", extra={"topology": self.tag, "subnet": str(subnet)})

    def close(self) -> None:
        """Delete everything this topology created; safe to call more than once."""
        errors: list[str] = []
        if self.root_link is not None:
            # Deleting the LAN namespace destroys the peer and with it this end, but a
            # half-built link may not have a peer in there yet.
            if _link_exists(self.root_link):
                res = _ip("link", "del", self.root_link, check=False)
                if res.returncode != 0 and _link_exists(self.root_link):
                    errors.append(f"link {self.root_link}: {res.stderr.strip()}")
            self.root_link = None
        for ns in reversed(self.namespaces):
            try:
                ns.delete()
            except Exception as exc:  # keep deleting the others
                errors.append(f"{ns.name}: {exc}")
        self.namespaces.clear()
        self.hosts.clear()
        if self._claim is not None:
            self._claim.unlink(missing_ok=True)
            self._claim = None
        self._marker.unlink(missing_ok=True)
        if errors:
            log.warning("topology cleanup incomplete", extra={"topology": self.tag,
                                                               "errors": "; ".join(errors)})

    # -- building

    @property
    def lan(self) -> Lan:
        if self._lan is None:
            raise TopologyError("the topology is not started (use it as a context manager)")
        return self._lan

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return self.lan.subnet

    def ns_name(self, name: str) -> str:
        """The full namespace name of a member called ``name``."""
        if not _NAME_RE.match(name):
            raise TopologyError(f"bad member name {name!r}: use [a-z0-9-], at most 32 chars")
        return f"{self.tag}-{name}"

    def add_namespace(self, name: str) -> Namespace:
        """A bare namespace (loopback up, no LAN cable) deleted with the topology."""
        ns = Namespace(self.ns_name(name))
        self.namespaces.append(ns)
        ns.create()
        return ns

    def add_host(self, name: str) -> Host:
        """A namespace whose ``eth0`` is cabled to the LAN switch, with the next address."""
        if name in self.hosts or name == "lan":
            raise TopologyError(f"host {name!r} already exists in {self.tag}")
        lan = self.lan
        ns = self.add_namespace(name)
        port = lan.new_port()
        # Create the pair inside the LAN namespace with its peer directly in the host's,
        # so no temporary name ever appears in the root namespace.
        lan.ns.run(["ip", "link", "add", port, "type", "veth",
                    "peer", "name", HOST_IFACE, "netns", ns.name])
        lan.plug(port)
        ip = lan.host_address(len(lan.hosts) + 1)
        ns.run(["ip", "addr", "add", f"{ip}/{lan.subnet.prefixlen}", "dev", HOST_IFACE])
        ns.run(["ip", "link", "set", HOST_IFACE, "up"])
        host = Host(name=name, ns=ns, ip=ip, prefixlen=lan.subnet.prefixlen,
                    iface=HOST_IFACE, port=port, lan=lan)
        lan.hosts.append(host)
        self.hosts[name] = host
        return host

    def _add_root_link(self, lan: Lan) -> None:
        name = f"{self.tag}r"
        port = lan.new_port()
        self.root_link = name  # recorded before creation so close() removes a half-built one
        _ip("link", "add", name, "type", "veth", "peer", "name", port, "netns", lan.ns.name)
        lan.plug(port)
        self.root_ip = str(lan.subnet.network_address + 1)
        _ip("addr", "add", f"{self.root_ip}/{lan.subnet.prefixlen}", "dev", name)
        _ip("link", "set", name, "up")

    # -- bookkeeping

    def _write_marker(self, subnet: str | None) -> None:
        pid = os.getpid()
        data = {"pid": pid, "start": start_time(pid), "subnet": subnet}
        tmp = self._marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self._marker)

    def _claim_subnet(self) -> ipaddress.IPv4Network:
        """Claim a free /24 of :data:`SUPERNET`, starting from one derived from the run id."""
        blocks = list(SUPERNET.subnets(new_prefix=24))
        used = _root_routes()
        first = int(self.run_id, 16) % len(blocks) if _is_hex(self.run_id) else 0
        for i in range(len(blocks)):  # bounded: each block is tried once
            block = blocks[(first + i) % len(blocks)]
            if any(block.overlaps(r) for r in used):
                continue
            claim = self.state_dir / f"net-{block.network_address}"
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.tag)
            self._claim = claim
            return block
        raise TopologyError(f"no free /24 left in {SUPERNET}: run cleanup_stale()")


def _is_hex(text: str) -> bool:
    return bool(re.fullmatch(r"[0-9a-f]+", text))


def _root_routes() -> list[ipaddress.IPv4Network]:
    """Destinations routed in the root namespace (default excluded), to avoid overlaps."""
    nets = []
    for route in _ip_json("-4", "route", "show", "table", "all"):
        dst = route.get("dst", "default")
        if dst == "default" or route.get("type") in ("broadcast", "local"):
            continue
        with contextlib.suppress(ValueError):
            nets.append(ipaddress.IPv4Network(dst, strict=False))
    return nets


def _link_exists(name: str) -> bool:
    return _ip("link", "show", "dev", name, check=False).returncode == 0


# --------------------------------------------------------------------------- stale leftovers


def _owner_alive(marker: Path) -> bool:
    try:
        data = json.loads(marker.read_text())
        pid = int(data["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return pid_alive(pid) and start_time(pid) == data.get("start")


def cleanup_stale(prefix: str = DEFAULT_PREFIX, state_dir: Path = STATE_DIR) -> list[str]:
    """Remove namespaces, root links and claims of killed runs with ``prefix``.

    A run whose owning process still lives is left alone, so this is safe to call at
    the start of every test session while other sessions run. Returns what was removed.
    """
    tag_re = re.compile(rf"^({re.escape(prefix)}[0-9a-f]+)(?:-[a-z0-9-]+|r)$")
    live: set[str] = set()
    if state_dir.is_dir():
        for marker in state_dir.glob(f"{prefix}*.json"):
            if _owner_alive(marker):
                live.add(marker.stem)
            else:
                marker.unlink(missing_ok=True)
        for claim in state_dir.glob("net-*"):
            with contextlib.suppress(OSError):
                if claim.read_text().strip() not in live:
                    claim.unlink(missing_ok=True)
    removed: list[str] = []
    for name in list_namespaces():
        m = tag_re.match(name)
        if m and m.group(1) not in live:
            Namespace(name).delete()
            removed.append(f"netns {name}")
    for link in _ip_json("link", "show"):
        name = link.get("ifname", "")
        m = tag_re.match(name)
        if m and m.group(1) not in live:
            _ip("link", "del", name, check=False)
            removed.append(f"link {name}")
    if removed:
        log.info("removed stale test leftovers", extra={"removed": ", ".join(removed)})
    return removed


# --------------------------------------------------------------------------- probes


@dataclass(frozen=True)
class HttpResult:
    """What an HTTP GET got: ``status`` 0 and ``error`` set when no HTTP answer came."""

    status: int
    body: str
    error: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


# Runs inside the namespace. Proxies are disabled: a proxy from the environment would
# send the request out of the namespace, and tests only talk to their own addresses.
_HTTP_SCRIPT = r"""
import json, sys, urllib.error, urllib.request
url, timeout = sys.argv[1], float(sys.argv[2])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(url, timeout=timeout) as resp:
        out = {"status": resp.status, "body": resp.read(1 << 20).decode("utf-8", "replace")}
except urllib.error.HTTPError as exc:
    out = {"status": exc.code, "body": exc.read(1 << 20).decode("utf-8", "replace")}
except Exception as exc:
    out = {"status": 0, "body": "", "error": f"{type(exc).__name__}: {exc}"}
print(json.dumps(out))
"""


def http_get_in(ns_name: str, url: str, timeout: float = 5.0) -> HttpResult:
    """GET ``url`` from inside namespace ``ns_name``.

    Never raises for network trouble: a refused or timed-out connection gives
    ``HttpResult(0, "", error)`` so that callers can poll.
    """
    argv = ["ip", "netns", "exec", ns_name, sys.executable, "-c", _HTTP_SCRIPT, url, str(timeout)]
    try:
        res = run(argv, timeout=timeout + 15.0, check=False)
    except CommandError as exc:
        return HttpResult(0, "", str(exc))
    try:
        data = json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return HttpResult(0, "", (res.stderr or res.stdout).strip()[-500:])
    return HttpResult(int(data["status"]), data.get("body", ""), data.get("error", ""))


def wait_http_in(
    ns_name: str, url: str, *, deadline: float = 60.0, interval: float = 0.5,
    request_timeout: float = 3.0,
) -> HttpResult:
    """Poll :func:`http_get_in` until a 2xx answer or ``deadline`` seconds; the last result."""
    end = time.monotonic() + deadline
    result = HttpResult(0, "", "not tried")
    while True:  # bounded by the deadline
        result = http_get_in(ns_name, url, timeout=request_timeout)
        if result.ok or time.monotonic() + interval >= end:
            return result
        time.sleep(interval)


def ping_argv(address: str, count: int = 2, wait: int = 1) -> list[str]:
    """A bounded ping: iputils ``ping`` when installed, else busybox's applet."""
    base = ["ping"] if shutil.which("ping") else ["busybox", "ping"]
    return [*base, "-c", str(count), "-W", str(wait), address]
