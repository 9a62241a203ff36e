"""Departments, projects and quotas."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from yun.control.access.policy import Scope
from yun.control.api.bundle import ApiBundle
from yun.control.api.deps import Listing
from yun.control.api.routing import audit_resource
from yun.control.services.listing import listed
from yun.control.services.projects import department_models, project_models
from yun.proto.identity import (
    Department,
    DepartmentCreate,
    DepartmentUpdate,
    Project,
    ProjectCreate,
    ProjectUpdate,
    Quota,
    QuotaUpdate,
)
from yun.proto.resources import Accepted, Page


def tenancy_router(api: ApiBundle) -> APIRouter:
    r = api.router("projects")
    user, scope = api.user, api.scope
    svc = api.projects

    @r.post("/departments", response_model=Department, status_code=201,
            name="department.create")
    async def create_department(req: DepartmentCreate, request: Request,
                                sc: Scope = scope) -> Department:
        made = await svc.create_department(req, sc.context)
        audit_resource(request, "department", made.uuid)
        return made

    @r.get("/departments", response_model=Page[Department], name="department.list")
    async def list_departments(params: Listing, sc: Scope = scope) -> Page[Department]:
        return await listed(api.ctx.db, "department", sc, params, department_models)

    @r.get("/departments/{ref}", response_model=Department, name="department.show")
    async def show_department(ref: str, sc: Scope = scope) -> Department:
        return await svc.get_department(ref, sc)

    @r.patch("/departments/{ref}", response_model=Department, name="department.update")
    async def update_department(ref: str, req: DepartmentUpdate,
                                sc: Scope = scope) -> Department:
        return await svc.update_department(ref, req, sc)

    @r.delete("/departments/{ref}", status_code=204, response_model=None, name="department.delete")
    async def delete_department(ref: str, request: Request, sc: Scope = scope) -> Response:
        audit_resource(request, "department", await svc.delete_department(ref, sc))
        return Response(status_code=204)

    @r.post("/projects", response_model=Project, status_code=201, name="project.create")
    async def create_project(req: ProjectCreate, request: Request, sc: Scope = scope
                             ) -> Project:
        made = await svc.create_project(req, sc)
        audit_resource(request, "project", made.uuid, made.uuid)
        return made

    @r.get("/projects", response_model=Page[Project], name="project.list")
    async def list_projects(params: Listing, sc: Scope = scope) -> Page[Project]:
        return await listed(api.ctx.db, "project", sc, params, project_models)

    @r.get("/projects/{ref}", response_model=Project, name="project.show")
    async def show_project(ref: str, sc: Scope = scope) -> Project:
        return await svc.get_project(ref, sc)

    @r.patch("/projects/{ref}", response_model=Project, name="project.update")
    async def update_project(ref: str, req: ProjectUpdate, sc: Scope = scope) -> Project:
        return await svc.update_project(ref, req, sc)

    @r.delete("/projects/{ref}", status_code=204, response_model=None, name="project.delete",
              responses={202: {"model": Accepted}})
    async def delete_project(ref: str, request: Request, sc: Scope = scope,
                             cascade: bool = False) -> Any:
        project_uuid, accepted = await svc.delete_project(ref, sc, cascade)
        audit_resource(request, "project", project_uuid, project_uuid)
        if accepted is not None:
            return JSONResponse(accepted.model_dump(mode="json"), status_code=202)
        return Response(status_code=204)

    @r.get("/projects/{ref}/quota", response_model=Quota, name="project.quota")
    async def project_quota(ref: str, sc: Scope = scope) -> Quota:
        return await svc.quota(ref, sc)

    @r.put("/projects/{ref}/quota", response_model=Quota, name="project.set_quota")
    async def set_quota(ref: str, req: QuotaUpdate, request: Request,
                        sc: Scope = scope) -> Quota:
        quota = await svc.set_quota(ref, req, sc)
        audit_resource(request, "project", quota.project_uuid, quota.project_uuid)
        return quota

    @r.get("/quota", response_model=Quota, name="quota.show")
    async def my_quota(sc: Scope = scope) -> Quota:
        return await svc.quota(None, sc)

    del user
    return r
