"""The one translator from the list query language (``yun.proto.query``) to SQL.

Every list endpoint describes its resource once as a :class:`Queryable` and calls
:func:`fetch_page`; filtering, sorting, offset and keyset (cursor) pagination and counting then
behave the same for every resource, on SQLite and PostgreSQL.

Semantics every caller can rely on:

* Values are converted to the field's kind and always sent as bound parameters.
* NULL: a NULL column matches none of ``eq lt le gt ge in like`` and therefore matches every
  ``ne not_in not_like``; ``not X`` is always the exact complement of ``X``.
* ``like`` is case-insensitive on both engines (``%`` any run, ``_`` one character, ``\\``
  escapes either).
* Tags: ``tag:k`` is "the resource has tag k"; ``tag:k=v``, ``tag:k in (...)`` and
  ``tag:k like p`` need the tag with such a value; ``tag:k!=v``, ``not in`` and ``not like`` are
  their complements, e.g. ``tag:k!=v`` is "not (has tag k with value v)", which includes
  resources without tag k.
* Sorting: the requested keys (or ``default_sort``), then the uuid column ascending as the
  tie-breaker. NULL sorts as the smallest value: first ascending, last descending, on both
  engines; the cursor's keyset predicate follows the same rule.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, and_, false, func, literal, not_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.db.models import TagRow
from yun.proto.query import (
    And,
    Comparison,
    Expr,
    Not,
    Or,
    QueryError,
    SortKey,
    TagMatch,
    parse_query,
    parse_sort,
)

MAX_LIMIT = 1000
MAX_CURSOR_LENGTH = 8192
_CURSOR_VERSION = 1

Kind = Literal["str", "int", "float", "datetime", "bool", "enum"]

_INT_RE = re.compile(r"[+-]?[0-9]+\Z")
_FLOAT_RE = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")
_INT64 = (-(2**63), 2**63 - 1)
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_ORDERED_KINDS = frozenset({"str", "int", "float", "datetime"})
_LIKE_KINDS = frozenset({"str", "enum"})
_POSITIVE = {"ne": "eq", "not_in": "in", "not_like": "like"}


@dataclass(frozen=True)
class Field:
    """One queryable field of a resource, by its API name (the key in ``Queryable.fields``)."""

    column: Any  # an InstrumentedAttribute / column expression of the model
    kind: Kind = "str"
    choices: frozenset[str] | None = None  # for enum: the allowed values
    sortable: bool = True


@dataclass(frozen=True)
class Queryable:
    """How one resource is queried: its model, its fields by API name, how its tags are found."""

    model: Any
    fields: Mapping[str, Field]
    uuid_column: Any  # unique tie-breaker for sorting and cursors (the model's uuid / id)
    default_sort: tuple[SortKey, ...]  # e.g. (SortKey("created_at", True),)
    tag_resource: Any | None = None  # the column tags refer to (model.uuid); None: untaggable
    tag_resource_type: str | None = None  # if set, tags must also have this resource_type


@dataclass
class PageResult:
    """One page of rows; ``total`` only when asked for, ``next_cursor`` None on the last page."""

    rows: list[Any]
    total: int | None
    next_cursor: str | None


# -- filters ---------------------------------------------------------------------------------

def _nullable(column: Any) -> bool:
    # Unknown expressions (labels, functions) may be NULL: guard them like nullable columns.
    return bool(getattr(getattr(column, "expression", column), "nullable", True))


def _field(queryable: Queryable, name: str, position: int) -> Field:
    field = queryable.fields.get(name)
    if field is None:
        raise QueryError(
            f"q: unknown field {name!r} at position {position}; fields: "
            f"{', '.join(sorted(queryable.fields))}",
            position=position, token=name,
        )
    return field


def _convert(name: str, field: Field, value: str, position: int) -> Any:
    """``value`` as the Python value of ``field``'s kind, or a QueryError naming all three."""

    def bad(why: str = "") -> QueryError:
        return QueryError(
            f"q: invalid value {value!r} for {field.kind} field {name!r} at position "
            f"{position}{why}",
            position=position, token=value,
        )

    if field.kind == "str":
        return value
    if field.kind == "enum":
        if field.choices is not None and value not in field.choices:
            raise bad(f"; allowed: {', '.join(sorted(field.choices))}")
        return value
    if field.kind == "int":
        if not _INT_RE.match(value):
            raise bad(" (expected an integer)")
        number = int(value)
        if not _INT64[0] <= number <= _INT64[1]:
            raise bad(" (out of range)")
        return number
    if field.kind == "float":
        if not _FLOAT_RE.match(value):
            raise bad(" (expected a number)")
        real = float(value)
        if not math.isfinite(real):
            raise bad(" (out of range)")
        return real
    if field.kind == "bool":
        flag = _BOOL_WORDS.get(value.lower())
        if flag is None:
            raise bad(" (expected true, false, yes, no, 1 or 0)")
        return flag
    if field.kind == "datetime":
        try:
            moment = datetime.fromisoformat(value)
            # A time without offset is taken as UTC, like every timestamp the API returns.
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            return moment.astimezone(UTC)
        except (ValueError, OverflowError):
            raise bad(" (expected ISO 8601, e.g. 2026-11-01T00:00:00Z)") from None
    raise QueryError(f"q: field {name!r} has an unknown kind {field.kind!r}", position=position)


