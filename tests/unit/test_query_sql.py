"""The list query translator on a real database: filters, tags, sorting, offset, cursors, count.

Every test runs on an in-memory SQLite and, when YUN_TEST_POSTGRES_URL is set, on PostgreSQL in
a schema of its own that is dropped afterwards. The data is built once per engine and never
changed, so the tests share it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import uuid as uuidlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import Boolean, Float, Integer, String, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import StaticPool

from yun.control.db.models import Base, TagRow, UTCDateTime
from yun.control.db.query import Field, PageResult, Queryable, fetch_page, where
from yun.proto.query import QueryError, SortKey, parse_query

PG_URL = os.environ.get("YUN_TEST_POSTGRES_URL", "")
pytestmark = pytest.mark.asyncio(loop_scope="module")


class ThingBase(DeclarativeBase):
    pass


class Thing(ThingBase):
    __tablename__ = "zq_things"

    uuid: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(63))
    vcpus: Mapped[int] = mapped_column(Integer)
    load: Mapped[float | None] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16))
    ha: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    note: Mapped[str | None] = mapped_column(String(255))
    secret: Mapped[str] = mapped_column(String(63), default="")


STATES = ("running", "stopped", "error", "unknown", "building")
T0 = datetime(2026, 11, 1, tzinfo=UTC)

THINGS = Queryable(
    model=Thing,
    fields={
        "uuid": Field(Thing.uuid),
        "name": Field(Thing.name),
        "vcpus": Field(Thing.vcpus, "int"),
        "load": Field(Thing.load, "float"),
        "state": Field(Thing.state, "enum", choices=frozenset(STATES)),
        "ha": Field(Thing.ha, "bool"),
        "created_at": Field(Thing.created_at, "datetime"),
        "seen_at": Field(Thing.seen_at, "datetime"),
        "note": Field(Thing.note),
        "secret": Field(Thing.secret, sortable=False),
    },
    uuid_column=Thing.uuid,
    default_sort=(SortKey("created_at", True),),
    tag_resource=Thing.uuid,
    tag_resource_type="thing",
)
UNTAGGED = Queryable(model=Thing, fields=THINGS.fields, uuid_column=Thing.uuid,
                     default_sort=(SortKey("name", False),))


@dataclass(frozen=True)
class Rec:
    uuid: str
    name: str
    vcpus: int
    load: float | None
    state: str
    ha: bool
    created_at: datetime
    seen_at: datetime | None
    note: str | None
    tags: dict[str, str]


def _make() -> list[Rec]:
    recs = []
    for i in range(30):
        # hex only: the same order under every collation, unrelated to insertion order
        uid = hashlib.sha256(str(i).encode()).hexdigest()[:32]
        tags: dict[str, str] = {}
        if i % 3 == 0:
            tags["env"] = "prod"
        elif i % 3 == 1:
            tags["env"] = "dev"
        if i % 7 == 0:
            tags["sys:ha"] = ""
        if i % 4 == 1:
            tags["team"] = f"Web-{i % 2}"
        recs.append(Rec(
            uuid=uid,
            name=f"{('web', 'db', 'cache')[i % 3]}{i:02d}",
            vcpus=1 + i % 4,
            load=None if i % 5 == 0 else i * 0.5,
            state=STATES[i % 5],
            ha=i % 2 == 0,
            created_at=T0 + timedelta(hours=i // 2),  # pairs share a timestamp
            seen_at=None if i % 4 == 0 else T0 + timedelta(minutes=7 * (i % 9)),
            note=None if i % 6 == 0 else f"Note {i}",
            tags=tags,
        ))
    return recs


RECS = _make()
BY_UUID = {r.uuid: r for r in RECS}


@dataclass
class Db:
    engine: AsyncEngine
    name: str

    async def page(self, queryable: Queryable = THINGS, **kw: Any) -> PageResult:
        kw.setdefault("scope", None)
        kw.setdefault("q", None)
        kw.setdefault("sort", None)
        kw.setdefault("limit", 1000)
        async with AsyncSession(self.engine) as session:
            return await fetch_page(session, queryable, **kw)

    async def uuids(self, q: str | None = None, sort: str | None = None, **kw: Any) -> list[str]:
        return [t.uuid for t in (await self.page(q=q, sort=sort, **kw)).rows]

    async def matching(self, q: str) -> set[str]:
        found = await self.uuids(q)
        assert len(found) == len(set(found))
        return set(found)


async def _fill(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(ThingBase.metadata.create_all)
        tags = Base.metadata.tables["resource_tags"]
        await conn.run_sync(Base.metadata.create_all, tables=[tags])
    async with AsyncSession(engine) as session, session.begin():
        for r in RECS:
            session.add(Thing(uuid=r.uuid, name=r.name, vcpus=r.vcpus, load=r.load,
                              state=r.state, ha=r.ha, created_at=r.created_at,
                              seen_at=r.seen_at, note=r.note))
            for key, value in r.tags.items():
                session.add(TagRow(resource_uuid=r.uuid, key=key, value=value,
                                   resource_type="thing"))
        # A tag of another resource type on the same uuid must not count.
        session.add(TagRow(resource_uuid=RECS[2].uuid, key="other", value="x",
                           resource_type="image"))


@pytest_asyncio.fixture(
    scope="module", loop_scope="module",
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
async def db(request: pytest.FixtureRequest) -> AsyncIterator[Db]:
    if request.param == "sqlite":
        engine = create_async_engine("sqlite+aiosqlite:///:memory:", poolclass=StaticPool)
        await _fill(engine)
        yield Db(engine, "sqlite")
        await engine.dispose()
        return
    if not PG_URL:
        pytest.skip("YUN_TEST_POSTGRES_URL is not set")
    schema = f"zq_test_{uuidlib.uuid4().hex[:12]}"
    admin = create_async_engine(PG_URL)
    async with admin.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = create_async_engine(PG_URL, connect_args={"options": f"-csearch_path={schema}"})
    try:
        await _fill(engine)
        yield Db(engine, "postgres")
    finally:
        await engine.dispose()
        async with admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


def expect(pred: Callable[[Rec], bool]) -> set[str]:
    return {r.uuid for r in RECS if pred(r)}


def _null_smallest(value: Any) -> tuple[bool, Any]:
    return (False, 0) if value is None else (True, value)


def ordered(keys: Sequence[tuple[str, bool]], recs: Sequence[Rec] = RECS) -> list[str]:
    """Python's idea of the order: keys, then uuid ascending; NULL is the smallest value."""
    out = sorted(recs, key=lambda r: r.uuid)
    for name, descending in reversed(keys):
        def key(r: Rec, n: str = name) -> tuple[bool, Any]:
            return _null_smallest(getattr(r, n))
        out.sort(key=key, reverse=descending)
    return [r.uuid for r in out]


