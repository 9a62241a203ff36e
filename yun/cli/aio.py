"""`yun aio`: every component on this host as separate services, and a demo VM (F-AIO)."""

from __future__ import annotations

import json
import secrets
import stat
import sys
import time
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from yun.cli.config import Profile, load_profiles, save_profiles
from yun.client import ApiError, Client, TaskFailed
from yun.config import DEFAULT_CONFIG, GatewaySettings, load_settings
from yun.node.hypervisor.libvirt.daemons import ensure_libvirt_daemons
from yun.proto.identity import IssuedToken
from yun.proto.pki import serving_tls
from yun.proto.resources import Image, Task, Vm, VmCreate
from yun.util.files import write_atomic
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


ADMIN_PASSWORD = Path("/etc/yun/admin-password")
DOMAIN_SECRET = Path("/etc/yun/domain-secret")
GUEST_IMAGE = Path("/var/cache/yun/test-guest/yun-guest.qcow2")
AIO_PROFILE = "aio"


def _kept_secret(path: Path) -> str:
    """The secret already in ``path``, or "" when there is none."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return ""


def write_config(path: Path = DEFAULT_CONFIG, *, secret_file: Path = DOMAIN_SECRET,
                 password_file: Path = ADMIN_PASSWORD) -> dict[str, Any]:
    """Create the all-in-one settings; later runs keep the secrets they made.

    Each secret has a file of its own, mode 0600, readable by the services (root) only:
    the domain secret in ``secret_file``, the first admin's password in
    ``password_file``. The settings file ``path`` names them and holds no secret, so
    it is 0644 (the CLI of any user reads its ``[cli]`` table for the gateway's URL).
    The CLI's own token is never here: `yun login` keeps it in the user's profiles file
    (0600). A settings file of an older version (with the domain secret, or an admin
    token, inside) is rewritten, its domain secret moved to ``secret_file``."""
    import tomllib

    current: dict[str, Any] = {}
    if path.exists():
        current = tomllib.loads(path.read_text())
    secret = (_kept_secret(secret_file) or current.get("common", {}).get("domain_secret")
              or secrets.token_urlsafe(24))
    if _kept_secret(secret_file) != secret or \
            stat.S_IMODE(secret_file.stat().st_mode) != 0o600:
        write_atomic(secret_file, secret + "\n")
    if not _kept_secret(password_file):
        write_atomic(password_file, secrets.token_urlsafe(18) + "\n")
    password_file.chmod(0o600)
    if current.get("common", {}).get("domain_secret_file") == str(secret_file) and \
            "domain_secret" not in current.get("common", {}) and \
            "admin_token" not in current.get("gateway", {}) and \
            "token" not in current.get("cli", {}) and \
            current.get("control", {}).get("admin_password_file"):
        path.chmod(0o644)
        return current  # this version's file: keep what the operator changed in it
    text = f"""# Yun all-in-one settings, written by `yun aio up`. No secret is kept here: the
# domain secret is in {secret_file} and the admin password in {password_file}
# (both mode 0600, root's); the CLI's login is in ~/.config/yun/config.toml (0600).
[common]
domain_name = "aio"
domain_secret_file = "{secret_file}"
domain_url = "https://127.0.0.1:{PORTS['domain']}"
listen_host = "127.0.0.1"
state_dir = "{STATE_DIR}"

[domain]
listen_port = {PORTS['domain']}
mdns = false

[control]
listen_port = {PORTS['control']}
# The first super admin, 'admin', is made with this password when no user exists.
admin_password_file = "{password_file}"

[storage]
listen_port = {PORTS['storage']}

[node]
listen_port = {PORTS['node']}
hypervisor = "libvirt"
accel = "auto"
# New nodes land in this pool (the control server makes 'default' at installation).
pool = "default"
# Memory kept for the host: here it also runs the control plane.
memory_reserve_mb = 2048

[gateway]
listen_port = {PORTS['gateway']}

[cli]
api_url = "http://127.0.0.1:{PORTS['gateway']}"
"""
    write_atomic(path, text, mode=0o644)
    return tomllib.loads(text)


def save_aio_profile(url: str, issued: IssuedToken, path: Path | None = None) -> Path:
    """Keep the super admin's token as the CLI profile ``aio`` (the current profile
    unless another one is), in the profiles file (0600, see :func:`save_profiles`)."""
    profiles = load_profiles(path)
    profiles.profiles[AIO_PROFILE] = Profile(
        url=url, token=issued.token, token_uuid=issued.uuid, project=issued.project_name,
        user=issued.user_name, expires_at=issued.expires_at.isoformat())
    if profiles.current is None or profiles.current == AIO_PROFILE:
        profiles.current = AIO_PROFILE
    return save_profiles(profiles, path)


def login_admin(url: str) -> Client:
    """Log the super admin in and keep the token as the CLI profile ``aio``."""
    password = ADMIN_PASSWORD.read_text().strip()
    deadline = time.monotonic() + 60
    while True:
        try:
            client, issued = Client.login(url, "admin", password, "default")
            break
        except ApiError as exc:
            if (exc.status != 0 and exc.status < 500) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    save_aio_profile(url, issued)
    return client


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


def wait_up(component: str, timeout: float) -> bool:
    """Until ``component`` serves: the gateway's plain-HTTP health check, or a TLS server on
    an internal port (which needs a domain certificate for anything more)."""
    if component == "gateway":
        return wait_http(f"http://127.0.0.1:{PORTS[component]}/healthz", timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if serving_tls("127.0.0.1", PORTS[component]):
            return True
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
        if not wait_up(component, 60):
            out.print(f"[red]{component} did not come up[/red]; see {LOG_DIR}/{component}.log")
            raise typer.Exit(1)
        out.print(f"  {component:<8} pid {pid:<7} {state}")


def demo_forward(client: Client, vm: Vm) -> tuple[str, int] | None:
    """The node NAT port reaching port 80 of the demo VM (F-SB-PRIVATE), made once."""
    forwards = [f for f in client.vms.port_forwards(vm.uuid)
                if f.vm_port == 80 and f.protocol == "tcp"]
    forward = forwards[0] if forwards else client.vms.add_port_forward(vm.uuid, 80)
    return forward.address, forward.port


def guest_page(ip: str, timeout: float) -> str | None:
    """The page the guest serves at ``ip`` (``host`` or ``host:port``), once it answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{ip}/", timeout=3) as resp:
                return resp.read().decode(errors="replace")
        except OSError:
            time.sleep(1)
    return None


