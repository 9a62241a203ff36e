"""Database engine, sessions and migrations of the control server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from yun.util import metrics

log = logging.getLogger("yun.control.db")

T = TypeVar("T")

MIGRATIONS = Path(__file__).parent / "migrations"
# Reader connections of an SQLite database (each is a thread of aiosqlite's).
SQLITE_READERS = 2


def sync_url(url: str) -> str:
    """The same database with a blocking driver, for Alembic."""
    parsed = make_url(url)
    if parsed.drivername.startswith("sqlite"):
        return parsed.set(drivername="sqlite").render_as_string(hide_password=False)
    if parsed.drivername.startswith("postgresql"):
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return url


def async_url(url: str) -> str:
    parsed = make_url(url)
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        return parsed.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return url


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", sync_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (blocking)."""
    parsed = make_url(sync_url(url))
    if parsed.drivername == "sqlite" and parsed.database:
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


class Database:
    """The control server's connection pool."""

    def __init__(self, url: str) -> None:
        self.url = async_url(url)
        is_sqlite = self.url.startswith("sqlite")
        kwargs: dict[str, object] = {}
        if is_sqlite:
            # SQLite admits one writer at a time, and its busy handler makes competing
            # writers sleep and poll: under load that collapses throughput. One shared
            # connection makes transactions queue in asyncio instead, in arrival order.
            kwargs.update(pool_size=1, max_overflow=0, pool_timeout=300,
                          async_creator=partial(_inline_sqlite, make_url(self.url).database))
        else:
            kwargs.update(pool_size=20, max_overflow=20, pool_pre_ping=True)
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        if is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)
        self.reader: AsyncEngine | None = None
        self.read_sessionmaker = self.sessionmaker
        database = self.engine.url.database
        if is_sqlite and database and database != ":memory:":
            # WAL lets readers run beside the one writer: API reads (task polls, lists)
            # get connections of their own instead of queueing behind every write.
            self.reader = create_async_engine(
                self.url, pool_size=SQLITE_READERS, max_overflow=0, pool_timeout=300,
                async_creator=partial(_inline_sqlite, database))
            event.listen(self.reader.sync_engine, "connect", _sqlite_reader_pragmas)
            self.read_sessionmaker = async_sessionmaker(self.reader, expire_on_commit=False)

    async def migrate(self) -> None:
        await asyncio.to_thread(_private_sqlite_file, self.engine.url.database
                                if self.url.startswith("sqlite") else None)
        await asyncio.to_thread(upgrade, self.url)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session in one transaction: committed on success, rolled back on error."""
        with metrics.timed_transaction("write"):
            async with self.sessionmaker() as session, session.begin():
                yield session

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncSession]:
        """A session for reads only. On SQLite it runs on reader connections, beside the
        writer (it sees what was committed when it began); elsewhere it is a session
        like :meth:`session`. Writing in it fails on SQLite."""
        with metrics.timed_transaction("read"):
            async with self.read_sessionmaker() as session, session.begin():
                yield session

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self.reader is not None:
            await self.reader.dispose()


def _private_sqlite_file(path: str | None) -> None:
    """Make the SQLite database file (and so its -wal and -shm files, which SQLite creates
    with the database's mode) readable by its owner only: it holds password hashes and API
    key secrets."""
    if not path or path == ":memory:":
        return
    db_file = Path(path)
    db_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(db_file, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f"{db_file}{suffix}", 0o600)


class _InlineConnection(aiosqlite.Connection):
    """An aiosqlite connection whose statements run on the event loop's thread.

    aiosqlite hands every call to a thread of its own and back. For the control
    server's short statements (a WAL commit with ``synchronous=NORMAL`` writes without a
    flush) those two hand-offs cost far more than the statement: under a bulk create
    they were a third of the control server's CPU. And in a process whose event loop
    keeps the GIL busy, each hand-off waits for the GIL (up to the 5 ms switch interval):
    reads on threaded connections took 2.4 s on average during a bulk create. A long
    query holds up the loop instead, as its rows' Python-side processing would anyway."""

    async def _execute(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if not self._running or not self._connection:
            raise ValueError("Connection closed")
        return fn(*args, **kwargs)


async def _inline_sqlite(database: str | None) -> aiosqlite.Connection:
    # check_same_thread: aiosqlite opens the connection on its thread; it is used here.
    connection = _InlineConnection(
        partial(sqlite3.connect, database or ":memory:", timeout=30, check_same_thread=False),
        64)
    connection._thread.daemon = True  # as SQLAlchemy does for aiosqlite's own
    return await connection


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_reader_pragmas(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA query_only=ON")
    cursor.close()
