"""A Yun cloud of real `yun serve <component>` processes on loopback, with sim nodes.

Unlike :class:`~yun.testing.cluster.SimCluster` (every service in the test's own event
loop), each component here is its own operating-system process, so a test can kill one
with SIGKILL mid-request and start it again on the same port and state directory, the
way a host crash and a service restart look in production. Only the gateway's public
port (plain HTTP) and the database are used from outside: internal ports are the
components' own business.

Every process runs in its own process group and is killed with its group; it also dies
with the test process (``PR_SET_PDEATHSIG``), so no run leaves services behind. The
whole cloud lives in one temporary directory, removed by :meth:`ProcCloud.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from yun.testing.cluster import login, wait_nodes_up
from yun.testing.ports import free_port

log = logging.getLogger("yun.testing.procs")

CONTROL_PLANE = ("domain", "control", "storage", "gateway")
_PR_SET_PDEATHSIG = 1


def toml_value(value: Any) -> str:
    """``value`` as a TOML literal (bool, number, or a quoted string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, section: str, common: dict[str, Any],
                 extra: dict[str, Any]) -> Path:
    """A settings file with a ``[common]`` table and the component's ``[section]``."""
    lines = ["[common]", *(f"{k} = {toml_value(v)}" for k, v in common.items()),
             f"[{section}]", *(f"{k} = {toml_value(v)}" for k, v in extra.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    # If the test process dies (even by SIGKILL) the kernel kills this child too.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class ServiceProcess:
    """One `yun serve <section>` process, restartable with the same config and port."""

    name: str
    section: str
    config: Path
    log_file: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "yun", "serve", self.section, "--config",
                str(self.config)]

    def start(self) -> None:
        """Start the process in a new process group (it must not be running)."""
        if self.alive():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as out:
            out.write(f"--- start {self.starts + 1} of {self.name}\n".encode())
            out.flush()
            # Called from the event loop's (main) thread: PDEATHSIG follows the thread
            # that forked, so a worker thread would take the child down when it ends.
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env}, start_new_session=True, close_fds=True,
                preexec_fn=_die_with_parent)
        self.starts += 1
        log.info("service started", extra={"service": self.name, "pid": self.popen.pid})

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal_group(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process's whole group (nothing if it never started)."""
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)  # the group id is the leader's pid

    def kill(self) -> None:
        """SIGKILL to the whole group: nothing gets a chance to clean up."""
        if self.popen is None:
            return
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        log.info("service killed", extra={"service": self.name, "pid": self.popen.pid})

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (an orderly stop), then SIGKILL the group after ``timeout``."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        # Whatever it started in its group goes too, even when the leader is gone.
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class ProcCloud:
    """Domain, control, storage and gateway servers and ``nodes`` sim nodes, each a process.

    Short presence timings by default (heartbeat 0.5 s, TTL 2 s) so that a node killed for
    a few seconds is seen gone. ``database_url`` empty means SQLite in the control
    server's state directory (see :attr:`database_url` after :meth:`start`).
    """

    nodes: int = 3
    database_url: str = ""
    heartbeat_interval: float = 0.5
    ttl: float = 2.0
    report_interval: float = 1.0
    reconcile_interval: float = 1.0
    sim_vcpus: int = 128
    sim_memory_mb: int = 262144
    sim_disk_gb: int = 4096
    root: Path | None = None
    keep: bool = False
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    token: str = ""
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, ServiceProcess] = field(default_factory=dict)
    _own_root: bool = False

    # -- layout -------------------------------------------------------------------------

    @property
    def node_names(self) -> list[str]:
        return [f"node-{i}" for i in range(self.nodes)]

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    def state_dir(self, name: str) -> Path:
        assert self.root is not None
        return self.root / "state" / name

    def node_state_dirs(self) -> dict[str, Path]:
        """Each sim node's state directory, by node name (where it keeps sim-host.json)."""
        return {name: self.state_dir(name) for name in self.node_names}

    def _configure(self) -> None:
        assert self.root is not None
        for name in (*CONTROL_PLANE, *self.node_names):
            self.ports[name] = free_port()
        if not self.database_url:
            self.database_url = f"sqlite+aiosqlite:///{self.state_dir('control') / 'control.db'}"
        password_file = self.root / "admin-password"
        password_file.write_text(self.admin_password)
        password_file.chmod(0o600)
        extras: dict[str, dict[str, Any]] = {
            "domain": {"ttl": self.ttl, "mdns": False},
            "control": {"database_url": self.database_url,
                        "admin_password_file": str(password_file),
                        "reconcile_interval": self.reconcile_interval},
            "storage": {},
            # The bulk sends far more than one user would: no rate limit.
            "gateway": {"rate_limit": 0},
        }
        for name in self.node_names:
            extras[name] = {"hypervisor": "sim", "report_interval": self.report_interval,
                            "pool": "default", "memory_reserve_mb": 0,
                            "sim_vcpus": self.sim_vcpus, "sim_memory_mb": self.sim_memory_mb,
                            "sim_disk_gb": self.sim_disk_gb}
        for name, extra in extras.items():
            section = "node" if name in self.node_names else name
            common = {"name": name, "domain_name": "chaos", "domain_secret": self.secret,
                      "domain_url": f"https://127.0.0.1:{self.ports['domain']}",
                      "listen_host": "127.0.0.1", "listen_port": self.ports[name],
                      "state_dir": str(self.state_dir(name)),
                      "heartbeat_interval": self.heartbeat_interval}
            config = write_config(self.root / "config" / f"{name}.toml", section, common, extra)
            self.procs[name] = ServiceProcess(name, section, config,
                                              self.root / "logs" / f"{name}.log")

    # -- life ---------------------------------------------------------------------------

    async def start(self, timeout: float = 90.0) -> ProcCloud:
        """Start every process and wait until the admin can log in and all nodes are up."""
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="yun-procs-"))
            self._own_root = True
        self.root.mkdir(parents=True, exist_ok=True)
        self._configure()
        try:
            for proc in self.procs.values():
                proc.start()
            deadline = time.monotonic() + timeout
            self.token = await self._until(deadline, self._login, "the admin could not log in")
            async with self.api() as api:
                await wait_nodes_up(api, self.nodes, max(1.0, deadline - time.monotonic()))
        except BaseException:
            log.error("the cloud did not start:\n%s", self.logs())
            self.close()
            raise
        return self

    async def _login(self) -> str:
        return await login(self.gateway_url, "admin", self.admin_password)

    async def _until(self, deadline: float, attempt: Any, what: str) -> Any:
        """Call ``attempt`` until it returns, failing early if a process has exited."""
        last: Exception | None = None
        while time.monotonic() < deadline:
            dead = [p.name for p in self.procs.values() if not p.alive()]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited:\n{self.logs(dead)}")
            try:
                return await attempt()
            except (httpx.HTTPError, RuntimeError) as exc:
                last = exc
            await asyncio.sleep(0.3)
        raise TimeoutError(f"{what}: {last}\n{self.logs()}")

    def api(self, timeout: float = 30.0, **kwargs: Any) -> httpx.AsyncClient:
        """A client of the gateway's public API as the admin (``kwargs`` go to httpx)."""
        return httpx.AsyncClient(base_url=self.gateway_url, timeout=timeout,
                                 headers={"Authorization": f"Bearer {self.token}"}, **kwargs)

    def kill(self, name: str) -> None:
        """SIGKILL ``name`` (a component or node name) and its process group."""
        self.procs[name].kill()

    def restart(self, name: str) -> None:
        """Start ``name`` again with the same config, port and state directory."""
        proc = self.procs[name]
        if proc.alive():
            proc.kill()
        proc.start()

    async def crash(self, names: list[str], down_for: float) -> None:
        """Kill ``names`` with -9, keep them down ``down_for`` seconds, start them again."""
        for name in names:
            self.kill(name)
        await asyncio.sleep(down_for)
        for name in names:
            self.restart(name)

    def logs(self, names: list[str] | None = None, lines: int = 15) -> str:
        wanted = names if names is not None else list(self.procs)
        return "\n".join(f"--- {n} (pid {self.procs[n].pid})\n{self.procs[n].tail(lines)}"
                         for n in wanted if n in self.procs)

    def close(self, timeout: float = 10.0) -> None:
        """Stop every process (SIGTERM to all at once, SIGKILL to each group still there
        after ``timeout``) and remove the directory this cloud made (unless ``keep``)."""
        procs = list(self.procs.values())
        for proc in procs:
            if proc.alive():
                proc.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.stop(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:  # keep stopping the others
                log.exception("could not stop %s", proc.name)
                proc.kill()
        if self.root is not None and self._own_root and not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)
