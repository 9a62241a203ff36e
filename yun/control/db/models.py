"""Tables of the control server. Every change to them goes through an Alembic migration."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import DateTime, TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back timezone-aware, on SQLite too."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC) if dialect.name != "sqlite" else value.astimezone(
            UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Stamped:
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=utcnow, onupdate=utcnow
    )


class ZoneRow(Stamped, Base):
    """A zone (F-PUB): a group of compute pools, e.g. one data centre."""

    __tablename__ = "zones"

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")


class PoolRow(Stamped, Base):
    """A compute pool (F-POOL): a set of nodes and the template of the VMs placed on them."""

    __tablename__ = "pools"

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    zone_uuid: Mapped[str] = mapped_column(ForeignKey("zones.uuid", ondelete="RESTRICT"),
                                           index=True)
    network_mode: Mapped[str] = mapped_column(String(32))
    storage_mode: Mapped[str] = mapped_column(String(16))
    thin: Mapped[bool] = mapped_column(Boolean, default=True)
    # Shared mode: VMs are qcow2 overlays on one read-only base per image (F-BACKING).
    backing: Mapped[bool] = mapped_column(Boolean, default=False)
    ha: Mapped[bool] = mapped_column(Boolean, default=False)
    # The address pool mono and share VMs take their public addresses or ports from.
    address_pool_uuid: Mapped[str | None] = mapped_column(
        ForeignKey("address_pools.uuid", ondelete="RESTRICT"), index=True)
    qos_level: Mapped[str] = mapped_column(String(16))
    cpu_ratio: Mapped[float] = mapped_column(Float)
    memory_ratio: Mapped[float] = mapped_column(Float)
    disk_ratio: Mapped[float] = mapped_column(Float)
    filters: Mapped[list[str]] = mapped_column(JSON, default=list)
    weights: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)


class NodeRow(Stamped, Base):
    """A node as it last reported itself; its capacity is in ``node_inventories``."""

    __tablename__ = "nodes"

    uuid: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(63))
    description: Mapped[str] = mapped_column(Text, default="")
    url: Mapped[str] = mapped_column(String(2048))
    status: Mapped[str] = mapped_column(String(16), default="up")
    # active: gets new VMs; drained: keeps its VMs and gets no new one (F-1PN).
    admin_state: Mapped[str] = mapped_column(String(16), default="active")
    # None: unassigned, until an administrator adds it to a pool.
    pool_uuid: Mapped[str | None] = mapped_column(
        ForeignKey("pools.uuid", ondelete="RESTRICT"), index=True)
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    capabilities: Mapped[list[str]] = mapped_column(JSON, default=list)
    hypervisor: Mapped[str] = mapped_column(String(32))
    accel: Mapped[str] = mapped_column(String(16))
    # The latest load, as last persisted: the live figures are kept in memory by the
    # node registry and written here in batches (not once per report).
    cpu_load: Mapped[float] = mapped_column(Float, default=0.0)
    memory_used_mb: Mapped[int] = mapped_column(Integer, default=0)
    disk_used_gb: Mapped[int] = mapped_column(Integer, default=0)
    net_load: Mapped[float] = mapped_column(Float, default=0.0)
    # The node's sandbox subnet, given by the control server when the node registers
    # (unique: routers route each node's subnet to it).
    sandbox_subnet: Mapped[str | None] = mapped_column(String(64), unique=True)
    #: where the node's NAT ports answer (F-SB-PRIVATE); None: the host of ``url``
    forward_address: Mapped[str | None] = mapped_column(String(64))
    #: the storage directories as last reported (StorageDirReport dumps)
    storage: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    last_report_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class InventoryRow(Base):
    """What one node has of one resource class (as Nova's placement keeps inventories).

    VMs may use ``(total - reserved) * ratio`` where the ratio is the node's pool's;
    ``used`` is the sum of the allocations on the node, claimed by a conditional UPDATE."""

    __tablename__ = "node_inventories"

    node_uuid: Mapped[str] = mapped_column(ForeignKey("nodes.uuid", ondelete="CASCADE"),
                                           primary_key=True)
    resource_class: Mapped[str] = mapped_column(String(32), primary_key=True)
    total: Mapped[int] = mapped_column(BigInteger)
    reserved: Mapped[int] = mapped_column(BigInteger, default=0)
    used: Mapped[int] = mapped_column(BigInteger, default=0)


class AllocationRow(Base):
    """What one consumer (a VM) holds of one resource class on one node."""

    __tablename__ = "allocations"

    consumer_uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    resource_class: Mapped[str] = mapped_column(String(32), primary_key=True)
    node_uuid: Mapped[str] = mapped_column(String(64), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)


class VmGroupRow(Stamped, Base):
    """An affinity or anti-affinity group of a project's VMs."""

    __tablename__ = "vm_groups"

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    project_uuid: Mapped[str] = mapped_column(ForeignKey("projects.uuid", ondelete="RESTRICT"),
                                              index=True)
    policy: Mapped[str] = mapped_column(String(16))


class ImageRow(Stamped, Base):
    __tablename__ = "images"

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    project_uuid: Mapped[str] = mapped_column(ForeignKey("projects.uuid", ondelete="RESTRICT"),
                                              index=True)
    visibility: Mapped[str] = mapped_column(String(16), default="project")
    # sha256 of (user, Idempotency-Key) of the upload that made it: a retried upload
    # finds its image instead of making a second one (U-IDEMP).
    upload_key: Mapped[str | None] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16))
    declared_format: Mapped[str | None] = mapped_column(String(16))
    format: Mapped[str | None] = mapped_column(String(16))
    size: Mapped[int | None] = mapped_column(BigInteger)
    virtual_size: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    storage_uuid: Mapped[str | None] = mapped_column(String(64))
    storage_url: Mapped[str | None] = mapped_column(String(2048))
    error: Mapped[str | None] = mapped_column(Text)
    # A protected image cannot be deleted until it is unprotected.
    protected: Mapped[bool] = mapped_column(Boolean, default=False)
    # The sha256 the uploader announced: the upload is refused when the bytes differ.
    expected_sha256: Mapped[str | None] = mapped_column(String(64))
    # The format the bytes came in, when the store converted them (vmdk -> qcow2).
    source_format: Mapped[str | None] = mapped_column(String(16))


