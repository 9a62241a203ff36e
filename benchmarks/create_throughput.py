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
from collections.abc import Awaitable, Callable
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
                     profile_control: Path | None = None) -> Deployment:
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
                    "admin_password_file": str(password_file)},
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


@dataclass
class Bulk:
    """What the bulk create measured."""

    vms: int
    concurrency: int
    first_request: float = 0.0  # wall clock
    last_accepted: float = 0.0
    all_ended_seen: float = 0.0  # the poll that saw nothing unfinished
    last_finished: float = 0.0  # max finished_at of the tasks
    rejected: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    accept_latencies: list[float] = field(default_factory=list)
    create_latencies: list[float] = field(default_factory=list)  # request → finished_at
    polls: int = 0


async def bulk_create(api: httpx.AsyncClient, vms: int, concurrency: int, timeout: float
                      ) -> Bulk:
    """Create ``vms`` VMs, ``concurrency`` requests in flight; wait for every task."""
    bulk = Bulk(vms, concurrency)
    sem = asyncio.Semaphore(concurrency)
    sent: dict[str, float] = {}  # task uuid -> request sent (wall clock)

    async def create(i: int) -> None:
        async with sem:
            t = time.time()
            try:
                resp = await api.post("/api/v1/vms", json={
                    "name": f"vm-{i:05d}", "image": "img", "vcpus": 1, "memory_mb": 256})
            except httpx.HTTPError as exc:
                bulk.rejected.append(f"vm-{i:05d}: {exc!r}")
                return
            done = time.time()
            bulk.last_accepted = max(bulk.last_accepted, done)
            bulk.accept_latencies.append(done - t)
            if resp.status_code != 202:
                bulk.rejected.append(f"vm-{i:05d}: {resp.status_code} {resp.text[:200]}")
                return
            sent[resp.json()["task"]["uuid"]] = t

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
        task = found.get(task_uuid)
        if task is None:
            bulk.failed.append(f"task {task_uuid} not listed")
            continue
        if task["state"] != "succeeded":
            bulk.failed.append(f"task {task_uuid}: {task['state']} {task.get('error')}")
        if task.get("finished_at"):
            finished = parse_ts(task["finished_at"])
            bulk.last_finished = max(bulk.last_finished, finished)
            bulk.create_latencies.append(finished - t_sent)
    return bulk


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
    async with new_client(dep, args.concurrency) as api:
        print(f"creating {args.vms} VMs, {args.concurrency} in flight ...", flush=True)
        before, client = usage(dep), client_cpu()
        bulk = await bulk_create(api, args.vms, args.concurrency, args.timeout)
        client = client_cpu() - client
        after = usage(dep)
        spread = await placement(api)
    return {"up_seconds": up_seconds, "healthz": healthz, "task_count": task_count,
            "sequential": sequential, "bulk": bulk, "before": before, "after": after,
            "spread": spread, "client_cpu_s": client}


