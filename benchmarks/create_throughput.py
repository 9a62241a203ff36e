#!/usr/bin/env python3
"""Create throughput on the ``sim`` hypervisor: 1,000 VMs on 100 nodes through the REST API.

The control plane runs as separate processes on 127.0.0.1, each started the way an
operator starts it (``python -m yun serve domain|control|storage|gateway --config F``)
from one generated TOML file, and the 100 simulated nodes run in one more process
(``python -m yun serve sim-nodes --count 100 --config F``); every node is a real
HTTP service that joins the domain, heartbeats and reports, only its hypervisor is
simulated. The script then

1. uploads a small qcow2 (``qemu-img create -f qcow2 x.qcow2 64M``) as image ``img``;
2. measures two baselines on the same deployment:
   * the round-trip rate of the cheapest requests at the bulk's concurrency:
     ``GET /healthz`` of the gateway (FastAPI alone, nothing forwarded) and
     ``GET /api/v1/tasks?q=state=running&limit=1&count=true`` (authenticated,
     forwarded to the control server, one SQL count: what the bulk's waiting polls);
   * the create flow one VM at a time (``POST /api/v1/vms`` then long-poll of its
     task): the latency of one create on an idle cloud; those VMs are deleted again;
3. creates ``--vms`` VMs (1 vCPU, 256 MiB) with at most ``--concurrency`` requests in
   flight, then waits for every task to end by polling the *count* of pending,
   running and rolling-back tasks (``q=state in (...)&count=true``: one request per
   poll, not one per VM);
4. prints VMs per second (first request → last task's ``finished_at``), accepted
   requests per second (first request → last 202), failures, the latencies, the
   spread of the VMs over the nodes, the control server's peak RSS (``VmHWM``) and
   the CPU seconds of every process.

Every process is stopped at the end (SIGTERM, then SIGKILL) and the temporary
directory removed, also on failure or SIGTERM. Exit status 1 if any create failed.
The API is used as ``admin`` (the super admin the control server makes from
``admin_password_file`` at its first start), logged in to project ``default`` with
``POST /api/v1/auth/tokens``; the gateway's rate limit is off (``rate_limit = 0``).

Run: ``.venv/bin/python benchmarks/create_throughput.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from machine import cpu_model, memory_gib  # benchmarks/machine.py

from yun.proto.pki import serving_tls
from yun.util.lifecycle import sigterm_as_interrupt

CONTROL_PLANE = ("domain", "control", "storage", "gateway")
UNFINISHED = ("pending", "running", "rolling_back")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = 1000  # the API's largest page
# The cheapest forwarded request: one SQL count (``q`` URL-encoded for the raw client).
TASK_COUNT_PATH = "/api/v1/tasks?q=state%3Drunning&limit=1&count=true"


class BenchmarkError(RuntimeError):
    """The deployment did not come up or behaved wrongly; the message says how."""


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(value: Any) -> str:
    """``value`` as a TOML value (bool, number or basic string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_config(path: Path, tables: dict[str, dict[str, Any]]) -> None:
    """Write ``tables`` (table name -> key -> value) as a TOML file."""
    lines: list[str] = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines))


@dataclass
class Service:
    """One ``python -m yun serve ...`` process and its log."""

    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=out, start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def exited(self) -> bool:
        """Started and no longer running."""
        return self.popen is not None and self.popen.poll() is not None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        """user + system CPU time of the process so far (from /proc/<pid>/stat)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15

    def memory_kib(self) -> dict[str, int]:
        """VmHWM (peak RSS) and VmRSS of the process, in KiB."""
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
        return out


def stop_services(services: list[Service], grace: float = 15.0) -> None:
    """SIGTERM every process, SIGKILL whatever still runs after ``grace`` seconds."""
    running = [s for s in services if s.alive()]
    for service in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(service.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for service in running:
        assert service.popen is not None
        try:
            service.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(service.pid, signal.SIGKILL)
            service.popen.wait(10)
            print(f"{service.name} needed SIGKILL", file=sys.stderr)




# --------------------------------------------------------------------------- measuring


@dataclass
class Deployment:
    """The running cloud: its processes, API address, the super admin's password and,
    once logged in, a token of ``admin`` in project ``default``."""

    root: Path
    services: dict[str, Service]
    ports: dict[str, int]
    api_url: str
    admin_password: str
    token: str = ""


def parse_ts(value: str) -> float:
    """Wall-clock seconds of an ISO timestamp from the API (UTC if naive)."""
    when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


RETRIES: list[str] = []  # transport errors of GETs that were retried (reported)


async def get_json(api: httpx.AsyncClient, url: str, attempts: int = 3, **kw: Any) -> Any:
    """GET ``url`` and decode its JSON; a transport error (say, a keep-alive connection
    the server closed just as it was reused) is retried and recorded in RETRIES."""
    for attempt in range(attempts):
        try:
            resp = await api.get(url, **kw)
        except httpx.TransportError as exc:
            RETRIES.append(f"GET {url}: {exc!r}")
            if attempt == attempts - 1:
                raise
            continue
        resp.raise_for_status()
        return resp.json()
    raise AssertionError("unreachable")


async def wait_until(what: str, check: Callable[[], Awaitable[bool]], timeout: float,
                     services: dict[str, Service]) -> None:
    """Poll ``check`` every 0.2 s; BenchmarkError (with logs) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            if await check():
                return
        dead = [s.name for s in services.values() if s.exited()]
        if dead or time.monotonic() > deadline:
            logs = "\n".join(f"--- {s.name}\n{s.tail()}" for s in services.values())
            reason = f"{', '.join(dead)} exited" if dead else f"not within {timeout:.0f} s"
            raise BenchmarkError(f"{what}: {reason}\n{logs}")
        await asyncio.sleep(0.2)


