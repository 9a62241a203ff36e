#!/usr/bin/env python3
"""A page of a big VM list: with the newest-first indexes of migration 0010, and without.

Writes ``--vms`` VMs (default 100,000; one project, one pool) into a fresh SQLite
database migrated to the head revision, in a temporary directory, then times the page of
50 the API reads (``yun.control.services.listing.list_page`` on a reader session, newest
first, the next-page cursor computed) for four requests: every project (an
administrator) and one project (a member), each without a filter and with
``q=state=running and vcpus>=1``. Then it drops the indexes of migration 0010 and times
the same four again: the baseline of the same run. It prints milliseconds per page (mean
of ``--pages`` reads after one warm-up read) and the ratio.

Run: ``.venv/bin/python benchmarks/list_pages.py [--vms N] [--pages N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert, text

from yun.control.access.policy import Scope
from yun.control.db.models import VmRow
from yun.control.db.session import Database
from yun.control.services.listing import ListParams, list_page
from yun.testing.seed import default_project_pool_image

INDEXES = ("ix_vms_created", "ix_vms_project_created")
FILTER = "state=running and vcpus>=1"


async def seed(db: Database, vms: int) -> str:
    """``vms`` running VMs a second apart; the project's uuid."""
    async with db.session() as session:
        project, pool = await default_project_pool_image(session)
        start = datetime(2026, 1, 1, tzinfo=UTC)
        for first in range(0, vms, 5000):
            await session.execute(insert(VmRow), [dict(
                uuid=str(uuid.uuid4()), name=f"vm-{i}", project_uuid=project, state="running",
                power_state="running", vcpus=1, memory_mb=256, disk_gb=1, image_uuid="img",
                pool_uuid=pool, created_at=start + timedelta(seconds=i), updated_at=start)
                for i in range(first, min(first + 5000, vms))])
    assert project is not None
    return project


async def page_ms(db: Database, scope: Scope, q: str | None, pages: int) -> float:
    params = ListParams(q=q, limit=50)
    async with db.reading() as session:
        await list_page(session, "vm", scope, params)  # warm-up: statement cache, pages
    started = time.perf_counter()
    for _ in range(pages):
        async with db.reading() as session:
            result = await list_page(session, "vm", scope, params)
        assert len(result.rows) == 50
    return (time.perf_counter() - started) / pages * 1000


async def timings(db: Database, project: str, pages: int) -> dict[str, float]:
    cases = {"every project": Scope(None, None),  # type: ignore[arg-type]
             "one project": Scope(None, frozenset({project}))}  # type: ignore[arg-type]
    out = {}
    for who, scope in cases.items():
        for q in (None, FILTER):
            out[f"{who}, {'q=' + q if q else 'no filter'}"] = await page_ms(db, scope, q, pages)
    return out


async def main(vms: int, pages: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="yun-list-pages-"))
    db = Database(f"sqlite+aiosqlite:///{root}/control.db")
    try:
        await db.migrate()
        started = time.perf_counter()
        project = await seed(db, vms)
        print(f"{vms} VMs written in {time.perf_counter() - started:.1f} s; "
              f"{pages} pages of 50 per case, newest first")
        with_indexes = await timings(db, project, pages)
        async with db.session() as session:
            for name in INDEXES:
                await session.execute(text(f"DROP INDEX {name}"))
        if db.reader is not None:
            await db.reader.dispose()  # connections opened afresh see the schema change
        without = await timings(db, project, pages)
        print(f"{'page of 50 VMs of ' + str(vms):48} | {'0010 indexes':>13} | "
              f"{'without':>9} | ratio")
        for case, ms in with_indexes.items():
            print(f"{case:48} | {ms:10.2f} ms | {without[case]:6.1f} ms | "
                  f"{without[case] / ms:5.1f}x")
    finally:
        await db.dispose()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=100_000, help="VMs in the list (100,000)")
    parser.add_argument("--pages", type=int, default=30, help="pages read per case (30)")
    args = parser.parse_args()
    asyncio.run(main(args.vms, args.pages))
