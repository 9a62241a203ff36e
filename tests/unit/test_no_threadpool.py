"""No route of the control server's or the gateway's API runs a plain ``def`` endpoint or
dependency: FastAPI would hand each request to a worker thread and back (issue 10: the
control server's user dependency cost a thread hop on every API request)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from tests.unit.test_gateway_harness import make_gateway
from yun.config import ControlSettings
from yun.control.api import create_control_app
from yun.control.context import ControlContext
from yun.control.db.session import Database
from yun.control.services.nodes import NodeRegistry
from yun.proto.components import ComponentType
from yun.proto.membership import Membership
from yun.testing.asgi import threadpool_callables


async def test_the_control_api_runs_nothing_in_the_thread_pool(tmp_path: Path) -> None:
    settings = ControlSettings(state_dir=tmp_path, name="control",
                               database_url=f"sqlite+aiosqlite:///{tmp_path}/c.db")
    db = Database(settings.db_url())
    try:
        ctx = ControlContext(settings=settings, db=db,
                             membership=Membership(settings, ComponentType.CONTROL, url=""))
        app = create_control_app(ctx, NodeRegistry(ctx))
        assert threadpool_callables(app) == {}
    finally:
        await db.dispose()


async def test_the_gateway_api_runs_nothing_in_the_thread_pool() -> None:
    gateway = make_gateway()
    assert threadpool_callables(gateway.app) == {}


def test_the_check_finds_a_plain_def_dependency_of_an_included_router() -> None:
    from fastapi import APIRouter, Depends

    def plain() -> int:
        return 1

    async def endpoint(value: int = Depends(plain)) -> int:
        return value

    router = APIRouter(prefix="/x")
    router.add_api_route("/y", endpoint)
    app = FastAPI()
    app.include_router(router)
    found = threadpool_callables(app)
    assert list(found.values()) == [{"/x/y"}]
    assert next(iter(found)).endswith("plain")
