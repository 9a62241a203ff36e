"""Identifiers: the one parser of UUIDs, for ids that name files, domains and records."""

from __future__ import annotations

import uuid


def canonical_uuid(value: object) -> str | None:
    """``value`` as a canonical UUID (lower-case, hyphenated), or None if it is not one."""
    try:
        return str(uuid.UUID(str(value)))
    except (ValueError, TypeError, AttributeError):
        return None


def uuid_problem(value: object, what: str) -> str | None:
    """Why ``value`` is not the canonical UUID an id that becomes a path must be, or None.

    Odd spellings of a valid UUID are refused too: one id, one file name.
    """
    canonical = canonical_uuid(value)
    shown = str(value)[:80]
    if canonical is None:
        return f"invalid {what} {shown!r}: expected a UUID"
    if canonical != value:
        return f"invalid {what} {shown!r}: expected {canonical}"
    return None