@app.command()
def up(config: Annotated[Path, typer.Option(help="settings file")] = DEFAULT_CONFIG,
       image: Annotated[Path, typer.Option(
           help="disk image of the demo VM (scripts/setup.sh builds the test guest there)")]
       = GUEST_IMAGE) -> None:
    """Start every component, upload the test guest image and boot the demo VM."""
    settings = write_config(config)
    out.print("[bold]Yun all-in-one[/bold]")
    ensure_libvirt_daemons()
    start_components(config)
    url = str(settings["cli"]["api_url"])
    try:
        client = login_admin(url)
    except ApiError as exc:
        out.print(f"[red]could not log in as admin:[/red] {exc}")
        raise typer.Exit(1) from exc
    try:
        _wait_node(client)
        found = _ensure_image(client, image)
        vm = _ensure_vm(client, found)
        _report(client, url, vm)
    except (ApiError, TaskFailed) as exc:
        out.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    finally:
        client.close()


def _wait_node(client: Client) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        nodes = client.nodes.list(q="status=up").items
        if nodes:
            node = nodes[0]
            out.print(f"  node {node.name}: {node.vcpus} vCPU, {node.memory_mb} MiB, "
                      f"accel {node.accel}")
            return
        time.sleep(0.5)
    out.print(f"[red]no node registered[/red]; see {LOG_DIR}/node.log")
    raise typer.Exit(1)


def _ensure_image(client: Client, path: Path) -> Image:
    images = client.images.list(q=f"name={DEMO_IMAGE} and status=active").items
    if images:
        return images[0]
    if not path.exists():
        out.print(f"[red]no demo image at {path}[/red]: build the test guest with "
                  "`.venv/bin/python -m yun.testing.guest build` (scripts/setup.sh does)")
        raise typer.Exit(1)
    with out.status(f"uploading {path.name}…"):
        # Public, so every project can boot the test guest.
        image = client.images.upload(path, DEMO_IMAGE, visibility="public",
                                     idempotency_key=f"aio-demo-image-{path.stat().st_size}")
    out.print(f"  image {DEMO_IMAGE}: {image.format}, {image.size} bytes, "
              f"sha256 {(image.sha256 or '')[:12]}…")
    return image


