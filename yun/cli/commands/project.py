"""`yun project …` and `yun quota …`: projects and their limits."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from yun.cli.common import (
    IdempotencyKey,
    Output,
    TagArgs,
    WaitOpt,
    WaitTimeout,
    accepted,
    add_list_and_show,
    add_tag_commands,
    finish,
    parse_tags,
)
from yun.cli.context import client
from yun.cli.output import emit, note, rows_table
from yun.client import DEFAULT_WAIT
from yun.proto.identity import ProjectCreate, Quota, QuotaResource, QuotaUpdate

app = typer.Typer(help="Projects (department admins).", no_args_is_help=True)
quota_app = typer.Typer(help="Quotas: limits and usage of a project.", no_args_is_help=True)

COLUMNS = ["uuid", "name", "department_name", "description", "tags"]
ProjectArg = Annotated[str, typer.Argument(help="project name or uuid")]


@app.command("create")
def create(name: str,
           department: Annotated[str | None, typer.Option(
               help="department name or uuid; default: yours")] = None,
           description: str = "", tag: TagArgs = None,
           idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Create a project."""
    spec = ProjectCreate(name=name, department=department, description=description,
                         tags=parse_tags(tag or []))
    emit(client().projects.create(spec, idempotency_key=idempotency_key), output)


add_list_and_show(app, "project", "Projects", COLUMNS, lambda c: c.projects,
                  "List the projects you may see.")


@app.command("delete")
def delete(project: ProjectArg,
           cascade: Annotated[bool, typer.Option(
               help="also delete its VMs and images (a task)")] = False,
           wait: WaitOpt = True, wait_timeout: WaitTimeout = DEFAULT_WAIT,
           idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Delete a project (refused while it holds VMs or images, unless --cascade)."""
    answer = accepted(client().projects.delete(project, cascade=cascade,
                                               idempotency_key=idempotency_key))
    finish(answer, f"delete project {project}", wait, wait_timeout, output)


add_tag_commands(app, "project", lambda c: c.projects.tags)


def _quota_table(quota: Quota) -> Table:
    rows = [{"resource": line.resource.value,
             "limit": "unlimited" if line.limit < 0 else line.limit, "used": line.used}
            for line in quota.lines]
    return rows_table(rows, ["resource", "limit", "used"], f"Quota of {quota.project_name}")


@quota_app.command("show")
def quota_show(project: Annotated[str | None, typer.Option(
                   help="project name or uuid; default: your token's project")] = None,
               output: Output = None) -> None:
    """Show a project's limits and usage."""
    quota = client().projects.get_quota(project) if project else client().quota.get()
    emit(quota, output, table=lambda: _quota_table(quota))


Limit_ = Annotated[int | None, typer.Option(min=-1, help="-1: unlimited")]


@quota_app.command("set")
def quota_set(
    project: Annotated[str, typer.Option(help="project name or uuid")],
    vms: Limit_ = None, vcpus: Limit_ = None,
    memory_mb: Annotated[int | None, typer.Option("--memory-mb", min=-1)] = None,
    disk_gb: Annotated[int | None, typer.Option("--disk-gb", min=-1)] = None,
    images: Limit_ = None,
    public_ips: Annotated[int | None, typer.Option("--public-ips", min=-1)] = None,
    idempotency_key: IdempotencyKey = None, output: Output = None,
) -> None:
    """Change some limits of a project (the others are kept; -1: unlimited)."""
    given = {QuotaResource.VMS: vms, QuotaResource.VCPUS: vcpus,
             QuotaResource.MEMORY_MB: memory_mb, QuotaResource.DISK_GB: disk_gb,
             QuotaResource.IMAGES: images, QuotaResource.PUBLIC_IPS: public_ips}
    limits = {resource: value for resource, value in given.items() if value is not None}
    if not limits:
        raise typer.BadParameter("give at least one limit, e.g. --vms 10")
    quota = client().projects.set_quota(project, QuotaUpdate(limits=limits),
                                        idempotency_key=idempotency_key)
    note(f"quota of {quota.project_name} changed")
    emit(quota, output, table=lambda: _quota_table(quota))