def start_deployment(root: Path, nodes: int, node_vcpus: int, node_memory_mb: int,
                     profile_control: Path | None = None, database_url: str = ""
                     ) -> Deployment:
    """Write the config and start the control plane and the sim-nodes process."""
    ports = {name: free_port() for name in CONTROL_PLANE}
    # The control server makes the super admin ``admin`` (in project ``default``) from
    # this file at its first start; the benchmark logs in with it.
    admin_password = secrets.token_urlsafe(16)
    password_file = root / "admin-password"
    password_file.write_text(admin_password)
    password_file.chmod(0o600)
    config = root / "yun.toml"
    tables: dict[str, dict[str, Any]] = {
        "common": {
            "domain_name": "bench", "domain_secret": secrets.token_urlsafe(16),
            "domain_url": f"https://127.0.0.1:{ports['domain']}", "listen_host": "127.0.0.1",
            "heartbeat_interval": 2.0, "log_level": "INFO",
        },
        "domain": {"name": "domain", "listen_port": ports["domain"], "mdns": False},
        "control": {"name": "control", "listen_port": ports["control"],
                    "admin_password_file": str(password_file),
                    # empty: SQLite in the control server's state directory
                    **({"database_url": database_url} if database_url else {})},
        "storage": {"name": "storage", "listen_port": ports["storage"]},
        "gateway": {"name": "gateway", "listen_port": ports["gateway"],
                    "listen_host": "127.0.0.1", "rate_limit": 0},  # 0: no rate limit
        "node": {"report_interval": 5.0, "pool": "default", "memory_reserve_mb": 0,
                 "sim_vcpus": node_vcpus,
                 "sim_memory_mb": node_memory_mb, "sim_disk_gb": 4096,
                 "state_dir": str(root / "state" / "nodes")},
    }
    for name in CONTROL_PLANE:
        tables[name]["state_dir"] = str(root / "state" / name)
    write_config(config, tables)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(root / "x.qcow2"), "64M"],
                   check=True)
    (root / "logs").mkdir()
    serve = [sys.executable, "-m", "yun", "serve"]
    services = {name: Service(name, [*serve, name, "--config", str(config)],
                              root / "logs" / f"{name}.log") for name in CONTROL_PLANE}
    if profile_control is not None:
        # Diagnostics only: cProfile (main thread; aiosqlite's thread is not seen) slows
        # the control server down, so the figures of such a run are not the benchmark's.
        services["control"].argv[1:3] = ["-m", "cProfile", "-o", str(profile_control),
                                         "-m", "yun"]
    services["sim-nodes"] = Service(
        "sim-nodes", [*serve, "sim-nodes", "--count", str(nodes), "--config", str(config)],
        root / "logs" / "sim-nodes.log")
    return Deployment(root, services, ports, f"http://127.0.0.1:{ports['gateway']}",
                      admin_password)


async def login(api: httpx.AsyncClient, user: str, password: str,
                project: str | None = None) -> str:
    """A token of ``user`` from ``POST /api/v1/auth/tokens`` (password login)."""
    body = {"username": user, "password": password}
    if project is not None:
        body["project"] = project
    resp = await api.post("/api/v1/auth/tokens", json=body)
    if resp.status_code != 201:
        raise BenchmarkError(f"login of {user}: {resp.status_code} {resp.text[:300]}")
    return str(resp.json()["token"])


