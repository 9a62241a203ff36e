"""The Storage Server's image store: files on disk with a JSON metadata sidecar.

Layout under ``root``::

    images/<image_id>        the image data, never modified once stored
    images/<image_id>.json   its metadata; its presence is what makes the image exist
    uploads/<image_id>       the bytes of an unfinished upload, kept to resume it
    uploads/<image_id>.json  its state (declared size, format, sha256, name)
    tmp/<image_id>.<random>  conversions and repeated uploads in progress

An upload appends to ``uploads/<image_id>`` while its sha256 is computed. A transfer
that breaks off keeps the bytes received: the uploader asks how many there are
(:meth:`ImageStore.upload_status`) and sends the rest with a ``Content-Range``. When the
last byte has arrived the sum is checked against the one the uploader announced, the
file is vetted by :mod:`yun.storage.formats`, converted to qcow2 when it is a foreign
format (vmdk, vdi, vhdx, vpc), and only then renamed into ``images/`` (atomic on one
file system) before its sidecar is written (also by atomic rename). A refused upload
loses its partial bytes, so the store never holds half an image. Partial uploads are
removed by :meth:`ImageStore.delete`, which the control server calls when it deletes the
image or gives up on its upload (``upload_timeout``): the storage server itself never
sweeps them.

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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from pydantic import BaseModel, ValidationError

from yun.proto.errors import (
    BadRequest,
    Conflict,
    NotFound,
    PayloadTooLarge,
    Unavailable,
    Unprocessable,
    YunError,
)
from yun.proto.messages import StorageImageReport
from yun.proto.resources import ImageUploadStatus
from yun.storage.formats import ImageFormatError, detect_format, normalize_format
from yun.util import qemu_img
from yun.util.ids import uuid_problem
from yun.util.image_files import image_file, read_sidecar, sidecar_path, write_sidecar

log = logging.getLogger("yun.storage.store")

CHUNK = 1024 * 1024
MAX_NAME = 255
DIR_MODE = 0o700
FILE_MODE = 0o600
# Formats converted to qcow2 when stored: nodes then deal with qcow2, raw and iso only.
FOREIGN_FORMATS = frozenset({"vmdk", "vdi", "vhdx", "vpc"})
STORED_FORMAT = "qcow2"
_SHA256_HEX = frozenset("0123456789abcdef")


class RangeNotSatisfiable(YunError):
    """A download range outside the image; ``size`` goes into ``Content-Range: bytes */size``."""

    status = 416
    title = "Range not satisfiable"

    def __init__(self, detail: str, *, size: int) -> None:
        super().__init__(detail)
        self.size = size


class OffsetMismatch(Conflict):
    """A resumed upload starts elsewhere than where the stored bytes end."""

    def __init__(self, image_id: str, offset: int, start: int, total: int | None) -> None:
        super().__init__(
            f"upload of image {image_id} holds {offset} bytes: resume at offset {offset} "
            f"(Content-Range: bytes {offset}-…/{total if total is not None else 'TOTAL'}), "
            f"not at {start}",
            errors=[{"offset": offset, "total": total}])
        self.offset = offset


@dataclass(frozen=True)
class ContentRange:
    """A ``Content-Range: bytes START-END/TOTAL`` of an upload request (END inclusive).

    ``bytes */TOTAL`` (``end`` None, ``start`` == ``total``) carries no bytes: it asks to
    complete an upload whose bytes have all arrived (its completion was interrupted).
    """

    start: int
    end: int | None
    total: int


def parse_content_range(header: str) -> ContentRange:
    """Parse an upload's ``Content-Range``; raise :class:`BadRequest` naming the problem."""
    text = header.strip()
    unit, _, spec = text.partition(" ")
    if unit != "bytes" or "/" not in spec:
        raise BadRequest(f"unsupported Content-Range {header[:80]!r}; use "
                         "'bytes START-END/TOTAL' or 'bytes */TOTAL'")
    span, _, total_text = spec.strip().partition("/")
    if not total_text.isdigit():
        raise BadRequest(f"Content-Range {header[:80]!r} must end in the total size in "
                         "bytes (an upload's size is known)")
    total = int(total_text)
    if span == "*":
        return ContentRange(start=total, end=None, total=total)
    first, dash, last = span.partition("-")
    if not dash or not first.isdigit() or not last.isdigit():
        raise BadRequest(f"unsupported Content-Range {header[:80]!r}; use "
                         "'bytes START-END/TOTAL' or 'bytes */TOTAL'")
    start, end = int(first), int(last)
    if end < start:
        raise BadRequest(f"Content-Range {header[:80]!r} ends before it starts")
    if end >= total:
        raise BadRequest(f"Content-Range {header[:80]!r} goes past its total of "
                         f"{total} bytes")
    return ContentRange(start=start, end=end, total=total)


