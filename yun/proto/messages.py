"""Typed messages of the internal protocol, shared by every component.

Every model forbids unknown fields, so a malformed message is refused with a
clear error instead of being half understood.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from yun.proto.base import MAC_RE, Message
from yun.proto.components import ComponentType
from yun.proto.network import Exposure, IPv4, LearnedAddress, NicNetwork, SandboxSettings

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
Name = Annotated[str, Field(min_length=1, max_length=63, pattern=NAME_PATTERN)]
__all__ = ["MAC_RE", "Message"]  # re-exported: most modules import them from here


# --- domain: join and presence -------------------------------------------------


Nonce = Annotated[str, Field(min_length=32, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]
Proof = Annotated[str, Field(min_length=64, max_length=64, pattern=r"^[0-9a-f]+$")]


class JoinChallengeRequest(Message):
    """First step of a join: the component names itself and sends a fresh nonce."""

    type: ComponentType
    name: Name
    client_nonce: Nonce


class JoinChallenge(Message):
    """The domain server's answer: its nonce, its CA certificate, and its proof that it
    knows the domain secret (HMAC over both nonces and the CA certificate's sha256)."""

    challenge_id: str
    server_nonce: str
    ca_cert_pem: str
    server_proof: str


class JoinRequest(Message):
    """Second step (F-JOIN): the component's proof of the secret, bound to its public key."""

    challenge_id: str = Field(min_length=1, max_length=64)
    client_proof: Proof
    public_key: str = Field(min_length=43, max_length=43,
                            description="the component's Ed25519 public key, base64url")
    type: ComponentType
    name: Name
    url: str = Field(min_length=1, max_length=2048, description="where peers reach this component")
    component_id: str | None = Field(
        default=None, max_length=64, description="the id from an earlier join, to rejoin as itself"
    )


class Peer(Message):
    """A component another component connects to."""

    component_id: str
    type: ComponentType
    name: str
    url: str


class Revocation(Message):
    """Credentials of ``component_id`` issued up to ``revoked_at`` are refused; the entry is
    dropped at ``expires_at``, when every such credential has expired anyway."""

    component_id: str
    revoked_at: float
    expires_at: float


class JoinResponse(Message):
    component_id: str
    credential: str
    certificate_pem: str
    ca_cert_pem: str
    domain: str
    heartbeat_interval: float
    ttl: float
    peers: list[Peer]
    revoked: list[Revocation] = Field(default_factory=list)
    revocation_generation: int = 0


class HeartbeatRequest(Message):
    url: str | None = Field(default=None, max_length=2048, description="set when the address moved")


class HeartbeatResponse(Message):
    peers: list[Peer]
    generation: int
    revoked: list[Revocation] = Field(default_factory=list)
    revocation_generation: int = 0
    credential: str | None = Field(default=None, description="a renewed credential")
    certificate_pem: str | None = Field(default=None, description="a renewed certificate")


class ComponentStatus(StrEnum):
    ALIVE = "alive"
    GONE = "gone"
    LEFT = "left"


class ComponentInfo(Message):
    component_id: str
    type: ComponentType
    name: str
    url: str
    status: ComponentStatus
    joined_at: datetime
    last_seen: datetime


# --- node <-> control -------------------------------------------------------------


class DomainState(StrEnum):
    """What the hypervisor says of a domain."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    ABSENT = "absent"


class NodeCapability(StrEnum):
    """What a node's hypervisor can do; reported by the node and schedulable."""

    LIVE_MIGRATE = "live_migrate"
    HOTPLUG_DISK = "hotplug_disk"
    HOTPLUG_NIC = "hotplug_nic"
    SNAPSHOTS = "snapshots"
    CONSOLE = "console"
    QOS_CPU = "qos_cpu"
    QOS_DISK = "qos_disk"
    QOS_NET = "qos_net"
    KVM = "kvm"
    #: the node has a direct-mode bridge on its uplink (``[node] direct_uplink``)
    NET_DIRECT = "net_direct"


class HostInfo(Message):
    """A node's identity, capacity and load, as it reports them."""

    hostname: str
    hypervisor: str
    accel: str = Field(description="kvm or tcg")
    vcpus: int = Field(ge=0, description="physical CPUs (threads) of the host")
    memory_mb: int = Field(ge=0, description="the host's real memory (MemTotal)")
    disk_gb: int = Field(ge=0)
    memory_reserved_mb: int = Field(
        default=0, ge=0, description="memory kept for the host itself, never given to VMs")
    vcpus_reserved: int = Field(default=0, ge=0, description="CPUs kept for the host itself")
    disk_reserved_gb: int = Field(default=0, ge=0, description="disk kept for the host itself")
    cpu_load: float = Field(default=0.0, ge=0, description="busy fraction of all CPUs, 0..1")
    memory_used_mb: int = Field(default=0, ge=0)
    disk_used_gb: int = Field(default=0, ge=0)
    net_load: float = Field(default=0.0, ge=0,
                            description="busy fraction of the uplink's capacity, 0..1")
    capabilities: list[NodeCapability] = Field(default_factory=list)
    pool: str | None = Field(
        default=None, max_length=63,
        description="the pool the node's configuration names; used when it first registers")
    forward_address: IPv4 | None = Field(
        default=None, description="the address where the node's NAT ports answer "
                                  "(F-SB-PRIVATE); none: the host of the agent's URL")


class CpuQos(StrEnum):
    """CPU QoS levels (F-QOS-CPU): on one core at most 100/50/30% of the time,
    sharing it 4:2:1 under contention."""

    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"


class QosSpec(Message):
    """A VM's QoS limits (F-QOS-CPU, F-QOS-DISK, F-QOS-NET); None is unlimited.

    Disk limits apply to each of the VM's disks; the bandwidth limit to each of its NICs,
    in both directions."""

    cpu: CpuQos = CpuQos.MEDIUM
    read_iops_sec: int | None = Field(default=None, ge=1, le=1_000_000)
    write_iops_sec: int | None = Field(default=None, ge=1, le=1_000_000)
    read_bytes_sec: int | None = Field(default=None, ge=4096, le=1 << 40)
    write_bytes_sec: int | None = Field(default=None, ge=4096, le=1 << 40)
    bandwidth_kbit: int | None = Field(default=None, ge=8, le=100_000_000,
                                       description="kilobits per second, each direction")


class DiskSpec(Message):
    """A VM disk: a qcow2 overlay of a cached image, or a blank volume.

    ``volume_id`` set: the disk is that volume of the node's disk backend (keyed by
    volume, not by VM: it outlives the VM and, in shared mode, moves between nodes);
    None: an older control server's disk, kept under the VM (see
    :func:`legacy_volume_id`)."""

    disk_id: str
    size_gb: int = Field(ge=1, le=65536)
    image_id: str | None = None
    image_sha256: str | None = None
    image_format: str | None = None
    bus: Literal["virtio", "sata", "ide"] = "virtio"
    volume_id: str | None = Field(default=None, description="the volume's uuid")
    thin: bool = Field(default=True, description="thin (grows with use) or preallocated")
    create: bool = Field(
        default=True, description="make the volume when it is missing (a root disk); False: "
                                  "it must exist already (a data volume: a missing one is data "
                                  "lost, never replaced by a blank)")
    storage: Literal["local", "shared"] = "local"
    backing: bool = Field(
        default=True, description="a volume made from an image: an overlay on the cached "
                                  "image, which stays its read-only base (True), or a full, "
                                  "independent copy of it (False: a pool without backing "
                                  "images in shared mode, F-BACKING)")


def legacy_volume_id(vm_uuid: str, disk_id: str) -> str:
    """The volume id given to a disk made before volumes were keyed by volume (kept
    under ``vms/<vm>/<disk>.qcow2`` on its node): the same on the control server (its
    migration) and on the node (which adopts the file under this id)."""
    import uuid as _uuid
    return str(_uuid.uuid5(_uuid.NAMESPACE_URL, f"yun:volume:{vm_uuid}/{disk_id}"))


class CdromSpec(Message):
    """The VM's CD drive: an ISO image from the node's image cache, or empty."""

    image_id: str | None = Field(default=None, description="None: an empty drive")
    image_sha256: str | None = None


class CloudInitSpec(Message):
    """What the node writes on the VM's NoCloud seed (a read-only ``cidata`` disk)."""

    instance_id: str = Field(description="the VM's uuid")
    hostname: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
    ssh_keys: list[str] = Field(default_factory=list, max_length=32)
    user_data: str | None = Field(default=None, max_length=65536,
                                  description="cloud-config or a script, as given")


HOSTNAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


class NicSpec(Message):
    """A NIC of a VM as its node makes it: which network backend, its MAC and, in
    sandbox mode, its addresses (in direct mode the LAN's DHCP server gives one)."""

    nic_id: str
    mac: str
    network: NicNetwork = NicNetwork.SANDBOX
    ip: str | None = Field(default=None,
                           description="sandbox: the VM's address (a static DHCP lease); "
                                       "direct: None")
    exposure: Exposure = Field(default=Exposure.PRIVATE,
                               description="sandbox: what reaches the VM from outside")
    extra_ips: list[str] = Field(
        default_factory=list, max_length=64,
        description="sandbox: more addresses of the node's subnet routed to the NIC "
                    "(configured by the guest itself)")
    hostname: str | None = Field(
        default=None, pattern=HOSTNAME_PATTERN,
        description="the hostname DHCP offers the guest (an RFC 1123 label)")

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str) -> str:
        value = value.lower()
        if not MAC_RE.match(value):
            raise ValueError(f"not a MAC address: {value!r}")
        return value


