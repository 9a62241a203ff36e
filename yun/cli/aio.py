"""`yun aio`: every component on this host as separate services, and a demo VM (F-AIO)."""

from __future__ import annotations

import json
import secrets
import sys
import time
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from yun.cli.api import Api, ApiError
from yun.config import DEFAULT_CONFIG
from yun.node.hypervisor.libvirt.daemons import ensure_libvirt_daemons
from yun.util.procs import read_pid, start_detached, stop_pid

app = typer.Typer(help="All-in-one: the whole cloud on this host.", no_args_is_help=True)
out = Console()

COMPONENTS = ("domain", "control", "storage", "node", "gateway")
PORTS = {"domain": 7700, "control": 7710, "node": 7720, "storage": 7730, "gateway": 8080}
RUN_DIR = Path("/run/yun")
LOG_DIR = Path("/var/log/yun")
STATE_DIR = Path("/var/lib/yun")
DEMO_IMAGE = "yun-test-guest"
DEMO_VM = "demo"
MARKER = "YUN-GUEST-READY"


def write_config(path: Path) -> dict[str, Any]:
    """Create the all-in-one settings once; later runs keep the secrets they made."""
    if path.exists():
        import tomllib
        return tomllib.loads(path.read_text())
    secret, token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    text = f"""# Yun all-in-one settings, written by `yun aio up`.
[common]
domain_name = "aio"
domain_secret = "{secret}"
domain_url = "http://127.0.0.1:{PORTS['domain']}"
listen_host = "127.0.0.1"
state_dir = "{STATE_DIR}"

[domain]
listen_port = {PORTS['domain']}
mdns = false

[control]
listen_port = {PORTS['control']}

[storage]
listen_port = {PORTS['storage']}

[node]
listen_port = {PORTS['node']}
hypervisor = "libvirt"
accel = "auto"

[gateway]
listen_port = {PORTS['gateway']}
admin_token = "{token}"

[cli]
api_url = "http://127.0.0.1:{PORTS['gateway']}"
token = "{token}"
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(text)
    import tomllib
    return tomllib.loads(text)


def wait_http(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def start_components(config: Path) -> None:
    for component in COMPONENTS:
        pidfile = RUN_DIR / f"{component}.pid"
        pid = read_pid(pidfile)
        if pid is None:
            pid = start_detached([sys.executable, "-m", "yun", "serve", component,
                                  "--config", str(config)],
                                 LOG_DIR / f"{component}.log", pidfile)
            state = "started"
        else:
            state = "already running"
        if not wait_http(f"http://127.0.0.1:{PORTS[component]}/healthz", 60):
            out.print(f"[red]{component} did not come up[/red]; see {LOG_DIR}/{component}.log")
            raise typer.Exit(1)
        out.print(f"  {component:<8} pid {pid:<7} {state}")


def guest_page(ip: str, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{ip}/", timeout=3) as resp:
                return resp.read().decode(errors="replace")
        except OSError:
            time.sleep(1)
    return None


@app.command()
def up(config: Annotated[Path, typer.Option(help="settings file")] = DEFAULT_CONFIG) -> None:
    """Start every component, upload the test guest image and boot the demo VM."""
    write_config(config)
    out.print("[bold]Yun all-in-one[/bold]")
    ensure_libvirt_daemons()
    start_components(config)
    api = Api(token=None)
    try:
        _wait_node(api)
        image = _ensure_image(api)
        vm = _ensure_vm(api, image)
        _report(api, vm)
    except ApiError as exc:
        out.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    finally:
        api.close()


def _wait_node(api: Api) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            nodes = api.request("GET", "/nodes", params={"status": "up"})["items"]
        except ApiError:
            nodes = []
        if nodes:
            node = nodes[0]
            out.print(f"  node {node['name']}: {node['vcpus']} vCPU, {node['memory_mb']} MiB, "
                      f"accel {node['accel']}")
            return
        time.sleep(0.5)
    out.print(f"[red]no node registered[/red]; see {LOG_DIR}/node.log")
    raise typer.Exit(1)


def _ensure_image(api: Api) -> dict[str, Any]:
    images = api.request("GET", "/images", params={"name": DEMO_IMAGE, "status": "active"})
    if images["items"]:
        return images["items"][0]  # type: ignore[no-any-return]
    from yun.testing.guest import ensure_guest_image

    with out.status("building the test guest image from Debian packages…"):
        path = ensure_guest_image()
    with out.status(f"uploading {path.name}…"):
        image = api.upload(path, DEMO_IMAGE, None, lambda n: None)
    out.print(f"  image {DEMO_IMAGE}: {image['format']}, {image['size']} bytes, "
              f"sha256 {image['sha256'][:12]}…")
    return image  # type: ignore[no-any-return]


def _ensure_vm(api: Api, image: dict[str, Any]) -> dict[str, Any]:
    vms = api.request("GET", "/vms", params={"name": DEMO_VM})["items"]
    if vms and vms[0]["state"] == "error":
        out.print(f"  VM {DEMO_VM} is in error ({vms[0].get('error')}); recreating it")
        accepted = api.request("DELETE", f"/vms/{vms[0]['uuid']}")
        api.wait_task(accepted["task"]["uuid"])
        vms = []
    if not vms:
        with out.status(f"creating VM {DEMO_VM}…"):
            accepted = api.request("POST", "/vms", json={
                "name": DEMO_VM, "image": image["uuid"], "vcpus": 1, "memory_mb": 256,
                "disk_gb": 1})
            task = api.wait_task(accepted["task"]["uuid"])
        if task["state"] != "succeeded":
            out.print(f"[red]create failed:[/red] {task['error']}")
            raise typer.Exit(1)
        vm_uuid = accepted["resource"]["uuid"]
    else:
        vm_uuid = vms[0]["uuid"]
        if vms[0]["state"] == "stopped":
            api.wait_task(api.request("POST", f"/vms/{vm_uuid}/start")["task"]["uuid"])
    with out.status("waiting for the guest to boot (serial console marker)…"):
        deadline = time.monotonic() + 300
        while MARKER not in api.request("GET", f"/vms/{vm_uuid}/console-log"):
            if time.monotonic() > deadline:
                out.print(f"[red]the guest printed no {MARKER} in 300 s[/red]")
                raise typer.Exit(1)
            time.sleep(1)
    return api.request("GET", f"/vms/{vm_uuid}")  # type: ignore[no-any-return]


def _report(api: Api, vm: dict[str, Any]) -> None:
    console = api.request("GET", f"/vms/{vm['uuid']}/console")
    page = guest_page(vm["ip"], 60)
    out.print()
    out.print(f"[bold green]VM {vm['name']} is {vm['state']}[/bold green] "
              f"on node {vm['node_name']}")
    out.print(f"  uuid       {vm['uuid']}")
    out.print(f"  IP         {vm['ip']}")
    out.print(f"  HTTP       curl http://{vm['ip']}/")
    if page:
        for line in page.strip().splitlines():
            out.print(f"               {line}")
    out.print(f"  serial log yun vm console-log {vm['name']}")
    out.print(f"  console    virsh console yun-{vm['uuid']}   (Ctrl-] to leave)")
    if console.get("vnc_port"):
        out.print(f"  VNC        {console['vnc_host']}:{console['vnc_port']}")
    out.print(f"  REST API   {api.url}/docs  (token: {DEFAULT_CONFIG}, table \\[cli])")


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Which components run, and the VMs."""
    rows = {c: read_pid(RUN_DIR / f"{c}.pid") for c in COMPONENTS}
    if as_json:
        out.print_json(json.dumps(rows))
        return
    for component, pid in rows.items():
        out.print(f"  {component:<8} {'running, pid ' + str(pid) if pid else 'stopped'}")
    if rows["gateway"]:
        api = Api()
        try:
            for vm in api.request("GET", "/vms")["items"]:
                out.print(f"  VM {vm['name']:<12} {vm['state']:<9} {vm.get('ip') or ''}")
        except ApiError as exc:
            out.print(f"  API: {exc}")
        finally:
            api.close()