class VmRow(Stamped, Base):
    __tablename__ = "vms"
    __table_args__ = (Index("ix_vms_node_uuid", "node_uuid"),
                      Index("ix_vms_updated_at", "updated_at"),
                      # Lists are read newest first (migration 0010).
                      Index("ix_vms_created", "created_at", "uuid"),
                      Index("ix_vms_project_created", "project_uuid", "created_at", "uuid"))

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    project_uuid: Mapped[str] = mapped_column(ForeignKey("projects.uuid", ondelete="RESTRICT"),
                                              index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    power_state: Mapped[str | None] = mapped_column(String(16))
    vcpus: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    disk_gb: Mapped[int] = mapped_column(Integer)
    # None: a blank VM (installed from an ISO, F-ISO).
    image_uuid: Mapped[str | None] = mapped_column(
        ForeignKey("images.uuid", ondelete="RESTRICT"))
    node_uuid: Mapped[str | None] = mapped_column(String(64))
    pool_uuid: Mapped[str | None] = mapped_column(
        ForeignKey("pools.uuid", ondelete="RESTRICT"), index=True)
    group_uuid: Mapped[str | None] = mapped_column(
        ForeignKey("vm_groups.uuid", ondelete="RESTRICT"), index=True)
    node_labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    qos: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The primary NIC: sandbox, its lease on the node; direct, the address the node saw
    # the VM take from the LAN's DHCP server (None until then).
    ip: Mapped[str | None] = mapped_column(String(64))
    mac: Mapped[str | None] = mapped_column(String(17))
    # More addresses of the node's sandbox subnet routed to the primary NIC (hot-plug).
    extra_ips: Mapped[list[str]] = mapped_column(JSON, default=list)
    task_uuid: Mapped[str | None] = mapped_column(String(36))
    error: Mapped[str | None] = mapped_column(Text)
    # The scoped Idempotency-Key of the create that made the VM: a create carried out
    # again after a control server crash finds its VM instead of making a second one.
    idempotency_key: Mapped[str | None] = mapped_column(String(64), unique=True)
    # The node must hold nothing for this VM (its create failed, its domain vanished, or
    # it was deleted while the node was down): what the node still holds for it is an
    # orphan, and its address and reservation are released once a report of the node
    # shows nothing left for it (see yun.control.services.nodes).
    node_cleanup: Mapped[bool] = mapped_column(Boolean, default=False)
    # The ISO in its CD drive (F-ISO), and what it boots from.
    cdrom_image_uuid: Mapped[str | None] = mapped_column(
        ForeignKey("images.uuid", ondelete="RESTRICT"), index=True)
    boot: Mapped[str] = mapped_column(String(8), default="disk")
    # Guest customisation (cloud-init NoCloud): the public keys and user data given at
    # create, as they were then (a key deleted later stays in the guest).
    ssh_keys: Mapped[list[str]] = mapped_column(JSON, default=list)
    user_data: Mapped[str | None] = mapped_column(Text)


class VolumeRow(Stamped, Base):
    """A volume (C-STO): a VM's root disk or a data volume, kept by volume so it can
    outlive its VM and, in shared mode, move between the nodes of its pool."""

    __tablename__ = "volumes"
    __table_args__ = (UniqueConstraint("vm_uuid", "disk_id", name="uq_volumes_vm_disk"),
                      # Lists are read newest first (migration 0010).
                      Index("ix_volumes_created", "created_at", "uuid"),
                      Index("ix_volumes_project_created", "project_uuid", "created_at",
                            "uuid"))

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    project_uuid: Mapped[str] = mapped_column(ForeignKey("projects.uuid", ondelete="RESTRICT"),
                                              index=True)
    pool_uuid: Mapped[str | None] = mapped_column(
        ForeignKey("pools.uuid", ondelete="RESTRICT"), index=True)
    # Local mode: the node that holds the file; shared mode: the node that last used it.
    node_uuid: Mapped[str | None] = mapped_column(String(64), index=True)
    vm_uuid: Mapped[str | None] = mapped_column(String(36), index=True)
    disk_id: Mapped[str | None] = mapped_column(String(64))  # its id inside the VM
    kind: Mapped[str] = mapped_column(String(8))  # root | data
    size_gb: Mapped[int] = mapped_column(Integer)
    thin: Mapped[bool] = mapped_column(Boolean, default=True)
    storage_mode: Mapped[str] = mapped_column(String(16))
    image_uuid: Mapped[str | None] = mapped_column(
        ForeignKey("images.uuid", ondelete="RESTRICT"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    delete_with_vm: Mapped[bool] = mapped_column(Boolean, default=True)
    task_uuid: Mapped[str | None] = mapped_column(String(36))
    error: Mapped[str | None] = mapped_column(Text)


class VolumeSnapshotRow(Base):
    __tablename__ = "volume_snapshots"
    __table_args__ = (UniqueConstraint("volume_uuid", "name",
                                       name="uq_volume_snapshots_volume_name"),)

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    volume_uuid: Mapped[str] = mapped_column(
        ForeignKey("volumes.uuid", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    size_gb: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class SshKeyRow(Stamped, Base):
    """A user's SSH public key, put into the guests they create (cloud-init)."""

    __tablename__ = "ssh_keys"
    __table_args__ = (UniqueConstraint("user_uuid", "name", name="uq_ssh_keys_user_name"),)

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(63))
    user_uuid: Mapped[str] = mapped_column(ForeignKey("users.uuid", ondelete="CASCADE"),
                                           index=True)
    project_uuid: Mapped[str] = mapped_column(
        ForeignKey("projects.uuid", ondelete="CASCADE"), index=True)
    public_key: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(128))


class EventRow(Base):
    """Something operators are told about: an alarm raised or cleared (a storage
    directory past its threshold, F-THIN), listed by the API."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    severity: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))  # raised | cleared | info
    resource_type: Mapped[str] = mapped_column(String(32))
    resource_uuid: Mapped[str | None] = mapped_column(String(64), index=True)
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class AddressRow(Base):
    """An IP handed to a VM NIC; unique within its scope (a node's NAT network)."""

    __tablename__ = "addresses"
    __table_args__ = (UniqueConstraint("scope", "ip", name="uq_addresses_scope_ip"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    scope: Mapped[str] = mapped_column(String(128))
    ip: Mapped[str] = mapped_column(String(64))
    vm_uuid: Mapped[str] = mapped_column(String(36), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class VmNicRow(Base):
    """A NIC added to a VM after its create (U-HOTPLUG); the primary NIC is the VM's own
    ``mac`` and ``ip``. Its address, in sandbox mode, is an ``addresses`` row of the VM."""

    __tablename__ = "vm_nics"
    __table_args__ = (UniqueConstraint("vm_uuid", "idx", name="uq_vm_nics_vm_idx"),)

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    vm_uuid: Mapped[str] = mapped_column(ForeignKey("vms.uuid", ondelete="CASCADE"),
                                         index=True)
    idx: Mapped[int] = mapped_column(Integer)  # 1, 2, ...: the primary NIC is 0
    mac: Mapped[str] = mapped_column(String(17), unique=True)
    ip: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AddressPoolRow(Stamped, Base):
    """An address pool (F-ADDR): public addresses (exclusive) or public ports (shared)
    inside one network, handed to the VMs of the compute pools linked to it."""

    __tablename__ = "address_pools"

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    kind: Mapped[str] = mapped_column(String(16))  # exclusive | shared
    network: Mapped[str] = mapped_column(String(64))  # every range lies inside it


class AddressRangeRow(Base):
    """A range of an address pool: addresses ``first_ip``..``last_ip`` and, in a shared
    pool, ports ``first_port``..``last_port`` on each. Ranges never overlap, in any pool."""

    __tablename__ = "address_ranges"

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    address_pool_uuid: Mapped[str] = mapped_column(
        ForeignKey("address_pools.uuid", ondelete="CASCADE"), index=True)
    first_ip: Mapped[str] = mapped_column(String(64))
    last_ip: Mapped[str] = mapped_column(String(64))
    first_port: Mapped[int | None] = mapped_column(Integer)
    last_port: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class PublicIpRow(Stamped, Base):
    """A public address (``port`` 0) or public port taken from an address pool.

    ``kind`` ``vm``: taken by a VM's create in a mono or share pool, released with it;
    ``eip``: an elastic IP, allocated by a project and bound to VMs as it likes. The
    unique (ip, port, protocol) is what guarantees nothing is handed out twice."""

    __tablename__ = "public_ips"
    __table_args__ = (UniqueConstraint("ip", "port", "protocol",
                                       name="uq_public_ips_ip_port_protocol"),)

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    address_pool_uuid: Mapped[str] = mapped_column(
        ForeignKey("address_pools.uuid", ondelete="RESTRICT"), index=True)
    project_uuid: Mapped[str] = mapped_column(
        ForeignKey("projects.uuid", ondelete="RESTRICT"), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # vm | eip
    ip: Mapped[str] = mapped_column(String(64))
    port: Mapped[int] = mapped_column(Integer, default=0)  # 0: the whole address
    protocol: Mapped[str] = mapped_column(String(8), default="")  # "" | tcp | udp
    vm_uuid: Mapped[str | None] = mapped_column(String(36), index=True)
    vm_port: Mapped[int | None] = mapped_column(Integer)


class NodeForwardRow(Base):
    """A NAT port of a node reaching a port of a private sandbox VM (F-SB-PRIVATE)."""

    __tablename__ = "node_forwards"
    __table_args__ = (
        UniqueConstraint("node_uuid", "protocol", "node_port",
                         name="uq_node_forwards_node_port"),
        UniqueConstraint("vm_uuid", "protocol", "vm_port", name="uq_node_forwards_vm_port"),
    )

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    vm_uuid: Mapped[str] = mapped_column(String(36), index=True)
    node_uuid: Mapped[str] = mapped_column(String(64), index=True)
    protocol: Mapped[str] = mapped_column(String(8))
    node_port: Mapped[int] = mapped_column(Integer)
    vm_port: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class NetworkChangeRow(Base):
    """One change of what the routers must apply. The largest id is the generation of
    the routers' rule set: inserts never contend on one row, as a counter would."""

    __tablename__ = "network_changes"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    subject: Mapped[str] = mapped_column(String(64))  # the VM, address pool or node
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class RouterRow(Stamped, Base):
    """An intelligent router as it last pulled the rule set."""

    __tablename__ = "routers"

    uuid: Mapped[str] = mapped_column(String(64), primary_key=True)  # its component id
    name: Mapped[str] = mapped_column(String(63))
    url: Mapped[str] = mapped_column(String(2048))
    lan_address: Mapped[str] = mapped_column(String(64))
    applied_generation: Mapped[int] = mapped_column(BigInteger, default=0)
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


# The states of a flow that has not ended; a resource has at most one such flow.
UNFINISHED_STATES = ("pending", "running", "rolling_back")
UNFINISHED_SQL = "state IN ('pending', 'running', 'rolling_back')"
UNFINISHED_FLOW_INDEX = "uq_flows_unfinished_resource"


class FlowRow(Base):
    """A multi-step operation (a task to the API) and its journal (Z-FLOW)."""

    __tablename__ = "flows"
    __table_args__ = (
        Index("ix_flows_state", "state"), Index("ix_flows_resource", "resource_uuid"),
        # Task lists are read newest first (migration 0010).
        Index("ix_flows_created", "created_at", "uuid"),
        Index("ix_flows_project_created", "project_uuid", "created_at", "uuid"),
        # One unfinished flow per resource, kept by the database itself (not a SELECT
        # then INSERT): a concurrent second flow fails to insert.
        Index(UNFINISHED_FLOW_INDEX, "resource_uuid", unique=True,
              sqlite_where=text(UNFINISHED_SQL), postgresql_where=text(UNFINISHED_SQL)),
    )

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    resource_type: Mapped[str] = mapped_column(String(32))
    resource_uuid: Mapped[str] = mapped_column(String(64))
    project_uuid: Mapped[str | None] = mapped_column(String(36), index=True)
    state: Mapped[str] = mapped_column(String(16))
    current_step: Mapped[str | None] = mapped_column(String(64))
    context: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    owner: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=utcnow, onupdate=utcnow
    )
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    steps: Mapped[list[FlowStepRow]] = relationship(
        order_by="FlowStepRow.seq", cascade="all, delete-orphan", lazy="selectin"
    )


class FlowStepRow(Base):
    __tablename__ = "flow_steps"

    flow_uuid: Mapped[str] = mapped_column(
        ForeignKey("flows.uuid", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    # running → done → (rolling_back → rolled_back | rollback_failed); or failed
    state: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    error: Mapped[str | None] = mapped_column(Text)


class IdempotencyRow(Base):
    """The recorded answer to a request made with an Idempotency-Key (U-IDEMP).

    ``key`` is the sha256 of the user and the client's key: keys are scoped per user.
    While the request runs (``status_code`` 0) ``owner`` and ``owner_boot`` name the
    control server and the process holding the key; a retry finding the key held by a
    process that is gone takes it over. A key is forgotten at ``expires_at``."""

    __tablename__ = "idempotency_keys"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    user_uuid: Mapped[str | None] = mapped_column(String(36))
    fingerprint: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    body: Mapped[Any] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    owner: Mapped[str | None] = mapped_column(String(64))
    owner_boot: Mapped[str | None] = mapped_column(String(36))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


# --- identity and tenancy (T-ID) -----------------------------------------------------


class DepartmentRow(Stamped, Base):
    __tablename__ = "departments"

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")


class ProjectRow(Stamped, Base):
    __tablename__ = "projects"

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    department_uuid: Mapped[str] = mapped_column(
        ForeignKey("departments.uuid", ondelete="RESTRICT"), index=True)


class UserRow(Stamped, Base):
    __tablename__ = "users"

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    email: Mapped[str | None] = mapped_column(String(254))
    password_hash: Mapped[str] = mapped_column(String(255))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    department_uuid: Mapped[str] = mapped_column(
        ForeignKey("departments.uuid", ondelete="RESTRICT"), index=True)


class RoleAssignmentRow(Base):
    """One role of one user on one scope: a project, a department, or the platform.

    ``scope`` is ``platform``, ``department:<uuid>`` or ``project:<uuid>``: a user holds
    at most one role per scope."""

    __tablename__ = "role_assignments"
    __table_args__ = (UniqueConstraint("user_uuid", "scope", name="uq_role_user_scope"),)

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_uuid: Mapped[str] = mapped_column(ForeignKey("users.uuid", ondelete="CASCADE"),
                                           index=True)
    role: Mapped[str] = mapped_column(String(32))
    scope: Mapped[str] = mapped_column(String(80))
    project_uuid: Mapped[str | None] = mapped_column(
        ForeignKey("projects.uuid", ondelete="CASCADE"), index=True)
    department_uuid: Mapped[str | None] = mapped_column(
        ForeignKey("departments.uuid", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class TokenRow(Base):
    """A login token: only the sha256 of its secret is kept."""

    __tablename__ = "tokens"

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_uuid: Mapped[str] = mapped_column(ForeignKey("users.uuid", ondelete="CASCADE"),
                                           index=True)
    project_uuid: Mapped[str | None] = mapped_column(
        ForeignKey("projects.uuid", ondelete="CASCADE"), index=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ApiKeyRow(Stamped, Base):
    """An API key pair. The secret is kept because requests are verified by recomputing
    their HMAC with it."""

    __tablename__ = "api_keys"
    __table_args__ = (UniqueConstraint("user_uuid", "name", name="uq_api_keys_user_name"),)

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(63))
    description: Mapped[str] = mapped_column(Text, default="")
    access_key: Mapped[str] = mapped_column(String(64), unique=True)
    secret: Mapped[str] = mapped_column(String(128))
    user_uuid: Mapped[str] = mapped_column(ForeignKey("users.uuid", ondelete="CASCADE"),
                                           index=True)
    project_uuid: Mapped[str] = mapped_column(ForeignKey("projects.uuid", ondelete="CASCADE"),
                                              index=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class QuotaRow(Base):
    """A project's limit and current use of one resource; claimed by a conditional UPDATE."""

    __tablename__ = "quotas"

    project_uuid: Mapped[str] = mapped_column(ForeignKey("projects.uuid", ondelete="CASCADE"),
                                              primary_key=True)
    resource: Mapped[str] = mapped_column(String(32), primary_key=True)
    limit: Mapped[int] = mapped_column(BigInteger)  # -1: unlimited
    used: Mapped[int] = mapped_column(BigInteger, default=0)


class TagRow(Base):
    """One key=value tag of any resource (Z-TAG); ``sys:`` keys belong to the platform."""

    __tablename__ = "resource_tags"
    # Filters by tag (``tag:env=prod``) find the resources by key and value (0002).
    __table_args__ = (Index("ix_resource_tags_key_value", "key", "value"),)

    resource_uuid: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255), default="")
    resource_type: Mapped[str] = mapped_column(String(32), index=True)


class AuditRow(Base):
    """One mutating API call: who, in which project, did what to what, and the result."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    request_id: Mapped[str] = mapped_column(String(64))
    user_uuid: Mapped[str | None] = mapped_column(String(36), index=True)
    user_name: Mapped[str | None] = mapped_column(String(63))
    project_uuid: Mapped[str | None] = mapped_column(String(36), index=True)
    action: Mapped[str] = mapped_column(String(64))
    resource_type: Mapped[str | None] = mapped_column(String(32))
    resource_uuid: Mapped[str | None] = mapped_column(String(64))
    source_ip: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    result: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text)