class DomainSpec(Message):
    """Everything a node needs to define one VM; the driver turns it into hypervisor config."""

    uuid: str
    name: Name
    vcpus: int = Field(ge=1, le=256)
    memory_mb: int = Field(ge=16, le=4 * 1024 * 1024)
    disks: list[DiskSpec] = Field(default_factory=list)
    nics: list[NicSpec] = Field(default_factory=list)
    vnc: bool = True
    qos: QosSpec = Field(default_factory=QosSpec)
    cdrom: CdromSpec | None = Field(default=None, description="None: no CD drive")
    boot: Literal["disk", "cdrom"] = "disk"
    cloud_init: CloudInitSpec | None = None


class DomainInfo(Message):
    uuid: str
    name: str
    state: DomainState
    vcpus: int = 0
    memory_mb: int = 0
    vnc_port: int | None = None
    console_log: str | None = None
    qos: QosSpec | None = Field(default=None, description="the limits in force on the domain")
    nics: list[str] = Field(default_factory=list,
                            description="MACs of the domain's NICs in force (the running "
                                        "guest's when it runs, its definition's otherwise)")
    disks: list[str] = Field(default_factory=list,
                             description="ids of the domain's disks in force (device disk)")
    cdrom_image: str | None = Field(default=None,
                                    description="the image id of the ISO in its CD drive")