def _like(column: Any, pattern: str) -> ColumnElement[bool]:
    return column.ilike(pattern, escape="\\")  # type: ignore[no-any-return]


def _comparison(queryable: Queryable, cmp: Comparison) -> ColumnElement[bool]:
    field = _field(queryable, cmp.field, cmp.position)
    if cmp.op in ("like", "not_like") and field.kind not in _LIKE_KINDS:
        raise QueryError(
            f"q: 'like' needs a text field, {cmp.field!r} is {field.kind} "
            f"(at position {cmp.position})", position=cmp.position, token=cmp.field,
        )
    if cmp.op in ("lt", "le", "gt", "ge") and field.kind not in _ORDERED_KINDS:
        raise QueryError(
            f"q: {cmp.field!r} is {field.kind} and cannot be compared with {cmp.op!r} "
            f"(at position {cmp.position}); use =, != or in",
            position=cmp.position, token=cmp.field,
        )
    col = field.column
    negated = cmp.op in _POSITIVE
    op = _POSITIVE.get(cmp.op, cmp.op)
    if op == "in":
        values = cmp.value if isinstance(cmp.value, tuple) else (cmp.value,)
        test = col.in_([_convert(cmp.field, field, v, cmp.position) for v in values])
    elif op == "like":
        if not isinstance(cmp.value, str):
            raise QueryError(f"q: 'like' takes one value (at position {cmp.position})",
                             position=cmp.position)
        test = _like(col, cmp.value)
    else:
        if not isinstance(cmp.value, str):
            raise QueryError(f"q: {cmp.op!r} takes one value (at position {cmp.position})",
                             position=cmp.position)
        value = _convert(cmp.field, field, cmp.value, cmp.position)
        test = {
            "eq": col.__eq__, "lt": col.__lt__, "le": col.__le__,
            "gt": col.__gt__, "ge": col.__ge__,
        }[op](value)
    if _nullable(col):
        # Two-valued on purpose: `not` of a NULL comparison would otherwise still be NULL.
        test = and_(col.is_not(None), test)
    return not_(test) if negated else test  # type: ignore[no-any-return]


def _tag(queryable: Queryable, match: TagMatch) -> ColumnElement[bool]:
    if queryable.tag_resource is None:
        raise QueryError(
            f"q: this resource has no tags (tag:{match.key} at position {match.position})",
            position=match.position, token=f"tag:{match.key}",
        )
    conditions: list[ColumnElement[bool]] = [
        TagRow.resource_uuid == queryable.tag_resource,
        TagRow.key == match.key,
    ]
    if queryable.tag_resource_type is not None:
        conditions.append(TagRow.resource_type == queryable.tag_resource_type)
    negated = match.op in _POSITIVE
    op = _POSITIVE.get(match.op or "", match.op)
    if op is not None:
        if op == "in":
            values = match.value if isinstance(match.value, tuple) else (match.value,)
            conditions.append(TagRow.value.in_([str(v) for v in values]))
        elif op == "like":
            conditions.append(_like(TagRow.value, str(match.value)))
        elif op == "eq":
            conditions.append(TagRow.value == str(match.value))
        else:
            raise QueryError(
                f"q: operator {match.op!r} is not supported for tags "
                f"(at position {match.position})", position=match.position,
            )
    exists = select(TagRow.key).where(*conditions).exists()
    return not_(exists) if negated else exists