# -- filters ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("q", "pred"),
    [
        ("vcpus=2", lambda r: r.vcpus == 2),
        ("vcpus==2", lambda r: r.vcpus == 2),
        ("vcpus!=2", lambda r: r.vcpus != 2),
        ("vcpus<2", lambda r: r.vcpus < 2),
        ("vcpus le 2", lambda r: r.vcpus <= 2),
        ("vcpus>3", lambda r: r.vcpus > 3),
        ("vcpus>=+3", lambda r: r.vcpus >= 3),
        ("vcpus in (1, 4)", lambda r: r.vcpus in (1, 4)),
        ("vcpus not in (1,4)", lambda r: r.vcpus not in (1, 4)),
        ("load>5", lambda r: r.load is not None and r.load > 5),
        ("load<=5.5", lambda r: r.load is not None and r.load <= 5.5),
        ("load=0.5", lambda r: r.load == 0.5),
        ("load!=0.5", lambda r: r.load != 0.5),  # NULL matches !=
        ("not load>5", lambda r: not (r.load is not None and r.load > 5)),
        ("load ge -1e3", lambda r: r.load is not None),
        ("state=error", lambda r: r.state == "error"),
        ("state in (running,stopped) and vcpus>=2",
         lambda r: r.state in ("running", "stopped") and r.vcpus >= 2),
        ("state like 'run%'", lambda r: r.state == "running"),
        ("ha=true", lambda r: r.ha),
        ("ha=YES", lambda r: r.ha),
        ("ha=1", lambda r: r.ha),
        ("ha=no", lambda r: not r.ha),
        ("ha!=false", lambda r: r.ha),
        ("ha in (0)", lambda r: not r.ha),
        ("name=web03", lambda r: r.name == "web03"),
        ("name>=db", lambda r: r.name >= "db"),
        ("name like web%", lambda r: r.name.startswith("web")),
        ("name like 'WEB%'", lambda r: r.name.startswith("web")),  # case-insensitive
        ("name like '%0_'", lambda r: r.name[-2] == "0"),
        ("name not like 'web%'", lambda r: not r.name.startswith("web")),
        ("note like 'note 1%'", lambda r: r.note is not None and r.note.startswith("Note 1")),
        ("note not like 'note 1%'",
         lambda r: r.note is None or not r.note.startswith("Note 1")),
        ("note='Note 5'", lambda r: r.note == "Note 5"),
        ("note!='Note 5'", lambda r: r.note != "Note 5"),
        ("not note='Note 5'", lambda r: r.note != "Note 5"),
        ("note in ('Note 5', 'Note 7')", lambda r: r.note in ("Note 5", "Note 7")),
        ("note not in ('Note 5')", lambda r: r.note != "Note 5"),
        ("seen_at>2026-11-01T00:30:00Z",
         lambda r: r.seen_at is not None and r.seen_at > T0 + timedelta(minutes=30)),
        ("not seen_at>2026-11-01T00:30:00Z",
         lambda r: not (r.seen_at is not None and r.seen_at > T0 + timedelta(minutes=30))),
        ("seen_at != 2026-11-01T00:07:00Z", lambda r: r.seen_at != T0 + timedelta(minutes=7)),
        ("created_at>=2026-11-01T05:00:00Z", lambda r: r.created_at >= T0 + timedelta(hours=5)),
        ("created_at>=2026-11-01T07:00:00+02:00",  # the same instant as 05:00Z
         lambda r: r.created_at >= T0 + timedelta(hours=5)),
        ("created_at<'2026-11-01 05:00:00'", lambda r: r.created_at < T0 + timedelta(hours=5)),
        ("created_at=2026-11-01T03:00:00.000Z", lambda r: r.created_at == T0 + timedelta(hours=3)),
        ("created_at in (2026-11-01T03:00:00Z, 2026-11-01T01:00:00+00:00)",
         lambda r: r.created_at in (T0 + timedelta(hours=3), T0 + timedelta(hours=1))),
        ("created_at>2026-11-01", lambda r: r.created_at > T0),
        ("uuid=" + RECS[4].uuid, lambda r: r.uuid == RECS[4].uuid),
        ("vcpus=1 or vcpus=2 and ha=true",
         lambda r: r.vcpus == 1 or (r.vcpus == 2 and r.ha)),
        ("(vcpus=1 or vcpus=2) and ha=true", lambda r: r.vcpus in (1, 2) and r.ha),
        ("not (state=error or state=unknown) and vcpus>1",
         lambda r: r.state not in ("error", "unknown") and r.vcpus > 1),
    ],
)
async def test_filters(db: Db, q: str, pred: Callable[[Rec], bool]) -> None:
    assert await db.matching(q) == expect(pred)


