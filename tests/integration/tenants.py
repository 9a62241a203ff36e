"""A cloud with two departments, projects and users of every role, for the tenancy tests.

Built through the public API as an operator would: the super admin makes departments,
projects and users and grants roles; each user then logs in to their project.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from yun.testing.cluster import SimCluster

PASSWORD = "correct horse battery"


@dataclass
class Tenant:
    """One user logged in to one project."""

    name: str
    project: str
    role: str
    token: str
    http: httpx.AsyncClient


@dataclass
class Tenants:
    cluster: SimCluster
    users: dict[str, Tenant] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> httpx.AsyncClient:
        return self.users[name].http

    async def close(self) -> None:
        for tenant in self.users.values():
            await tenant.http.aclose()


async def ok(resp: httpx.Response | Any, *status: int) -> Any:
    if asyncio.iscoroutine(resp):
        resp = await resp
    assert resp.status_code in (status or (200, 201, 202, 204)), resp.text
    return resp.json() if resp.content else None


# user → (department, project, role); department admins and the super admin log in to
# the first project of their department.
PEOPLE = {
    "alice": ("d1", "p1", "member"),
    "rita": ("d1", "p1", "reader"),
    "paul": ("d1", "p1", "project_admin"),
    "dora": ("d1", "p1", "department_admin"),
    "bob": ("d1", "p2", "member"),
    "zed": ("d2", "p3", "member"),
}


async def build_tenants(cluster: SimCluster, image: Path) -> Tenants:
    admin = cluster.api
    assert admin is not None
    tenants = Tenants(cluster)
    for dept in ("d1", "d2"):
        made = await ok(admin.post("/api/v1/departments", json={"name": dept}), 201)
        tenants.ids[dept] = made["uuid"]
    for project, dept in (("p1", "d1"), ("p2", "d1"), ("p3", "d2")):
        made = await ok(admin.post("/api/v1/projects", json={"name": project,
                                                             "department": dept}), 201)
        tenants.ids[project] = made["uuid"]
    for user, (dept, project, role) in PEOPLE.items():
        made = await ok(admin.post("/api/v1/users", json={
            "name": user, "password": PASSWORD, "department": dept}), 201)
        tenants.ids[user] = made["uuid"]
        grant: dict[str, Any] = {"user": user, "role": role}
        if role == "department_admin":
            grant["department"] = dept
            # An administrator also needs a project to log in to.
            await ok(admin.post("/api/v1/role-assignments", json={
                "user": user, "role": "reader", "project": project}), 201)
        else:
            grant["project"] = project
        await ok(admin.post("/api/v1/role-assignments", json=grant), 201)
    for user, (_, project, role) in PEOPLE.items():
        token = await cluster.login(user, PASSWORD, project)
        tenants.users[user] = Tenant(user, project, role, token, cluster.client(token))
    # One image and one VM in each project of a member, made by that member.
    data = await asyncio.to_thread(image.read_bytes)
    for user in ("alice", "bob", "zed"):
        http = tenants[user]
        made = await ok(http.post("/api/v1/images", params={"name": f"img-{user}"},
                                  content=data,
                                  headers={"Content-Type": "application/octet-stream"}), 201)
        tenants.ids[f"img-{user}"] = made["uuid"]
        accepted = await ok(http.post("/api/v1/vms", params={"wait": 60}, json={
            "name": f"vm-{user}", "image": f"img-{user}", "tags": {"owner": user}}), 202)
        assert accepted["task"]["state"] == "succeeded", accepted
        tenants.ids[f"vm-{user}"] = accepted["resource"]["uuid"]
        tenants.ids[f"task-{user}"] = accepted["task"]["uuid"]
    return tenants
