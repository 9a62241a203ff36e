"""`yun router …`: the intelligent routers (platform admins)."""

from __future__ import annotations

import typer

from yun.cli.common import Output
from yun.cli.context import client
from yun.cli.output import emit

app = typer.Typer(help="Intelligent routers: which rule-set generation each applied "
                       "(platform admins).", no_args_is_help=True)

COLUMNS = ["name", "lan_address", "applied_generation", "current_generation", "in_sync",
           "live", "last_seen_at"]


@app.command("list")
def list_routers(output: Output = None) -> None:
    """List the routers: their LAN address and applied generation against the current."""
    answer = client().routers.list()
    emit(answer.items, output, columns=COLUMNS, title=f"Routers (generation "
                                                     f"{answer.generation})")
