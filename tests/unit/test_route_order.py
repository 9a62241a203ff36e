"""The gateway's and the control server's routers are included in the order of how often
they are asked (FastAPI tries routes one after the other). That order must change nothing
but speed: no route may take a request meant for a route of another router, and the
hot routes must stay near the front."""

from __future__ import annotations

import re
from typing import Any
from unittest.mock import MagicMock

import pytest
from fastapi import FastAPI
from starlette.routing import BaseRoute, Match, Route

from yun.config import GatewaySettings
from yun.control.api import create_control_app
from yun.gateway.app import create_gateway_app


def routes_in_dispatch_order(app: FastAPI) -> list[Route]:
    """Every HTTP route of ``app`` in the order a request is matched against them."""
    out: list[Route] = []

    def walk(routes: list[BaseRoute]) -> None:
        for route in routes:
            # FastAPI >= 0.16x keeps an included router as one entry; older ones copy
            # its routes into the app's list.
            included = getattr(route, "original_router", None)
            if included is not None:
                walk(included.routes)
            elif isinstance(route, Route):
                out.append(route)

    walk(app.router.routes)
    return out


def sample_path(route: Route) -> str:
    """A concrete path of the route's template: each parameter a plain value."""
    return re.sub(r"{[^}:]+(:path)?}", lambda m: "a/b" if m.group(1) else "x1", route.path)


def first_match(routes: list[Route], method: str, path: str) -> Route | None:
    scope: dict[str, Any] = {"type": "http", "method": method, "path": path,
                             "root_path": "", "path_params": {}}
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return route
    return None


@pytest.fixture(scope="module")
def apps() -> dict[str, FastAPI]:
    return {"gateway": create_gateway_app(MagicMock(), GatewaySettings()),
            "control": create_control_app(MagicMock(), MagicMock())}


@pytest.mark.parametrize("component", ["gateway", "control"])
def test_every_route_is_reached_by_its_own_path(apps: dict[str, FastAPI],
                                                component: str) -> None:
    routes = routes_in_dispatch_order(apps[component])
    assert len(routes) > 100, len(routes)
    shadowed = []
    for route in routes:
        for method in route.methods or ():
            path = sample_path(route)
            winner = first_match(routes, method, path)
            if winner is not route and (winner is None or winner.endpoint
                                        is not route.endpoint):
                shadowed.append(f"{method} {path}: {route.path} is taken by "
                                f"{winner.path if winner else None}")
    assert not shadowed, shadowed


@pytest.mark.parametrize(("component", "method", "path", "within"), [
    ("gateway", "GET", "/api/v1/tasks/x1", 6),
    ("gateway", "GET", "/api/v1/vms/x1", 10),
    ("gateway", "POST", "/api/v1/vms", 10),
    ("control", "POST", "/internal/v1/nodes/report", 10),
    ("control", "GET", "/internal/v1/tasks/x1", 10),
    ("control", "GET", "/internal/v1/vms/x1", 14),
    ("control", "POST", "/internal/v1/vms", 14),
])
def test_the_most_asked_routes_are_tried_first(apps: dict[str, FastAPI], component: str,
                                               method: str, path: str, within: int) -> None:
    routes = routes_in_dispatch_order(apps[component])
    winner = first_match(routes, method, path)
    assert winner is not None
    assert routes.index(winner) < within, [r.path for r in routes[:within + 1]]
