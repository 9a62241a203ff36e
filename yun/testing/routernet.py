"""A lab of intelligent routers built from network namespaces, for real-packet tests.

Layout (inside one :class:`~yun.testing.netns.Topology`)::

    client ── wan switch ── router1, router2, … ── LAN switch ── node ── vm
    198.51.100.100          198.51.100.<n>   172.31.K.x          172.31.K.x   10.64.0.x

* ``client`` is the internet: it reaches the public addresses (``203.0.113.0/24``)
  through the router chosen with :meth:`RouterLab.route_client_via`;
* each router has ``eth0`` on the LAN (the topology's hosts) and ``wan0`` on the WAN
  switch; ``yun serve router`` runs inside its namespace, so its nftables table,
  routes and ``ip_forward`` are the namespace's own;
* ``node`` routes each VM address (``/32``) to a veth into the ``vm`` namespace, which
  holds the sandbox addresses, and sends the VMs' outbound traffic to the router chosen
  with :meth:`RouterLab.route_vm_out_via` (so in and out may take different routers);
* the test process reaches the control plane over the topology's root link.

Every address used is inside these namespaces; :meth:`RouterLab.close` deletes all.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from yun.testing.netns import Host, Namespace, Topology, http_get_in
from yun.testing.procs import ServiceProcess, write_config

log = logging.getLogger("yun.testing.routernet")

WAN_PREFIX = "198.51.100"
CLIENT_IP = f"{WAN_PREFIX}.100"
PUBLIC_NET = "203.0.113.0/24"
SANDBOX_SUBNET = "10.64.0.0/24"
SANDBOX_GATEWAY = "10.64.0.1"

# An HTTP server answering each GET with the address the request came from.
ECHO_SERVER = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (self.server.label + " " + self.client_address[0]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
srv = http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H)
srv.label = sys.argv[3]
srv.serve_forever()
"""


@dataclass
class Wan:
    """The routers' public side in a :class:`~yun.testing.netns.Topology`: a WAN switch
    (namespace ``wan``, bridge ``br0``) and the "internet" client (namespace ``client``,
    ``wan0`` at :data:`CLIENT_IP`); :meth:`attach` cables a router host to it."""

    topo: Topology
    switch: Namespace | None = None
    client: Namespace | None = None
    ips: dict[str, str] = field(default_factory=dict)
    servers: list[Any] = field(default_factory=list)
    _ports: int = 0

    def build(self) -> Wan:
        """Make the switch and the client (their namespaces belong to the topology)."""
        self.switch = self.topo.add_namespace("wan")
        self.switch.run(["ip", "link", "add", "br0", "type", "bridge"])
        self.switch.run(["ip", "link", "set", "br0", "up"])
        self.client = self.topo.add_namespace("client")
        self.link(self.client, CLIENT_IP)
        return self

    def link(self, ns: Namespace, address: str) -> None:
        """A cable from the switch to ``ns``: ``wan0`` there, at ``address``/24."""
        assert self.switch is not None
        self._ports += 1
        port = f"w{self._ports}"
        self.switch.run(["ip", "link", "add", port, "type", "veth", "peer", "name", "wan0",
                         "netns", ns.name])
        self.switch.run(["ip", "link", "set", port, "master", "br0"])
        self.switch.run(["ip", "link", "set", port, "up"])
        ns.run(["ip", "addr", "add", f"{address}/24", "dev", "wan0"])
        ns.run(["ip", "link", "set", "wan0", "up"])

    def attach(self, host: Host) -> str:
        """Give router host ``host`` its ``wan0`` (the next WAN address); that address."""
        address = f"{WAN_PREFIX}.{len(self.ips) + 1}"
        self.link(host.ns, address)
        self.ips[host.name] = address
        return address

    def route_client_via(self, router: str) -> None:
        """The client reaches the public addresses through router host ``router``."""
        assert self.client is not None
        self.client.run(["ip", "route", "replace", PUBLIC_NET, "via", self.ips[router]])

    def serve_echo(self, port: int = 8000, label: str = "client") -> None:
        """The client's echo HTTP server on ``port`` (answers ``label <peer address>``)."""
        assert self.client is not None
        self.servers.append(self.client.popen(
            [sys.executable, "-c", ECHO_SERVER, CLIENT_IP, str(port), label]))

    def get(self, url: str, timeout: float = 3.0) -> str:
        """The body of GET ``url`` from the client ('' when there is no 2xx answer)."""
        assert self.client is not None
        res = http_get_in(self.client.name, url, timeout=timeout)
        return res.body if res.ok else ""

    def close(self) -> None:
        """Stop the echo servers (the namespaces go with the topology)."""
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.kill()
                server.wait(5)
        self.servers.clear()


@dataclass
class RouterProcess(ServiceProcess):
    """``yun serve router`` inside a router host's namespace."""

    ns_name: str = ""

    @property
    def argv(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns_name, *super().argv]