def check_sha256(value: str | None) -> str | None:
    """``value`` in lower case if it is 64 hex digits (None stays None)."""
    if value is None or value == "":
        return None
    lowered = value.strip().lower()
    if len(lowered) != 64 or not set(lowered) <= _SHA256_HEX:
        raise BadRequest(f"sha256 must be 64 hex digits, not {value[:80]!r}")
    return lowered


class ImageRecord(BaseModel):
    """The metadata of one stored image (its sidecar). ``size`` and ``sha256`` are
    those of the stored file (what nodes verify); ``upload_*`` those of the bytes
    uploaded, which differ when a foreign format was converted."""

    id: str
    name: str
    format: str
    size: int
    virtual_size: int
    sha256: str
    created_at: datetime
    source_format: str | None = None
    upload_size: int | None = None
    upload_sha256: str | None = None

    def report(self) -> StorageImageReport:
        """This image as the storage server reports it to the control server."""
        return StorageImageReport(
            image_id=self.id,
            size=self.size,
            sha256=self.sha256,
            format=self.format,
            virtual_size=self.virtual_size,
            source_format=self.source_format,
        )


class UploadState(BaseModel):
    """What an unfinished upload was declared as (its ``uploads/<id>.json``)."""

    id: str
    name: str = ""
    declared_format: str | None = None
    expected_sha256: str | None = None
    total: int | None = None
    started_at: datetime


