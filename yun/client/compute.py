"""Namespaces of the compute resources: VMs, images, nodes and tasks."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import httpx

from yun.client._base import (
    ACCEPTED,
    DEFAULT_WAIT,
    TASK,
    Listable,
    TaggedCollection,
    Wait,
    accepted,
    follow,
    maybe_accepted,
    maybe_accepted_call,
)
from yun.client._core import (
    Call,
    Content,
    Op,
    R,
    endpoint,
    idempotency,
    model,
    nothing,
    path,
    text,
)
from yun.proto.resources import (
    Accepted,
    CdromInsert,
    Console,
    Image,
    ImageCreate,
    ImageFormat,
    ImageFromVm,
    ImageUpdate,
    ImageUploadStatus,
    ImageVisibility,
    Node,
    NodeLabelsUpdate,
    Page,
    PortForward,
    PortForwardCreate,
    Task,
    Vm,
    VmAddress,
    VmCreate,
    VmNic,
    VmNicCreate,
    VmQosUpdate,
    VmStop,
)

CHUNK = 1 << 20
UPLOAD_TIMEOUT = httpx.Timeout(60.0, read=3600.0, write=3600.0)

ImageSource = str | os.PathLike[str] | bytes | Iterable[bytes]
"""A file's path, the image's bytes, or an iterable of chunks (streamed)."""


class Vms(TaggedCollection[R, Vm]):
    """``client.vms``: virtual machines of the token's project."""

    _path = "/vms"
    _model = Vm
    _page = Page[Vm]

    def _action(self, ref: str, action: str, key: str | None,
                body: VmStop | None = None) -> Call[Accepted]:
        return Call("POST", self._item(ref, "/" + action), ACCEPTED, body=body,
                    headers=idempotency(key))

    @endpoint
    def create(self, spec: VmCreate, *, wait: Wait = False,
               idempotency_key: str | None = None) -> Op[Accepted | Task]:
        """Create a VM from an image (or blank, from an ISO) and boot it."""
        return accepted(Call("POST", "/vms", ACCEPTED, body=spec,
                             headers=idempotency(idempotency_key)), wait)

    @endpoint
    def delete(self, ref: str, *, wait: Wait = False, keep_volumes: bool = False,
               idempotency_key: str | None = None) -> Op[Accepted | Task]:
        """Delete a VM with its root volume, address and network port, and its data
        volumes marked ``delete_with_vm`` unless ``keep_volumes`` (then kept, detached)."""
        return accepted(Call("DELETE", self._item(ref), ACCEPTED,
                             params={"keep_volumes": "true"} if keep_volumes else {},
                             headers=idempotency(idempotency_key)), wait)

    @endpoint
    def start(self, ref: str, *, wait: Wait = False,
              idempotency_key: str | None = None) -> Op[Accepted | Task]:
        """Power a VM on (``Accepted.task`` is None when it already runs)."""
        return accepted(self._action(ref, "start", idempotency_key), wait)

    @endpoint
    def stop(self, ref: str, *, force: bool = False, timeout: float = 60.0, wait: Wait = False,
             idempotency_key: str | None = None) -> Op[Accepted | Task]:
        """Shut a VM down (ACPI), forcing it off after ``timeout`` seconds or at once."""
        body = VmStop(force=force, timeout=timeout)
        return accepted(self._action(ref, "stop", idempotency_key, body), wait)

    @endpoint
    def reboot(self, ref: str, *, wait: Wait = False,
               idempotency_key: str | None = None) -> Op[Accepted | Task]:
        """Reboot a VM."""
        return accepted(self._action(ref, "reboot", idempotency_key), wait)

    @endpoint
    def set_qos(self, ref: str, spec: VmQosUpdate, *, wait: Wait = False,
                idempotency_key: str | None = None) -> Op[Accepted | Task]:
        """Change a VM's QoS (CPU level, disk IOPS and bytes/s, bandwidth); fields left
        out keep their value, ``spec.clear`` lifts limits. A running VM gets them at once
        (``Accepted.task`` is None when nothing changes)."""
        return accepted(Call("POST", self._item(ref, "/qos"), ACCEPTED, body=spec,
                             headers=idempotency(idempotency_key)), wait)

    @endpoint
    def insert_cdrom(self, ref: str, image: str, *, wait: Wait = False,
                     idempotency_key: str | None = None) -> Op[Accepted | Task]:
        """Put the ISO ``image`` into the VM's CD drive (a running guest sees it at once);
        ``Accepted.task`` is None when it is already in."""
        body = CdromInsert.model_validate({"image": image})
        return accepted(Call("PUT", self._item(ref, "/cdrom"), ACCEPTED, body=body,
                             headers=idempotency(idempotency_key)), wait)

    @endpoint
    def eject_cdrom(self, ref: str, *, wait: Wait = False,
                    idempotency_key: str | None = None) -> Op[Accepted | Task]:
        """Empty the VM's CD drive; a VM booting from it boots from its disk from then on
        (``Accepted.task`` is None when the drive is empty already)."""
        return accepted(Call("DELETE", self._item(ref, "/cdrom"), ACCEPTED,
                             headers=idempotency(idempotency_key)), wait)

    @endpoint
    def console_log(self, ref: str, max_bytes: int = 65536) -> Call[str]:
        """The last ``max_bytes`` the VM wrote on its serial console."""
        return Call("GET", self._item(ref, "/console-log"), text,
                    params={"max_bytes": max_bytes})

    @endpoint
    def console(self, ref: str) -> Call[Console]:
        """Where the VM's VNC display and serial log are."""
        return Call("GET", self._item(ref, "/console"), model(Console))

    @endpoint
    def port_forwards(self, ref: str) -> Call[list[PortForward]]:
        """How the VM's ports are reached from outside."""
        return Call("GET", self._item(ref, "/port-forwards"), model(list[PortForward]))

    @endpoint
    def add_port_forward(self, ref: str, port: int, protocol: str = "tcp", *,
                         idempotency_key: str | None = None) -> Call[PortForward]:
        """Reach ``port`` of the VM from outside: a NAT port of its node (sandbox-private)
        or a public ip:port (sandbox-share)."""
        body = PortForwardCreate.model_validate({"port": port, "protocol": protocol})
        return Call("POST", self._item(ref, "/port-forwards"), model(PortForward), body=body,
                    headers=idempotency(idempotency_key))

    @endpoint
    def add_address(self, ref: str, *, idempotency_key: str | None = None) -> Call[VmAddress]:
        """One more address of the node's subnet for a sandbox VM (U-HOTPLUG)."""
        return Call("POST", self._item(ref, "/addresses"), model(VmAddress),
                    headers=idempotency(idempotency_key))

    @endpoint
    def remove_address(self, ref: str, ip: str, *,
                       idempotency_key: str | None = None) -> Call[None]:
        """Take an extra address off a VM."""
        return Call("DELETE", path("/vms/{}/addresses/{}", ref, ip), nothing,
                    headers=idempotency(idempotency_key))

    @endpoint
    def nics(self, ref: str) -> Call[list[VmNic]]:
        """The VM's NICs, the primary one (index 0) first (U-HOTPLUG)."""
        return Call("GET", self._item(ref, "/nics"), model(list[VmNic]))

    @endpoint
    def add_nic(self, ref: str, *, network: str | None = None,
                idempotency_key: str | None = None) -> Call[VmNic]:
        """Plug one more NIC into the VM (live when it runs, else at its next start); the
        platform picks its MAC and, in sandbox mode, its address."""
        body = VmNicCreate.model_validate({"network": network})
        return Call("POST", self._item(ref, "/nics"), model(VmNic), body=body,
                    headers=idempotency(idempotency_key))

    @endpoint
    def remove_nic(self, ref: str, nic: str, *,
                   idempotency_key: str | None = None) -> Call[None]:
        """Unplug a NIC of the VM, named by its index, uuid or MAC (not the primary one)."""
        # A MAC travels in the path with '-' for ':' (colons are not accepted there).
        return Call("DELETE", path("/vms/{}/nics/{}", ref, nic.replace(":", "-")), nothing,
                    headers=idempotency(idempotency_key))

    @endpoint
    def remove_port_forward(self, ref: str, port: int, protocol: str = "tcp", *,
                            idempotency_key: str | None = None) -> Call[None]:
        """Stop forwarding ``port`` of the VM."""
        return Call("DELETE", path("/vms/{}/port-forwards/{}/{}", ref, protocol, str(port)),
                    nothing, headers=idempotency(idempotency_key))


