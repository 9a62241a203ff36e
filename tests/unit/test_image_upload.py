"""Resumable uploads in the storage server's store: Content-Range parsing, resuming at
the right offset, checksums, conversion of foreign formats, nothing left on refusal."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from yun.proto.errors import BadRequest, Conflict, Unprocessable
from yun.storage.store import (
    ContentRange,
    ImageStore,
    OffsetMismatch,
    check_sha256,
    parse_content_range,
)
from yun.util.run import run


class Cut(Exception):
    """The connection broke off (what a client disconnect looks like to the store)."""


async def body(data: bytes, size: int = 64 * 1024, cut_after: int | None = None
               ) -> AsyncIterator[bytes]:
    sent = 0
    for i in range(0, len(data), size):
        if cut_after is not None and sent >= cut_after:
            raise Cut
        yield data[i:i + size]
        sent += len(data[i:i + size])


def image_file(tmp_path: Path, fmt: str, size: str = "64M") -> bytes:
    path = tmp_path / f"src.{fmt}"
    run(["qemu-img", "create", "-q", "-f", fmt, str(path), size])
    return path.read_bytes()


def left(store: ImageStore) -> list[str]:
    return sorted(p.name for d in (store.images_dir, store.uploads_dir, store.tmp_dir)
                  for p in d.iterdir())


# --- pure parts --------------------------------------------------------------------


@pytest.mark.parametrize(("header", "expected"), [
    ("bytes 0-99/100", ContentRange(0, 99, 100)),
    ("bytes 50-99/100", ContentRange(50, 99, 100)),
    ("bytes 50-59/100", ContentRange(50, 59, 100)),
    ("bytes */100", ContentRange(100, None, 100)),
    ("  bytes 0-0/1 ", ContentRange(0, 0, 1)),
])
def test_content_range_is_parsed(header: str, expected: ContentRange) -> None:
    assert parse_content_range(header) == expected


@pytest.mark.parametrize(("header", "why"), [
    ("bytes 0-99/*", "total size"),
    ("items 0-99/100", "unsupported"),
    ("bytes 0-100/100", "goes past"),
    ("bytes 60-50/100", "ends before it starts"),
    ("bytes -5/100", "unsupported"),
    ("bytes 5-/100", "unsupported"),
    ("bytes=0-99/100", "unsupported"),
    ("", "unsupported"),
])
def test_bad_content_ranges_are_refused_by_name(header: str, why: str) -> None:
    with pytest.raises(BadRequest, match=why):
        parse_content_range(header)


def test_sha256_is_checked_and_lowered() -> None:
    assert check_sha256("AB" * 32) == "ab" * 32
    assert check_sha256(None) is None
    for bad in ("ab" * 31, "zz" * 32, "ab" * 33):
        with pytest.raises(BadRequest, match="64 hex digits"):
            check_sha256(bad)


# --- the store ---------------------------------------------------------------------


async def test_an_interrupted_upload_resumes_at_the_offset_held(tmp_path: Path) -> None:
    data = image_file(tmp_path, "qcow2")
    total, image_id = len(data), str(uuid.uuid4())
    store = ImageStore(tmp_path / "store")
    digest = hashlib.sha256(data).hexdigest()
    with pytest.raises(Cut):
        await store.put(image_id, body(data, cut_after=64 * 1024),
                        content_range=ContentRange(0, total - 1, total), expected_sha256=digest)
    held = store.upload_status(image_id)
    assert (held.offset, held.total, held.complete) == (64 * 1024, total, False)
    assert not (store.images_dir / f"{image_id}.json").exists()

    # Resuming anywhere else is refused, naming the offset the store has.
    with pytest.raises(OffsetMismatch, match=f"resume at offset {held.offset}") as refused:
        await store.put(image_id, body(data[1000:]),
                        content_range=ContentRange(1000, total - 1, total))
    assert refused.value.errors == [{"offset": held.offset, "total": total}]
    # ... as is another total than the one declared first.
    with pytest.raises(Conflict, match=f"declared {total} bytes"):
        await store.put(image_id, body(data[held.offset:]),
                        content_range=ContentRange(held.offset, total, total + 1))

    # A part that does not complete it, then the rest; with a fresh store (a restart:
    # the hash of the bytes on disk is computed again).
    middle = held.offset + (total - held.offset) // 2
    part = await store.put(image_id, body(data[held.offset:middle]),
                           content_range=ContentRange(held.offset, middle - 1, total))
    assert (part.record, part.offset) == (None, middle)
    store = ImageStore(tmp_path / "store")
    done = await store.put(image_id, body(data[middle:]),
                           content_range=ContentRange(middle, total - 1, total))
    assert done.created and done.record is not None
    assert done.record.sha256 == digest and done.record.format == "qcow2"
    assert (store.images_dir / image_id).read_bytes() == data
    assert left(store) == sorted([image_id, f"{image_id}.json"])
    assert store.upload_status(image_id).complete
    # A repeat of the last part after a lost answer answers the image.
    again = await store.put(image_id, body(b""), content_range=ContentRange(total, None, total))
    assert again.record == done.record and not again.created


async def test_a_checksum_mismatch_is_refused_naming_both_sums(tmp_path: Path) -> None:
    data = image_file(tmp_path, "qcow2")
    store = ImageStore(tmp_path / "store")
    image_id, wrong = str(uuid.uuid4()), "0" * 64
    actual = hashlib.sha256(data).hexdigest()
    with pytest.raises(Unprocessable, match=f"declared sha256 {wrong} .* have sha256 {actual}"):
        await store.put(image_id, body(data), expected_sha256=wrong)
    assert left(store) == []


async def test_a_body_longer_than_its_range_is_refused(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    image_id = str(uuid.uuid4())
    with pytest.raises(BadRequest, match="goes past byte 511"):
        await store.put(image_id, body(b"\0" * 1024, size=512),
                        content_range=ContentRange(0, 511, 4096), declared_format="raw")
    assert store.upload_status(image_id).offset == 512  # what fitted stays


@pytest.mark.parametrize("fmt", ["vmdk", "vdi", "vhdx", "vpc"])
async def test_foreign_formats_are_stored_as_qcow2(tmp_path: Path, fmt: str) -> None:
    data = image_file(tmp_path, fmt)
    store = ImageStore(tmp_path / "store")
    image_id = str(uuid.uuid4())
    result = await store.put(image_id, body(data))
    record = result.record
    assert record is not None
    assert (record.format, record.source_format) == ("qcow2", fmt)
    stored = (store.images_dir / image_id).read_bytes()
    # What nodes verify is the stored file.
    assert record.sha256 == hashlib.sha256(stored).hexdigest()
    assert record.size == len(stored)
    assert record.upload_sha256 == hashlib.sha256(data).hexdigest()
    assert record.virtual_size >= 64 * 1024 * 1024
    info = run(["qemu-img", "info", "--output=json", str(store.images_dir / image_id)])
    assert '"format": "qcow2"' in info.stdout
    assert left(store) == sorted([image_id, f"{image_id}.json"])
    assert record.report().source_format == fmt


async def test_raw_bytes_declared_qcow2_are_refused_and_nothing_kept(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    image_id = str(uuid.uuid4())
    data = b"\x01" * 8192
    with pytest.raises(Unprocessable, match="declared qcow2 but qemu-img found no qcow2"):
        await store.put(image_id, body(data), declared_format="qcow2",
                        content_range=ContentRange(0, len(data) - 1, len(data)))
    assert left(store) == []


async def test_delete_removes_a_partial_upload(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    image_id = str(uuid.uuid4())
    await store.put(image_id, body(b"\0" * 1024), declared_format="raw",
                    content_range=ContentRange(0, 1023, 4096))
    assert store.upload_status(image_id).offset == 1024
    assert await store.delete(image_id)
    assert left(store) == []
    assert store.upload_status(image_id).offset == 0
