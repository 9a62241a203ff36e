"""The disk backend contract: images cached on the node, volumes made from them."""

from __future__ import annotations

import abc
import ssl
from dataclasses import dataclass

import httpx

from yun.node.hypervisor.base import ResolvedDisk
from yun.proto.messages import DiskSpec, ImageLocation


class DiskError(RuntimeError):
    """A disk or image could not be made ready."""


@dataclass(frozen=True)
class ImageAccess:
    """How this node reaches a storage server: ``auth`` signs each request with the node's
    key and credential, ``tls`` checks the server against the domain CA and presents the
    node's certificate."""

    auth: httpx.Auth | None = None
    tls: ssl.SSLContext | None = None


class DiskBackend(abc.ABC):
    """Makes the disks of a VM real on this node, and removes them."""

    @abc.abstractmethod
    async def ensure_image(self, image: ImageLocation, access: ImageAccess | None) -> None:
        """Have ``image`` in the node's cache, fetched from the storage server and verified.

        Interrupted downloads resume; a cached image whose checksum matches is not fetched again.
        """

    @abc.abstractmethod
    async def ensure_disk(self, vm_uuid: str, disk: DiskSpec) -> ResolvedDisk:
        """The volume of ``disk`` (a qcow2 overlay of its cached image, or blank); idempotent."""

    @abc.abstractmethod
    async def delete_disks(self, vm_uuid: str) -> None:
        """Remove every volume of the VM; no error if there is none."""

    @abc.abstractmethod
    async def vm_disk_ids(self) -> dict[str, list[str]]:
        """Every VM that has volumes on this node, with its disk ids (for reconciliation)."""

    @abc.abstractmethod
    async def capacity_gb(self) -> tuple[int, int]:
        """(total, used) space of the volume store, in GiB."""