def _read(file: Path, start: int = 0) -> Iterator[bytes]:
    with file.open("rb") as f:
        f.seek(start)
        while chunk := f.read(CHUNK):
            yield chunk


def _counted(chunks: Iterable[bytes], progress: Callable[[int], None],
             start: int = 0) -> Iterator[bytes]:
    sent = start
    for chunk in chunks:
        yield chunk
        sent += len(chunk)  # httpx asks for the next chunk once this one is written
        progress(sent)


def upload_content(source: ImageSource, progress: Callable[[int], None] | None,
                   start: int = 0) -> Content:
    """The body of an upload from byte ``start`` of ``source``: bytes (signed with their
    hash) or chunks (streamed). An iterable ``source`` must already begin at ``start``."""
    chunks: Iterable[bytes]
    if isinstance(source, bytes):
        source = source[start:]
        if progress is None:
            return source
        chunks = (source[i:i + CHUNK] for i in range(0, len(source), CHUNK))
    elif isinstance(source, (str, os.PathLike)):
        file = Path(source)
        if not file.is_file():  # say so now, not halfway through a request
            raise FileNotFoundError(f"no such file: {file}")
        chunks = _read(file, start)
    else:
        chunks = source
    return chunks if progress is None else _counted(chunks, progress, start)


def _part_answer(response: httpx.Response) -> Image | ImageUploadStatus:
    if response.status_code == 202:
        return ImageUploadStatus.model_validate(response.json())
    return Image.model_validate(response.json())