def report(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Print the figures; return them as a JSON-able summary."""
    bulk: Bulk = result["bulk"]
    ok = bulk.vms - len(bulk.rejected) - len(bulk.failed)
    create_s = bulk.last_finished - bulk.first_request
    accept_s = bulk.last_accepted - bulk.first_request
    failures = len(bulk.rejected) + len(bulk.failed)
    before, after = result["before"], result["after"]
    seq, hz, tc = result["sequential"], result["healthz"], result["task_count"]
    print()
    print(f"Create throughput: {bulk.vms} VMs (1 vCPU, 256 MiB) on {args.nodes} sim nodes "
          f"({args.node_vcpus} vCPU, {args.node_memory_mb} MiB each), "
          f"{bulk.concurrency} requests in flight")
    print(f"  VMs per second (first request → last task finished) : "
          f"{ok / create_s:8.1f}   ({create_s:.2f} s)")
    print(f"  accepted requests per second (first request → last 202): "
          f"{(bulk.vms - len(bulk.rejected)) / accept_s:8.1f}   ({accept_s:.2f} s)")
    print(f"  failures                                            : {failures:8d}"
          f"   ({len(bulk.rejected)} refused, {len(bulk.failed)} tasks not succeeded)")
    for sample in (bulk.rejected + bulk.failed)[:5]:
        print(f"    {sample}")
    print(f"  202 latency p50 / p95 / max                         : "
          f"{1000 * statistics.median(bulk.accept_latencies):.0f} / "
          f"{1000 * pct(bulk.accept_latencies, 0.95):.0f} / "
          f"{1000 * max(bulk.accept_latencies):.0f} ms")
    print(f"  request → task finished p50 / p95 / max             : "
          f"{statistics.median(bulk.create_latencies):.2f} / "
          f"{pct(bulk.create_latencies, 0.95):.2f} / {max(bulk.create_latencies):.2f} s")
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
    return {
        "vms": bulk.vms, "nodes": args.nodes, "concurrency": bulk.concurrency,
        "vms_per_second": ok / create_s, "create_seconds": create_s,
        "accepted_per_second": (bulk.vms - len(bulk.rejected)) / accept_s,
        "accept_seconds": accept_s, "failures": failures,
        "failure_samples": (bulk.rejected + bulk.failed)[:10],
        "accept_latency_ms": {"p50": 1000 * statistics.median(bulk.accept_latencies),
                              "p95": 1000 * pct(bulk.accept_latencies, 0.95)},
        "create_latency_s": {"p50": statistics.median(bulk.create_latencies),
                             "p95": pct(bulk.create_latencies, 0.95)},
        "placement": spread, "processes": {"before_bulk": before, "after_bulk": after},
        "control_vmhwm_mib": hwm, "control_plane_cpu_s_bulk": control_plane,
        "client_cpu_s": result["client_cpu_s"], "baseline_healthz": hz,
        "baseline_task_count": tc, "baseline_sequential": seq,
        "startup_seconds": result["up_seconds"], "get_retries": RETRIES,
    }


def machine() -> str:
    """One line about the machine: CPU model, cores, memory, load."""
    model, mem_gib = cpu_model(), memory_gib()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"cpu {model}, {os.cpu_count()} cores, {mem_gib:.1f} GiB, loadavg {load}"


def add_deployment_options(parser: argparse.ArgumentParser) -> None:
    """The options of every benchmark that brings up this deployment."""
    parser.add_argument("--timeout", type=float, default=240.0,
                        help="seconds the VM creates may take to end (default 240)")
    parser.add_argument("--startup-timeout", type=float, default=90.0,
                        help="seconds the cloud may take to come up (default 90)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="also write the figures to FILE as JSON")
    parser.add_argument("--keep-logs", type=Path, default=None, metavar="DIR",
                        help="copy the services' logs and config to DIR before cleaning up")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/create_throughput.py",
        description="Create throughput of Yun on the sim hypervisor: the control plane as "
                    "separate processes on 127.0.0.1, N simulated nodes in one more process, "
                    "M VMs created through the REST API with bounded concurrency. Prints "
                    "VMs/s, accepted requests/s, failures, the control server's peak RSS, "
                    "CPU seconds per process and baselines measured in the same run.")
    parser.add_argument("--vms", type=int, default=1000, help="VMs to create (default 1000)")
    parser.add_argument("--nodes", type=int, default=100, help="sim nodes (default 100)")
    parser.add_argument("--concurrency", type=int, default=50,
                        help="create requests in flight (default 50)")
    parser.add_argument("--node-vcpus", type=int, default=16,
                        help="vCPUs of each sim node (default 16)")
    parser.add_argument("--node-memory-mb", type=int, default=32768,
                        help="memory of each sim node in MiB (default 32768)")
    parser.add_argument("--baseline-vms", type=int, default=20,
                        help="VMs of the one-at-a-time baseline, deleted again (default 20)")
    parser.add_argument("--baseline-requests", type=int, default=1000,
                        help="requests of each round-trip baseline (default 1000)")
    add_deployment_options(parser)
    parser.add_argument("--profile-control", type=Path, default=None, metavar="FILE",
                        help="diagnostics: run the control server under cProfile and write "
                             "its profile to FILE (slows it down: not for the figures)")
    args = parser.parse_args(argv)
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    print(machine(), flush=True)
    root = Path(tempfile.mkdtemp(prefix="yun-bench-create-"))
    dep = start_deployment(root, args.nodes, args.node_vcpus, args.node_memory_mb,
                           args.profile_control)
    summary = run_then_stop(root, dep, args.keep_logs,
                            lambda: report(asyncio.run(measure(dep, args)), args))
    if summary is None:
        return 130
    print(f"benchmark wall time {time.monotonic() - started:.0f} s; {machine()}")
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0 if summary["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
