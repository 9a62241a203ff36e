"""The `yun` command: user commands, the all-in-one, and the component launchers."""

from __future__ import annotations

from typing import Annotated

import typer

from yun.cli import aio, serve
from yun.cli.commands import (
    address_pool,
    department,
    eip,
    image,
    infra,
    key,
    pool,
    project,
    role,
    router,
    session,
    user,
    vm,
    vm_group,
    volume,
    zone,
)
from yun.cli.context import YunGroup
from yun.cli.state import OutputFormat, State, begin

app = typer.Typer(cls=YunGroup, help="Yun: an IaaS cloud for KVM/QEMU hosts.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)


@app.callback()
def root(
    ctx: typer.Context,
    profile: Annotated[str | None, typer.Option(
        envvar="YUN_PROFILE", help="the stored login to use (see `yun profile list`)")] = None,
    output: Annotated[OutputFormat | None, typer.Option(
        "--output", "-o", envvar="YUN_OUTPUT", case_sensitive=False,
        help="table, json (the API's JSON) or yaml; each command also takes -o")] = None,
) -> None:
    """Yun: an IaaS cloud for KVM/QEMU hosts.

    Connects with YUN_API_URL + YUN_API_TOKEN (or YUN_ACCESS_KEY + YUN_SECRET_KEY) when
    set, else the chosen or current profile (`yun login`)."""
    ctx.obj = State(profile=profile, output=output)
    begin(ctx.obj)
    ctx.call_on_close(ctx.obj.close)


app.command("login")(session.login)
app.command("logout")(session.logout)
app.command("whoami")(session.whoami)
app.add_typer(session.profile_app, name="profile")
app.add_typer(vm.app, name="vm")
app.add_typer(image.app, name="image")
app.add_typer(infra.node_app, name="node")
app.add_typer(zone.app, name="zone")
app.add_typer(pool.app, name="pool")
app.add_typer(vm_group.app, name="vm-group")
app.add_typer(volume.app, name="volume")
app.add_typer(volume.event_app, name="event")
app.add_typer(address_pool.app, name="address-pool")
app.add_typer(eip.app, name="eip")
app.add_typer(router.app, name="router")
app.add_typer(infra.task_app, name="task")
app.add_typer(project.app, name="project")
app.add_typer(project.quota_app, name="quota")
app.add_typer(department.app, name="department")
app.add_typer(user.app, name="user")
app.add_typer(role.app, name="role")
app.add_typer(key.app, name="key")
app.add_typer(key.api_key_app, name="api-key")
app.add_typer(key.audit_app, name="audit")
app.add_typer(aio.app, name="aio")
app.add_typer(serve.app, name="serve")


if __name__ == "__main__":
    app()