class Images(TaggedCollection[R, Image]):
    """``client.images``: the project's images and the public ones."""

    _path = "/images"
    _model = Image
    _page = Page[Image]

    @endpoint
    def upload(self, source: ImageSource, name: str, format: ImageFormat | str | None = None,
               *, description: str = "",
               visibility: ImageVisibility | str = ImageVisibility.PROJECT,
               idempotency_key: str | None = None,
               progress: Callable[[int], None] | None = None,
               sha256: str | None = None, size: int | None = None) -> Call[Image]:
        """Upload a disk image or ISO; its format is detected (declare ``raw`` ones).

        ``progress`` is called with the number of bytes sent so far. A path or an
        iterable is streamed (signed as ``UNSIGNED-PAYLOAD`` with a key pair); bytes are
        sent at once, unless ``progress`` is given. ``sha256`` (of the whole file) makes
        the server refuse other bytes; ``size`` (the file's length) makes a body that
        ends early a resumable upload (see :meth:`upload_status`, :meth:`upload_part`)."""
        spec = ImageCreate.model_validate({"name": name, "description": description,
                                           "format": format, "visibility": visibility,
                                           "sha256": sha256})
        if size is None and isinstance(source, (str, os.PathLike)) and Path(source).is_file():
            size = Path(source).stat().st_size
        elif size is None and isinstance(source, bytes):
            size = len(source)
        params = {"name": spec.name, "description": spec.description or None,
                  "format": spec.format.value if spec.format else None,
                  "visibility": spec.visibility.value, "sha256": spec.sha256,
                  "size": size or None}
        return Call("POST", "/images", model(Image), params=params,
                    content=upload_content(source, progress), timeout=UPLOAD_TIMEOUT,
                    headers={"Content-Type": "application/octet-stream",
                             **idempotency(idempotency_key)})

    @endpoint
    def from_vm(self, spec: ImageFromVm, *, wait: Wait = False,
                idempotency_key: str | None = None) -> Op[Accepted | Task]:
        """Make a new image of a VM's disk (its root disk unless ``spec.disk`` names
        another), running or stopped; the image is ``active`` when the task succeeds
        (F-IMAGE)."""
        return accepted(Call("POST", "/images/from-vm", ACCEPTED, body=spec,
                             headers=idempotency(idempotency_key)), wait)

    @endpoint
    def upload_status(self, ref: str) -> Call[ImageUploadStatus]:
        """How many bytes of the image's upload the storage server holds (``offset``):
        where an interrupted upload resumes."""
        return Call("GET", self._item(ref, "/upload"), model(ImageUploadStatus))

    @endpoint
    def upload_part(self, ref: str, source: ImageSource, offset: int, total: int,
                    format: ImageFormat | str | None = None, *,
                    progress: Callable[[int], None] | None = None,
                    ) -> Call[Image | ImageUploadStatus]:
        """Send the bytes of ``source`` from ``offset`` to its end (``total`` bytes in
        all) to resume an interrupted upload; ``offset`` must be the one
        :meth:`upload_status` answers (else 409 naming it). Returns the image once
        complete, else the new upload status. ``progress`` gets the bytes held so far."""
        fmt = ImageFormat(format).value if format else None
        if offset >= total:
            content_range = f"bytes */{total}"
            content: Content = b""
        else:
            content_range = f"bytes {offset}-{total - 1}/{total}"
            content = upload_content(source, progress, offset)
        return Call("PUT", self._item(ref, "/data"), _part_answer, params={"format": fmt},
                    content=content, timeout=UPLOAD_TIMEOUT,
                    headers={"Content-Type": "application/octet-stream",
                             "Content-Range": content_range})

    @endpoint
    def update(self, ref: str, *, protected: bool | None = None,
               description: str | None = None,
               idempotency_key: str | None = None) -> Call[Image]:
        """Change an image's protection or description; returns the image."""
        return Call("PATCH", self._item(ref), model(Image),
                    body=ImageUpdate(protected=protected, description=description),
                    headers=idempotency(idempotency_key))

    @endpoint
    def delete(self, ref: str, *, cascade: bool = False, wait: Wait = False,
               idempotency_key: str | None = None) -> Op[Accepted | Task | None]:
        """Delete an image. It is refused (409) while it is protected or used by VMs
        (made from it or with it in their CD drive) or volumes, unless ``cascade``,
        which starts a task deleting those VMs first (None: deleted at once)."""
        call = maybe_accepted_call("DELETE", self._item(ref),
                                   {"cascade": "true" if cascade else None}, idempotency_key)
        return maybe_accepted(call, wait)


