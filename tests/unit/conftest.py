"""Fixtures shared by unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from yun.control.db.session import Database


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    """A migrated SQLite control database of the test's own (flow engine tests)."""
    database = Database(f"sqlite+aiosqlite:///{tmp_path}/flows.db")
    await database.migrate()
    yield database
    await database.dispose()