@dataclass(frozen=True)
class PutResult:
    """What one upload request achieved: the image when it is complete (``record`` None
    while bytes are missing), whether it is new, and the bytes held so far."""

    record: ImageRecord | None
    created: bool
    offset: int
    total: int | None


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

    def __init__(self, root: Path, publish_dir: Path | None = None) -> None:
        """``publish_dir`` (shared mode): every stored image is also linked there, in the
        layout nodes take images from (:mod:`yun.util.image_files`), so the nodes of
        shared pools use it in place; ``root`` must then be on the same file system."""
        self.root = Path(root)
        self.publish_dir = Path(publish_dir) if publish_dir is not None else None
        self.images_dir = self.root / "images"
        self.tmp_dir = self.root / "tmp"
        self.uploads_dir = self.root / "uploads"
        for directory in (self.root, self.images_dir, self.tmp_dir, self.uploads_dir):
            directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            # mkdir's mode is masked by the umask and ignored for an existing directory
            # (a store made by an older version, 0755): set it outright.
            os.chmod(directory, DIR_MODE)
        # Commit (compare, rename, write sidecar) and delete are short; one lock for
        # the whole store keeps two uploads of the same id from both "winning".
        self._commit_lock = asyncio.Lock()
        # Uploads receiving bytes now (one request per upload at a time), and the sha256
        # state of interrupted ones (saves hashing their bytes again on resume).
        self._receiving: set[str] = set()
        self._digests: dict[str, tuple[int, hashlib._Hash]] = {}
        self._sweep_tmp()
        self._tighten_modes()
        if self.publish_dir is not None:
            self.publish_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            for record in self.list():  # stored before the mode was shared, or lost
                self._publish(record)

    def _published(self, image_id: str, fmt: str) -> Path | None:
        if self.publish_dir is None:
            return None
        return image_file(self.publish_dir, image_id, fmt)

    def _publish(self, record: ImageRecord) -> None:
        """Link the image into the shared mount's images/ with its checksum sidecar (a
        hard link: no copy, on the one file system of the shared storage)."""
        target = self._published(record.id, record.format)
        if target is None:
            return
        sidecar = sidecar_path(target)
        if target.exists() and read_sidecar(sidecar) == record.sha256:
            return
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}")
        try:
            os.link(self.data_path(record.id), tmp)
        except OSError as exc:
            raise Unavailable(
                f"image {record.id}: cannot link it into {self.publish_dir} ({exc}); the "
                f"store ({self.root}) must be on the shared mount itself") from exc
        os.replace(tmp, target)
        write_sidecar(sidecar, record.sha256)
        log.info("image published on the shared mount",
                 extra={"image": record.id, "path": str(target)})

    def _unpublish(self, image_id: str) -> None:
        if self.publish_dir is None:
            return
        for path in self.publish_dir.glob(f"{check_image_id(image_id)}.*"):
            if path.name.endswith(".lock"):
                continue  # a node's fetch lock, harmless
            path.unlink(missing_ok=True)

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

    def _partial_path(self, image_id: str) -> Path:
        return self.uploads_dir / check_image_id(image_id)

    def _upload_meta_path(self, image_id: str) -> Path:
        return self.uploads_dir / f"{check_image_id(image_id)}.json"

    def _load_upload(self, image_id: str) -> UploadState | None:
        try:
            return UploadState.model_validate_json(self._upload_meta_path(image_id).read_bytes())
        except FileNotFoundError:
            return None
        except ValidationError as exc:
            log.warning("unreadable upload state; upload starts over",
                        extra={"image": image_id, "error": str(exc)})
            return None

    def _save_upload(self, state: UploadState) -> None:
        meta_tmp = self.tmp_dir / f"{state.id}.upload.{secrets.token_hex(4)}"
        try:
            with _create_private(meta_tmp) as f:
                f.write(state.model_dump_json().encode())
            os.replace(meta_tmp, self._upload_meta_path(state.id))
        finally:
            meta_tmp.unlink(missing_ok=True)

    def _discard_partial(self, image_id: str) -> bool:
        """Forget an unfinished upload: its bytes, its state, its cached hash."""
        self._digests.pop(image_id, None)
        partial = self._partial_path(image_id)
        existed = partial.exists()
        self._upload_meta_path(image_id).unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
        if existed:
            log.info("partial upload removed", extra={"image": image_id})
        return existed

    def upload_status(self, image_id: str) -> ImageUploadStatus:
        """How many bytes of ``image_id`` the store holds: where an upload resumes."""
        record = self._load(image_id)
        if record is not None:
            size = record.upload_size if record.upload_size is not None else record.size
            return ImageUploadStatus(image_id=image_id, offset=size, total=size,
                                     complete=True)
        state = self._load_upload(image_id)
        offset = _size_or_zero(self._partial_path(image_id))
        return ImageUploadStatus(image_id=image_id, offset=offset,
                                 total=state.total if state else None)

    async def put(
        self,
        image_id: str,
        chunks: AsyncIterable[bytes],
        *,
        name: str = "",
        declared_format: str | None = None,
        max_bytes: int | None = None,
        content_range: ContentRange | None = None,
        expected_sha256: str | None = None,
    ) -> PutResult:
        """Receive (part of) image ``image_id`` from ``chunks``.

        Without ``content_range`` the chunks are the whole image (any earlier partial
        upload of the id is dropped). With one, they are the bytes ``start..end`` of an
        upload of ``total`` bytes, and ``start`` must be the number of bytes the store
        already holds (else :class:`OffsetMismatch`, naming that offset). The upload
        completes when the last byte has arrived: the sha256 of the bytes is checked
        against ``expected_sha256``, the format vetted, foreign formats converted to
        qcow2, and the image committed; a refused upload leaves nothing behind. An
        interrupted transfer keeps the bytes received, for a later resume.

        Storing the same content again under the same id is a no-op (``created``
        False); different content under an existing id raises :class:`Conflict`.
        """
        check_image_id(image_id)
        name = _check_name(name)
        try:
            declared = normalize_format(declared_format)
        except ImageFormatError as exc:
            raise Unprocessable(str(exc)) from exc
        expected = check_sha256(expected_sha256)
        total = content_range.total if content_range else None
        if max_bytes is not None and total is not None and total > max_bytes:
            raise PayloadTooLarge(
                f"upload of {total} bytes exceeds the limit of {max_bytes} bytes")
        existing = self._load(image_id)
        if existing is not None and content_range is not None:
            # A resumed upload whose completion answer was lost: it is done.
            return PutResult(existing, False, existing.upload_size or existing.size,
                             existing.upload_size)
        if image_id in self._receiving:
            raise Conflict(f"an upload of image {image_id} is already in progress; retry "
                           "when it has ended")
        self._receiving.add(image_id)
        try:
            if existing is not None:
                return await self._put_again(existing, chunks, max_bytes)
            if content_range is None:
                self._discard_partial(image_id)
            state = self._upload_state(image_id, name, declared, expected, total)
            partial = self._partial_path(image_id)
            offset = await asyncio.to_thread(_size_or_zero, partial)
            start = content_range.start if content_range else 0
            if start != offset:
                raise OffsetMismatch(image_id, offset, start, state.total)
            if content_range is not None and content_range.end is not None:
                limit: int | None = content_range.end + 1
            else:
                limit = state.total
            try:
                size, digest = await self._append(image_id, partial, offset, chunks, limit,
                                                  max_bytes)
            except PayloadTooLarge:
                self._discard_partial(image_id)  # it can never complete
                raise
            if state.total is not None and size < state.total:
                log.info("upload chunk stored", extra={"image": image_id, "offset": size,
                                                       "total": state.total})
                return PutResult(None, False, size, state.total)
            record, created = await self._complete(image_id, state, partial, size,
                                                   digest.hexdigest())
            return PutResult(record, created, size, size)
        finally:
            self._receiving.discard(image_id)

    def _upload_state(self, image_id: str, name: str, declared: str | None,
                      expected: str | None, total: int | None) -> UploadState:
        """The state of the upload of ``image_id``, made or checked against this request."""
        state = self._load_upload(image_id)
        if state is None:
            state = UploadState(id=image_id, name=name, declared_format=declared,
                                expected_sha256=expected, total=total,
                                started_at=datetime.now(UTC))
            self._save_upload(state)
            return state
        if total is not None and state.total is not None and total != state.total:
            raise Conflict(f"upload of image {image_id} was declared {state.total} bytes "
                           f"long; this request says {total}")
        if expected and state.expected_sha256 and expected != state.expected_sha256:
            raise Conflict(f"upload of image {image_id} was declared with sha256 "
                           f"{state.expected_sha256}; this request says {expected}")
        changed = state.model_copy(update={
            "total": state.total if state.total is not None else total,
            "expected_sha256": state.expected_sha256 or expected,
            "declared_format": state.declared_format or declared,
            "name": state.name or name,
        })
        if changed != state:
            self._save_upload(changed)
        return changed

    async def _append(
        self, image_id: str, partial: Path, offset: int, chunks: AsyncIterable[bytes],
        limit: int | None, max_bytes: int | None,
    ) -> tuple[int, hashlib._Hash]:
        """Append ``chunks`` to the partial file (``offset`` bytes long); return its new
        length and the sha256 state of all its bytes.

        The hash state of an interrupted upload is kept in memory while the process
        lives; after a restart the bytes on disk are hashed again on resume.
        """
        digest = await self._digest_of(image_id, partial, offset)
        size = offset
        pending: list[bytes] = []
        pending_len = 0
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, FILE_MODE)
        writing = False
        with os.fdopen(fd, "ab") as f:
            try:
                async for chunk in chunks:
                    if not chunk:
                        continue
                    if limit is not None and size + len(chunk) > limit:
                        raise BadRequest(
                            f"the body goes past byte {limit - 1}, the end its Content-Range "
                            f"(or declared size) gives; {size - offset} bytes were taken")
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise PayloadTooLarge(f"upload exceeds the limit of {max_bytes} bytes")
                    pending.append(chunk)
                    pending_len += len(chunk)
                    # Batch small network chunks so each thread hop writes and hashes
                    # CHUNK bytes (hashlib releases the GIL on large buffers).
                    if pending_len >= CHUNK:
                        writing = True
                        await asyncio.to_thread(_write_hash, f, digest, b"".join(pending))
                        writing = False
                        pending, pending_len = [], 0
                if pending:
                    writing = True
                    await asyncio.to_thread(_write_hash, f, digest, b"".join(pending))
                    writing = False
            except BaseException:
                # What was received stays, a valid prefix to resume from. A batch whose
                # write was cut (cancelled mid-thread) is not trusted: the bytes on disk
                # are hashed again on resume.
                if writing:
                    self._digests.pop(image_id, None)
                else:
                    if pending:
                        _write_hash(f, digest, b"".join(pending))  # at most CHUNK bytes
                    f.flush()
                    self._digests[image_id] = (size, digest)
                log.info("upload interrupted; bytes kept for resuming",
                         extra={"image": image_id, "offset": _size_or_zero(partial)})
                raise
        self._digests[image_id] = (size, digest)
        return size, digest

    async def _digest_of(self, image_id: str, partial: Path, offset: int) -> hashlib._Hash:
        cached = self._digests.pop(image_id, None)
        if cached is not None and cached[0] == offset:
            return cached[1]
        if offset == 0:
            return hashlib.sha256()
        log.info("hashing partial upload again to resume it",
                 extra={"image": image_id, "offset": offset})
        digest, _ = await asyncio.to_thread(_hash_file, partial)
        return digest

    async def _complete(self, image_id: str, state: UploadState, partial: Path, size: int,
                        sha256: str) -> tuple[ImageRecord, bool]:
        """Vet, convert and commit a fully received upload; a refusal removes its bytes."""
        converted = self.tmp_dir / f"{image_id}.{secrets.token_hex(8)}.qcow2"
        try:
            if state.expected_sha256 and sha256 != state.expected_sha256:
                raise Unprocessable(
                    f"checksum mismatch: the uploader declared sha256 {state.expected_sha256} "
                    f"but the {size} bytes received have sha256 {sha256}; nothing was stored")
            await asyncio.to_thread(_fsync_path, partial)
            try:
                detected = await detect_format(partial, state.declared_format)
            except ImageFormatError as exc:
                raise Unprocessable(str(exc)) from exc
            stored, fmt, source = partial, detected.format, None
            stored_size, stored_sha, virtual_size = size, sha256, detected.virtual_size
            if fmt in FOREIGN_FORMATS:
                try:
                    await qemu_img.convert(partial, converted, src_fmt=fmt,
                                           dst_fmt=STORED_FORMAT)
                    os.chmod(converted, FILE_MODE)
                    info = await qemu_img.info(converted, fmt=STORED_FORMAT)
                except qemu_img.QemuImgError as exc:
                    raise Unprocessable(f"{fmt} image cannot be converted to "
                                        f"{STORED_FORMAT}: {exc}") from exc
                digest, stored_size = await asyncio.to_thread(_hash_file, converted, True)
                stored, source = converted, fmt
                fmt, stored_sha, virtual_size = STORED_FORMAT, digest.hexdigest(), \
                    info.virtual_size
            async with self._commit_lock:
                existing = self._load(image_id)
                if existing is not None:
                    if (existing.upload_sha256 or existing.sha256) == sha256:
                        log.info("image already stored", extra={"image": image_id})
                        self._discard_partial(image_id)
                        return existing, False
                    raise Conflict(
                        f"image {image_id} already exists with different content "
                        f"(sha256 {existing.upload_sha256 or existing.sha256}, upload has "
                        f"{sha256})")
                record = ImageRecord(
                    id=image_id, name=state.name, format=fmt, size=stored_size,
                    virtual_size=virtual_size, sha256=stored_sha,
                    created_at=datetime.now(UTC), source_format=source,
                    upload_size=size, upload_sha256=sha256,
                )
                await asyncio.to_thread(self._commit, stored, record)
        except (Unprocessable, Conflict) as exc:
            log.info("upload refused; its bytes removed",
                     extra={"image": image_id, "reason": exc.detail})
            self._discard_partial(image_id)
            raise
        finally:
            converted.unlink(missing_ok=True)
        self._discard_partial(image_id)
        log.info("image stored", extra={
            "image": image_id, "sha256": record.sha256, "format": record.format,
            "source_format": source, "size": record.size, "upload_size": size})
        return record, True

    async def _put_again(self, existing: ImageRecord, chunks: AsyncIterable[bytes],
                         max_bytes: int | None) -> PutResult:
        """A whole upload of an image already stored: a no-op when the bytes are the same."""
        tmp = self.tmp_dir / f"{existing.id}.{secrets.token_hex(8)}"
        try:
            size, digest = await self._append(existing.id, tmp, 0, chunks, None, max_bytes)
        finally:
            tmp.unlink(missing_ok=True)
            self._digests.pop(existing.id, None)
        sha256 = digest.hexdigest()
        if (existing.upload_sha256 or existing.sha256) != sha256:
            raise Conflict(
                f"image {existing.id} already exists with different content "
                f"(sha256 {existing.upload_sha256 or existing.sha256}, upload has {sha256})")
        log.info("image already stored", extra={"image": existing.id})
        return PutResult(existing, False, size, size)

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
        self._publish(record)

    async def delete(self, image_id: str) -> bool:
        """Remove an image and any unfinished upload of it; return whether either existed
        (no error when neither did)."""
        check_image_id(image_id)
        async with self._commit_lock:
            meta = self._meta_path(image_id)
            existed = meta.exists()
            # Sidecar first: once it is gone the image no longer exists, even if the
            # process dies before the data file is removed.
            meta.unlink(missing_ok=True)
            self._unpublish(image_id)
            self.data_path(image_id).unlink(missing_ok=True)
            partial = self._discard_partial(image_id)
        if existed:
            log.info("image deleted", extra={"image": image_id})
        return existed or partial


def _write_hash(f: IO[bytes], digest: hashlib._Hash, data: bytes) -> None:
    f.write(data)
    digest.update(data)


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _hash_file(path: Path, sync: bool = False) -> tuple[hashlib._Hash, int]:
    """The sha256 state and length of a file (fsynced first when ``sync``)."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        if sync:
            os.fsync(f.fileno())
        while data := f.read(CHUNK * 4):
            digest.update(data)
            size += len(data)
    return digest, size


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
