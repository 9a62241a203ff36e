"""Checks on the FastAPI apps of Yun's components, for the tests."""

from __future__ import annotations

import inspect
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute


def _is_async(call: Any) -> bool:
    if inspect.isfunction(call) or inspect.ismethod(call):
        return inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)
    return inspect.iscoroutinefunction(type(call).__call__)  # a callable object


def threadpool_callables(app: FastAPI) -> dict[str, set[str]]:
    """The endpoints and dependencies of ``app`` that FastAPI runs in its thread pool (plain
    ``def`` functions), each with the paths of the routes that call it.

    Each such call hands the request to a worker thread and back: on a busy server that
    costs more than most handlers' own work (issue 10), so the components' apps have none.
    """
    found: dict[str, set[str]] = {}

    def walk(dependant: Dependant, path: str) -> None:
        call = dependant.call
        if call is not None and not _is_async(call):
            name = f"{getattr(call, '__module__', '?')}.{getattr(call, '__qualname__', call)}"
            found.setdefault(name, set()).add(path)
        for sub in dependant.dependencies:
            walk(sub, path)

    # Included routers are kept as branches (FastAPI 0.165): descend into them.
    routes: list[Any] = list(app.routes)
    while routes:
        route = routes.pop()
        included = getattr(route, "original_router", None)
        if included is not None:
            routes.extend(included.routes)
        if isinstance(route, APIRoute):
            walk(route.dependant, route.path)
    return found
