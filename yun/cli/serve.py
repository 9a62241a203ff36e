"""Launchers of the components: `yun serve <component>` runs one service in the foreground."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from yun.config import (
    ConfigError,
    ControlSettings,
    DomainSettings,
    GatewaySettings,
    NodeSettings,
    RouterSettings,
    StorageSettings,
    load_settings,
)
from yun.proto.membership import JoinRefused
from yun.util.lifecycle import run_service, run_until_signalled
from yun.util.logs import setup_logging

app = typer.Typer(help="Run one Yun component in the foreground (logs as JSON on stderr).",
                  no_args_is_help=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML settings file")]


def _run(component: str, make: object) -> None:
    try:
        service = make()  # type: ignore[operator]
    except (ConfigError, ValueError) as exc:
        typer.echo(f"yun {component}: {exc}", err=True)
        raise typer.Exit(2) from exc
    setup_logging(component, service.settings.log_level)
    try:
        run_service(run_until_signalled(service.start, service.stop))
    except JoinRefused as exc:
        typer.echo(f"yun {component}: {exc}", err=True)
        raise typer.Exit(3) from exc


@app.command()
def domain(config: ConfigOpt = None) -> None:
    """The domain server (C-DOM)."""
    from yun.domain.service import DomainService
    _run("domain", lambda: DomainService(load_settings(DomainSettings, "domain", config)))


@app.command()
def control(config: ConfigOpt = None) -> None:
    """A control server (C-CTL)."""
    from yun.control.service import ControlService
    _run("control", lambda: ControlService(load_settings(ControlSettings, "control", config)))


@app.command()
def node(config: ConfigOpt = None) -> None:
    """The node client of this host (C-NODE)."""
    from yun.node.service import NodeService
    _run("node", lambda: NodeService(load_settings(NodeSettings, "node", config)))


@app.command()
def storage(config: ConfigOpt = None) -> None:
    """A storage server (C-STO)."""
    from yun.storage.service import StorageService
    _run("storage", lambda: StorageService(load_settings(StorageSettings, "storage", config)))


@app.command()
def gateway(config: ConfigOpt = None) -> None:
    """The HTTP gateway: public REST API (C-GW)."""
    from yun.gateway.service import GatewayService
    _run("gateway", lambda: GatewayService(load_settings(GatewaySettings, "gateway", config)))


@app.command()
def router(config: ConfigOpt = None) -> None:
    """An intelligent router (C-RT): run it in the router host's network namespace."""
    from yun.router.service import RouterService
    _run("router", lambda: RouterService(load_settings(RouterSettings, "router", config)))


@app.command("sim-nodes")
def sim_nodes(
    count: Annotated[int, typer.Option(min=1, max=20000, help="how many simulated nodes")],
    prefix: Annotated[str, typer.Option(help="node names are <prefix>-<n>")] = "sim",
    flush_delay: Annotated[float, typer.Option(
        min=0.0, max=60.0,
        help="seconds a sim host's state may wait before it is written (0: at once)")] = 0.5,
    join_concurrency: Annotated[int, typer.Option(
        min=1, max=1000, help="nodes joining the domain at a time")] = 32,
    config: ConfigOpt = None,
) -> None:
    """Many simulated node clients in one process (sim hypervisor), behind one listener:
    each a real node (own identity, join, heartbeats, reports, node API) at
    https://<host>:<port>/n/<name>."""
    from yun.node.simnodes import SimNodesService

    _run("sim-nodes", lambda: SimNodesService(
        load_settings(NodeSettings, "node", config, hypervisor="sim", listen_port=0),
        count, prefix=prefix, flush_delay=flush_delay, join_concurrency=join_concurrency))
