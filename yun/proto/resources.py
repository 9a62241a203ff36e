"""Public resource models of the REST API, shared by the gateway, the control server and the CLI."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from yun.proto.messages import NAME_PATTERN, CpuQos, NodeCapability, QosSpec
from yun.proto.ssh_keys import parse_public_key

T = TypeVar("T")

ResourceName = Annotated[
    str,
    Field(min_length=1, max_length=63, pattern=NAME_PATTERN,
          description="letters, digits, '.', '_' and '-', starting with a letter or digit; "
                      "at most 63 characters"),
]
Description = Annotated[str, Field(max_length=1024)]
Ref = Annotated[
    str,
    Field(min_length=1, max_length=63, pattern=NAME_PATTERN,
          description="a resource's uuid or name"),
]
TAG_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$"
SYSTEM_TAG_PREFIX = "sys:"
TagKey = Annotated[str, Field(min_length=1, max_length=64, pattern=TAG_KEY_PATTERN)]
TagValue = Annotated[str, Field(max_length=255)]
Tags = Annotated[
    dict[TagKey, TagValue],
    Field(max_length=50, description="key=value labels; keys starting with 'sys:' are the "
                                     "platform's own and cannot be set through the API"),
]


def user_tags(tags: dict[str, str]) -> dict[str, str]:
    """``tags`` after refusing the keys reserved to the platform (Z-TAG)."""
    reserved = sorted(k for k in tags if k.lower().startswith(SYSTEM_TAG_PREFIX))
    if reserved:
        raise ValueError(f"tag keys starting with '{SYSTEM_TAG_PREFIX}' are reserved to the "
                         f"platform: {', '.join(reserved)}")
    return tags


class Input(BaseModel):
    """A request body: unknown fields are refused, so a typo is reported, not ignored."""

    model_config = ConfigDict(extra="forbid")


class Named(BaseModel):
    """Fields every resource shares."""

    model_config = ConfigDict(from_attributes=True)

    uuid: str
    name: str
    description: str = ""
    tags: dict[str, str] = Field(default_factory=dict)
    created_at: datetime
    updated_at: datetime


class Resource(Named):
    """A resource owned by a project (VMs, images)."""

    project_uuid: str | None = Field(default=None, description="the project owning it")


class Page(BaseModel, Generic[T]):
    """One page of a list. ``total`` is given when asked for with ``count=true``;
    ``next_cursor`` continues after the last item (None on the last page)."""

    items: list[T]
    total: int | None = None
    limit: int
    offset: int = 0
    next_cursor: str | None = None


class TagsUpdate(Input):
    """Change a resource's tags: ``set`` adds or replaces, ``remove`` deletes keys."""

    set: Tags = Field(default_factory=dict)
    remove: list[TagKey] = Field(default_factory=list, max_length=50)

    @field_validator("set")
    @classmethod
    def _not_reserved(cls, value: dict[str, str]) -> dict[str, str]:
        return user_tags(value)

    @field_validator("remove")
    @classmethod
    def _not_reserved_keys(cls, value: list[str]) -> list[str]:
        user_tags(dict.fromkeys(value, ""))
        return value


class TaggedInput(Input):
    """A request body carrying user tags (never ``sys:`` ones)."""

    tags: Tags = Field(default_factory=dict)

    @field_validator("tags")
    @classmethod
    def _not_reserved(cls, value: dict[str, str]) -> dict[str, str]:
        return user_tags(value)


class TagsReplace(TaggedInput):
    """Replace every tag of a resource that is not a platform (``sys:``) tag."""


# --- nodes --------------------------------------------------------------------------


class NodeStatus(StrEnum):
    UP = "up"
    DOWN = "down"


class NodeAdminState(StrEnum):
    """``active``: gets new VMs; ``drained``: keeps its VMs, gets no new one (F-1PN)."""

    ACTIVE = "active"
    DRAINED = "drained"


class ResourceClass(StrEnum):
    VCPU = "vcpu"
    MEMORY_MB = "memory_mb"
    DISK_GB = "disk_gb"