class StorageDirReport(Message):
    """One storage directory of a node (each stands for a disk, F-STO-LOCAL) or the
    shared mount (F-STO-SHARED), as its file system reports it."""

    path: str = Field(max_length=4096)
    shared: bool = False
    total_bytes: int = Field(ge=0)
    used_bytes: int = Field(ge=0, description="used on the file system (anyone's files)")
    volumes: int = Field(default=0, ge=0, description="Yun volumes in it")
    allocated_bytes: int = Field(default=0, ge=0,
                                 description="what those volumes take on disk (physical)")
    over_threshold: bool = Field(default=False,
                                 description="used/total passed the node's alarm threshold")


class NodeReport(Message):
    """A node pushes its identity, capacity, load and everything it holds for VMs.

    ``domains``, ``ports`` and ``disks`` together are what the node holds for each VM:
    the control server releases a VM's address and reservation only when none of them
    names it. ``seq`` and ``acked_seq`` order reports against the control server's own
    changes (see :meth:`yun.control.services.nodes.NodeRegistry.report`).
    """

    node_id: str
    name: str
    url: str
    host: HostInfo
    domains: list[DomainInfo]
    full: bool = Field(default=True, description="domains lists every domain on the node")
    ports: dict[str, list[str]] | None = Field(
        default=None, description="VM uuid -> MACs of its network reservations (DHCP leases) "
                                  "on the node; None when not reported")
    disks: dict[str, list[str]] | None = Field(
        default=None, description="VM uuid -> ids of its volumes on the node; None when not "
                                  "reported")
    busy: list[str] = Field(
        default_factory=list, description="VMs the node is working on as this report was "
                                          "taken (a provision or removal under way)")
    boot_id: str = Field(default="", max_length=64,
                         description="changes each time the node agent starts")
    seq: int = Field(default=0, ge=0, description="this report's number since boot")
    acked_seq: int = Field(
        default=0, ge=0, description="the last report of this boot the receiving control "
                                     "server answered before this one was taken (0: none)")
    report_interval: float = Field(default=0.0, ge=0,
                                   description="seconds between the node's reports")
    learned: list[LearnedAddress] = Field(
        default_factory=list, max_length=100_000,
        description="addresses direct-mode VMs took from the LAN's DHCP server")
    storage: list[StorageDirReport] | None = Field(
        default=None, max_length=256,
        description="the node's storage directories and their use; None: not reported")
    volumes: list[str] | None = Field(
        default=None, description="ids of every volume on the node; None: not reported")
    generation: int = Field(
        default=0, ge=0, description="a hash of what the node holds (which domains, ports, "
                                     "disks and volumes, not the domains' states): equal "
                                     "generations hold the same things; 0: not tracked")
    delta: bool = Field(
        default=False, description="domains lists only the domains whose state changed "
                                   "since report acked_seq; ports, disks and volumes are "
                                   "omitted (what the node holds is still that of "
                                   "generation), storage and learned only when changed")

    @model_validator(mode="after")
    def _delta_needs_a_base(self) -> NodeReport:
        if self.delta and (self.full or not self.generation or not self.acked_seq
                           or self.ports is not None or self.disks is not None):
            raise ValueError(
                f"a delta report of node {self.node_id} needs full=false, a generation and "
                f"an acked_seq to apply to, and no ports or disks (got full={self.full}, "
                f"generation={self.generation}, acked_seq={self.acked_seq})")
        return self