@pytest.mark.parametrize(
    ("q", "pred"),
    [
        ("tag:env", lambda r: "env" in r.tags),
        ("tag:env=prod", lambda r: r.tags.get("env") == "prod"),
        ("tag:env!=prod", lambda r: r.tags.get("env") != "prod"),  # untagged ones included
        ("not tag:env=prod", lambda r: r.tags.get("env") != "prod"),
        ("tag:env in (prod, dev)", lambda r: r.tags.get("env") in ("prod", "dev")),
        ("tag:env not in (prod)", lambda r: r.tags.get("env") != "prod"),
        ("tag:team like 'web-%'", lambda r: r.tags.get("team", "").startswith("Web-")),
        ("tag:team not like '%-1'", lambda r: not r.tags.get("team", "").endswith("-1")),
        ("tag:sys:ha", lambda r: "sys:ha" in r.tags),
        ("(state=error or state=unknown) and not tag:sys:ha",
         lambda r: r.state in ("error", "unknown") and "sys:ha" not in r.tags),
        ("tag:env=prod and tag:sys:ha=''",
         lambda r: r.tags.get("env") == "prod" and "sys:ha" in r.tags),
        ("tag:other", lambda r: False),  # that tag belongs to another resource type
        ("tag:nope", lambda r: False),
        ("not tag:nope", lambda r: True),
    ],
)
async def test_tags(db: Db, q: str, pred: Callable[[Rec], bool]) -> None:
    assert await db.matching(q) == expect(pred)


