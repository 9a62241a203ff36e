"""Messages of VM networking shared by the control server, the nodes and the routers.

How a VM is networked depends on its pool's mode (:class:`yun.proto.resources.NetworkMode`):

- ``direct`` (F-NET-DIRECT): the VM's tap joins a bridge that enslaves the node's uplink;
  the LAN's own DHCP server gives the VM its address, which the node learns and reports.
- ``sandbox-*`` (F-NET-SANDBOX): the VM's tap is a routed point-to-point link to the node;
  its address comes from the node's sandbox subnet (assigned to the node by the control
  server, unique in the platform) and is served by the node's dnsmasq as a static lease.
  ``private`` VMs reach nothing outside; ``mono`` and ``share`` VMs reach the outside
  through the intelligent routers, which translate their public addresses (F-SB-MONO)
  or public ports (F-SB-SHARE) to the VM's sandbox address.

The routers' rule set (:class:`RouterRuleSet`) is computed by one pure function of the
control server's state and numbered by a generation that grows with every change.
"""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from yun.proto.base import Message

Port = Annotated[int, Field(ge=1, le=65535)]
Protocol = Literal["tcp", "udp"]


def _ipv4(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError as exc:
        raise ValueError(f"not an IPv4 address: {value!r}") from exc


def _ipv4_net(value: str) -> str:
    try:
        return str(ipaddress.IPv4Network(value, strict=True))
    except ValueError as exc:
        raise ValueError(f"not an IPv4 network: {value!r} ({exc})") from exc


#: An IPv4 address in its canonical text form.
IPv4 = Annotated[str, AfterValidator(_ipv4)]
#: An IPv4 network (host bits zero) in its canonical text form.
IPv4Net = Annotated[str, AfterValidator(_ipv4_net)]


class NicNetwork(StrEnum):
    """Which node-side backend makes a NIC real."""

    SANDBOX = "sandbox"
    DIRECT = "direct"


class Exposure(StrEnum):
    """What reaches a sandbox VM from outside (the pool's sandbox sub-mode)."""

    PRIVATE = "private"  # nothing but the node's NAT ports (port forwards)
    MONO = "mono"  # its own public IP at every router, and out with that IP
    SHARE = "share"  # public IP:port mappings at every router


class SandboxSettings(Message):
    """The node-wide part of the sandbox network, sent by the control server with every
    provision and in answer to the node's reports (it changes as routers come and go).

    The node applies it idempotently (``ensure_network``)."""

    subnet: IPv4Net = Field(description="the node's sandbox subnet, unique in the platform")
    gateway: IPv4 = Field(description="the node's address on every sandbox tap "
                                     "(the subnet's first host)")
    routers: list[IPv4] = Field(
        default_factory=list,
        description="LAN addresses of the live intelligent routers: next hops of the "
                    "outbound traffic of mono and share VMs (ECMP)")
    blocked: list[IPv4Net] = Field(
        default_factory=list,
        description="networks no VM may reach (management networks, the platform's "
                    "sandbox supernet); the node adds its own addresses")


class NodeForward(Message):
    """A NAT port of the node that reaches one port of a private sandbox VM
    (F-SB-PRIVATE): ``node-address:node_port`` → ``vm_ip:vm_port``."""

    protocol: Protocol = "tcp"
    node_port: Port
    vm_ip: IPv4
    vm_port: Port


class NodeForwards(Message):
    """Every NAT port of one VM on its node (replaces what the node had for the VM)."""

    forwards: list[NodeForward] = Field(default_factory=list)


class MonoMapping(Message):
    """F-SB-MONO at a router: ``public_ip`` ⇄ ``vm_ip``, both directions, any port."""

    public_ip: IPv4
    vm_ip: IPv4
    vm_uuid: str


class PortMapping(Message):
    """F-SB-SHARE at a router: ``public_ip:public_port`` ⇄ ``vm_ip:vm_port``."""

    protocol: Protocol = "tcp"
    public_ip: IPv4
    public_port: Port
    vm_ip: IPv4
    vm_port: Port
    vm_uuid: str


class NodeRoute(Message):
    """How a router reaches the sandbox VMs of one node: ``subnet via address``."""

    node_uuid: str
    subnet: IPv4Net
    via: IPv4


class RouterRuleSet(Message):
    """Everything every intelligent router applies, at one generation of the control
    server's network state. Computed by one pure function
    (:func:`yun.control.network.router_rules.rule_set`)."""

    generation: int = Field(ge=0)
    mono: list[MonoMapping] = Field(default_factory=list)
    ports: list[PortMapping] = Field(default_factory=list)
    routes: list[NodeRoute] = Field(default_factory=list)


class RouterHello(Message):
    """A router introduces itself when it pulls the rule set (the control server then
    pushes it change notices)."""

    lan_address: IPv4 = Field(description="its address on the LAN of the nodes: next hop "
                                         "for the VMs' outbound traffic")
    applied_generation: int = Field(default=0, ge=0,
                                    description="the generation its table holds now")
    name: str = Field(default="", max_length=63,
                      description="its name (the control server may not know it yet)")
    url: str = Field(default="", max_length=2048,
                     description="where it takes change notices")


class RouterNotice(Message):
    """The control server tells a router the rule set changed (it pulls it then)."""

    generation: int = Field(ge=0)


class LearnedAddress(Message):
    """An address a direct-mode VM was seen to take from the LAN's DHCP server."""

    mac: str
    ip: IPv4


class RouterStatus(Message):
    """An intelligent router as the control server knows it (``GET /api/v1/routers``)."""

    uuid: str = Field(description="the router's component id")
    name: str
    url: str
    lan_address: str
    applied_generation: int = Field(description="the generation its table held at its "
                                                "last pull")
    current_generation: int = Field(description="the control server's generation now")
    in_sync: bool = Field(description="applied_generation == current_generation")
    live: bool = Field(description="pulled within the router timeout")
    last_seen_at: str | None = None


class RouterList(Message):
    """Every router known to the control server."""

    items: list[RouterStatus] = Field(default_factory=list)
    generation: int = 0
