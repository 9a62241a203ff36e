"""`yun image …`: disk and ISO images."""

from __future__ import annotations

import contextlib
import hashlib
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from yun.cli.common import (
    IdempotencyKey,
    Output,
    WaitOpt,
    WaitTimeout,
    accepted,
    add_list_and_show,
    add_tag_commands,
    finish,
)
from yun.cli.context import client
from yun.cli.output import OutputFormat, emit, note, output_format
from yun.client import DEFAULT_WAIT, ApiError
from yun.proto.resources import (
    Image,
    ImageFormat,
    ImageFromVm,
    ImageStatus,
    ImageVisibility,
)

app = typer.Typer(help="Disk and ISO images.", no_args_is_help=True)

COLUMNS = ["uuid", "name", "status", "visibility", "protected", "format", "source_format",
           "size"]
HASH_CHUNK = 4 << 20
# Pauses between attempts to resume an interrupted upload (seconds).
RESUME_BACKOFF = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
ImageArg = Annotated[str, typer.Argument(help="image name or uuid")]


def upload_key(path: Path, name: str) -> str:
    """The default idempotency key of an upload: the same file (path, size, mtime) under
    the same name gives the same key, so re-running an upload that failed midway does
    not make a second image, while a changed file is a new upload."""
    stat = path.stat()
    ident = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{name}"
    return "upload-" + hashlib.sha256(ident.encode()).hexdigest()[:48]


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in large blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def retryable(exc: ApiError) -> bool:
    """Whether an upload that failed so may be resumed: the connection broke (0), a
    server failed (5xx) or it conflicts with an upload still in progress (409)."""
    return exc.status == 0 or exc.status >= 500 or exc.status == 409


@contextlib.contextmanager
def progress_bar(path: Path, show: bool) -> Iterator[Callable[[int], None] | None]:
    """A progress callback drawing a bar on stderr, or None when there is no bar."""
    if not show:
        yield None
        return
    with Progress("[progress.description]{task.description}", BarColumn(),
                  DownloadColumn(), TransferSpeedColumn(), console=Console(stderr=True),
                  ) as progress:
        bar = progress.add_task(f"upload {path.name}", total=path.stat().st_size)
        yield lambda sent: progress.update(bar, completed=sent)


@app.command("upload")
def upload(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    name: Annotated[str, typer.Option(help="image name")],
    format: Annotated[ImageFormat | None, typer.Option(
        help="declare the format (needed for raw)")] = None,
    description: str = "",
    visibility: Annotated[ImageVisibility, typer.Option(
        help="public images are seen by every project (administrators)")]
    = ImageVisibility.PROJECT,
    idempotency_key: Annotated[str | None, typer.Option(
        help="default: derived from the file's path, size, mtime and the name")] = None,
    sha256: Annotated[str | None, typer.Option(
        help="the file's sha256 (default: computed before sending)")] = None,
    retries: Annotated[int, typer.Option(
        min=0, help="times an interrupted upload is resumed before giving up")] = 6,
    output: Output = None,
) -> None:
    """Upload a disk image or ISO, with a progress bar on a terminal.

    The file's sha256 goes with it (the server refuses other bytes). An interrupted
    upload is resumed from the offset the server holds, up to --retries times; running
    the same command again also resumes it."""
    total = path.stat().st_size
    digest = (sha256 or file_sha256(path)).lower()
    show = sys.stderr.isatty() and output_format(output) is OutputFormat.TABLE

    def send(key: str) -> Image:
        with progress_bar(path, show) as progress:
            try:
                return client().images.upload(
                    path, name, format, description=description, visibility=visibility,
                    idempotency_key=key, progress=progress, sha256=digest, size=total)
            except ApiError as exc:
                if not retryable(exc):
                    raise
                return resume(path, name, format, digest, total, retries, progress, exc)

    image = send(idempotency_key or upload_key(path, name))
    if idempotency_key is None and not _exists(image):
        # The derived key replayed an earlier upload of this file whose image was deleted
        # since: this is a new upload, not a retry.
        note(f"image {image.uuid} from an earlier upload of this file is gone: uploading again")
        image = send(f"{upload_key(path, name)}-{uuid.uuid4().hex[:12]}")
    emit(image, output)