@dataclass
class RouterLab:
    """Client, WAN switch, routers, LAN, node and VM namespaces (see the module doc)."""

    root: Path
    topo: Topology = field(default_factory=Topology)
    wan: Namespace | None = None
    client: Namespace | None = None
    node: Host | None = None
    vm: Namespace | None = None
    routers: dict[str, Host] = field(default_factory=dict)
    wan_ips: dict[str, str] = field(default_factory=dict)
    processes: dict[str, RouterProcess] = field(default_factory=dict)
    servers: list[Any] = field(default_factory=list)
    vm_ips: list[str] = field(default_factory=list)
    wan_net: Wan | None = None

    def __enter__(self) -> RouterLab:
        self.topo.__enter__()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process started here and delete every namespace (safe twice)."""
        for proc in self.processes.values():
            with contextlib.suppress(Exception):
                proc.stop(timeout=5)
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.kill()
                server.wait(5)
        self.servers.clear()
        self.topo.close()

    # -- building

    @property
    def root_ip(self) -> str:
        assert self.topo.root_ip is not None
        return self.topo.root_ip

    def _build(self) -> None:
        self.wan_net = Wan(self.topo).build()
        self.wan, self.client = self.wan_net.switch, self.wan_net.client
        self.node = self.topo.add_host("node")
        self.vm = self.topo.add_namespace("vm")
        node, vm = self.node.ns, self.vm
        node.run(["ip", "link", "add", "vm0", "type", "veth", "peer", "name", "eth0",
                  "netns", vm.name])
        node.run(["ip", "addr", "add", f"{SANDBOX_GATEWAY}/32", "dev", "vm0"])
        node.run(["ip", "link", "set", "vm0", "up"])
        node.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        vm.run(["ip", "link", "set", "eth0", "up"])
        vm.run(["ip", "route", "add", SANDBOX_GATEWAY, "dev", "eth0"])
        vm.run(["ip", "route", "add", "default", "via", SANDBOX_GATEWAY])

    def add_vm_address(self, ip: str) -> None:
        """Give the VM namespace one more sandbox address, routed to it by the node."""
        assert self.vm is not None and self.node is not None
        self.vm.run(["ip", "addr", "add", f"{ip}/32", "dev", "eth0"])
        self.node.ns.run(["ip", "route", "replace", f"{ip}/32", "dev", "vm0"])
        self.vm_ips.append(ip)

    def add_router(self, name: str) -> Host:
        """A router host: on the LAN (``eth0``) and on the WAN (``wan0``)."""
        assert self.wan_net is not None
        host = self.topo.add_host(name)
        self.wan_ips[name] = self.wan_net.attach(host)
        self.routers[name] = host
        return host

    def serve_http(self, ns: Namespace, address: str, port: int, label: str) -> None:
        """Start the echo HTTP server in ``ns`` (answers ``label <peer address>``)."""
        self.servers.append(ns.popen([sys.executable, "-c", ECHO_SERVER, address, str(port),
                                      label]))

    def router_process(self, name: str, domain_url: str, secret: str, *,
                       sync_interval: float = 2.0, domain_name: str = "it",
                       log_level: str = "INFO", host_name: str | None = None
                       ) -> RouterProcess:
        """The ``yun serve router`` process of router ``name`` (made once, not started),
        in the namespace of router host ``host_name`` (default: ``name``)."""
        if name in self.processes:
            return self.processes[name]
        host = self.routers[host_name or name]
        state = self.root / name
        common = {"name": name, "domain_name": domain_name, "domain_secret": secret,
                  "domain_url": domain_url, "state_dir": str(state),
                  "heartbeat_interval": 0.5, "log_level": log_level}
        config = write_config(state / "yun.toml", "router", common, {
            "listen_host": host.ip, "listen_port": 7740, "lan_address": host.ip,
            "sync_interval": sync_interval})
        proc = RouterProcess(name=name, section="router", config=config,
                             log_file=state / "router.log", ns_name=host.ns.name)
        self.processes[name] = proc
        return proc

    # -- paths

    def route_client_via(self, router: str) -> None:
        """The internet client reaches the public addresses through ``router``."""
        assert self.wan_net is not None
        self.wan_net.route_client_via(router)

    def route_vm_out_via(self, router: str) -> None:
        """The node sends the VMs' outbound traffic to ``router``."""
        assert self.node is not None
        self.node.ns.run(["ip", "route", "replace", "default", "via", self.routers[router].ip])

    # -- reading a router back

    def nft_table(self, router: str) -> str:
        """``nft list table ip yun_router`` in the router's namespace ('' if absent)."""
        res = self.routers[router].ns.run(["nft", "list", "table", "ip", "yun_router"],
                                          check=False)
        return res.stdout if res.returncode == 0 else ""

    def forwarding(self, router: str) -> bool:
        res = self.routers[router].ns.run(["sysctl", "-n", "net.ipv4.ip_forward"])
        return res.stdout.strip() == "1"

    def routes(self, router: str) -> str:
        return self.routers[router].ns.run(["ip", "-4", "route", "show", "proto", "201"]).stdout


# --------------------------------------------------------------------------- control rows