async def test_scope_is_always_applied(db: Db) -> None:
    page = await db.page(scope=Thing.vcpus == 1, q="ha=true or ha=false", count=True)
    assert {t.uuid for t in page.rows} == expect(lambda r: r.vcpus == 1)
    assert page.total == len(page.rows)


async def test_like_escapes_wildcards(db: Db) -> None:
    assert await db.matching(r"name like 'web\\%'") == set()
    assert await db.matching(r"name like 'web\\_3'") == set()
    assert await db.matching("note like 'note _'") == expect(
        lambda r: r.note is not None and len(r.note) == 6)


@pytest.mark.parametrize(
    "q",
    [
        "name='; drop table zq_things; --'",
        "name=\"x' or '1'='1\"",
        "name like \"%' or 1=1 --\"",
        "name='\\' or name like \\'%'",
        "note in ('a\\'); delete from zq_things; --', \"b\")",
        "tag:env='prod\\' or 1=1 --'",
        "tag:env like \"'; drop table resource_tags; --\"",
        "name='%' or note=\"Note 1'; update zq_things set vcpus=0; --\"",
    ],
)
async def test_injection_matches_nothing_and_changes_nothing(db: Db, q: str) -> None:
    assert await db.matching(q) == set()
    await _unchanged(db)


@pytest.mark.parametrize(
    "q",
    [
        "'; drop table zq_things; --",
        "name='x'; drop table zq_things; --",
        "name = 'x' or 1=1 --",
        "name like '%'' or 1=1 --'",
        "name=x' or '1'='1",
        "vcpus=1; delete from zq_things",
        "vcpus=1 union select * from resource_tags",
    ],
)
async def test_injection_that_is_not_a_query_is_refused(db: Db, q: str) -> None:
    with pytest.raises(QueryError):
        await db.page(q=q)
    await _unchanged(db)


async def _unchanged(db: Db) -> None:
    async with AsyncSession(db.engine) as session:
        rows = (await session.execute(select(Thing.uuid, Thing.vcpus))).all()
        assert {(u, BY_UUID[u].vcpus) for u, _ in rows} == set(rows)
        assert len(rows) == 30
        tags = (await session.execute(select(func.count()).select_from(TagRow))).scalar()
        assert tags == sum(len(r.tags) for r in RECS) + 1


