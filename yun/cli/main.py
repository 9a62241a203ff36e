"""The `yun` command: user commands, the all-in-one, and the component launchers."""

from __future__ import annotations

import typer

from yun.cli import aio, serve
from yun.cli.resources import image_app, node_app, task_app, vm_app

app = typer.Typer(help="Yun: an IaaS cloud for KVM/QEMU hosts.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
app.add_typer(vm_app, name="vm")
app.add_typer(image_app, name="image")
app.add_typer(node_app, name="node")
app.add_typer(task_app, name="task")
app.add_typer(aio.app, name="aio")
app.add_typer(serve.app, name="serve")


if __name__ == "__main__":
    app()
