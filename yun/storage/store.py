"""The Storage Server's image store: files on disk with a JSON metadata sidecar.

Layout under ``root``::

    images/<image_id>        the image data, never modified once stored
    images/<image_id>.json   its metadata; its presence is what makes the image exist
    tmp/<image_id>.<random>  uploads in progress

An upload streams into ``tmp/`` while its sha256 and length are computed, is vetted
by :mod:`yun.storage.formats`, and only then renamed into ``images/`` (atomic on one
file system) before its sidecar is written (also by atomic rename). Any failure
removes the temporary file, so the store never holds half an image.

Images are tenants' data: every file is 0600 and every directory 0700 from the moment
it is made (whatever the umask), so only the storage server's own user can read them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
from collections.abc import AsyncIterable, AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from pydantic import BaseModel, ValidationError

from yun.proto.errors import BadRequest, Conflict, NotFound, Unprocessable, YunError
from yun.proto.messages import StorageImageReport
from yun.storage.formats import ImageFormatError, detect_format, normalize_format
from yun.util.ids import uuid_problem

log = logging.getLogger("yun.storage.store")

CHUNK = 1024 * 1024
MAX_NAME = 255
DIR_MODE = 0o700
FILE_MODE = 0o600


class PayloadTooLarge(YunError):
    status = 413
    title = "Payload too large"


class RangeNotSatisfiable(YunError):
    """A download range outside the image; ``size`` goes into ``Content-Range: bytes */size``."""

    status = 416
    title = "Range not satisfiable"

    def __init__(self, detail: str, *, size: int) -> None:
        super().__init__(detail)
        self.size = size


class ImageRecord(BaseModel):
    """The metadata of one stored image (its sidecar)."""

    id: str
    name: str
    format: str
    size: int
    virtual_size: int
    sha256: str
    created_at: datetime

    def report(self) -> StorageImageReport:
        """This image as the storage server reports it to the control server."""
        return StorageImageReport(
            image_id=self.id,
            size=self.size,
            sha256=self.sha256,
            format=self.format,
            virtual_size=self.virtual_size,
        )


def check_image_id(image_id: str) -> str:
    """Return ``image_id`` if it is a canonical (lower-case, hyphenated) UUID.

    Ids become file names, so anything else (``..``, slashes, odd spellings of the
    same UUID) is refused before it comes near the file system.
    """
    problem = uuid_problem(image_id, "image id")
    if problem is not None:
        raise BadRequest(problem)
    return image_id


def _check_name(name: str) -> str:
    if len(name) > MAX_NAME:
        raise Unprocessable(f"image name is longer than {MAX_NAME} characters")
    if not name.isprintable():
        raise Unprocessable("image name contains control characters")
    return name


class ImageStore:
    """Images of one storage server, under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.images_dir = self.root / "images"
        self.tmp_dir = self.root / "tmp"
        for directory in (self.root, self.images_dir, self.tmp_dir):
            directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            # mkdir's mode is masked by the umask and ignored for an existing directory
            # (a store made by an older version, 0755): set it outright.
            os.chmod(directory, DIR_MODE)
        # Commit (compare, rename, write sidecar) and delete are short; one lock for
        # the whole store keeps two uploads of the same id from both "winning".
        self._commit_lock = asyncio.Lock()
        self._sweep_tmp()
        self._tighten_modes()

    def _sweep_tmp(self) -> None:
        """Remove uploads a previous process left half done (it died mid-upload)."""
        for leftover in self.tmp_dir.iterdir():
            if leftover.is_file():
                leftover.unlink(missing_ok=True)
                log.info("removed unfinished upload", extra={"file": leftover.name})

    def _tighten_modes(self) -> None:
        """Make images an older version stored world-readable (0644) private."""
        for path in self.images_dir.iterdir():
            if path.is_file() and path.stat().st_mode & 0o077:
                os.chmod(path, FILE_MODE)
                log.info("image file made private", extra={"file": path.name})

    def data_path(self, image_id: str) -> Path:
        """Where the data of ``image_id`` lives (whether or not it exists)."""
        return self.images_dir / check_image_id(image_id)

    def _meta_path(self, image_id: str) -> Path:
        return self.images_dir / f"{check_image_id(image_id)}.json"

    # --- reading ---------------------------------------------------------------

    def _load(self, image_id: str) -> ImageRecord | None:
        meta = self._meta_path(image_id)
        try:
            return ImageRecord.model_validate_json(meta.read_bytes())
        except FileNotFoundError:
            return None
        except ValidationError as exc:
            log.warning("unreadable image metadata", extra={"image": image_id, "error": str(exc)})
            return None

    def get(self, image_id: str) -> ImageRecord:
        """The metadata of ``image_id``; raises :class:`NotFound`."""
        record = self._load(image_id)
        if record is None:
            raise NotFound(f"image {image_id} does not exist")
        return record

    def list(self) -> list[ImageRecord]:
        """Every stored image, oldest first."""
        records = []
        for meta in self.images_dir.glob("*.json"):
            try:
                check_image_id(meta.stem)
            except BadRequest:
                continue
            record = self._load(meta.stem)
            if record is not None:
                records.append(record)
        return sorted(records, key=lambda r: (r.created_at, r.id))

    def open_range(
        self, image_id: str, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        """The bytes ``start``..``end`` (inclusive, as in HTTP ranges) of an image.

        ``end`` None or past the end means "to the last byte". The file is opened
        here, before the first byte is read, so a missing image raises
        :class:`NotFound` now and an image deleted mid-download still streams whole.
        Raises :class:`RangeNotSatisfiable` when the range lies outside the image.
        """
        record = self.get(image_id)
        size = record.size
        if start < 0 or start >= size or (end is not None and end < start):
            raise RangeNotSatisfiable(
                f"range {start}-{'' if end is None else end} is outside image {image_id} "
                f"of {size} bytes",
                size=size,
            )
        last = size - 1 if end is None else min(end, size - 1)
        try:
            f = self.data_path(image_id).open("rb")
        except FileNotFoundError:
            raise NotFound(f"image {image_id} does not exist") from None
        return _read_range(f, start, last - start + 1)

    # --- writing ---------------------------------------------------------------

    async def put(
        self,
        image_id: str,
        chunks: AsyncIterable[bytes],
        *,
        name: str = "",
        declared_format: str | None = None,
        max_bytes: int | None = None,
    ) -> tuple[ImageRecord, bool]:
        """Store the image streamed by ``chunks``; return its record and whether it is new.

        Storing the same content again under the same id is a no-op (False);
        different content under an existing id raises :class:`Conflict`. A file
        that is not an acceptable image raises :class:`Unprocessable`, one over
        ``max_bytes`` :class:`PayloadTooLarge`. Nothing is left behind on failure.
        """
        check_image_id(image_id)
        name = _check_name(name)
        try:
            declared = normalize_format(declared_format)
        except ImageFormatError as exc:
            raise Unprocessable(str(exc)) from exc
        tmp = self.tmp_dir / f"{image_id}.{secrets.token_hex(8)}"
        try:
            size, sha256 = await self._receive(tmp, chunks, max_bytes)
            try:
                detected = await detect_format(tmp, declared)
            except ImageFormatError as exc:
                log.info("upload refused", extra={"image": image_id, "reason": str(exc)})
                raise Unprocessable(str(exc)) from exc
            async with self._commit_lock:
                existing = self._load(image_id)
                if existing is not None:
                    if existing.sha256 == sha256:
                        log.info("image already stored", extra={"image": image_id})
                        return existing, False
                    raise Conflict(
                        f"image {image_id} already exists with different content "
                        f"(sha256 {existing.sha256}, upload has {sha256})"
                    )
                record = ImageRecord(
                    id=image_id,
                    name=name,
                    format=detected.format,
                    size=size,
                    virtual_size=detected.virtual_size,
                    sha256=sha256,
                    created_at=datetime.now(UTC),
                )
                await asyncio.to_thread(self._commit, tmp, record)
        finally:
            tmp.unlink(missing_ok=True)
        log.info(
            "image stored",
            extra={"image": image_id, "sha256": sha256, "format": record.format, "size": size},
        )
        return record, True

    async def _receive(
        self, tmp: Path, chunks: AsyncIterable[bytes], max_bytes: int | None
    ) -> tuple[int, str]:
        """Write ``chunks`` into ``tmp``; return (length, sha256)."""
        digest = hashlib.sha256()
        size = 0
        pending: list[bytes] = []
        pending_len = 0
        with _create_private(tmp) as f:
            async for chunk in chunks:
                if not chunk:
                    continue
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise PayloadTooLarge(f"upload exceeds the limit of {max_bytes} bytes")
                pending.append(chunk)
                pending_len += len(chunk)
                # Batch small network chunks so each thread hop writes and hashes ~1 MiB
                # (hashlib releases the GIL on large buffers; the loop stays responsive).
                if pending_len >= CHUNK:
                    await asyncio.to_thread(_write_hash, f, digest, b"".join(pending))
                    pending, pending_len = [], 0
            if pending:
                await asyncio.to_thread(_write_hash, f, digest, b"".join(pending))
            await asyncio.to_thread(os.fsync, f.fileno())
        return size, digest.hexdigest()

    def _commit(self, tmp: Path, record: ImageRecord) -> None:
        """Move vetted data into place, then write the sidecar that makes it exist."""
        data = self.images_dir / record.id
        os.chmod(tmp, FILE_MODE)  # already 0600 unless an older version made it
        os.replace(tmp, data)
        meta_tmp = self.tmp_dir / f"{record.id}.json.{secrets.token_hex(4)}"
        try:
            with _create_private(meta_tmp) as f:
                f.write(record.model_dump_json(indent=1).encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(meta_tmp, self._meta_path(record.id))
        finally:
            meta_tmp.unlink(missing_ok=True)
        _fsync_dir(self.images_dir)

    async def delete(self, image_id: str) -> bool:
        """Remove an image; return whether it existed (no error when it did not)."""
        check_image_id(image_id)
        async with self._commit_lock:
            meta = self._meta_path(image_id)
            existed = meta.exists()
            # Sidecar first: once it is gone the image no longer exists, even if the
            # process dies before the data file is removed.
            meta.unlink(missing_ok=True)
            self.data_path(image_id).unlink(missing_ok=True)
        if existed:
            log.info("image deleted", extra={"image": image_id})
        return existed


def _write_hash(f: IO[bytes], digest: hashlib._Hash, data: bytes) -> None:
    f.write(data)
    digest.update(data)


def _create_private(path: Path) -> IO[bytes]:
    """A new file at ``path`` open for writing, mode 0600 from its creation: no moment
    in which another user could open it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    return os.fdopen(fd, "wb")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _read_range(f: IO[bytes], start: int, length: int) -> AsyncIterator[bytes]:
    try:
        await asyncio.to_thread(f.seek, start)
        remaining = length
        while remaining > 0:
            data = await asyncio.to_thread(f.read, min(CHUNK, remaining))
            if not data:
                # The file is shorter than its metadata says: fail the transfer rather
                # than end it early and let the client think it got the whole image.
                raise OSError(f"image file {f.name} ended {remaining} bytes early")
            remaining -= len(data)
            yield data
    finally:
        f.close()
