"""Settings of each component: a TOML file section, overridden by environment variables.

One file (default ``/etc/yun/yun.toml``) holds a ``[common]`` table and a table per
component (``[domain]``, ``[control]``, ``[node]``, ``[storage]``, ``[gateway]``, ``[router]``).
An environment variable ``YUN_<COMPONENT>_<FIELD>`` (or ``YUN_<FIELD>`` for common
fields) overrides the file. Unknown keys are refused so a typo is noticed.

The domain secret may be kept out of that file: ``domain_secret_file`` names a file
holding only the secret, readable by the services' user alone (mode 0600), so that the
settings file itself can be readable by anyone (the CLI reads its ``[cli]`` table).
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_CONFIG = Path("/etc/yun/yun.toml")


class ConfigError(ValueError):
    """The configuration file or environment is invalid; the message names the key."""


class ComponentSettings(BaseModel):
    """Fields every component has."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default_factory=lambda: os.uname().nodename.split(".")[0])
    domain_name: str = "default"
    domain_secret: str = ""
    domain_secret_file: Path | None = Field(
        default=None, description="a file holding the domain secret (mode 0600, nothing "
                                  "else in it); read when domain_secret is empty")
    domain_url: str | None = Field(
        default=None, description="the domain server's address; empty means discover it by mDNS"
    )
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    advertise_url: str | None = Field(
        default=None, description="the URL peers use to reach this component"
    )
    state_dir: Path = Path("/var/lib/yun")
    log_level: str = "INFO"
    heartbeat_interval: float = Field(default=2.0, gt=0)

    # Internal ports speak TLS with certificates of the domain CA; the gateway's user
    # port is the one plain-HTTP exception.
    url_scheme: ClassVar[str] = "https"

    @model_validator(mode="after")
    def _secret_from_file(self) -> ComponentSettings:
        if self.domain_secret_file is not None and not self.domain_secret:
            self.domain_secret = read_secret_file(self.domain_secret_file, "domain_secret_file")
        return self

    def url(self) -> str:
        """The URL this component tells the domain to give its peers."""
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = self.listen_host if self.listen_host not in ("0.0.0.0", "::") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{self.url_scheme}://{host}:{self.listen_port}"