# Serialised without the new fields for a control server that has not said it takes them.
NODE_REPORT_DELTA_FIELDS = frozenset({"generation", "delta"})


class NodeReportAnswer(Message):
    """What the control server answers a report with: the node-wide network settings
    it must hold (applied idempotently; they change as routers come and go).

    The last two fields are sent only to nodes that asked for them (``?deltas=1``), so an
    older node, which refuses unknown fields, still reads the answer."""

    sandbox: SandboxSettings | None = None
    deltas: bool = Field(default=False,
                         description="this control server takes delta reports")
    full_report: bool = Field(
        default=False, description="send the full lists next time: this server has no "
                                   "state of the node to apply a delta to")


class DomainConsole(Message):
    """Where a domain's display and serial log are, as its node tells it."""

    vnc_host: str | None = Field(default=None, description="None: the domain has no display")
    vnc_port: int | None = Field(default=None, ge=1, le=65535)
    serial_log: str | None = Field(default=None, description="the log file on the node")


class ConsoleLog(Message):
    """The tail of what a guest printed on its serial console."""

    text: str


class StopRequest(Message):
    force: bool = False
    timeout: float = Field(default=60.0, ge=0, le=3600)


class ImageLocation(Message):
    """Where a node fetches an image from (the storage server) and what it must hash to."""

    image_id: str
    url: str
    sha256: str
    size: int
    format: str


