"""Structured log fields never collide with LogRecord's own attributes.

``logging`` raises KeyError when ``extra`` names an attribute of LogRecord (``name``,
``msg``, ``module`` …), but only when the record is actually made, i.e. when its level is
enabled: a test run at WARNING never sees it, an operator's control server at INFO
answers 500 (found by creating a VM group by hand)."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import yun

RESERVED = set(vars(logging.LogRecord("n", logging.INFO, "p", 1, "m", None, None))) | {
    "message", "asctime"}


def _extra_keys() -> list[tuple[str, int, str]]:
    found = []
    for path in Path(yun.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            for keyword in node.keywords:
                if keyword.arg == "extra" and isinstance(keyword.value, ast.Dict):
                    found += [(str(path), node.lineno, key.value)
                              for key in keyword.value.keys
                              if isinstance(key, ast.Constant) and isinstance(key.value, str)]
    return found


def test_no_log_call_overwrites_a_record_attribute() -> None:
    keys = _extra_keys()
    assert len(keys) > 100  # the scan sees the project's log calls
    clashes = [f"{path}:{line}: {key}" for path, line, key in keys if key in RESERVED]
    assert clashes == []