def read_secret_file(path: Path, setting: str) -> str:
    """The secret held in ``path`` (surrounding whitespace dropped).

    Refused, naming ``setting`` and the file, when the file is missing, empty, not a
    regular file, or readable or writable by its group or others: a secret that other
    users can read is no longer the services' own."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{setting}: {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{setting}: {path} is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{setting}: {path} has mode {stat.S_IMODE(st.st_mode):04o}, open to its group "
            f"or others; make it readable by its owner only (chmod 600 {path})")
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc}") from None
    if not secret:
        raise ConfigError(f"{setting}: {path} is empty")
    return secret


class DomainSettings(ComponentSettings):
    listen_port: int = 7700
    ttl: float = Field(default=6.0, gt=0, description="seconds without heartbeat before 'gone'")
    mdns: bool = True
    credential_lifetime: float = Field(
        default=3600.0, ge=60, le=30 * 86400,
        description="seconds a component's certificate and credential are valid; they are "
                    "renewed with the heartbeat when past half their life")


class ControlSettings(ComponentSettings):
    listen_port: int = 7710
    database_url: str = ""  # default: sqlite under state_dir
    create_timeout: float = 600.0
    reconcile_interval: float = 5.0
    idempotency_retention: float = Field(
        default=86400.0, gt=0, description="seconds an Idempotency-Key and its answer are "
                                           "kept; a key used again after that is a new key")
    flow_heartbeat_interval: float = Field(
        default=10.0, gt=0, description="seconds between a control server's heartbeats of "
                                        "its flows and its rounds taking over the flows of "
                                        "departed control servers")
    flow_takeover_grace: float = Field(
        default=30.0, gt=0, description="seconds a flow's heartbeat must be silent, with its "
                                        "owner gone, before another control server takes it")
    load_persist_interval: float = Field(
        default=30.0, gt=0, le=3600,
        description="seconds between writes of the nodes' latest loads to the database; "
                    "the live figures are kept in memory")
    upload_timeout: float = Field(
        default=6 * 3600.0, gt=0, description="seconds after which an image upload not "
                                              "finished is abandoned (status error)")
    admin_password_file: Path | None = Field(
        default=None, description="when no user exists yet, a super admin 'admin' is made "
                                  "with the password in this file (mode 0600)")
    sandbox_supernet: str = Field(
        default="10.64.0.0/10", description="the network every node's sandbox subnet is "
                                            "taken from (one block per node)")
    sandbox_prefix: int = Field(default=24, ge=16, le=28,
                                description="the prefix length of each node's sandbox subnet")
    vm_blocked_networks: list[str] = Field(
        default_factory=lambda: ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                 "100.64.0.0/10", "169.254.0.0/16"],
        description="networks no sandbox VM may reach, besides the sandbox supernet and "
                    "the node's own addresses: where the management addresses live")
    router_timeout: float = Field(
        default=30.0, gt=0, description="seconds after its last pull of the rule set that a "
                                        "router stops being a next hop of the VMs")
    project_quota: dict[str, int] = Field(
        default_factory=dict, description="limits of new projects, e.g. {vms = 20}; -1 is "
                                          "unlimited; resources not named keep the defaults")

    def default_quota(self) -> dict[Any, int]:
        """The limits a new project starts with."""
        from yun.proto.identity import DEFAULT_QUOTA, QuotaResource

        limits: dict[Any, int] = dict(DEFAULT_QUOTA)
        for name, limit in self.project_quota.items():
            try:
                limits[QuotaResource(name)] = limit
            except ValueError:
                raise ConfigError(f"[control] project_quota: unknown resource {name!r}; "
                                  f"known: {', '.join(r.value for r in QuotaResource)}") from None
        return limits

    def db_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.state_dir / 'control.db'}"


class NodeSettings(ComponentSettings):
    listen_port: int = 7720
    hypervisor: Literal["libvirt", "sim"] = "libvirt"
    libvirt_uri: str = "qemu:///system"
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    report_interval: float = 2.0
    vnc_listen: str | None = Field(
        default=None, description="address VNC displays listen on; default: listen_host")
    sim_vcpus: int = 64
    sim_memory_mb: int = 262144
    sim_disk_gb: int = 4096
    # Host reserve: what the node keeps for itself and never offers to VMs. The node
    # reports it beside its totals; the control server subtracts it. 1 GiB of memory
    # covers the kernel, libvirtd, virtlogd, dnsmasq, this agent and QEMU's own overhead
    # outside guest RAM (tens of MiB per guest) on a small host; raise it on hosts with
    # many guests or other services (an all-in-one also runs the control plane).
    memory_reserve_mb: int = Field(
        default=1024, ge=0, le=1 << 30,
        description="MiB of host memory never given to VMs (the host's own needs)")
    vcpus_reserve: int = Field(default=0, ge=0, le=4096,
                               description="host CPUs never given to VMs")
    disk_reserve_gb: int = Field(default=0, ge=0, le=1 << 20,
                                 description="GiB of VM disk space never given to VMs")
    pool: str | None = Field(
        default=None, min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="the compute pool a new node lands in; none: unassigned until an admin "
                    "adds it")
    uplink: str | None = Field(
        default=None, min_length=1, max_length=15,
        description="network interface whose traffic is the node's network load; default: "
                    "the interface of the default route")
    net_capacity_mbit: int = Field(
        default=1000, ge=0, le=10_000_000,
        description="the uplink's capacity in Mbit/s, to turn its traffic into a load "
                    "fraction; 0: network load is not measured")
    forward_address: str | None = Field(
        default=None, description="the IPv4 address where this node's NAT ports "
                                  "(F-SB-PRIVATE) answer, as the API shows them; default: "
                                  "listen_host, or the source of the default route when "
                                  "listen_host is loopback or a wildcard")

    @model_validator(mode="after")
    def _forward_address(self) -> NodeSettings:
        import ipaddress

        if self.forward_address is not None:
            try:
                self.forward_address = str(ipaddress.IPv4Address(self.forward_address))
            except ValueError:
                raise ConfigError(f"forward_address: not an IPv4 address: "
                                  f"{self.forward_address!r}") from None
        return self

    # Direct mode (F-NET-DIRECT): set direct_uplink and the node offers direct networks.
    direct_uplink: str | None = Field(
        default=None, description="the LAN interface the direct-mode bridge enslaves (its "
                                  "IPv4 addresses and routes move onto the bridge); unset: "
                                  "this node has no direct network")
    direct_bridge: str = Field(
        default="yunbr0", description="the Linux bridge of direct mode (made when missing)")
    direct_blocked: list[str] = Field(
        default_factory=list,
        description="IPv4 networks no direct-mode VM may reach besides the node's own "
                    "addresses and the control server's blocked networks (which are used "
                    "minus the LAN itself): the management hosts on the LAN, e.g. "
                    "[\"192.168.1.10/32\"]")
    sim_direct: bool = Field(
        default=False, description="sim nodes only: offer a simulated direct network whose "
                                   "LAN DHCP server hands out addresses of sim_direct_lan")
    sim_direct_lan: str = Field(
        default="192.168.77.0/24", description="the simulated LAN of sim_direct")

    # Storage (F-STO-LOCAL, F-STO-SHARED, F-THIN): see docs/OPERATIONS.md "Node storage".
    storage_dirs: list[str] = Field(
        default_factory=list,
        description="the node's storage directories, one per disk of the host; new volumes "
                    "go to the one with the most free space. An entry may be a glob "
                    "(/srv/yun/disk*): it is expanded again on every report and volume "
                    "creation, so a directory made under it while the node runs is used at "
                    "once. Empty: the single directory <state_dir>/node/disks")
    shared_storage: Path | None = Field(
        default=None, description="a mount point present on every node of a shared-mode "
                                  "pool (NFS, CephFS): shared volumes and their base images "
                                  "live there")
    image_cache_dir: Path | None = Field(
        default=None, description="the node's image cache; default: images/ in the first "
                                  "storage directory")
    image_cache_gb: float = Field(
        default=100.0, gt=0, le=1 << 20,
        description="GiB the image cache may take; past it, least-recently-used images no "
                    "volume is based on are evicted")
    storage_alarm_percent: float = Field(
        default=85.0, gt=0, le=100,
        description="a storage directory whose use passes this share of its size raises an "
                    "alarm (a warning in the log, over_threshold in the node's report)")

    def storage_patterns(self) -> list[str]:
        """The configured storage directories (or globs), or the single default one."""
        return list(self.storage_dirs) or [str(self.state_dir / "node" / "disks")]

    @model_validator(mode="after")
    def _direct(self) -> NodeSettings:
        import ipaddress
        import re

        ifname = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
        for key in ("direct_uplink", "direct_bridge"):
            value = getattr(self, key)
            if value is not None and not ifname.match(value):
                raise ConfigError(f"[node] {key}: {value!r} is not an interface name "
                                  f"(1-15 letters, digits, '.', '_' or '-')")
        if self.direct_uplink is not None and self.direct_uplink == self.direct_bridge:
            raise ConfigError(f"[node] direct_bridge: {self.direct_bridge!r} is the uplink "
                              f"itself; name a bridge to create")
        for key in ("direct_blocked", "sim_direct_lan"):
            values = getattr(self, key)
            for value in values if isinstance(values, list) else [values]:
                try:
                    ipaddress.IPv4Network(value, strict=False)
                except ValueError as exc:
                    raise ConfigError(f"[node] {key}: {value!r} is not an IPv4 network "
                                      f"({exc})") from None
        return self


class StorageSettings(ComponentSettings):
    """A storage server (C-STO): ``yun serve storage``."""

    listen_port: int = 7730
    max_upload_bytes: int = 64 * 1024**3
    mode: Literal["local", "shared"] = Field(
        default="local", description="the storage mode of the pools it serves (F-STO-MODEL): "
                                     "local, nodes fetch images over HTTP and cache them; "
                                     "shared, images are kept on the shared mount and the "
                                     "nodes of shared pools use them there, never copied "
                                     "over the network")
    shared_storage: Path | None = Field(
        default=None, description="shared mode: the mount point the nodes of shared pools "
                                  "have as their [node] shared_storage")

    @model_validator(mode="after")
    def _check_mode(self) -> StorageSettings:
        if self.mode == "shared" and self.shared_storage is None:
            raise ConfigError("[storage] mode = \"shared\" needs shared_storage: the mount "
                              "point every node of the shared pools has")
        if self.mode == "local" and self.shared_storage is not None:
            raise ConfigError("[storage] shared_storage is only used with mode = \"shared\"")
        return self


class RouterSettings(ComponentSettings):
    """An intelligent router (C-RT): ``yun serve router``."""

    listen_port: int = 7740
    lan_address: str | None = Field(
        default=None, description="the router's IPv4 address on the nodes' LAN: the next "
                                  "hop of the VMs' outbound traffic; default: listen_host "
                                  "when it is an IPv4 address")
    wan_interfaces: list[str] = Field(
        default_factory=list, description="the public-side interfaces; when given, only "
                                          "packets arriving on them are translated inbound")
    sync_interval: float = Field(
        default=10.0, gt=0, le=3600,
        description="seconds between full pulls of the rule set, each compared with the "
                    "live nftables table (drift is repaired)")
    manage_forwarding: bool = Field(
        default=True, description="turn IPv4 forwarding of the router's network namespace "
                                  "on once synced (off before)")
    nft_command: str = "nft"

    @model_validator(mode="after")
    def _lan(self) -> RouterSettings:
        import ipaddress

        if self.lan_address is None:
            try:
                self.lan_address = str(ipaddress.IPv4Address(self.listen_host))
            except ValueError:
                raise ConfigError("lan_address: give the router's IPv4 address on the "
                                  "nodes' LAN (listen_host is not one)") from None
            if self.lan_address == "0.0.0.0":
                raise ConfigError("lan_address: give the router's IPv4 address on the "
                                  "nodes' LAN (listen_host is 0.0.0.0)")
        else:
            try:
                self.lan_address = str(ipaddress.IPv4Address(self.lan_address))
            except ValueError:
                raise ConfigError(f"lan_address: not an IPv4 address: "
                                  f"{self.lan_address!r}") from None
        for name in self.wan_interfaces:
            if not 1 <= len(name) <= 15 or "/" in name or " " in name:
                raise ConfigError(f"wan_interfaces: not an interface name: {name!r}")
        return self


class GatewaySettings(ComponentSettings):
    url_scheme: ClassVar[str] = "http"
    listen_port: int = 8080
    listen_host: str = "0.0.0.0"
    auth_cache_ttl: float = Field(
        default=5.0, ge=0, le=300,
        description="seconds a verified token or API key is trusted before the control "
                    "server is asked again (a revoked token works at most this long)")
    rate_limit: float = Field(
        default=100.0, ge=0,
        description="requests per second a user (or, before login, an address) may send; "
                    "0 disables rate limiting")
    rate_burst: int = Field(default=200, ge=1, le=1_000_000,
                            description="requests a user may send at once above the rate")
    max_json_body: int = Field(default=1 << 20, ge=1024, le=1 << 30,
                               description="largest JSON request body in bytes")
    expose_metrics: bool = Field(
        default=False,
        description="serve GET /metrics (request rates and latencies, process CPU and "
                    "memory) on the public port; off by default, as the public port is "
                    "reachable by anyone")


S = TypeVar("S", bound=ComponentSettings)


def load_settings(cls: type[S], section: str, path: Path | None = None, **overrides: Any) -> S:
    """Build ``cls`` from ``[common]`` and ``[section]`` of the file, the environment, then
    ``overrides`` (command-line options), in increasing precedence."""
    data: dict[str, Any] = {}
    path = path or Path(os.environ.get("YUN_CONFIG", DEFAULT_CONFIG))
    if path.exists():
        try:
            doc = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        data.update(doc.get("common", {}))
        data.update(doc.get(section, {}))
    for field in cls.model_fields:
        for env in (f"YUN_{section.upper()}_{field.upper()}", f"YUN_{field.upper()}"):
            if env in os.environ:
                data[field] = os.environ[env]
                break
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_problem(section, e) for e in exc.errors())
        raise ConfigError(f"invalid configuration ({path}): {problems}") from exc


def _problem(section: str, error: Any) -> str:
    """One validation error as ``[section] field: message``; a ConfigError raised by a
    check of the whole section (no field) keeps its own message, which names the key."""
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, ConfigError):
        return f"[{section}] {cause}"
    return f"[{section}] {'.'.join(str(p) for p in error['loc'])}: {error['msg']}"
