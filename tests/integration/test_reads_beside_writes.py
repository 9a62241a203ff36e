"""API reads do not wait for the database writer (issue 10).

On SQLite the control server has one writer connection, and every write transaction
queues for it; reads have connections of their own (WAL). A read served through the
writer waits behind every create under way: at scale the API's reads ran at the pace of
its writes. Here a write transaction stays open on the control server while every read
route of the API is called: each must answer meanwhile.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from sqlalchemy import update

from tests.integration.conftest import upload
from yun.control.db.models import ProjectRow
from yun.testing.cluster import SimCluster

LISTS = ["/vms", "/images", "/nodes", "/pools", "/zones", "/projects", "/departments",
         "/users", "/ssh-keys", "/vm-groups", "/volumes", "/address-pools", "/eips",
         "/keys", "/tasks", "/audit", "/routers", "/role-assignments", "/auth/tokens"]
# Reads of one resource or of a VM's parts, {vm} and {project} filled in.
OTHERS = ["/quota", "/auth/whoami", "/roles", "/vms/{vm}/port-forwards", "/vms/{vm}/nics",
          "/projects/{project}/quota"]
KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ0ZXN0a2V5Zm9ydGhlcmVhZHNiZXNpZGV3cml0"
       "ZXM0 reads@test")
ANSWER_WITHIN = 5.0


async def made(cluster: SimCluster, path: str, body: dict[str, Any], status: int = 201
               ) -> dict[str, Any]:
    assert cluster.api is not None
    resp = await cluster.api.post(f"/api/v1{path}", json=body)
    assert resp.status_code == status, resp.text
    return dict(resp.json())


async def test_every_read_answers_while_a_write_is_open(one: SimCluster,
                                                        small_qcow2: Path) -> None:
    cluster = one
    api, control = cluster.api, cluster.control
    assert api is not None and control is not None
    await upload(cluster, small_qcow2)
    created = await made(cluster, "/vms", {"name": "reader", "image": "img"}, 202)
    assert (await cluster.wait_task(created["task"]["uuid"]))["state"] == "succeeded"
    await made(cluster, "/zones", {"name": "east"})
    await made(cluster, "/vm-groups", {"name": "web", "policy": "anti-affinity"})
    await made(cluster, "/ssh-keys", {"name": "mine", "public_key": KEY})
    await made(cluster, "/keys", {"name": "script"})
    vm = created["resource"]["uuid"]
    project = (await api.get("/api/v1/auth/whoami")).json()["project_uuid"]

    # Every list, then the first item of each by its uuid, to read while the writer is held.
    paths = [p.format(vm=vm, project=project) for p in OTHERS]
    for path in LISTS:
        resp = await api.get(f"/api/v1{path}")
        assert resp.status_code == 200, (path, resp.text)
        paths.append(path)
        items = resp.json()
        items = items["items"] if isinstance(items, dict) else items
        if items and "uuid" in items[0] and path not in ("/tasks", "/audit", "/auth/tokens",
                                                           "/role-assignments", "/routers"):
            paths.append(f"{path}/{items[0]['uuid']}")
    assert f"/vms/{vm}" in paths

    async def read(path: str) -> tuple[str, int | str]:
        try:
            resp = await asyncio.wait_for(api.get(f"/api/v1{path}"), ANSWER_WITHIN)
        except TimeoutError:
            return path, "no answer while the write was open"
        return path, resp.status_code

    async with control.db.session() as session:
        # A write takes the writer connection and SQLite's write lock until the commit.
        await session.execute(update(ProjectRow).where(ProjectRow.uuid == project)
                              .values(description="held"))
        answers = await asyncio.gather(*(read(p) for p in paths))
    late = [(p, a) for p, a in answers if a != 200]
    assert not late, late
    print(f"\n{len(paths)} reads answered while a write was open")
