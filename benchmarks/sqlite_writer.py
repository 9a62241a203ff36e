#!/usr/bin/env python3
"""The control server's SQLite writer: small write transactions, inline against threaded.

The control server's writes go through one SQLite connection. aiosqlite runs every call
on a thread of its own; ``yun.control.db.session`` runs the writer's calls on the event
loop's thread instead (``_InlineConnection``). This script times the same small write
transaction (one primary-key SELECT and one INSERT of a flow row, then COMMIT) through
:class:`~yun.control.db.session.Database` both ways, in one run, on a fresh database in
a temporary directory, and prints CPU and wall milliseconds per transaction.

Run: ``.venv/bin/python benchmarks/sqlite_writer.py [--transactions N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import tempfile
import time
from functools import partial

import aiosqlite
from sqlalchemy import select

from yun.control.db import session as db_session
from yun.control.db.models import FlowRow
from yun.control.db.session import Database


async def _threaded(database: str | None) -> aiosqlite.Connection:
    """aiosqlite's own connection: every call through its thread."""
    connection = aiosqlite.Connection(
        partial(sqlite3.connect, database or ":memory:", timeout=30), 64)
    connection._thread.daemon = True
    return await connection


async def measure(transactions: int, inline: bool) -> tuple[float, float]:
    """CPU and wall milliseconds per transaction."""
    workdir = tempfile.mkdtemp(prefix="yun-bench-sqlite-")
    original = db_session._inline_sqlite
    if not inline:
        db_session._inline_sqlite = _threaded  # type: ignore[assignment]
    try:
        db = Database(f"sqlite:///{workdir}/control.db")
        await db.migrate()
        cpu, wall = time.process_time(), time.perf_counter()
        for i in range(transactions):
            async with db.session() as session:
                await session.execute(select(FlowRow.uuid).where(FlowRow.uuid == f"f{i}"))
                session.add(FlowRow(uuid=f"f{i}", kind="bench", resource_type="bench",
                                    resource_uuid=f"r{i}", state="succeeded", context={},
                                    steps=[]))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        await db.dispose()
        return 1000 * cpu / transactions, 1000 * wall / transactions
    finally:
        db_session._inline_sqlite = original
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=3000)
    args = parser.parse_args()
    threaded = asyncio.run(measure(args.transactions, inline=False))
    inline = asyncio.run(measure(args.transactions, inline=True))
    print(f"{args.transactions} small write transactions (SELECT by key, INSERT, COMMIT), "
          "SQLite WAL, synchronous=NORMAL")
    print(f"  aiosqlite, threaded : {threaded[0]:.3f} ms CPU, {threaded[1]:.3f} ms wall each")
    print(f"  inline writer       : {inline[0]:.3f} ms CPU, {inline[1]:.3f} ms wall each")
    print(f"  inline / threaded   : {inline[0] / threaded[0]:.2f} (CPU), "
          f"{inline[1] / threaded[1]:.2f} (wall)")


if __name__ == "__main__":
    main()