class Inventory(BaseModel):
    """One resource class of a node: what VMs may use is ``(total - reserved) * ratio``."""

    resource_class: ResourceClass
    total: int = Field(description="what the host has")
    reserved: int = Field(description="kept for the host itself")
    ratio: float = Field(description="the overcommit ratio of the node's pool (1.0 unassigned)")
    usable: int = Field(description="(total - reserved) * ratio")
    used: int = Field(description="held by VMs placed on the node")
    free: int


class NodeLoad(BaseModel):
    """The latest load a node reported (kept in memory by the control server)."""

    cpu: float = Field(description="busy fraction of the host's CPUs, 0..1")
    memory_used_mb: int
    disk_used_gb: int
    net: float = Field(description="busy fraction of the uplink, 0..1")
    reported_at: datetime | None = None


class StorageDir(BaseModel):
    """One storage directory of a node (or its shared mount) and its use."""

    path: str
    shared: bool = False
    total_bytes: int
    used_bytes: int
    used_percent: float = Field(description="used / total, in percent")
    volumes: int = 0
    allocated_bytes: int = Field(default=0, description="what Yun volumes take on disk")
    over_threshold: bool = False


class Node(Named):
    url: str
    status: NodeStatus
    admin_state: NodeAdminState = NodeAdminState.ACTIVE
    pool_uuid: str | None = Field(default=None, description="None: unassigned")
    pool_name: str | None = None
    labels: dict[str, str] = Field(default_factory=dict,
                                   description="matched by a VM's node_labels (aggregates)")
    capabilities: list[NodeCapability] = Field(default_factory=list)
    hypervisor: str
    accel: str
    vcpus: int
    memory_mb: int
    disk_gb: int
    vcpus_reserved: int = Field(description="vCPUs held by VMs on the node")
    memory_reserved_mb: int = Field(description="memory held by VMs on the node")
    disk_reserved_gb: int = Field(description="disk held by VMs on the node")
    inventory: list[Inventory] = Field(default_factory=list)
    load: NodeLoad | None = None
    cpu_load: float
    memory_used_mb: int
    sandbox_subnet: str | None = Field(default=None,
                                       description="the node's sandbox subnet (F-NET-SANDBOX)")
    last_report_at: datetime | None = None
    vm_count: int = 0
    storage: list[StorageDir] = Field(default_factory=list,
                                      description="the node's storage directories as last "
                                                  "reported (F-STO-LOCAL, F-THIN)")



