"""Public resource models of the REST API, shared by the gateway, the control server and the CLI."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from yun.proto.messages import NAME_PATTERN

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


class Node(Named):
    url: str
    status: NodeStatus
    hypervisor: str
    accel: str
    vcpus: int
    memory_mb: int
    disk_gb: int
    vcpus_reserved: int
    memory_reserved_mb: int
    disk_reserved_gb: int
    cpu_load: float
    memory_used_mb: int
    nat_subnet: str
    last_report_at: datetime | None = None
    vm_count: int = 0


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


class ImageCreate(TaggedInput):
    name: ResourceName
    description: Description = ""
    format: ImageFormat | None = Field(
        default=None, description="declared format; required only for raw disks")
    visibility: ImageVisibility = Field(
        default=ImageVisibility.PROJECT,
        description="'public' images are seen by every project (set by administrators)")


class Image(Resource):
    status: ImageStatus
    visibility: ImageVisibility = ImageVisibility.PROJECT
    format: str | None = None
    size: int | None = None
    virtual_size: int | None = None
    sha256: str | None = None
    error: str | None = None


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


class VmCreate(TaggedInput):
    name: ResourceName
    description: Description = ""
    image: str = Field(min_length=1, max_length=63, description="image uuid or name")
    vcpus: int = Field(default=1, ge=1, le=64)
    memory_mb: int = Field(default=256, ge=64, le=1024 * 1024)
    disk_gb: int = Field(default=1, ge=1, le=16384)


class VmStop(Input):
    force: bool = False
    timeout: float = Field(default=60.0, ge=0, le=3600)


class Vm(Resource):
    state: VmState
    vcpus: int
    memory_mb: int
    disk_gb: int
    image_uuid: str
    node_uuid: str | None = None
    node_name: str | None = None
    ip: str | None = None
    mac: str | None = None
    power_state: str | None = None
    task_uuid: str | None = None
    error: str | None = None


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