# -- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("q", "message"),
    [
        ("color=red", "q: unknown field 'color' at position 0; fields: created_at, ha, load,"),
        ("vcpus=2 and vcpus=two", "q: invalid value 'two' for int field 'vcpus' at position 12"),
        ("vcpus=2.5", "invalid value '2.5' for int field 'vcpus'"),
        ("vcpus=1_000", "invalid value '1_000' for int field 'vcpus'"),
        ("vcpus=99999999999999999999", "(out of range)"),
        ("load>nan", "invalid value 'nan' for float field 'load'"),
        ("load>1e999", "invalid value '1e999' for float field 'load' at position 0 (out of"),
        ("created_at>yesterday", "invalid value 'yesterday' for datetime field 'created_at'"),
        ("created_at>2026-13-01", "expected ISO 8601"),
        ("ha=maybe", "invalid value 'maybe' for bool field 'ha' at position 0"),
        ("state=paused", "invalid value 'paused' for enum field 'state' at position 0; "
                         "allowed: building, error, running, stopped, unknown"),
        ("state in (running, paused)", "invalid value 'paused' for enum field 'state'"),
        ("vcpus like '1%'", "q: 'like' needs a text field, 'vcpus' is int (at position 0)"),
        ("ha<true", "q: 'ha' is bool and cannot be compared with 'lt' (at position 0)"),
        ("state>error", "'state' is enum and cannot be compared with 'gt'"),
    ],
)
async def test_filter_errors(db: Db, q: str, message: str) -> None:
    with pytest.raises(QueryError) as info:
        await db.page(q=q)
    assert message in info.value.detail


async def test_tags_on_an_untaggable_resource(db: Db) -> None:
    with pytest.raises(QueryError, match=r"this resource has no tags \(tag:env at position 11"):
        await db.page(UNTAGGED, q="vcpus=1 or tag:env")