@app.command()
def down(purge: Annotated[bool, typer.Option(
        help="also delete every VM and image, the host network and all state")] = False,
         config: Annotated[Path, typer.Option(help="settings file")] = DEFAULT_CONFIG) -> None:
    """Stop the services. VMs keep running unless --purge."""
    if purge and read_pid(RUN_DIR / "gateway.pid"):
        api = Api()
        try:
            for vm in api.request("GET", "/vms", params={"limit": 1000})["items"]:
                api.wait_task(api.request("DELETE", f"/vms/{vm['uuid']}")["task"]["uuid"])
                out.print(f"  deleted VM {vm['name']}")
            for image in api.request("GET", "/images", params={"limit": 1000})["items"]:
                api.request("DELETE", f"/images/{image['uuid']}")
                out.print(f"  deleted image {image['name']}")
        except ApiError as exc:
            out.print(f"[yellow]cleanup incomplete:[/yellow] {exc}")
        finally:
            api.close()
    for component in reversed(COMPONENTS):
        pid = read_pid(RUN_DIR / f"{component}.pid")
        if pid:
            stop_pid(pid)
            out.print(f"  {component:<8} stopped")
        (RUN_DIR / f"{component}.pid").unlink(missing_ok=True)
    if purge:
        import asyncio
        import shutil

        from yun.config import NodeSettings, load_settings
        from yun.node.network.nat import NatNetworkBackend

        settings = load_settings(NodeSettings, "node", config)
        asyncio.run(NatNetworkBackend(settings.state_dir / "node" / "network", settings.bridge,
                                      settings.nat_subnet).teardown())
        shutil.rmtree(STATE_DIR, ignore_errors=True)
        config.unlink(missing_ok=True)
        out.print("  state and settings removed")
