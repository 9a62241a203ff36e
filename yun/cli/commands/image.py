"""`yun image …`: disk and ISO images."""

from __future__ import annotations

import hashlib
import uuid
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
from yun.cli.output import emit, note
from yun.client import DEFAULT_WAIT, ApiError
from yun.proto.resources import Image, ImageFormat, ImageVisibility

app = typer.Typer(help="Disk and ISO images.", no_args_is_help=True)

COLUMNS = ["uuid", "name", "status", "visibility", "format", "size"]
ImageArg = Annotated[str, typer.Argument(help="image name or uuid")]


def upload_key(path: Path, name: str) -> str:
    """The default idempotency key of an upload: the same file (path, size, mtime) under
    the same name gives the same key, so re-running an upload that failed midway does
    not make a second image, while a changed file is a new upload."""
    stat = path.stat()
    ident = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{name}"
    return "upload-" + hashlib.sha256(ident.encode()).hexdigest()[:48]


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
    output: Output = None,
) -> None:
    """Upload a disk image or ISO, with a progress bar."""

    def send(key: str) -> Image:
        with Progress("[progress.description]{task.description}", BarColumn(),
                      DownloadColumn(), TransferSpeedColumn(), console=Console(stderr=True),
                      ) as progress:
            bar = progress.add_task(f"upload {path.name}", total=path.stat().st_size)
            return client().images.upload(
                path, name, format, description=description, visibility=visibility,
                idempotency_key=key, progress=lambda sent: progress.update(bar, completed=sent))

    image = send(idempotency_key or upload_key(path, name))
    if idempotency_key is None and not _exists(image):
        # The derived key replayed an earlier upload of this file whose image was deleted
        # since: this is a new upload, not a retry.
        note(f"image {image.uuid} from an earlier upload of this file is gone: uploading again")
        image = send(f"{upload_key(path, name)}-{uuid.uuid4().hex[:12]}")
    emit(image, output)


def _exists(image: Image) -> bool:
    try:
        client().images.get(image.uuid)
    except ApiError as exc:
        if exc.status == 404:
            return False
        raise
    return True


add_list_and_show(app, "image", "Images", COLUMNS, lambda c: c.images,
                  "List the project's images and the public ones.")


@app.command("delete")
def delete(image: ImageArg,
           cascade: Annotated[bool, typer.Option(help="also delete the VMs using it")] = False,
           wait: WaitOpt = True, wait_timeout: WaitTimeout = DEFAULT_WAIT,
           idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Delete an image (refused while VMs use it, unless --cascade)."""
    answer = accepted(client().images.delete(image, cascade=cascade,
                                             idempotency_key=idempotency_key))
    finish(answer, f"delete image {image}", wait, wait_timeout, output)


add_tag_commands(app, "image", lambda c: c.images.tags)