def where(queryable: Queryable, expr: Expr | None) -> ColumnElement[bool] | None:
    """The SQL condition of a parsed ``q`` for ``queryable``; None when there is no filter.

    Raises QueryError for unknown fields, values that do not fit a field, operators a field
    does not support, and tags on an untaggable resource.
    """
    if expr is None:
        return None
    return _where(queryable, expr)


def _where(queryable: Queryable, expr: Expr) -> ColumnElement[bool]:
    # Recursion depth is bounded by the parser's nesting limit (And/Or are flattened).
    if isinstance(expr, Comparison):
        return _comparison(queryable, expr)
    if isinstance(expr, TagMatch):
        return _tag(queryable, expr)
    if isinstance(expr, And):
        return and_(*(_where(queryable, item) for item in expr.items))
    if isinstance(expr, Or):
        return or_(*(_where(queryable, item) for item in expr.items))
    if isinstance(expr, Not):
        return not_(_where(queryable, expr.item))
    raise QueryError(f"q: unsupported expression {type(expr).__name__}")


# -- sorting and cursors ---------------------------------------------------------------------

@dataclass(frozen=True)
class _OrderKey:
    name: str | None  # API field name; None for the uuid tie-breaker
    column: Any
    kind: Kind | None
    descending: bool
    nullable: bool


def _order_keys(queryable: Queryable, sort: str | None) -> list[_OrderKey]:
    keys = parse_sort(sort or "") or queryable.default_sort
    out: list[_OrderKey] = []
    for key in keys:
        field = queryable.fields.get(key.field)
        if field is None or not field.sortable:
            sortable = sorted(name for name, f in queryable.fields.items() if f.sortable)
            why = "unknown field" if field is None else "field that cannot be sorted"
            raise QueryError(
                f"sort: {why} {key.field!r}; sortable fields: {', '.join(sortable)}",
                token=key.field, parameter="sort",
            )
        out.append(_OrderKey(key.field, field.column, field.kind, key.descending,
                             _nullable(field.column)))
    if not any(k.column is queryable.uuid_column for k in out):
        out.append(_OrderKey(None, queryable.uuid_column, None, False, False))
    return out


def _order_by(keys: Sequence[_OrderKey]) -> list[Any]:
    clauses = []
    for key in keys:
        if key.descending:
            clause = key.column.desc()
            clauses.append(clause.nulls_last() if key.nullable else clause)
        else:
            clause = key.column.asc()
            clauses.append(clause.nulls_first() if key.nullable else clause)
    return clauses


def _after(key: _OrderKey, value: Any) -> ColumnElement[bool] | None:
    """Rows strictly after ``value`` in this key's order (NULL is the smallest value)."""
    col = key.column
    if value is None:
        # Ascending: every non-NULL follows NULL. Descending: NULLs are last, nothing follows.
        return None if key.descending else col.is_not(None)  # type: ignore[no-any-return]
    # An explicit bound parameter: SQLAlchemy refuses `col > True` with a bare Python bool.
    bound = literal(value, col.type)
    if key.descending:
        return or_(col < bound, col.is_(None)) if key.nullable else col < bound
    return col > bound  # type: ignore[no-any-return]


def _keyset(keys: Sequence[_OrderKey], values: Sequence[Any]) -> ColumnElement[bool]:
    """Lexicographic "after (values)" over mixed directions: OR over i of (equal before i,
    after at i)."""
    terms: list[ColumnElement[bool]] = []
    equal: list[ColumnElement[bool]] = []
    for key, value in zip(keys, values, strict=True):
        after = _after(key, value)
        if after is not None:
            terms.append(and_(*equal, after))
        equal.append(key.column.is_(None) if value is None else key.column == value)
    return or_(*terms) if terms else false()


def _spec(keys: Sequence[_OrderKey]) -> list[list[Any]]:
    return [[k.name, k.descending] for k in keys]