async def test_where_binds_every_value() -> None:
    assert where(THINGS, None) is None
    assert where(THINGS, parse_query("  ")) is None
    sql = str(where(THINGS, parse_query("name=\"x'; drop table t\" or tag:k like \"'--\"")))
    assert "drop" not in sql and "--" not in sql and ":name_1" in sql


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"sort": "colour"}, "sort: unknown field 'colour'; sortable fields: created_at, ha,"),
        ({"sort": "secret"}, "sort: field that cannot be sorted 'secret'"),
        ({"sort": "name,,"}, "sort: expected a field name at position 5"),
        ({"limit": 0}, "limit: must be between 1 and 1000"),
        ({"limit": 1001}, "limit: must be between 1 and 1000"),
        ({"offset": -1}, "offset: must be 0 or more"),
        ({"offset": 2, "cursor": "abc"}, "cursor: cannot be combined with offset"),
        ({"cursor": "not a cursor!"}, "cursor: not a valid cursor"),
        ({"cursor": "eyJ2Ijox"}, "cursor: not a valid cursor"),
        ({"cursor": "W10"}, "cursor: not a valid cursor"),  # []
        ({"cursor": "x" * 9000}, "cursor: not a valid cursor"),
    ],
)
async def test_parameter_errors(db: Db, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(QueryError) as info:
        await db.page(**kw)
    assert message in info.value.detail


async def test_cursor_for_another_sort_or_tampered(db: Db) -> None:
    page = await db.page(sort="name", limit=5)
    assert page.next_cursor
    with pytest.raises(QueryError, match="cursor: it was made for another sort order"):
        await db.page(sort="-name", limit=5, cursor=page.next_cursor)
    with pytest.raises(QueryError, match="cursor: it was made for another sort order"):
        await db.page(limit=5, cursor=page.next_cursor)  # default sort
    payload = json.loads(base64.urlsafe_b64decode(page.next_cursor + "=="))
    for bad in ([1, "x"], ["x"], [{"dt": "x"}, "u"], [None, None, None]):
        payload["k"] = bad
        forged = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
        with pytest.raises(QueryError, match="cursor: not a valid cursor"):
            await db.page(sort="name", limit=5, cursor=forged)


# -- sorting, offset, cursors, count ---------------------------------------------------------

SORTS = [
    (None, [("created_at", True)]),
    ("", [("created_at", True)]),
    ("name", [("name", False)]),
    ("-name", [("name", True)]),
    ("vcpus,-created_at", [("vcpus", False), ("created_at", True)]),
    ("-vcpus,name", [("vcpus", True), ("name", False)]),
    ("load", [("load", False)]),
    ("-load", [("load", True)]),
    ("-seen_at,vcpus", [("seen_at", True), ("vcpus", False)]),
    ("seen_at,-load", [("seen_at", False), ("load", True)]),
    ("ha,-note", [("ha", False), ("note", True)]),
    ("state,-uuid", [("state", False), ("uuid", True)]),
    ("-uuid", [("uuid", True)]),
]


@pytest.mark.parametrize(("sort", "keys"), SORTS)
async def test_sort(db: Db, sort: str | None, keys: list[tuple[str, bool]]) -> None:
    assert await db.uuids(sort=sort) == ordered(keys)


async def test_nulls_sort_first_ascending_and_last_descending(db: Db) -> None:
    asc = [BY_UUID[u].load for u in await db.uuids(sort="load")]
    desc = [BY_UUID[u].load for u in await db.uuids(sort="-load")]
    nulls = sum(1 for r in RECS if r.load is None)
    assert asc[:nulls] == [None] * nulls and None not in asc[nulls:]
    assert desc[-nulls:] == [None] * nulls and None not in desc[:-nulls]


async def test_offset(db: Db) -> None:
    full = ordered([("vcpus", True)])
    for offset in (0, 7, 28, 30, 45):
        page = await db.page(sort="-vcpus", limit=7, offset=offset)
        assert [t.uuid for t in page.rows] == full[offset:offset + 7]
        assert (page.next_cursor is None) == (offset + 7 >= 30)


@pytest.mark.parametrize(("sort", "keys"), SORTS)
@pytest.mark.parametrize("limit", [1, 7, 10])
async def test_cursor_walks_every_row_once(
    db: Db, sort: str | None, keys: list[tuple[str, bool]], limit: int
) -> None:
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = await db.page(sort=sort, limit=limit, cursor=cursor, count=True)
        assert page.total == 30
        assert 1 <= len(page.rows) <= limit
        seen.extend(t.uuid for t in page.rows)
        pages += 1
        if page.next_cursor is None:
            break
        assert len(page.rows) == limit
        cursor = page.next_cursor
        assert pages < 40
    assert seen == ordered(keys)
    assert pages == -(-30 // limit)


@pytest.mark.parametrize("sort", ["-created_at", "seen_at,name", "-load,-vcpus"])
async def test_cursor_with_a_filter(db: Db, sort: str) -> None:
    q = "vcpus>=2 and not tag:sys:ha"
    wanted = await db.uuids(q, sort)
    assert set(wanted) == expect(lambda r: r.vcpus >= 2 and "sys:ha" not in r.tags)
    seen: list[str] = []
    cursor = None
    while True:
        page = await db.page(q=q, sort=sort, limit=4, cursor=cursor)
        seen.extend(t.uuid for t in page.rows)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == wanted


async def test_cursor_is_urlsafe_and_last_page_has_none(db: Db) -> None:
    page = await db.page(limit=29)
    assert page.next_cursor is not None
    assert all(c.isalnum() or c in "-_" for c in page.next_cursor)
    last = await db.page(limit=29, cursor=page.next_cursor)
    assert len(last.rows) == 1 and last.next_cursor is None
    assert (await db.page(limit=30)).next_cursor is None


async def test_count(db: Db) -> None:
    page = await db.page(q="vcpus>=2", limit=3, count=True)
    assert len(page.rows) == 3
    assert page.total == len(expect(lambda r: r.vcpus >= 2))
    assert (await db.page(q="vcpus>=2", limit=3)).total is None
    assert (await db.page(q="tag:env=prod", limit=1, count=True)).total == 10
    assert (await db.page(q="name=nothing", count=True)).total == 0