NodeLabelKey = Annotated[str, Field(min_length=1, max_length=63,
                                    pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")]
NodeLabels = Annotated[dict[NodeLabelKey, Annotated[str, Field(max_length=63)]],
                       Field(max_length=32)]


class NodeLabelsUpdate(Input):
    """Replace a node's labels."""

    labels: NodeLabels


# --- zones and compute pools ---------------------------------------------------------


class ZoneCreate(TaggedInput):
    name: ResourceName
    description: Description = ""


class ZoneUpdate(Input):
    description: Description | None = None


class Zone(Named):
    pool_count: int = 0


class NetworkMode(StrEnum):
    """How a pool's VMs are networked (F-NET-*; implemented by the networks issue)."""

    DIRECT = "direct"
    SANDBOX_PRIVATE = "sandbox-private"
    SANDBOX_MONO = "sandbox-mono"
    SANDBOX_SHARE = "sandbox-share"


class StorageMode(StrEnum):
    LOCAL = "local"
    SHARED = "shared"


Ratio = Annotated[float, Field(gt=0, le=64, description="overcommit ratio, > 0 and <= 64")]
Weight = Annotated[float, Field(ge=0, le=100)]


class PoolTemplate(Input):
    """The template fields of a pool; None in an update leaves a field as it is."""

    description: Description | None = None
    network_mode: NetworkMode | None = None
    storage_mode: StorageMode | None = None
    thin: bool | None = Field(default=None, description="thin-provisioned disks")
    backing: bool | None = Field(
        default=None, description="shared mode: VMs are overlays on one read-only base "
                                  "image (F-BACKING); refused in local mode")
    ha: bool | None = Field(default=None, description="restart VMs elsewhere when a node fails")
    address_pool: Ref | None = Field(
        default=None, description="the linked address pool (a reference until networks land)")
    qos_level: CpuQos | None = Field(default=None, description="CPU QoS of new VMs")
    cpu_ratio: Ratio | None = None
    memory_ratio: Ratio | None = None
    disk_ratio: Ratio | None = None
    filters: list[Annotated[str, Field(max_length=63)]] | None = Field(
        default=None, max_length=32, description="scheduler filters, by name, in order")
    weights: dict[Annotated[str, Field(max_length=63)], Weight] | None = Field(
        default=None, max_length=32, description="scheduler weighers by name, with weights")


class PoolCreate(PoolTemplate, TaggedInput):
    name: ResourceName
    zone: Ref | None = Field(default=None, description="zone uuid or name; default: 'default'")


class PoolUpdate(PoolTemplate):
    zone: Ref | None = None


class PoolCapacity(BaseModel):
    resource_class: ResourceClass
    usable: int
    used: int
    free: int


class Pool(Named):
    zone_uuid: str
    zone_name: str | None = None
    network_mode: NetworkMode
    storage_mode: StorageMode
    thin: bool
    backing: bool = False
    ha: bool
    address_pool: str | None = None
    qos_level: CpuQos
    cpu_ratio: float
    memory_ratio: float
    disk_ratio: float
    filters: list[str]
    weights: dict[str, float]
    node_count: int = 0
    vm_count: int = 0
    capacity: list[PoolCapacity] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)


class PoolNodeAdd(Input):
    node: Ref


# --- address pools and elastic IPs (F-ADDR) -------------------------------------------


class AddressPoolKind(StrEnum):
    """What an address pool hands out: whole public addresses (mono VMs and elastic IPs)
    or public ports of shared addresses (share VMs)."""

    EXCLUSIVE = "exclusive"
    SHARED = "shared"


IpText = Annotated[str, Field(min_length=1, max_length=64, description="an IPv4 address")]


class AddressRangeCreate(Input):
    """Addresses ``first_ip``..``last_ip`` (inclusive) and, in a shared pool, ports
    ``first_port``..``last_port`` on each of them. Checked by the service (400 naming
    what is wrong), not here, so every mistake gets the same kind of answer."""

    first_ip: IpText
    last_ip: IpText
    first_port: int | None = Field(default=None, description="shared pools only, 1..65535")
    last_port: int | None = Field(default=None, description="shared pools only, 1..65535")


class AddressRange(BaseModel):
    uuid: str
    first_ip: str
    last_ip: str
    first_port: int | None = None
    last_port: int | None = None
    total: int = Field(description="addresses (exclusive) or address:port pairs (shared)")
    used: int = 0


class AddressPoolCreate(TaggedInput):
    name: ResourceName
    description: Description = ""
    kind: AddressPoolKind
    network: Annotated[str, Field(max_length=64)] | None = Field(
        default=None, description="the pool's network (CIDR); default: the smallest "
                                  "network holding the first range")
    ranges: list[AddressRangeCreate] = Field(min_length=1, max_length=64)


class AddressPoolUpdate(Input):
    description: Description | None = None


class AddressPool(Named):
    kind: AddressPoolKind
    network: str
    ranges: list[AddressRange] = Field(default_factory=list)
    total: int = Field(default=0, description="addresses (exclusive) or address:port "
                                              "pairs (shared) of all its ranges")
    used: int = 0
    free: int = 0
    compute_pools: list[str] = Field(default_factory=list,
                                     description="names of the compute pools linked to it")


class ElasticIpAllocate(TaggedInput):
    """Allocate a whole public address of an exclusive pool to the token's project."""

    address_pool: Ref
    name: ResourceName | None = Field(default=None, description="default: eip-<address>")
    description: Description = ""


class ElasticIpBind(Input):
    vm: Ref


class ElasticIp(Resource):
    ip: str
    address_pool_uuid: str
    address_pool_name: str | None = None
    vm_uuid: str | None = Field(default=None, description="the VM it is bound to, if any")
    vm_name: str | None = None


# --- VM groups (affinity) ------------------------------------------------------------


class GroupPolicy(StrEnum):
    AFFINITY = "affinity"
    ANTI_AFFINITY = "anti-affinity"


class VmGroupCreate(TaggedInput):
    name: ResourceName
    description: Description = ""
    policy: GroupPolicy


class VmGroup(Resource):
    policy: GroupPolicy
    members: list[str] = Field(default_factory=list, description="uuids of its VMs")


# --- images -------------------------------------------------------------------------


class ImageStatus(StrEnum):
    UPLOADING = "uploading"
    ACTIVE = "active"
    ERROR = "error"
    DELETING = "deleting"


class ImageFormat(StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"
    VMDK = "vmdk"
    VDI = "vdi"
    VHDX = "vhdx"
    VPC = "vpc"
    ISO = "iso"


class ImageVisibility(StrEnum):
    PROJECT = "project"
    PUBLIC = "public"


SHA256_PATTERN = r"^[0-9a-fA-F]{64}$"


class ImageCreate(TaggedInput):
    name: ResourceName
    description: Description = ""
    format: ImageFormat | None = Field(
        default=None, description="declared format; required only for raw disks")
    visibility: ImageVisibility = Field(
        default=ImageVisibility.PROJECT,
        description="'public' images are seen by every project (set by administrators)")
    sha256: str | None = Field(
        default=None, pattern=SHA256_PATTERN,
        description="sha256 of the bytes to be uploaded (64 hex digits); the upload is "
                    "refused if the bytes received differ")

    @field_validator("sha256")
    @classmethod
    def _lower_sha256(cls, value: str | None) -> str | None:
        return value.lower() if value else value


class ImageFromVm(TaggedInput):
    """A new image made of a VM's disk (F-IMAGE): its root volume unless ``disk`` names
    another of its volumes (a disk id such as ``vol-1a2b3c4d``, or a volume's uuid or
    name). The VM may run (a consistent live copy) or be stopped."""

    vm: str = Field(min_length=1, max_length=255, description="the VM (name or uuid)")
    name: ResourceName
    description: Description = ""
    visibility: ImageVisibility = Field(
        default=ImageVisibility.PROJECT,
        description="'public' images are seen by every project (set by administrators)")
    disk: str | None = Field(
        default=None, min_length=1, max_length=255,
        description="the VM's disk to copy: a disk id, or a volume uuid or name "
                    "(default: the root disk)")


class ImageUpdate(Input):
    """What can change on an image after its upload."""

    description: Description | None = None
    protected: bool | None = Field(
        default=None, description="a protected image cannot be deleted until unprotected")


class Image(Resource):
    status: ImageStatus
    visibility: ImageVisibility = ImageVisibility.PROJECT
    format: str | None = Field(default=None, description="the format it is stored in")
    source_format: str | None = Field(
        default=None, description="the format it was uploaded in, when it was converted "
                                  "(vmdk, vdi, vhdx, vpc are stored as qcow2)")
    size: int | None = None
    virtual_size: int | None = None
    sha256: str | None = Field(default=None, description="sha256 of the stored file")
    expected_sha256: str | None = Field(
        default=None, description="the sha256 the uploader announced for its bytes")
    protected: bool = False
    error: str | None = None


class ImageUploadStatus(BaseModel):
    """How far an upload has come: resume it by sending bytes from ``offset``."""

    image_id: str
    offset: int = Field(description="bytes the storage server holds; the next byte to send")
    total: int | None = Field(default=None, description="the declared size of the upload")
    complete: bool = Field(default=False, description="the image is stored")


class ImageUploadTicket(BaseModel):
    """Where the gateway streams an image's bytes: a storage server chosen by the control server."""

    image: Image
    storage_url: str
    existing: bool = Field(
        default=False, description="a retried keyed upload: the image is already stored")


# --- tasks --------------------------------------------------------------------------


class TaskState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    ROLLING_BACK = "rolling_back"
    FAILED = "failed"


class TaskStep(BaseModel):
    name: str
    state: str
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None


class Task(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    uuid: str
    kind: str
    resource_type: str
    resource_uuid: str
    project_uuid: str | None = None
    state: TaskState
    current_step: str | None = None
    error: str | None = None
    steps: list[TaskStep] = Field(default_factory=list)
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None


# --- virtual machines ---------------------------------------------------------------


class VmState(StrEnum):
    BUILDING = "building"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    STARTING = "starting"
    REBOOTING = "rebooting"
    DELETING = "deleting"
    ERROR = "error"
    UNKNOWN = "unknown"


#: the most user data a VM may be given (the NoCloud seed's ``user-data``), in bytes
MAX_USER_DATA = 65536
#: the most SSH keys a VM may be given at create
MAX_VM_SSH_KEYS = 32
ImageRef = Annotated[str, Field(min_length=1, max_length=63, description="image uuid or name")]
SshKeyEntry = Annotated[str, Field(
    min_length=1, max_length=8192,
    description="the name of one of your SSH keys (`/ssh-keys`) or a public key line")]


class VmCreate(TaggedInput):
    """A VM to make: from a disk ``image``, or blank from an ``iso`` (F-ISO), or both (it
    boots from its disk with the ISO in its CD drive). ``ssh_keys`` and ``user_data``
    reach the guest through cloud-init (a NoCloud seed every VM gets)."""

    name: ResourceName
    description: Description = ""
    image: ImageRef | None = Field(
        default=None, description="disk image uuid or name; none: a blank disk of disk_gb "
                                  "(then give an iso to install from)")
    iso: ImageRef | None = Field(
        default=None, description="ISO image uuid or name for its CD drive; without an "
                                  "image the VM boots from it")
    ssh_keys: list[SshKeyEntry] = Field(default_factory=list, max_length=MAX_VM_SSH_KEYS)
    user_data: str | None = Field(
        default=None, description=f"cloud-init user data (cloud-config or a script), at most "
                                  f"{MAX_USER_DATA} bytes; never shown again")
    vcpus: int = Field(default=1, ge=1, le=64)
    memory_mb: int = Field(default=256, ge=64, le=1024 * 1024)
    disk_gb: int = Field(default=1, ge=1, le=16384)
    pool: Ref | None = Field(default=None, description="compute pool; default: 'default'")
    zone: Ref | None = Field(default=None,
                             description="a zone instead of a pool: the scheduler picks a pool")
    group: Ref | None = Field(default=None, description="affinity or anti-affinity VM group")
    node_labels: NodeLabels = Field(
        default_factory=dict, description="only nodes carrying all these labels")
    bandwidth_kbit: int | None = Field(
        default=None, ge=8, le=100_000_000, description="NIC bandwidth limit, kbit/s each way")

    @field_validator("user_data")
    @classmethod
    def _user_data_size(cls, value: str | None) -> str | None:
        if value is not None and len(value.encode()) > MAX_USER_DATA:
            raise ValueError(f"user_data is {len(value.encode())} bytes; at most "
                             f"{MAX_USER_DATA} (64 KiB) are allowed")
        return value

    @model_validator(mode="after")
    def _boot_source(self) -> VmCreate:
        if self.image is None and self.iso is None:
            raise ValueError("give an image to boot from, or an iso to install from (a "
                             "blank VM), or both")
        return self


class CdromInsert(Input):
    """The ISO to put into a VM's CD drive (its uuid or name)."""

    image: ImageRef


class VmQosUpdate(Input):
    """Change a VM's QoS; fields left out keep their value, ``clear`` lists limits to lift."""

    cpu: CpuQos | None = None
    read_iops_sec: int | None = Field(default=None, ge=1, le=1_000_000)
    write_iops_sec: int | None = Field(default=None, ge=1, le=1_000_000)
    read_bytes_sec: int | None = Field(default=None, ge=4096, le=1 << 40)
    write_bytes_sec: int | None = Field(default=None, ge=4096, le=1 << 40)
    bandwidth_kbit: int | None = Field(default=None, ge=8, le=100_000_000)
    clear: list[Literal["read_iops_sec", "write_iops_sec", "read_bytes_sec",
                        "write_bytes_sec", "bandwidth_kbit"]] = Field(
        default_factory=list, max_length=5)


class VmStop(Input):
    force: bool = False
    timeout: float = Field(default=60.0, ge=0, le=3600)


class PortForwardCreate(BaseModel):
    """Reach a port of a VM from outside: a NAT port of its node (sandbox-private) or a
    public ip:port of its pool's shared address pool (sandbox-share)."""

    model_config = ConfigDict(extra="forbid")

    port: int = Field(ge=1, le=65535, description="the VM's port")
    protocol: Literal["tcp", "udp"] = "tcp"


class PortForward(BaseModel):
    """``address:port`` reaches ``vm_port`` of the VM."""

    protocol: str
    vm_port: int
    address: str = Field(description="the node's LAN address (private) or the public "
                                     "address (share)")
    port: int


class VmAddress(BaseModel):
    """An extra address of a sandbox VM, of its node's subnet, routed to its NIC
    (U-HOTPLUG); the guest configures it itself."""

    ip: str


class VmNicCreate(Input):
    """A NIC to plug into a VM (U-HOTPLUG). Both fields default to the VM's pool: a
    hot-plugged NIC is on the VM's network, and in sandbox mode it is private (it gets
    an address of the node's sandbox subnet and no public address or port)."""

    network: Literal["sandbox", "direct"] | None = Field(
        default=None, description="the VM's network (the only one allowed); default: it")
    exposure: Literal["private"] | None = Field(
        default=None, description="sandbox: a hot-plugged NIC is always private")


class VmNic(BaseModel):
    """A NIC of a VM: the primary one (``index`` 0, made with the VM) or one plugged in
    later."""

    index: int = Field(description="0: the primary NIC; 1, 2, ...: NICs plugged in later")
    uuid: str | None = Field(default=None, description="the plugged NIC's id (None for the "
                                                       "primary one)")
    vm_uuid: str
    mac: str | None
    network: str = Field(description="sandbox or direct")
    exposure: str | None = Field(default=None, description="sandbox: private, mono or share")
    ip: str | None = Field(default=None, description="sandbox: its address in the node's "
                           "subnet; direct: None (the LAN's DHCP server gives one)")
    primary: bool = False


class Vm(Resource):
    state: VmState
    vcpus: int
    memory_mb: int
    disk_gb: int
    image_uuid: str | None = Field(default=None, description="None: a blank VM (from an ISO)")
    cdrom_image_uuid: str | None = Field(default=None,
                                         description="the ISO in its CD drive, if any")
    boot: Literal["disk", "cdrom"] = "disk"
    ssh_key_fingerprints: list[str] = Field(
        default_factory=list, description="the SSH keys given to the guest (SHA256)")
    user_data_size: int | None = Field(
        default=None, description="bytes of user data given at create (None: none); the "
                                  "data itself is never shown: it may hold secrets")
    user_data_sha256: str | None = None
    pool_uuid: str | None = None
    pool_name: str | None = None
    group_uuid: str | None = None
    node_labels: dict[str, str] = Field(default_factory=dict)
    qos: QosSpec = Field(default_factory=QosSpec, description="the VM's QoS limits")
    node_uuid: str | None = None
    node_name: str | None = None
    ip: str | None = Field(default=None, description="sandbox: its address in its node's "
                           "subnet; direct: the address it took from the LAN's DHCP server")
    mac: str | None = None
    extra_ips: list[str] = Field(default_factory=list,
                                 description="more addresses of its node's subnet (hot-plug)")
    network_mode: str | None = None
    public_ip: str | None = Field(default=None, description="sandbox-mono: its own public "
                                  "address")
    port_forwards: list[PortForward] = Field(default_factory=list)
    power_state: str | None = None
    task_uuid: str | None = None
    error: str | None = None


# --- volumes (C-STO) and events ----------------------------------------------------------


class VolumeKind(StrEnum):
    ROOT = "root"
    DATA = "data"


class VolumeStatus(StrEnum):
    """``available``: attached to no VM; ``in-use``: attached to one."""

    AVAILABLE = "available"
    IN_USE = "in-use"
    ERROR = "error"


class VolumeCreate(TaggedInput):
    """A data volume. It is made on a node when first attached (in local mode on the node
    of that VM); ``vm`` attaches it at once."""

    name: ResourceName
    description: Description = ""
    size_gb: int = Field(ge=1, le=65536)
    pool: Ref | None = Field(default=None, description="compute pool whose storage it uses; "
                             "default: the pool of `vm`, else 'default'")
    thin: bool | None = Field(default=None, description="thin (grows with use) or thick "
                              "(preallocated); default: the pool's setting")
    vm: Ref | None = Field(default=None, description="attach it to this VM at once")
    delete_with_vm: bool = Field(default=False,
                                 description="deleted with the VM it is attached to")


class VolumeAttach(Input):
    vm: Ref = Field(description="the VM to attach the volume to")
    delete_with_vm: bool | None = Field(default=None, description="deleted with that VM; "
                                        "default: as it was")


class VolumeResize(Input):
    size_gb: int = Field(ge=1, le=65536, description="the new size: larger than the current")


class VolumeSnapshotCreate(Input):
    name: ResourceName


class VolumeSnapshot(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    uuid: str
    volume_uuid: str
    name: str
    size_gb: int = Field(description="the volume's size when it was taken")
    created_at: datetime


class Volume(Resource):
    kind: VolumeKind
    size_gb: int
    thin: bool
    storage_mode: StorageMode
    status: VolumeStatus
    pool_uuid: str | None = None
    pool_name: str | None = None
    node_uuid: str | None = Field(default=None, description="the node holding it (local "
                                  "mode) or that last used it; None: not made yet")
    node_name: str | None = None
    vm_uuid: str | None = None
    vm_name: str | None = None
    disk_id: str | None = Field(default=None, description="its disk id inside the VM")
    image_uuid: str | None = None
    delete_with_vm: bool = True
    snapshot_count: int = 0
    error: str | None = None


class EventState(StrEnum):
    RAISED = "raised"
    CLEARED = "cleared"
    INFO = "info"


class Event(BaseModel):
    """An alarm raised or cleared, or a notice (e.g. a storage directory past its
    threshold, F-THIN)."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    kind: str
    severity: str
    state: EventState
    resource_type: str
    resource_uuid: str | None = None
    message: str
    data: dict[str, Any] = Field(default_factory=dict)


class Accepted(BaseModel):
    """The answer to a long operation: the resource as it is now and the task to watch.

    ``task`` is None when nothing had to be done (a VM asked to start that already
    runs); ``message`` then says so."""

    task: Task | None
    resource: dict[str, Any]
    message: str | None = None


class Console(BaseModel):
    vm_uuid: str
    node_name: str | None
    vnc_host: str | None
    vnc_port: int | None
    serial_log: str | None


# --- SSH keys -------------------------------------------------------------------------


class SshKeyCreate(Input):
    """One of your SSH public keys, for the guests you create (``ssh_keys`` of a VM)."""

    name: ResourceName
    public_key: str = Field(min_length=1, max_length=8192,
                            description="one line of a .pub file: type, base64 data, "
                                        "comment (ssh-ed25519, ssh-rsa, ecdsa-sha2-*)")

    @field_validator("public_key")
    @classmethod
    def _parses(cls, value: str) -> str:
        return parse_public_key(value).line


class SshKey(BaseModel):
    """A stored SSH public key."""

    model_config = ConfigDict(from_attributes=True)

    uuid: str
    name: str
    public_key: str
    fingerprint: str = Field(description="SHA256:…, as ssh-keygen -l shows it")
    user_uuid: str
    project_uuid: str
    created_at: datetime
    updated_at: datetime