async def bring_up(dep: Deployment, api: httpx.AsyncClient, nodes: int,
                   timeout: float) -> None:
    """Start the processes in order, log ``admin`` in (``dep.token``, also set on
    ``api``) and wait until the cloud serves with every node up."""
    for name in CONTROL_PLANE:
        dep.services[name].start()
        port = dep.ports[name]

        async def healthy(port: int = port, name: str = name) -> bool:
            if name != "gateway":  # internal ports speak TLS with domain certificates only
                return await asyncio.to_thread(serving_tls, "127.0.0.1", port)
            async with httpx.AsyncClient(timeout=2) as probe:
                return (await probe.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200

        await wait_until(f"{name} health", healthy, timeout, dep.services)
    dep.services["sim-nodes"].start()

    async def gateway_sees_control() -> bool:
        return int((await api.get("/healthz")).json()["control_servers"]) > 0

    async def nodes_up() -> bool:
        page = (await api.get("/api/v1/nodes", params={"q": "status=up", "limit": 1,
                                                        "count": "true"})).json()
        return int(page["total"]) >= nodes

    await wait_until("gateway peers", gateway_sees_control, timeout, dep.services)
    dep.token = await login(api, "admin", dep.admin_password, "default")
    api.headers["Authorization"] = f"Bearer {dep.token}"
    await wait_until(f"{nodes} nodes up", nodes_up, timeout, dep.services)


async def upload_image(dep: Deployment, api: httpx.AsyncClient, timeout: float) -> None:
    """A 64 MiB (virtual) empty qcow2 as image ``img``; retried until storage is known."""
    data = (dep.root / "x.qcow2").read_bytes()
    last: list[str] = []

    async def upload() -> bool:
        resp = await api.post("/api/v1/images", params={"name": "img"}, content=data,
                              headers={"Content-Type": "application/octet-stream"})
        last[:] = [f"{resp.status_code} {resp.text[:300]}"]
        if resp.status_code == 201:
            return bool(resp.json()["status"] == "active")
        if resp.status_code == 409:  # a previous try got the record made
            page = (await api.get("/api/v1/images", params={"q": "name=img"})).json()
            return any(i["status"] == "active" for i in page["items"])
        return False

    try:
        await wait_until("image upload", upload, timeout, dep.services)
    except BenchmarkError as exc:
        raise BenchmarkError(f"{exc}\nlast answer: {last}") from exc


async def round_trips(dep: Deployment, path: str, count: int, concurrency: int
                      ) -> dict[str, Any]:
    """Rate and latency of ``count`` GETs of ``path`` over ``concurrency`` connections.

    A minimal HTTP/1.1 keep-alive client on asyncio streams, not httpx: httpx spends a
    few milliseconds of CPU per request, so on two cores it, not the server, would set
    the rate. Each connection sends its next request when the previous answer is in.
    """
    host, port = "127.0.0.1", dep.ports["gateway"]
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               f"Authorization: Bearer {dep.token}\r\n\r\n").encode()
    latencies: list[float] = []
    errors = 0
    left = count

    async def connection() -> None:
        nonlocal left, errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while left > 0:
                left -= 1
                t = time.monotonic()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                latencies.append(time.monotonic() - t)
                errors += status != 200
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    started = time.monotonic()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    return {"requests": len(latencies), "seconds": elapsed,
            "per_second": len(latencies) / elapsed,
            "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * pct(latencies, 0.95), "errors": errors}


async def wait_task(api: httpx.AsyncClient, task_uuid: str, timeout: float
                    ) -> dict[str, Any]:
    """Long-poll one task until it ends."""
    deadline = time.monotonic() + timeout
    while True:
        task: dict[str, Any] = await get_json(api, f"/api/v1/tasks/{task_uuid}",
                                              params={"wait": 30}, timeout=60)
        if task["state"] in ("succeeded", "failed"):
            return task
        if time.monotonic() > deadline:
            raise BenchmarkError(f"task {task_uuid} still {task['state']} after {timeout} s")


async def sequential_creates(api: httpx.AsyncClient, count: int, timeout: float
                             ) -> dict[str, float]:
    """Create ``count`` VMs one at a time (request → task ended), then delete them."""
    latencies: list[float] = []
    failures = 0
    vm_uuids = []
    started = time.monotonic()
    for i in range(count):
        t = time.monotonic()
        resp = await api.post("/api/v1/vms", json={"name": f"seq-{i:03d}", "image": "img",
                                                   "vcpus": 1, "memory_mb": 256})
        if resp.status_code != 202:
            failures += 1
            continue
        vm_uuids.append(resp.json()["resource"]["uuid"])
        task = await wait_task(api, resp.json()["task"]["uuid"], timeout)
        latencies.append(time.monotonic() - t)
        failures += task["state"] != "succeeded"
    elapsed = time.monotonic() - started
    for vm_uuid in vm_uuids:
        resp = await api.delete(f"/api/v1/vms/{vm_uuid}")
        if resp.status_code != 202:
            raise BenchmarkError(f"delete of baseline VM {vm_uuid}: {resp.status_code}")
        task = await wait_task(api, resp.json()["task"]["uuid"], timeout)
        if task["state"] != "succeeded":
            raise BenchmarkError(f"delete of baseline VM {vm_uuid}: {task.get('error')}")
    if not latencies:
        raise BenchmarkError("no baseline create succeeded")
    return {"vms": count, "seconds": elapsed, "per_second": count / elapsed,
            "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * pct(latencies, 0.95), "failures": failures}


# What varies between two failures of the same cause: ids, names, numbers.
_VARYING = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
                      r"|\bvm-\d+\b|\bsim-\d+\b|\b\d+(\.\d+)*\b")


@dataclass
class Failure:
    """One create that did not end in a running VM: what it was and why."""

    what: str  # ``vm-00012`` (refused) or ``vm-00012 task <uuid>`` (task not succeeded)
    reason: str  # ``409 <detail>``, ``ReadTimeout(...)``, ``failed at step X: <error>``

    @property
    def cause(self) -> str:
        """The reason with ids, names and numbers replaced by ``#`` (an HTTP status at
        its start is kept): the grouping key."""
        status, _, rest = self.reason.partition(" ")
        if status.isdigit():
            return f"{status} {_VARYING.sub('#', rest)}"[:160]
        return _VARYING.sub("#", self.reason)[:160]


def failure_detail(resp: httpx.Response) -> str:
    """The status and the ``detail`` of an error answer (its text if it is not JSON)."""
    try:
        body = resp.json()
    except ValueError:
        return f"{resp.status_code} {resp.text[:300]!r}"
    detail = body.get("detail", body) if isinstance(body, dict) else body
    return f"{resp.status_code} {json.dumps(detail)[:300]}"


def grouped(failures: list[Failure]) -> list[tuple[int, str]]:
    """(count, cause) of ``failures``, most frequent first."""
    return [(n, cause) for cause, n in Counter(f.cause for f in failures).most_common()]


@dataclass
class Bulk:
    """What the bulk create measured."""

    vms: int
    concurrency: int
    first_request: float = 0.0  # wall clock
    last_accepted: float = 0.0
    all_ended_seen: float = 0.0  # the poll that saw nothing unfinished
    last_finished: float = 0.0  # max finished_at of the tasks
    rejected: list[Failure] = field(default_factory=list)  # no 202
    failed: list[Failure] = field(default_factory=list)  # 202, task not succeeded
    accept_latencies: list[float] = field(default_factory=list)
    create_latencies: list[float] = field(default_factory=list)  # request → finished_at
    polls: int = 0


async def bulk_create(api: httpx.AsyncClient, vms: int, concurrency: int, timeout: float
                      ) -> Bulk:
    """Create ``vms`` VMs, ``concurrency`` requests in flight; wait for every task."""
    bulk = Bulk(vms, concurrency)
    sem = asyncio.Semaphore(concurrency)
    sent: dict[str, float] = {}  # task uuid -> request sent (wall clock)
    names: dict[str, str] = {}  # task uuid -> VM name

    async def create(i: int) -> None:
        async with sem:
            t = time.time()
            try:
                resp = await api.post("/api/v1/vms", json={
                    "name": f"vm-{i:05d}", "image": "img", "vcpus": 1, "memory_mb": 256})
            except httpx.HTTPError as exc:
                bulk.rejected.append(Failure(f"vm-{i:05d}", f"no answer: {exc!r}"))
                return
            done = time.time()
            bulk.last_accepted = max(bulk.last_accepted, done)
            bulk.accept_latencies.append(done - t)
            if resp.status_code != 202:
                bulk.rejected.append(Failure(f"vm-{i:05d}", failure_detail(resp)))
                return
            task_uuid = resp.json()["task"]["uuid"]
            sent[task_uuid] = t
            names[task_uuid] = f"vm-{i:05d}"

    bulk.first_request = time.time()
    await asyncio.gather(*(create(i) for i in range(vms)))
    deadline = time.monotonic() + timeout
    while True:
        bulk.polls += 1
        page = await get_json(api, "/api/v1/tasks", params={
            "q": f"state in ({','.join(UNFINISHED)})", "limit": 1, "count": "true"})
        unfinished = int(page["total"])
        if unfinished == 0:
            bulk.all_ended_seen = time.time()
            break
        if time.monotonic() > deadline:
            raise BenchmarkError(f"{unfinished} tasks unfinished after {timeout:.0f} s")
        await asyncio.sleep(0.5)
    found: dict[str, dict[str, Any]] = {}
    for task in await list_all(api, "/api/v1/tasks", q="kind=vm.create"):
        if task["uuid"] in sent:
            found[task["uuid"]] = task
    for task_uuid, t_sent in sent.items():
        listed = found.get(task_uuid)
        what = f"{names[task_uuid]} task {task_uuid}"
        if listed is None:
            bulk.failed.append(Failure(what, "task not listed after the bulk"))
            continue
        task = listed
        if task["state"] != "succeeded":
            bulk.failed.append(Failure(what, task_failure(task)))
        if task.get("finished_at"):
            finished = parse_ts(task["finished_at"])
            bulk.last_finished = max(bulk.last_finished, finished)
            bulk.create_latencies.append(finished - t_sent)
    return bulk


def task_failure(task: dict[str, Any]) -> str:
    """Why a task did not succeed: its state, the step it stopped at, its error and the
    first failed step's own error when that says more."""
    steps = [s for s in task.get("steps", []) if s.get("error")]
    step_error = f" (step {steps[0]['name']}: {steps[0]['error']})" if steps else ""
    if steps and steps[0]["error"] == task.get("error"):
        step_error = ""
    return (f"{task['state']} at step {task.get('current_step')}: "
            f"{task.get('error') or 'no error recorded'}{step_error}")


async def list_all(api: httpx.AsyncClient, path: str, q: str | None = None,
                   max_pages: int = 10_000) -> list[dict[str, Any]]:
    """Every item of a list, page after page of PAGE items by ``next_cursor``."""
    items: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": PAGE}
    if q is not None:
        params["q"] = q
    for _ in range(max_pages):
        page = await get_json(api, path, params=params)
        items.extend(page["items"])
        if not page.get("next_cursor"):
            return items
        params["cursor"] = page["next_cursor"]
    raise BenchmarkError(f"{path}: more than {max_pages} pages")


async def placement(api: httpx.AsyncClient) -> dict[str, Any]:
    """How the running VMs are spread over the nodes, and whether any node is overbooked."""
    vms = await list_all(api, "/api/v1/vms")
    nodes = await list_all(api, "/api/v1/nodes")
    per_node = Counter(v["node_uuid"] for v in vms if v["state"] == "running")
    counts = [per_node.get(n["uuid"], 0) for n in nodes]
    overbooked = [n["name"] for n in nodes if n["vcpus_reserved"] > n["vcpus"]
                  or n["memory_reserved_mb"] > n["memory_mb"]]
    return {"vms": len(vms), "running": sum(1 for v in vms if v["state"] == "running"),
            "distinct_addresses": len({(v["node_uuid"], v["ip"]) for v in vms}),
            "nodes": len(nodes), "per_node_min": min(counts, default=0),
            "per_node_max": max(counts, default=0), "overbooked": overbooked}


def usage(dep: Deployment) -> dict[str, dict[str, float]]:
    """CPU seconds and memory of every process now."""
    out: dict[str, dict[str, float]] = {}
    for name, service in dep.services.items():
        if service.alive():
            out[name] = {"cpu_s": service.cpu_seconds(), **service.memory_kib()}
    return out


# --------------------------------------------------------------------------- PostgreSQL


# The local server the setup script starts (yun/testing/host.py: role yun, password yun).
DEFAULT_POSTGRES = "postgresql+psycopg://yun:yun@127.0.0.1:5432/postgres"


@contextlib.contextmanager
def fresh_postgres(server_url: str) -> Iterator[str]:
    """A database made for this run on the server of ``server_url`` (any database of
    it; the role must be allowed CREATE DATABASE), dropped afterwards even on failure;
    yields its URL. BenchmarkError naming the server when it cannot be reached."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    base = make_url(server_url)
    name = f"yun_bench_{secrets.token_hex(4)}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}" OWNER "{base.username}"'))
    except SQLAlchemyError as exc:
        admin.dispose()
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise BenchmarkError(
            f"PostgreSQL at {base.render_as_string(hide_password=True)}: cannot create a "
            f"database ({first[0] if first else exc!r}); is the server running "
            f"(`python -m yun.testing.host postgres`, or scripts/setup.sh --test) and may "
            f"role {base.username} create databases?") from None
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        except SQLAlchemyError as exc:
            print(f"could not drop database {name}: {exc}", file=sys.stderr)
        admin.dispose()


# --------------------------------------------------------------------------- profile


PROFILED = ("control", "gateway", "sim-nodes")


def find_py_spy() -> str | None:
    """py-spy next to this Python (the virtualenv) or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


@dataclass
class Spies:
    """py-spy samplers attached to some of the deployment's processes: per process one
    of every busy thread and one (``--gil``) of the thread holding the GIL."""

    out: Path
    rate: int
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    started: float = 0.0

    def start(self, py_spy: str, dep: Deployment) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        for name in PROFILED:
            for mode, extra in (("all", []), ("gil", ["--gil"])):
                raw = self.out / f"{name}-{mode}.folded"
                with (self.out / f"{name}-{mode}.log").open("wb") as log:
                    # No --duration: the bulk's length is not known in advance; SIGINT
                    # at its end makes py-spy write what it sampled and exit.
                    self.procs[f"{name}-{mode}"] = subprocess.Popen(
                        [py_spy, "record", "--pid", str(dep.services[name].pid), "--rate",
                         str(self.rate), "--format", "raw", "--nonblocking", "--threads",
                         "--function", *extra, "--output", str(raw)],
                        stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def stop(self, top: int) -> list[str]:
        """Stop sampling; write ``<name>-<mode>.txt`` summaries; return them as lines."""
        seconds = time.monotonic() - self.started
        for spy in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                spy.send_signal(signal.SIGINT)
        for spy in self.procs.values():
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        # Lazy: api_reads imports this module at its top.
        from api_reads import summarize_folded  # benchmarks/api_reads.py

        lines: list[str] = []
        for key, spy in self.procs.items():
            raw = self.out / f"{key}.folded"
            sampled = "thread holding the GIL" if key.endswith("-gil") else "every busy thread"
            title = f"{key}: {sampled}, {seconds:.0f} s at {self.rate} Hz"
            if not raw.exists() or raw.stat().st_size == 0:
                log = (self.out / f"{key}.log").read_text(errors="replace")[-300:]
                body = [f"  py-spy wrote nothing (exit {spy.returncode}): {log.strip()}"]
            else:
                body = summarize_folded(raw.read_text(), seconds, self.rate, top)
            (self.out / f"{key}.txt").write_text("\n".join([title, *body]) + "\n")
            # The run's output gets the headline and self time by package; the
            # functions are in the files.
            lines.append(f"{title} (in full: {self.out / key}.txt)")
            lines.extend(body[:2])
            if "  self time by package:" in body:
                at = body.index("  self time by package:")
                lines.extend(body[at:at + 7])
        return lines


# --------------------------------------------------------------------------- /metrics


async def control_metrics(dep: Deployment) -> str | None:
    """The control server's ``/metrics`` text, None when it serves none (yet). Its port
    speaks TLS with domain certificates: the benchmark does not check the server's and
    shows the control server's own when asked for one."""
    # The control server's own credential (ids/control-<name>.crt and .key): its port
    # asks every caller for a certificate of the domain's CA.
    certs = sorted((dep.root / "state" / "control" / "ids").glob("control-*.crt"))
    cert: tuple[str, str] | None = None
    if certs and certs[0].with_suffix(".key").exists():
        cert = (str(certs[0]), str(certs[0].with_suffix(".key")))
    try:
        async with httpx.AsyncClient(verify=False, cert=cert, timeout=10) as client:
            resp = await client.get(f"https://127.0.0.1:{dep.ports['control']}/metrics")
    except httpx.HTTPError:
        return None
    if resp.status_code != 200 or "# TYPE" not in resp.text:
        return None
    return resp.text


def histogram_sums(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]:
    """(family, labels) → [count, sum] of every histogram and summary in ``text``."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.type not in ("histogram", "summary"):
            continue
        for sample in family.samples:
            suffix = sample.name[len(family.name):]
            if suffix not in ("_count", "_sum"):
                continue
            labels = tuple(sorted(sample.labels.items()))
            pair = out.setdefault((family.name, labels), [0.0, 0.0])
            pair[0 if suffix == "_count" else 1] = sample.value
    return out


def where_time_went(before: str, after: str, top: int = 8) -> list[str]:
    """Per histogram family, the label sets that gained the most time between the two
    scrapes: count, total seconds, mean (flow and step durations, DB transactions,
    placement, ... whatever the control server records)."""
    old, new = histogram_sums(before), histogram_sums(after)
    families: dict[str, list[tuple[float, float, str]]] = {}
    for (family, labels), (count, total) in new.items():
        was = old.get((family, labels), [0.0, 0.0])
        n, t = count - was[0], total - was[1]
        if n <= 0:
            continue
        label_text = ",".join(f"{k}={v}" for k, v in labels) or "(all)"
        families.setdefault(family, []).append((t, n, label_text))
    lines: list[str] = []
    for family in sorted(families):
        rows = sorted(families[family], reverse=True)
        lines.append(f"  {family}: {sum(r[1] for r in rows):.0f} observations, "
                     f"sum {sum(r[0] for r in rows):.2f}")
        seconds = family.endswith("_seconds")  # else a size (e.g. journal batches)
        for t, n, label_text in rows[:top]:
            mean = f"{1000 * t / n:8.2f} ms" if seconds else f"{t / n:8.2f}"
            lines.append(f"    {label_text:<60} n={n:<7.0f} sum={t:9.2f}  mean={mean}")
    return lines or ["  /metrics answered but no histogram moved during the bulk"]


# --------------------------------------------------------------------------- the run


def client_cpu() -> float:
    """CPU seconds this (client) process has used so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def with_cpu(dep: Deployment, what: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """Run ``what``; add the CPU seconds the client, gateway and control server used."""
    before, client = usage(dep), client_cpu()
    result = await what
    after = usage(dep)
    result["cpu_s"] = {"client": client_cpu() - client, **{
        name: after[name]["cpu_s"] - before[name]["cpu_s"] for name in ("gateway", "control")}}
    return result


def new_client(dep: Deployment, concurrency: int) -> httpx.AsyncClient:
    """An API client with at most ``concurrency`` connections (with the token, if any)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {dep.token}"} if dep.token else None
    return httpx.AsyncClient(base_url=dep.api_url, timeout=120, limits=limits,
                             headers=headers)


async def measure(dep: Deployment, args: argparse.Namespace) -> dict[str, Any]:
    """Bring the cloud up, run the baselines and the bulk create, collect the figures."""
    async with new_client(dep, args.concurrency) as api:
        t = time.monotonic()
        await bring_up(dep, api, args.nodes, args.startup_timeout)
        up_seconds = time.monotonic() - t
        print(f"cloud up in {up_seconds:.1f} s: {args.nodes} sim nodes, API {dep.api_url}",
              flush=True)
        await upload_image(dep, api, args.startup_timeout)
        print("image uploaded; baselines ...", flush=True)
        healthz = await with_cpu(dep, round_trips(
            dep, "/healthz", args.baseline_requests, args.concurrency))
        task_count = await with_cpu(dep, round_trips(
            dep, TASK_COUNT_PATH, args.baseline_requests,
            args.concurrency))
        sequential = await sequential_creates(api, args.baseline_vms, args.timeout)
    # A fresh connection pool: none of the bulk's connections has sat idle long enough
    # for the server to close it (uvicorn's keep-alive timeout is 5 s).
    metrics_before = await control_metrics(dep)
    spies: Spies | None = None
    if args.profile is not None:
        spies = Spies(args.profile, args.profile_rate)
        spies.start(args.py_spy, dep)
    async with new_client(dep, args.concurrency) as api:
        print(f"creating {args.vms} VMs, {args.concurrency} in flight ...", flush=True)
        before, client = usage(dep), client_cpu()
        try:
            bulk = await bulk_create(api, args.vms, args.concurrency, args.timeout)
        finally:
            client = client_cpu() - client
            after = usage(dep)
            profile = spies.stop(args.profile_top) if spies is not None else []
        spread = await placement(api)
    metrics_after = await control_metrics(dep) if metrics_before is not None else None
    metrics = (where_time_went(metrics_before, metrics_after)
               if metrics_before is not None and metrics_after is not None
               else ["  (the control server serves no /metrics in this tree)"])
    return {"up_seconds": up_seconds, "healthz": healthz, "task_count": task_count,
            "sequential": sequential, "bulk": bulk, "before": before, "after": after,
            "spread": spread, "client_cpu_s": client, "metrics": metrics,
            "profile": profile}


def report(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Print the figures; return them as a JSON-able summary."""
    bulk: Bulk = result["bulk"]
    ok = bulk.vms - len(bulk.rejected) - len(bulk.failed)
    # No task finished at all (every create refused): the rate is 0 over the bulk.
    create_s = (bulk.last_finished or bulk.all_ended_seen) - bulk.first_request
    accept_s = bulk.last_accepted - bulk.first_request
    failures = len(bulk.rejected) + len(bulk.failed)
    before, after = result["before"], result["after"]
    seq, hz, tc = result["sequential"], result["healthz"], result["task_count"]
    print()
    print(f"Create throughput: {bulk.vms} VMs (1 vCPU, 256 MiB) on {args.nodes} sim nodes "
          f"({args.node_vcpus} vCPU, {args.node_memory_mb} MiB each), "
          f"{bulk.concurrency} requests in flight, database {args.db}")
    print(f"  VMs per second (first request → last task finished) : "
          f"{ok / create_s:8.1f}   ({create_s:.2f} s)")
    print(f"  accepted requests per second (first request → last 202): "
          f"{(bulk.vms - len(bulk.rejected)) / accept_s:8.1f}   ({accept_s:.2f} s)")
    print(f"  failures                                            : {failures:8d}"
          f"   ({len(bulk.rejected)} refused, {len(bulk.failed)} tasks not succeeded)")
    for label, group in (("refused (no 202)", bulk.rejected),
                         ("tasks not succeeded", bulk.failed)):
        if not group:
            continue
        print(f"    {label}, by cause:")
        for count, cause in grouped(group):
            print(f"      {count:5d} × {cause}")
        print(f"    {label}, each ({min(len(group), MAX_FAILURES_SHOWN)} of {len(group)}):")
        for failure in group[:MAX_FAILURES_SHOWN]:
            print(f"      {failure.what}: {failure.reason}")
    accept = latency_ms(bulk.accept_latencies)
    print(f"  202 latency p50 / p95 / p99 / max                   : "
          f"{accept['p50']:.0f} / {accept['p95']:.0f} / {accept['p99']:.0f} / "
          f"{accept['max']:.0f} ms")
    if bulk.create_latencies:
        print(f"  request → task finished p50 / p95 / max             : "
              f"{statistics.median(bulk.create_latencies):.2f} / "
              f"{pct(bulk.create_latencies, 0.95):.2f} / {max(bulk.create_latencies):.2f} s")
    control_bulk = after["control"]["cpu_s"] - before["control"]["cpu_s"]
    control_ms_per_vm = 1000 * control_bulk / max(ok, 1)
    print(f"  control server CPU per VM created (reports included): "
          f"{control_ms_per_vm:8.1f} ms")
    print(f"  waiting: {bulk.polls} polls of the unfinished-task count; all ended seen "
          f"{bulk.all_ended_seen - bulk.first_request:.2f} s after the first request")
    spread = result["spread"]
    print(f"  placement: {spread['running']} running of {spread['vms']}, "
          f"{spread['distinct_addresses']} distinct (node, IP), per node "
          f"{spread['per_node_min']}..{spread['per_node_max']}, "
          f"overbooked nodes: {len(spread['overbooked'])}")
    print()
    print("Processes                 CPU s (bulk)  CPU s (total)  peak RSS (VmHWM)  RSS at end")
    for name in [*CONTROL_PLANE, "sim-nodes"]:
        if name not in after:
            continue
        delta = after[name]["cpu_s"] - before.get(name, {}).get("cpu_s", 0.0)
        print(f"  {name:<22} {delta:12.1f}  {after[name]['cpu_s']:13.1f}  "
              f"{after[name]['VmHWM'] / 1024:13.1f} MiB  {after[name]['VmRSS'] / 1024:7.1f} MiB")
    control_plane = sum(after[n]["cpu_s"] - before[n]["cpu_s"] for n in CONTROL_PLANE)
    print(f"  {'control plane (4 procs)':<22} {control_plane:12.1f}   "
          f"= {control_plane / create_s:.2f} cores over the bulk")
    print(f"  {'benchmark client':<22} {result['client_cpu_s']:12.1f}")
    print()
    print("Baselines (same deployment, same run)")
    for label, rt in (("GET /healthz of the gateway (FastAPI alone)", hz),
                      ("GET /api/v1/tasks?q=state=running&limit=1&count=true (gateway → "
                       "control → SQL count)", tc)):
        cpu = rt["cpu_s"]
        print(f"  {label}, {args.concurrency} in flight: {rt['per_second']:.0f} req/s, "
              f"p50 {rt['p50_ms']:.0f} ms, p95 {rt['p95_ms']:.0f} ms, errors {rt['errors']}; "
              f"CPU s client {cpu['client']:.1f}, gateway {cpu['gateway']:.1f}, "
              f"control {cpu['control']:.1f} for {rt['requests']} requests "
              f"in {rt['seconds']:.1f} s")
    print(f"  one VM at a time ({seq['vms']} creates, request → task succeeded): "
          f"p50 {seq['p50_ms']:.0f} ms, p95 {seq['p95_ms']:.0f} ms, "
          f"{seq['per_second']:.1f} VMs/s sequential")
    print(f"  bulk speed-up over one at a time: {ok / create_s / seq['per_second']:.1f}x")
    hwm = after["control"]["VmHWM"] / 1024
    if RETRIES:
        print(f"  GETs retried after a transport error: {len(RETRIES)}, e.g. {RETRIES[0]}")
    print()
    print(f"control server peak memory (VmHWM): {hwm:.1f} MiB")
    metrics_lines = result.get("metrics") or []
    if metrics_lines:
        print()
        print("Where the control server's time went during the bulk (its /metrics, after − before)")
        for line in metrics_lines:
            print(line)
    if result.get("profile"):
        print()
        print("Profiles (py-spy during the bulk; raw stacks and summaries in "
              f"{args.profile})")
        for line in result["profile"]:
            print(line)
    now = {"vms_per_second": ok / create_s, "p50": accept["p50"], "p95": accept["p95"],
           "p99": accept["p99"], "control_ms": control_ms_per_vm, "failures": failures,
           "hwm": hwm}
    print()
    for line in comparison(now, args):
        print(line)
    return {
        "vms": bulk.vms, "nodes": args.nodes, "concurrency": bulk.concurrency,
        "vms_per_second": ok / create_s, "create_seconds": create_s,
        "accepted_per_second": (bulk.vms - len(bulk.rejected)) / accept_s,
        "accept_seconds": accept_s, "failures": failures,
        "db": args.db, "size": args.size,
        "refused": [vars(f) for f in bulk.rejected],
        "not_succeeded": [vars(f) for f in bulk.failed],
        "failure_causes": [{"count": n, "cause": c}
                           for n, c in grouped(bulk.rejected + bulk.failed)],
        "accept_latency_ms": accept, "control_cpu_ms_per_vm": control_ms_per_vm,
        "create_latency_s": {"p50": statistics.median(bulk.create_latencies or [0.0]),
                             "p95": pct(bulk.create_latencies or [0.0], 0.95)},
        "control_metrics": metrics_lines,
        "placement": spread, "processes": {"before_bulk": before, "after_bulk": after},
        "control_vmhwm_mib": hwm, "control_plane_cpu_s_bulk": control_plane,
        "client_cpu_s": result["client_cpu_s"], "baseline_healthz": hz,
        "baseline_task_count": tc, "baseline_sequential": seq,
        "startup_seconds": result["up_seconds"], "get_retries": RETRIES,
    }


SIZES = {"small": {"vms": 1_000, "nodes": 100}, "large": {"vms": 10_000, "nodes": 1_000}}
RESULTS = Path(__file__).resolve().parent / "results"
MAX_FAILURES_SHOWN = 200  # each failure's line, up to this many (all are grouped)

# The figures before issue 10 (docs/BENCHMARKS.md section 2, this machine, SQLite, 1,000
# VMs on 100 nodes, 50 in flight): what every run is compared with.
PREVIOUS = {"vms_per_second": 18.5, "p50": 2346.0, "p95": 3651.0, "p99": None,
            "control_ms": 46.0, "failures": None, "hwm": 206.0}
PREVIOUS_RANGE = "13.7–21.1"  # VMs/s over the recorded runs
GOALS = {"vms_per_second": "≥ 200", "p50": "", "p95": "< 200", "p99": "", "control_ms": "",
         "failures": "0", "hwm": "< 2048 (100,000 VMs)"}


def latency_ms(latencies: list[float]) -> dict[str, float]:
    """p50/p95/p99/max of ``latencies`` (seconds) in milliseconds; zeros when empty."""
    if not latencies:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    return {"p50": 1000 * statistics.median(latencies), "p95": 1000 * pct(latencies, 0.95),
            "p99": 1000 * pct(latencies, 0.99), "max": 1000 * max(latencies)}


def comparison(now: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """This run against the figures before issue 10 and the issue's goals, as a table."""
    rows = (("VMs per second", "vms_per_second", "{:.1f}"),
            ("202 latency p50 (ms)", "p50", "{:.0f}"),
            ("202 latency p95 (ms)", "p95", "{:.0f}"),
            ("202 latency p99 (ms)", "p99", "{:.0f}"),
            ("control CPU per VM (ms)", "control_ms", "{:.1f}"),
            ("failed creates", "failures", "{:d}"),
            ("control peak RSS (MiB)", "hwm", "{:.0f}"))
    head = f"{args.vms} VMs / {args.nodes} nodes, {args.db}"
    out = [f"Against the previous figures (1,000 VMs / 100 nodes, SQLite; "
           f"{PREVIOUS_RANGE} VMs/s over the recorded runs)",
           f"  {'':<26}{'previous':>10}  {head:>28}  {'change':>8}  goal"]
    for label, key, fmt in rows:
        old, new = PREVIOUS[key], now[key]
        change = f"{new / old:.2f}x" if old else ""
        old_text = fmt.format(old) if old is not None else "–"
        out.append(f"  {label:<26}{old_text:>10}  {fmt.format(new):>28}  {change:>8}  "
                   f"{GOALS[key]}")
    return out


def machine() -> str:
    """One line about the machine: CPU model, cores, memory, load."""
    model, mem_gib = cpu_model(), memory_gib()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"cpu {model}, {os.cpu_count()} cores, {mem_gib:.1f} GiB, loadavg {load}"


def add_database_options(parser: argparse.ArgumentParser) -> None:
    """``--db`` and ``--postgres-url``: the control server's database of a benchmark."""
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite",
                        help="the control server's database: SQLite in its state directory "
                             "(default) or a fresh PostgreSQL database made and dropped by "
                             "the run on the server of --postgres-url")
    parser.add_argument("--postgres-url", default=os.environ.get("YUN_BENCH_POSTGRES_URL",
                                                                 DEFAULT_POSTGRES),
                        help="a URL of the PostgreSQL server to make the run's database on "
                             f"(default $YUN_BENCH_POSTGRES_URL or {DEFAULT_POSTGRES})")


def add_deployment_options(parser: argparse.ArgumentParser, *,
                           sized_by_run: bool = False) -> None:
    """The options of every benchmark that brings up this deployment. ``sized_by_run``:
    the script sizes the timeouts by its run when they are not given (None until then)."""
    parser.add_argument("--timeout", type=float, default=240.0,
                        help="seconds the VM creates may take to end (default 240; "
                             "create_throughput.py: 0.1 s per VM when more)")
    parser.add_argument("--startup-timeout", type=float, default=90.0,
                        help="seconds the cloud may take to come up (default 90; "
                             "create_throughput.py: 0.2 s per node when more)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="also write the figures to FILE as JSON")
    parser.add_argument("--keep-logs", type=Path, default=None, metavar="DIR",
                        help="copy the services' logs and config to DIR before cleaning up")
    if sized_by_run:
        parser.set_defaults(timeout=None, startup_timeout=None)


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """``--profile-rate`` and ``--profile-top``: how py-spy samples and how much of each
    summary is printed, for the benchmarks that profile with it."""
    parser.add_argument("--profile-rate", type=int, default=100,
                        help="py-spy samples per second (default 100)")
    parser.add_argument("--profile-top", type=int, default=15,
                        help="functions listed per summary (default 15)")


def add_bulk_create_options(parser: argparse.ArgumentParser) -> None:
    """``--concurrency``: create requests in flight in a benchmark's bulk create."""
    parser.add_argument("--concurrency", type=int, default=50,
                        help="create requests in flight during the bulk (default 50)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/create_throughput.py",
        description="Create throughput of Yun on the sim hypervisor: the control plane as "
                    "separate processes on 127.0.0.1, N simulated nodes in one more process, "
                    "M VMs created through the REST API with bounded concurrency. Prints "
                    "VMs/s, accepted requests/s, failures, the control server's peak RSS, "
                    "CPU seconds per process and baselines measured in the same run.")
    parser.add_argument("--size", choices=sorted(SIZES), default="small",
                        help="small: 1,000 VMs on 100 nodes (default); large: 10,000 VMs "
                             "on 1,000 nodes (the issue's sizes)")
    parser.add_argument("--vms", type=int, default=None,
                        help="VMs to create (default: the size's)")
    parser.add_argument("--nodes", type=int, default=None,
                        help="sim nodes (default: the size's)")
    add_database_options(parser)
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="py-spy the control server, the gateway and sim-nodes during the "
                             "bulk (every busy thread, and --gil) into DIR: raw folded stacks "
                             "and a text summary of each (slows the run down)")
    add_sampling_options(parser)
    parser.add_argument("--save", action="store_true",
                        help="keep the output, the JSON figures and the profile summaries "
                             "under benchmarks/results/<date>-create-<db>-<size>/")
    add_bulk_create_options(parser)
    parser.add_argument("--node-vcpus", type=int, default=16,
                        help="vCPUs of each sim node (default 16)")
    parser.add_argument("--node-memory-mb", type=int, default=32768,
                        help="memory of each sim node in MiB (default 32768)")
    parser.add_argument("--baseline-vms", type=int, default=20,
                        help="VMs of the one-at-a-time baseline, deleted again (default 20)")
    parser.add_argument("--baseline-requests", type=int, default=1000,
                        help="requests of each round-trip baseline (default 1000)")
    add_deployment_options(parser, sized_by_run=True)  # by size, see below
    parser.add_argument("--profile-control", type=Path, default=None, metavar="FILE",
                        help="diagnostics: run the control server under cProfile and write "
                             "its profile to FILE (slows it down: not for the figures)")
    args = parser.parse_args(argv)
    preset = SIZES[args.size]
    if args.vms is None and args.nodes is None:
        args.label = args.size
    else:  # a size of one's own: named by its figures in the results directory
        args.label = f"{args.vms or preset['vms']}vms-{args.nodes or preset['nodes']}nodes"
    args.vms = args.vms if args.vms is not None else preset["vms"]
    args.nodes = args.nodes if args.nodes is not None else preset["nodes"]
    # Today's rate is ~20 VMs/s: the bulk's bound grows with its size.
    if args.timeout is None:
        args.timeout = max(240.0, args.vms / 10)
    if args.startup_timeout is None:
        args.startup_timeout = max(90.0, args.nodes * 0.2)
    args.py_spy = None
    if args.profile is not None:
        args.py_spy = find_py_spy()
        if args.py_spy is None:
            parser.error("--profile needs py-spy, which is not a dependency of Yun and is "
                         "not installed beside this Python nor on PATH "
                         "(`.venv/bin/pip install py-spy`)")
        if args.profile_rate < 1 or args.profile_top < 1:
            parser.error("--profile-rate and --profile-top must be at least 1")
    for name in ("vms", "nodes", "concurrency", "baseline_requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.baseline_vms < 1:
        parser.error("--baseline-vms must be at least 1")
    return args


def run_then_stop(root: Path, dep: Any, keep_logs: Path | None,
                  run: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """Run the measurement, then stop the deployment and remove its files whatever
    happened; None when interrupted."""
    try:
        with sigterm_as_interrupt():
            return run()
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'SIGINT'}); stopping everything", file=sys.stderr)
        return None
    finally:
        # sim nodes first: they would otherwise log the control plane going away.
        stop_services([dep.services["sim-nodes"]])
        stop_services([dep.services[n] for n in reversed(CONTROL_PLANE)])
        if keep_logs is not None:
            shutil.copytree(root / "logs", keep_logs, dirs_exist_ok=True)
            shutil.copy(root / "yun.toml", keep_logs)
        shutil.rmtree(root, ignore_errors=True)


class Tee:
    """Everything printed to stdout, also kept (for ``--save``)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.kept: list[str] = []

    def write(self, text: str) -> int:
        self.kept.append(text)
        return int(self.stream.write(text))

    def flush(self) -> None:
        self.stream.flush()


def run(args: argparse.Namespace, database_url: str) -> dict[str, Any] | None:
    """One deployment, measured and stopped; the summary (None when interrupted)."""
    root = Path(tempfile.mkdtemp(prefix="yun-bench-create-"))
    dep = start_deployment(root, args.nodes, args.node_vcpus, args.node_memory_mb,
                           args.profile_control, database_url)
    return run_then_stop(root, dep, args.keep_logs,
                         lambda: report(asyncio.run(measure(dep, args)), args))


def save(args: argparse.Namespace, tee: Tee, summary: dict[str, Any] | None) -> Path:
    """Output, figures and profile summaries under benchmarks/results/ (text, small)."""
    folder = RESULTS / f"{datetime.now(UTC):%Y-%m-%d}-create-{args.db}-{args.label}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "output.txt").write_text("".join(tee.kept))
    if summary is not None:
        (folder / "figures.json").write_text(json.dumps(summary, indent=2, default=str)
                                             + "\n")
    if args.profile is not None:  # the summaries, not the raw stacks (megabytes)
        for text in sorted(args.profile.glob("*.txt")):
            shutil.copy(text, folder / f"profile-{text.name}")
    return folder


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tee = Tee(sys.stdout)
    if args.save:
        sys.stdout = tee
    started = time.monotonic()
    print(machine(), flush=True)
    print(f"{args.size if args.label == args.size else 'custom'} size: {args.vms} VMs on "
          f"{args.nodes} nodes, database {args.db}", flush=True)
    summary: dict[str, Any] | None = None
    try:
        if args.db == "postgres":
            with fresh_postgres(args.postgres_url) as url:
                print(f"PostgreSQL database {url.rsplit('/', 1)[1]} made for this run",
                      flush=True)
                summary = run(args, url)
        else:
            summary = run(args, "")
        if summary is not None:
            print(f"benchmark wall time {time.monotonic() - started:.0f} s; {machine()}")
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.save:
            sys.stdout = tee.stream
            print(f"kept in {save(args, tee, summary)}")
    if summary is None:
        return 130
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0 if summary["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