def _ensure_vm(client: Client, image: Image) -> Vm:
    vms = client.vms.list(q=f"name={DEMO_VM}").items
    if vms and vms[0].state == "error":
        out.print(f"  VM {DEMO_VM} is in error ({vms[0].error}); recreating it")
        client.vms.delete(vms[0].uuid, wait=True)
        vms = []
    if not vms:
        with out.status(f"creating VM {DEMO_VM}…"):
            task = client.vms.create(VmCreate(name=DEMO_VM, image=image.uuid, vcpus=1,
                                              memory_mb=256, disk_gb=1), wait=True)
        assert isinstance(task, Task)
        vm_uuid = task.resource_uuid
    else:
        vm_uuid = vms[0].uuid
        if vms[0].state == "stopped":
            client.vms.start(vm_uuid, wait=True)
    with out.status("waiting for the guest to boot (serial console marker)…"):
        deadline = time.monotonic() + 300
        while MARKER not in client.vms.console_log(vm_uuid):
            if time.monotonic() > deadline:
                out.print(f"[red]the guest printed no {MARKER} in 300 s[/red]")
                raise typer.Exit(1)
            time.sleep(1)
    return client.vms.get(vm_uuid)


def _report(client: Client, url: str, vm: Vm) -> None:
    console = client.vms.console(vm.uuid)
    # The default pool is sandbox-private: the guest is reached through a NAT port of its
    # node; this host (its node) also reaches its sandbox address directly.
    forward = demo_forward(client, vm)
    reach = f"{forward[0]}:{forward[1]}" if forward else vm.ip
    page = guest_page(reach, 60) if reach else None
    if page is None and vm.ip and reach != vm.ip:
        reach, page = vm.ip, guest_page(vm.ip, 10)
    out.print()
    out.print(f"[bold green]VM {vm.name} is {vm.state}[/bold green] on node {vm.node_name}")
    out.print(f"  uuid       {vm.uuid}")
    out.print(f"  IP         {vm.ip} (sandbox-private: reached through its node's NAT port)")
    out.print(f"  HTTP       curl http://{reach}/")
    if forward:
        out.print(f"  port 80    {forward[0]}:{forward[1]}   (yun vm port-forward list "
                  f"{vm.name})")
    if page:
        for line in page.strip().splitlines():
            out.print(f"               {line}")
    out.print(f"  serial log yun vm console-log {vm.name}")
    out.print(f"  console    virsh console yun-{vm.uuid}   (Ctrl-] to leave)")
    if console.vnc_port:
        out.print(f"  VNC        {console.vnc_host}:{console.vnc_port}")
    out.print(f"  REST API   {url}/docs")
    out.print(f"  login      yun login --url {url} --username admin   (password: "
              f"{ADMIN_PASSWORD}); the CLI profile '{AIO_PROFILE}' is logged in already")


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
        try:
            with _admin() as client:
                for vm in client.vms.iterate():
                    out.print(f"  VM {vm.name:<12} {vm.state:<9} {vm.ip or ''}")
        except (ApiError, OSError) as exc:
            out.print(f"  API: {exc}")


@app.command()
def down(purge: Annotated[bool, typer.Option(
        help="also delete every VM and image, the host network and all state")] = False,
         config: Annotated[Path, typer.Option(help="settings file")] = DEFAULT_CONFIG) -> None:
    """Stop the services. VMs keep running unless --purge."""
    if purge and read_pid(RUN_DIR / "gateway.pid"):
        try:
            with _admin() as client:
                for vm in list(client.vms.iterate()):
                    client.vms.delete(vm.uuid, wait=True)
                    out.print(f"  deleted VM {vm.name}")
                for image in list(client.images.iterate()):
                    client.images.delete(image.uuid)
                    out.print(f"  deleted image {image.name}")
        except (ApiError, TaskFailed, OSError) as exc:
            out.print(f"[yellow]cleanup incomplete:[/yellow] {exc}")
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
        from yun.node.network.sandbox import SandboxNetworkBackend

        settings = load_settings(NodeSettings, "node", config)
        asyncio.run(SandboxNetworkBackend(settings.state_dir / "node" / "network").teardown())
        shutil.rmtree(STATE_DIR, ignore_errors=True)
        config.unlink(missing_ok=True)
        ADMIN_PASSWORD.unlink(missing_ok=True)
        DOMAIN_SECRET.unlink(missing_ok=True)
        profiles = load_profiles()
        if profiles.profiles.pop(AIO_PROFILE, None) is not None:
            if profiles.current == AIO_PROFILE:
                profiles.current = None
            save_profiles(profiles)
        out.print("  state and settings removed")


def _admin() -> Client:
    """A client logged in as the all-in-one's super admin."""
    settings = load_settings(GatewaySettings, "gateway")
    return login_admin(f"http://127.0.0.1:{settings.listen_port}")