class NicAttach(Message):
    """Plug one more NIC into a VM already on the node (U-HOTPLUG): its port is made and
    the hypervisor attaches it, live when the domain runs and in its definition."""

    nic: NicSpec
    sandbox: SandboxSettings | None = Field(
        default=None, description="the node's sandbox network, when the NIC is in it")


class ProvisionRequest(Message):
    """Create (idempotently) the disks and domain of a VM on a node, and start it."""

    spec: DomainSpec
    images: list[ImageLocation] = Field(default_factory=list)
    start: bool = True
    sandbox: SandboxSettings | None = Field(
        default=None, description="the node's sandbox network, when a NIC is in it")


class UploadAborted(Message):
    """The storage server tells the control server an upload's stream broke."""

    reason: str = Field(min_length=1, max_length=500)


class VolumeSnapshotInfo(Message):
    name: str
    created_at: datetime | None = None
    vm_state_size: int = 0


class VolumeInfo(Message):
    """A volume as its node holds it."""

    volume_id: str
    path: str = Field(description="the file the hypervisor opens")
    format: str
    size_gb: int = Field(ge=0, description="virtual size")
    allocated_bytes: int = Field(ge=0, description="taken on disk")
    thin: bool = True
    directory: str = Field(description="the storage directory it lives in")
    backing_image_id: str | None = None
    snapshots: list[VolumeSnapshotInfo] = Field(default_factory=list)


class VolumeEnsure(Message):
    """Make a volume on a node (idempotent): a blank one, or an overlay/copy of an image
    (fetched into the node's cache first)."""

    disk: DiskSpec
    image: ImageLocation | None = None


class VolumeResize(Message):
    size_gb: int = Field(ge=1, le=65536)


class VolumeExport(Message):
    """Copy a volume into a new image kept by a storage server (F-IMAGE, host images).

    The node makes a self-contained qcow2 copy (no backing file): of the closed volume
    with ``qemu-img convert``, or, when ``live`` and the VM ``vm_uuid`` runs it as disk
    ``disk_id``, a consistent point-in-time copy through the hypervisor while the guest
    goes on writing. It uploads the copy itself to ``storage_url`` (its node
    credentials), which announces the image to the control server as for any upload,
    and removes the copy in every case."""

    image_id: str = Field(description="the new image, recorded as uploading")
    storage_url: str = Field(description="the storage server keeping the image")
    vm_uuid: str | None = Field(default=None, description="the VM the volume belongs to")
    disk_id: str | None = Field(default=None, description="the volume's disk id in that VM")
    live: bool = Field(default=False, description="the VM runs: copy it live")
    name: str = Field(default="", max_length=255, description="the image's name (logs)")


class DiskAttach(Message):
    """Plug a volume into a VM on the node (U-HOTPLUG): live when it runs, and into its
    definition. The volume must exist on the node (or its shared mount)."""

    disk: DiskSpec


class CdromChange(Message):
    """Insert an ISO into the VM's CD drive (cached first), or eject it (``image`` None)."""

    image: ImageLocation | None = None


class StorageServerInfo(Message):
    """What a storage server tells the control server about itself."""

    mode: Literal["local", "shared"] = Field(
        description="the storage mode of the pools it can serve (F-STO-MODEL)")


class StorageImageReport(Message):
    """The storage server tells the control server an upload is stored."""

    image_id: str
    size: int
    sha256: str
    format: str
    virtual_size: int
    # The format the bytes were uploaded in when the store converted them (vmdk -> qcow2).
    source_format: str | None = None