class Nodes(TaggedCollection[R, Node]):
    """``client.nodes``: the compute nodes (super admins)."""

    _path = "/nodes"
    _model = Node
    _page = Page[Node]

    @endpoint
    def set_labels(self, ref: str, labels: Mapping[str, str], *,
                   idempotency_key: str | None = None) -> Call[Node]:
        """Replace a node's labels (``{"ssd": "true"}``), which a VM's ``node_labels``
        must match for the node to host it; returns the node."""
        return Call("PUT", self._item(ref, "/labels"), model(Node),
                    body=NodeLabelsUpdate(labels=dict(labels)),
                    headers=idempotency(idempotency_key))


class Tasks(Listable[R, Task]):
    """``client.tasks``: long operations and their steps."""

    _path = "/tasks"
    _page = Page[Task]

    @endpoint
    def get(self, task_uuid: str, wait: float = 0) -> Call[Task]:
        """One task; with ``wait``, the API holds the answer up to that many seconds
        (at most 600) for the task to end."""
        return Call("GET", path("/tasks/{}", task_uuid), TASK,
                    params={"wait": wait or None}, timeout=wait + 30 if wait else None)

    @endpoint
    def wait(self, task_uuid: str, timeout: float = DEFAULT_WAIT, *, check: bool = True,
             on_update: Callable[[Task], None] | None = None) -> Op[Task]:
        """Follow a task until it ends and return it; raise :class:`TaskFailed` if it
        failed (when ``check``) and :class:`TaskTimeout` if it has not ended in time.
        ``on_update`` sees each state the task is polled in."""
        return follow(task_uuid, timeout, check, on_update)