def resume(path: Path, name: str, format: ImageFormat | None, digest: str, total: int,
           retries: int, progress: Callable[[int], None] | None, cause: ApiError) -> Image:
    """Finish the interrupted upload of ``path`` as image ``name``: ask the server how
    many bytes it holds and send the rest, until it is complete or ``retries`` run out.

    Only an upload of the same bytes (same announced sha256) is resumed; any other
    failure is ``cause``'s."""
    last = cause
    for attempt in range(retries + 1):
        time.sleep(RESUME_BACKOFF[min(attempt, len(RESUME_BACKOFF) - 1)])
        try:
            current = client().images.get(name)
        except ApiError as exc:
            if exc.status == 404:  # the upload never got as far as making the image
                raise cause from None
            if not retryable(exc):
                raise
            last = exc
            continue
        if current.status == ImageStatus.ACTIVE and current.expected_sha256 == digest:
            return current
        if current.status != ImageStatus.UPLOADING or current.expected_sha256 != digest:
            raise cause  # another image of that name, or a failed upload: not ours to resume
        try:
            held = client().images.upload_status(current.uuid)
            if held.complete:
                return client().images.get(current.uuid)
            note(f"upload interrupted ({last.detail or last.title}); resuming at byte "
                 f"{held.offset} of {total}")
            answer = client().images.upload_part(current.uuid, path, held.offset, total,
                                                 format, progress=progress)
        except ApiError as exc:
            if not retryable(exc):
                raise
            last = exc
            continue
        if isinstance(answer, Image):
            return answer
    raise last


def _exists(image: Image) -> bool:
    try:
        client().images.get(image.uuid)
    except ApiError as exc:
        if exc.status == 404:
            return False
        raise
    return True


@app.command("from-vm")
def from_vm(
    vm: Annotated[str, typer.Argument(help="VM name or uuid (running or stopped)")],
    name: Annotated[str, typer.Option(help="the new image's name")],
    description: str = "",
    visibility: Annotated[ImageVisibility, typer.Option(
        help="public images are seen by every project (administrators)")]
    = ImageVisibility.PROJECT,
    disk: Annotated[str | None, typer.Option(
        help="the VM's disk to copy: disk id, volume uuid or name (default: root disk)")]
    = None,
    wait: WaitOpt = True, wait_timeout: WaitTimeout = DEFAULT_WAIT,
    idempotency_key: IdempotencyKey = None, output: Output = None,
) -> None:
    """Make a new image of a VM's disk, kept by the storage server: a consistent live
    copy of a running VM (the guest goes on writing) or a copy of a stopped one. New VMs
    made from the image start with the same content."""
    spec = ImageFromVm(vm=vm, name=name, description=description, visibility=visibility,
                       disk=disk)
    answer = accepted(client().images.from_vm(spec, idempotency_key=idempotency_key))
    image_uuid = str(answer.resource["uuid"]) if answer is not None else name
    finish(answer, f"image from-vm {vm}", wait, wait_timeout, output,
           show=lambda: client().images.get(image_uuid))


add_list_and_show(app, "image", "Images", COLUMNS, lambda c: c.images,
                  "List the project's images and the public ones.")


@app.command("protect")
def protect(image: ImageArg, output: Output = None) -> None:
    """Protect an image: it cannot be deleted (not even with --cascade) until unprotected."""
    emit(client().images.update(image, protected=True), output)


@app.command("unprotect")
def unprotect(image: ImageArg, output: Output = None) -> None:
    """Unprotect an image, so that it can be deleted again."""
    emit(client().images.update(image, protected=False), output)


@app.command("delete")
def delete(image: ImageArg,
           cascade: Annotated[bool, typer.Option(help="also delete the VMs using it")] = False,
           wait: WaitOpt = True, wait_timeout: WaitTimeout = DEFAULT_WAIT,
           idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Delete an image (refused while it is protected or in use by VMs or volumes;
    --cascade deletes the VMs first)."""
    answer = accepted(client().images.delete(image, cascade=cascade,
                                             idempotency_key=idempotency_key))
    finish(answer, f"delete image {image}", wait, wait_timeout, output)


add_tag_commands(app, "image", lambda c: c.images.tags)
