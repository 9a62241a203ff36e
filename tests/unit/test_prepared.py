"""Prepared statements of the hot reads: they see what the ORM would, in the same
transaction, and the scope still limits a lookup by uuid."""

from __future__ import annotations

import pytest

from yun.control.access.policy import Scope
from yun.control.db.models import FlowRow, TagRow, VmRow
from yun.control.db.prepared import row_by_uuid
from yun.control.db.session import Database
from yun.control.db.tags import tags_of
from yun.control.services.common import find
from yun.control.services.tasks import get_task
from yun.proto.context import RequestContext
from yun.proto.errors import NotFound
from yun.proto.identity import Role

UUID = "0d7a2c1e-1111-4c6b-9d52-5b4d1f2a3c4d"


async def test_column_rows_see_changes_pending_in_the_session(db: Database) -> None:
    async with db.session() as session:
        session.add(TagRow(resource_uuid=UUID, key="env", value="prod", resource_type="vm"))
        # Not flushed yet: the ORM's autoflush would include it, and so must the Core read.
        assert await tags_of(session, [UUID]) == {UUID: {"env": "prod"}}
        tag = await session.get(TagRow, (UUID, "env"))
        assert tag is not None
        tag.value = "test"
        assert await tags_of(session, [UUID]) == {UUID: {"env": "test"}}
        await session.delete(tag)
        assert await tags_of(session, [UUID]) == {UUID: {}}


def test_a_row_by_uuid_is_built_once_per_model() -> None:
    assert row_by_uuid(VmRow) is row_by_uuid(VmRow)
    assert row_by_uuid(VmRow) is not row_by_uuid(FlowRow)


def _scope(*projects: str) -> Scope:
    member = RequestContext(user_uuid="u", user_name="ann", project_uuid=projects[0],
                            roles=frozenset({Role.MEMBER}))
    return Scope(member, frozenset(projects))


async def test_lookups_by_uuid_keep_the_scope(db: Database) -> None:
    async with db.session() as session:
        session.add(FlowRow(uuid=UUID, kind="vm.create", resource_type="vm",
                            resource_uuid="r", project_uuid="p1", state="done"))
    admin = Scope(RequestContext(user_uuid="a", user_name="admin",
                                 roles=frozenset({Role.SUPER_ADMIN})), None)
    async with db.reading() as session:
        for lookup in (lambda sc: find(session, FlowRow, UUID, "task", sc),
                       lambda sc: get_task(session, UUID, sc)):
            assert (await lookup(admin)).kind == "vm.create"
            assert (await lookup(_scope("p1"))).kind == "vm.create"
            # Outside the scope: answered like a missing row.
            with pytest.raises(NotFound):
                await lookup(_scope("p2"))
            # The scoped lookup did not change the prepared statement.
            assert (await lookup(admin)).kind == "vm.create"
