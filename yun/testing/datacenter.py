"""A real Yun deployment in network namespaces: every component its own process.

The control plane (domain, control, storage, gateway) runs in host ``ctl``; each node
host is a namespace with its own libvirtd (:class:`NodeHost`) and node agent. The
test process reaches the gateway through the topology's root link, and the guests
through ``ip netns exec`` into their node.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from yun.proto.pki import serving_tls
from yun.testing.netns import Host, Topology, http_get_in
from yun.testing.nodehost import NodeHost
from yun.testing.procs import toml_value as _toml
from yun.util.procs import stop_pid

CONTROL_PLANE = ("domain", "control", "storage", "gateway")
PORTS = {"domain": 7700, "control": 7710, "storage": 7730, "gateway": 8080, "node": 7720,
         "router": 7740}


@dataclass
class Process:
    name: str
    host: Host
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> None:
        self.env = env if env is not None else self.env
        with self.log.open("ab") as out:
            self.popen = self.host.popen(self.argv, stdout=out, stderr=out,
                                         stdin=subprocess.DEVNULL,
                                         env={**os.environ, **self.env})

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean anything up."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            stop_pid(self.popen.pid, timeout=10)
            self.popen.wait(10)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


#: every data centre started and not yet closed, so a failing test's report can carry
#: the logs of one that a module fixture keeps up (tests/system/conftest.py)
LIVE: list[DataCenter] = []


class DataCenter:
    def __init__(self, topo: Topology, workdir: Path, nodes: int = 1,
                 discover: bool = False, node_options: dict[str, Any] | None = None,
                 control_options: dict[str, Any] | None = None) -> None:
        self.topo = topo
        # Extra settings of the control server's [control] table (e.g. router_timeout).
        self.control_options = dict(control_options or {})
        # Extra settings of every node's [node] table (e.g. the all-in-one's host reserve).
        self.node_options = dict(node_options or {})
        # discover: the domain server announces itself by mDNS and the nodes are given
        # no address for it (F-DISC).
        self.discover = discover
        self.workdir = workdir
        self.node_count = nodes
        self.secret = secrets.token_urlsafe(16)
        self.admin_password = secrets.token_urlsafe(16)
        self.token = ""
        self.procs: dict[str, Process] = {}
        # The section each process serves (node, router, ...), by process name.
        self.sections: dict[str, str] = {}
        self.node_hosts: dict[str, NodeHost] = {}
        self.ctl: Host | None = None
        self.api: httpx.Client | None = None

    # -- building ---------------------------------------------------------------------------

    def _config(self, name: str, host: Host, section: str, extra: dict[str, Any],
                state_dir: Path) -> Path:
        assert self.ctl is not None
        common = {
            "name": name, "domain_name": "dc", "domain_secret": self.secret,
            "domain_url": f"https://{self.ctl.ip}:{PORTS['domain']}", "listen_host": host.ip,
            "state_dir": str(state_dir), "heartbeat_interval": 1.0,
        }
        if self.discover and section == "node":
            del common["domain_url"]
        lines = ["[common]", *(f"{k} = {_toml(v)}" for k, v in common.items()),
                 f"[{section}]", *(f"{k} = {_toml(v)}" for k, v in extra.items())]
        path = self.workdir / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _process(self, name: str, host: Host, section: str, config: Path) -> Process:
        proc = Process(name, host, [sys.executable, "-m", "yun", "serve", section,
                                    "--config", str(config)],
                       self.workdir / "logs" / f"{name}.log")
        self.procs[name] = proc
        self.sections[name] = section
        return proc

    def port_of(self, name: str) -> int:
        """The port process ``name`` serves on."""
        return PORTS[self.sections.get(name, name)]

    def start(self) -> DataCenter:
        LIVE.append(self)
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        self.ctl = self.topo.add_host("ctl")
        extras: dict[str, dict[str, Any]] = {
            "domain": {"listen_port": PORTS["domain"], "ttl": 4.0, "mdns": self.discover},
            "control": {"listen_port": PORTS["control"],
                        "admin_password_file": str(self._admin_password_file()),
                        **self.control_options},
            "storage": {"listen_port": PORTS["storage"]},
            "gateway": {"listen_port": PORTS["gateway"], "rate_limit": 0},
        }
        # Every component joins through the domain server, so it comes first; the others
        # (and the node hosts' libvirtd) then start at once: each is seconds of Python
        # start-up, which one after the other was most of a deployment's ~18 s. Nodes and
        # the gateway retry until the control server answers.
        for component in CONTROL_PLANE:
            config = self._config(component, self.ctl, component, extras[component],
                                  self.workdir / "state" / component)
            self._process(component, self.ctl, component, config).start()
            if component == "domain":
                self._wait_up(self.ctl, PORTS[component], component)
        nodes = [self._launch_node(f"node{i}") for i in range(self.node_count)]
        for component in CONTROL_PLANE[1:]:
            self._wait_up(self.ctl, PORTS[component], component)
        for name, host in nodes:
            self._wait_up(host, PORTS["node"], name)
        base = f"http://{self.ctl.ip}:{PORTS['gateway']}"
        self.token = self._login(base)
        self.api = httpx.Client(base_url=base, timeout=120,
                                headers={"Authorization": f"Bearer {self.token}"})
        self.wait_nodes(self.node_count)
        return self

    def _admin_password_file(self) -> Path:
        path = self.workdir / "admin-password"
        path.write_text(self.admin_password)
        path.chmod(0o600)
        return path

    def _login(self, base: str, timeout: float = 60) -> str:
        """The super admin's token; the control server makes that user at its first start."""
        deadline = time.monotonic() + timeout
        while True:
            resp = httpx.post(f"{base}/api/v1/auth/tokens", timeout=30, json={
                "username": "admin", "password": self.admin_password})
            if resp.status_code == 201:
                return str(resp.json()["token"])
            if time.monotonic() > deadline:
                raise RuntimeError(f"admin login failed: {resp.status_code} {resp.text}")
            time.sleep(0.5)

    def add_node(self, name: str) -> NodeHost:
        """Start node host ``name`` (its namespace, libvirtd and node agent); return once
        the agent serves."""
        _, host = self._launch_node(name)
        self._wait_up(host, PORTS["node"], name)
        return self.node_hosts[name]

    def _launch_node(self, name: str) -> tuple[str, Host]:
        """Start node host ``name`` without waiting for its agent to serve."""
        host = self.topo.add_host(name)
        node_host = NodeHost(host.ns.name, name=name).start()
        self.node_hosts[name] = node_host
        state = node_host.root / "yun"
        state.mkdir(mode=0o755, exist_ok=True)
        config = self._config(name, host, "node", {
            "listen_port": PORTS["node"], "hypervisor": "libvirt",
            "libvirt_uri": node_host.libvirt_uri, "accel": "tcg", "report_interval": 1.0,
            "pool": "default", **self.node_options,
        }, state)
        self._process(name, host, "node", config).start()
        return name, host

    def add_router(self, name: str, host: Host, **options: Any) -> Process:
        """Start ``yun serve router`` named ``name`` in ``host`` (joined to the domain
        like every component; ``lan_address``: the host's LAN address); ``options``: more
        settings of its [router] table (e.g. ``sync_interval``)."""
        state = self.workdir / "state" / name
        config = self._config(name, host, "router", {
            "listen_port": PORTS["router"], "lan_address": host.ip, **options}, state)
        proc = self._process(name, host, "router", config)
        proc.start()
        self._wait_up(host, PORTS["router"], name)
        return proc

    def start_again(self, name: str) -> None:
        """Start process ``name`` again after it stopped or was killed; wait until it
        serves."""
        proc = self.procs[name]
        proc.start()
        self._wait_up(proc.host, self.port_of(name), name)

    @staticmethod
    def _serving(host: Host, port: int) -> bool:
        """The gateway answers its plain-HTTP health check; an internal port serves TLS
        that asks for a domain certificate. Probed from this process, which reaches every
        host of the LAN through the topology's root link: a probe run inside the host's
        namespace was a Python start-up (~0.5 s of CPU) per poll, taken from the very
        processes being waited for."""
        if port == PORTS["gateway"]:
            try:
                return httpx.get(f"http://{host.ip}:{port}/healthz", timeout=2).is_success
            except httpx.HTTPError:
                return False
        return serving_tls(host.ip, port)

    def _wait_up(self, host: Host, port: int, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        proc = self.procs[name]
        while time.monotonic() < deadline:
            if self._serving(host, port):
                return
            if proc.popen is not None and proc.popen.poll() is not None:
                break
            time.sleep(0.3)
        raise RuntimeError(f"{name} did not come up:\n{proc.tail()}")

    def restart(self, name: str, env: dict[str, str] | None = None) -> None:
        proc = self.procs[name]
        proc.stop()
        proc.start(env if env is not None else {})
        self._wait_up(proc.host, self.port_of(name), name)

    # -- using ------------------------------------------------------------------------------

    def wait_nodes(self, count: int, timeout: float = 60) -> None:
        assert self.api is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.api.get("/api/v1/nodes", params={"q": "status=up", "count": "true"}).json()[
                        "total"] >= count:
                    return
            except (httpx.HTTPError, KeyError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"fewer than {count} nodes up:\n" + "\n".join(
            p.tail(10) for p in self.procs.values()))

    def wait_task(self, task_uuid: str, timeout: float = 300) -> dict[str, Any]:
        assert self.api is not None
        deadline = time.monotonic() + timeout
        while True:
            task: dict[str, Any] = self.api.get(f"/api/v1/tasks/{task_uuid}",
                                                params={"wait": 10}).json()
            if task["state"] in ("succeeded", "failed"):
                return task
            if time.monotonic() > deadline:
                raise TimeoutError(f"task {task_uuid} still {task['state']}")

    def upload_guest_image(self, name: str = "guest") -> dict[str, Any]:
        from yun.testing.guest import ensure_guest_image

        assert self.api is not None
        path = ensure_guest_image()
        with path.open("rb") as f:
            resp = self.api.post("/api/v1/images", params={"name": name}, content=f,
                                 headers={"Content-Type": "application/octet-stream"})
        resp.raise_for_status()
        return resp.json()  # type: ignore[no-any-return]

    def create_vm(self, name: str, image: str = "guest", **fields: Any) -> dict[str, Any]:
        assert self.api is not None
        resp = self.api.post("/api/v1/vms", json={"name": name, "image": image,
                                                  "memory_mb": 192, **fields})
        resp.raise_for_status()
        task = self.wait_task(resp.json()["task"]["uuid"])
        if task["state"] != "succeeded":
            raise RuntimeError(f"create {name} failed: {task['error']}\n{self.logs()}")
        return self.api.get(f"/api/v1/vms/{resp.json()['resource']['uuid']}").json()  # type: ignore[no-any-return]

    def node_of(self, vm: dict[str, Any]) -> Host:
        return self.topo.hosts[vm["node_name"]]

    def wait_console(self, vm_uuid: str, marker: str, timeout: float = 180,
                     count: int = 1) -> str:
        assert self.api is not None
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            resp = self.api.get(f"/api/v1/vms/{vm_uuid}/console-log")
            text = resp.text if resp.status_code == 200 else ""
            if text.count(marker) >= count:
                return text
            time.sleep(1)
        raise TimeoutError(f"no {marker} (x{count}) on the console of {vm_uuid}:\n"
                           f"{text[-2000:]}")

    def guest_http(self, vm: dict[str, Any], timeout: float = 60) -> dict[str, str]:
        """GET / of the guest from inside its node; the answer's key=value lines."""
        deadline = time.monotonic() + timeout
        host = self.node_of(vm)
        last = None
        while time.monotonic() < deadline:
            last = http_get_in(host.ns.name, f"http://{vm['ip']}/", 3)
            if last.ok:
                return dict(line.split("=", 1) for line in last.body.splitlines()
                            if "=" in line)
            time.sleep(1)
        raise TimeoutError(f"guest {vm['ip']} gave no HTTP answer: {last}")

    def cli(self, log: list[str], *args: str, json_out: bool = True) -> Any:
        """``yun ARGS`` (with ``-o json`` when ``json_out``) against this deployment's
        gateway with the admin's token, as an operator's shell runs it, noted in ``log``;
        the JSON document it printed (None: none). A failed command fails the test with
        its output."""
        assert self.ctl is not None
        env = {**os.environ, "YUN_API_URL": f"http://{self.ctl.ip}:8080",
               "YUN_API_TOKEN": self.token, "COLUMNS": "200"}
        for var in ("YUN_PROFILE", "YUN_OUTPUT", "YUN_ACCESS_KEY", "YUN_SECRET_KEY"):
            env.pop(var, None)
        log.append("yun " + " ".join(args))
        argv = [sys.executable, "-m", "yun", *args, *(["-o", "json"] if json_out else [])]
        done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise AssertionError(f"yun {' '.join(args)}: {done.stdout}{done.stderr}")
        out = done.stdout
        starts = [i for i in (out.find("{"), out.find("[")) if i >= 0]
        return json.JSONDecoder().raw_decode(out, min(starts))[0] if starts else None

    def logs(self, lines: int = 15) -> str:
        """The last ``lines`` lines of each process's log."""
        return "\n".join(f"--- {p.name}\n{p.tail(lines)}" for p in self.procs.values())

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            LIVE.remove(self)
        if self.api is not None:
            self.api.close()
        # Every process but the domain server at once (each stop waits out that process's
        # own shutdown), then the domain server, which the others leave on their way out.
        domain = [p for p in self.procs.values() if self.sections.get(p.name) == "domain"]
        others = [p for p in self.procs.values() if p not in domain]
        with ThreadPoolExecutor(max(1, len(others))) as pool:
            list(pool.map(_stop_or_kill, others))
        for proc in domain:
            _stop_or_kill(proc)
        for node_host in self.node_hosts.values():
            node_host.stop()


def _stop_or_kill(proc: Process) -> None:
    """Stop ``proc`` (SIGTERM, waiting for it), or SIGKILL it when that fails."""
    try:
        proc.stop()
    except Exception:
        proc.kill()


@contextlib.contextmanager
def deployed(topo: Topology, *, nodes: int = 1, discover: bool = False,
             node_options: dict[str, Any] | None = None, image: str | None = "guest",
             prefix: str = "yun-dc-", control_options: dict[str, Any] | None = None
             ) -> Iterator[DataCenter]:
    """A started :class:`DataCenter` in ``topo`` (with the test guest image uploaded as
    ``image`` unless None), its processes' logs printed if anything fails while it is
    up, and everything stopped and removed after."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    dc = DataCenter(topo, workdir, nodes=nodes, discover=discover, node_options=node_options,
                    control_options=control_options)
    try:
        dc.start()
        if image is not None:
            dc.upload_guest_image(image)
        yield dc
    except BaseException:
        print(dc.logs())
        raise
    finally:
        dc.close()
        shutil.rmtree(workdir, ignore_errors=True)