def _to_json(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"dt": value.isoformat()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    # Anything else (Decimal, enum members) is carried as text and compared as text.
    return str(value)


def _from_json(key: _OrderKey, raw: Any) -> Any:
    if raw is None:
        return None
    if isinstance(raw, dict):
        text = raw.get("dt")
        if set(raw) != {"dt"} or not isinstance(text, str):
            raise ValueError("bad datetime")
        return datetime.fromisoformat(text)
    if key.kind == "datetime":
        raise ValueError("datetime expected")
    if key.kind == "int" and (isinstance(raw, bool) or not isinstance(raw, int)):
        raise ValueError("int expected")
    if key.kind == "float" and (isinstance(raw, bool) or not isinstance(raw, int | float)):
        raise ValueError("number expected")
    if key.kind == "bool" and not isinstance(raw, bool):
        raise ValueError("bool expected")
    if key.kind in ("str", "enum") and not isinstance(raw, str):
        raise ValueError("text expected")
    if not isinstance(raw, str | int | float | bool):
        raise ValueError("scalar expected")
    return raw


def _encode_cursor(keys: Sequence[_OrderKey], values: Sequence[Any]) -> str:
    payload = {"v": _CURSOR_VERSION, "s": _spec(keys), "k": [_to_json(v) for v in values]}
    data = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _decode_cursor(keys: Sequence[_OrderKey], cursor: str) -> list[Any]:
    invalid = QueryError("cursor: not a valid cursor (take it from next_cursor unchanged)",
                         parameter="cursor")
    if len(cursor) > MAX_CURSOR_LENGTH or not re.fullmatch(r"[A-Za-z0-9_-]+", cursor):
        raise invalid
    try:
        data = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        payload = json.loads(data)
    except (binascii.Error, ValueError, RecursionError):
        raise invalid from None
    if not isinstance(payload, dict) or payload.get("v") != _CURSOR_VERSION:
        raise invalid
    if payload.get("s") != _spec(keys):
        raise QueryError(
            "cursor: it was made for another sort order; send the same sort (and q) as the "
            "request that returned it", parameter="cursor",
        )
    raw = payload.get("k")
    if not isinstance(raw, list) or len(raw) != len(keys):
        raise invalid
    try:
        return [_from_json(key, value) for key, value in zip(keys, raw, strict=True)]
    except (ValueError, TypeError):
        raise invalid from None


# -- pages -----------------------------------------------------------------------------------

async def fetch_page(
    session: AsyncSession,
    queryable: Queryable,
    *,
    scope: ColumnElement[bool] | None,
    q: str | None,
    sort: str | None,
    limit: int,
    offset: int = 0,
    cursor: str | None = None,
    count: bool = False,
) -> PageResult:
    """One page of ``queryable``'s rows (model instances) within ``scope`` matching ``q``.

    ``scope`` is the caller's own restriction (project, ownership) and is always applied.
    ``cursor`` continues after the last row of the page that returned it (same ``q`` and
    ``sort``); it cannot be combined with ``offset``. ``count`` adds the number of all rows
    matching ``scope`` and ``q``. Raises QueryError for any invalid parameter.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise QueryError(f"limit: must be between 1 and {MAX_LIMIT}", parameter="limit")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise QueryError("offset: must be 0 or more", parameter="offset")
    if cursor and offset:
        raise QueryError("cursor: cannot be combined with offset", parameter="cursor")
    expr = parse_query(q or "")
    condition = where(queryable, expr)
    keys = _order_keys(queryable, sort)
    filters = [c for c in (scope, condition) if c is not None]

    stmt = select(queryable.model, *(k.column.label(f"_yun_k{i}") for i, k in enumerate(keys)))
    if filters:
        stmt = stmt.where(*filters)
    if cursor:
        stmt = stmt.where(_keyset(keys, _decode_cursor(keys, cursor)))
    # One row more than asked tells whether a next page exists without a second query.
    stmt = stmt.order_by(*_order_by(keys)).limit(limit + 1)
    if offset:
        stmt = stmt.offset(offset)
    result = (await session.execute(stmt)).all()

    rows = [r[0] for r in result[:limit]]
    next_cursor = None
    if len(result) > limit:
        next_cursor = _encode_cursor(keys, list(result[limit - 1][1:]))

    total = None
    if count:
        count_stmt = select(func.count()).select_from(queryable.model)
        if filters:
            count_stmt = count_stmt.where(*filters)
        total = int((await session.execute(count_stmt)).scalar_one())
    return PageResult(rows=rows, total=total, next_cursor=next_cursor)


__all__ = [
    "MAX_LIMIT",
    "Field",
    "PageResult",
    "QueryError",
    "Queryable",
    "SortKey",
    "fetch_page",
    "where",
]
