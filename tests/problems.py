"""Checking error answers: every test asserts the same shape of a problem+json answer."""

from __future__ import annotations

from typing import Any

import httpx


def assert_problem(resp: httpx.Response, status: int, *fragments: str) -> dict[str, Any]:
    """``resp`` is an application/problem+json answer of ``status`` whose detail names each
    of ``fragments``, and it leaks no stack trace; returns its body."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = resp.json()
    assert body["status"] == status, body
    for fragment in fragments:
        assert fragment in body["detail"], body
    assert "Traceback" not in resp.text
    return body