class NetworkRows:
    """Writes the control server's rows the routers' rule set is made of, each change
    noted (``network_changes``) as the create and delete flows do; for tests and the
    benchmark, where no address-pool API or VM create is needed."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.project: str | None = None
        self.image: str | None = None
        self.pools: dict[str, str] = {}

    async def _base(self) -> tuple[str, str]:
        import uuid as uuidlib

        from sqlalchemy import select

        from yun.control.db.models import ImageRow, ProjectRow

        if self.project is None or self.image is None:
            async with self.db.session() as session:
                project = await session.scalar(select(ProjectRow.uuid).limit(1))
                assert project is not None, "the control server has no project yet"
                image = str(uuidlib.uuid4())
                session.add(ImageRow(uuid=image, name="router-lab", project_uuid=project,
                                     status="active"))
            self.project, self.image = project, image
        return self.project, self.image

    async def pool(self, name: str, kind: str = "exclusive",
                   network: str = PUBLIC_NET) -> str:
        """An address pool (rows only)."""
        import uuid as uuidlib

        from yun.control.db.models import AddressPoolRow

        if name not in self.pools:
            uuid = str(uuidlib.uuid4())
            async with self.db.session() as session:
                session.add(AddressPoolRow(uuid=uuid, name=name, kind=kind, network=network))
            self.pools[name] = uuid
        return self.pools[name]

    async def vm(self, name: str, ip: str) -> str:
        """A VM row with sandbox address ``ip``."""
        import uuid as uuidlib

        from yun.control.db.models import VmRow

        project, image = await self._base()
        uuid = str(uuidlib.uuid4())
        async with self.db.session() as session:
            session.add(VmRow(uuid=uuid, name=name, project_uuid=project, state="active",
                              vcpus=1, memory_mb=128, disk_gb=1, image_uuid=image, ip=ip))
        return uuid

    async def map_public(self, vm_uuid: str, ip: str, *, port: int = 0,
                         vm_port: int | None = None, protocol: str = "",
                         pool: str = "public") -> str:
        """Bind a public address (``port`` 0) or port of ``pool`` to a VM; note the change."""
        import uuid as uuidlib

        from yun.control.db.models import PublicIpRow
        from yun.control.network.changes import note_change

        project, _ = await self._base()
        pool_uuid = await self.pool(pool, "exclusive" if port == 0 else "shared")
        uuid = str(uuidlib.uuid4())
        async with self.db.session() as session:
            session.add(PublicIpRow(uuid=uuid, name=f"ip-{ip}-{port}", address_pool_uuid=pool_uuid,
                                    project_uuid=project, kind="vm", ip=ip, port=port,
                                    protocol=protocol if port else "", vm_uuid=vm_uuid,
                                    vm_port=vm_port))
            note_change(session, vm_uuid)
        return uuid

    async def map_many(self, count: int, *, first_public: str = "100.64.0.0",
                       first_vm: str = "10.64.0.0") -> None:
        """``count`` mono mappings in one transaction (for the benchmark)."""
        import ipaddress
        import uuid as uuidlib

        from yun.control.db.models import PublicIpRow, VmRow
        from yun.control.network.changes import note_change

        project, image = await self._base()
        pool_uuid = await self.pool("bulk", "exclusive", "100.64.0.0/10")
        pub0, vm0 = ipaddress.IPv4Address(first_public), ipaddress.IPv4Address(first_vm)
        async with self.db.session() as session:
            for i in range(count):
                vm = str(uuidlib.uuid4())
                session.add(VmRow(uuid=vm, name=f"bulk-{i}", project_uuid=project,
                                  state="active", vcpus=1, memory_mb=128, disk_gb=1,
                                  image_uuid=image, ip=str(vm0 + 1 + i)))
                session.add(PublicIpRow(uuid=str(uuidlib.uuid4()), name=f"bulk-{i}",
                                        address_pool_uuid=pool_uuid, project_uuid=project,
                                        kind="vm", ip=str(pub0 + 1 + i), port=0, protocol="",
                                        vm_uuid=vm))
            note_change(session, "bulk")

    async def unmap(self, public_uuid: str) -> None:
        """Release a public address or port; note the change."""
        from yun.control.db.models import PublicIpRow
        from yun.control.network.changes import note_change

        async with self.db.session() as session:
            row = await session.get(PublicIpRow, public_uuid)
            if row is not None:
                note_change(session, row.vm_uuid or row.ip)
                await session.delete(row)

    async def node(self, name: str, lan_ip: str, subnet: str = SANDBOX_SUBNET) -> str:
        """A node row at ``lan_ip`` owning the sandbox ``subnet``; note the change."""
        import uuid as uuidlib

        from yun.control.db.models import NodeRow
        from yun.control.network.changes import note_change

        uuid = str(uuidlib.uuid4())
        async with self.db.session() as session:
            session.add(NodeRow(uuid=uuid, name=name, url=f"https://{lan_ip}:7720",
                                hypervisor="sim", accel="tcg", sandbox_subnet=subnet,
                                labels={}, capabilities=[]))
            note_change(session, uuid)
        return uuid
