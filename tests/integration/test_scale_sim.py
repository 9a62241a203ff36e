"""Scale on the ``sim`` hypervisor (issue 10, "Tests"), on SQLite and on PostgreSQL:

* ``test_bulk_create_converges``: 5,000 VMs created concurrently through the API on 500
  sim nodes that keep reporting; then one node loses VMs in its reports and regains them
  (its guests are switched off and on again behind the control server's back, and one
  domain vanishes from it), and the control server's view follows the node; nothing is
  overbooked, no task is left unfinished and the invariant checker finds nothing wrong.
  The control plane runs as ``yun serve`` processes (the control server has a core of
  its own, as in production), the sim nodes in the test's event loop (so that the test
  can reach into a sim host).
* ``test_kill_9_during_bulk_create``: the control server killed with -9 during a bulk
  create of 2,000 VMs on 200 sim nodes (the control plane and one ``sim-nodes`` process
  as real processes), then started again: it serves again within the bound, every
  client's request gets its definitive answer, and once settled the invariant checker
  finds nothing wrong.

The sizes are the issue's; the environment scales them down for a quick run (the
create rate of the day bounds how long the full sizes take): ``YUN_SCALE_FRACTION``
(e.g. 0.1) multiplies all four, ``YUN_SCALE_VMS``/``YUN_SCALE_NODES`` and
``YUN_SCALE_KILL_VMS``/``YUN_SCALE_KILL_NODES`` set one each. Every test prints its
figures (``-s`` shows them on success).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_chaos import KeyRun, send_with_key, wait_until
from yun.config import NodeSettings
from yun.node.hypervisor.sim.driver import SimDriver
from yun.node.hypervisor.sim.hostfile import FILE_NAME
from yun.node.service import NodeService
from yun.testing.cluster import wait_nodes_up
from yun.testing.invariants import KeyAnswer, check, summarize, unsettled
from yun.testing.procs import ProcCloud, ServiceProcess, write_config

log = logging.getLogger("tests.scale")


def _size(name: str, default: int) -> int:
    """``default`` scaled by YUN_SCALE_FRACTION, or the environment's own ``name``."""
    if name in os.environ:
        value = int(os.environ[name])
    else:
        value = round(default * float(os.environ.get("YUN_SCALE_FRACTION", "1")))
    if value < 1:
        raise ValueError(f"{name} must be at least 1 (got {value})")
    return value


VMS = _size("YUN_SCALE_VMS", 5_000)
NODES = _size("YUN_SCALE_NODES", 500)
KILL_VMS = _size("YUN_SCALE_KILL_VMS", 2_000)
KILL_NODES = _size("YUN_SCALE_KILL_NODES", 200)
CONCURRENCY = 50  # create requests in flight: a bulk client's connection pool
VM_BODY = {"image": "img", "vcpus": 1, "memory_mb": 256}
# Bounds generous enough for a loaded 2-core machine at ~15 VMs/s.
TASKS_TIMEOUT = max(300.0, VMS / 5)
CONVERGE_TIMEOUT = 90.0
# The goal is < 10 s from the restart to an answering API; the machine these
# tests run on is shared (two cores, other tests at once): the assertion allows twice
# that and the figure is printed.
RESTART_GOAL = 10.0
RESTART_BOUND = 2 * RESTART_GOAL


async def _ready(api: httpx.AsyncClient, nodes: int, image: Path) -> None:
    """Wait for ``nodes`` nodes up, then upload ``image`` as ``img``."""
    await wait_nodes_up(api, nodes, timeout=max(60.0, nodes * 0.3))
    resp = await api.post("/api/v1/images", params={"name": "img"},
                          content=await asyncio.to_thread(image.read_bytes),
                          headers={"Content-Type": "application/octet-stream"})
    assert resp.status_code == 201, resp.text


def _db(database_url: str) -> str:
    return "postgres" if database_url else "sqlite"


async def _list_all(api: httpx.AsyncClient, path: str) -> list[dict[str, Any]]:
    """Every item of a list, page after page."""
    items: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 1000}
    while True:
        resp = await api.get(path, params=params)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        items.extend(page["items"])
        if not page.get("next_cursor"):
            return items
        params["cursor"] = page["next_cursor"]


def _sim(node: NodeService) -> SimDriver:
    """The sim driver of ``node``, to change its host behind the control server's back."""
    assert isinstance(node.agent.driver, SimDriver)
    return node.agent.driver


def _overbooked(nodes: list[dict[str, Any]]) -> list[str]:
    return [f"{n['name']}: {n['vcpus_reserved']}/{n['vcpus']} vCPU, "
            f"{n['memory_reserved_mb']}/{n['memory_mb']} MiB"
            for n in nodes if n["vcpus_reserved"] > n["vcpus"]
            or n["memory_reserved_mb"] > n["memory_mb"]]


# --------------------------------------------------------------------------- bulk, reports


async def _create_all(api: httpx.AsyncClient, count: int, prefix: str) -> list[str]:
    """``count`` creates, CONCURRENCY in flight; the task of each (all must be 202)."""
    gate = asyncio.Semaphore(CONCURRENCY)
    refused: Counter[str] = Counter()

    async def create(i: int) -> str | None:
        async with gate:
            resp = await api.post("/api/v1/vms", json={"name": f"{prefix}-{i:05d}",
                                                        **VM_BODY})
        if resp.status_code != 202:
            refused[f"{resp.status_code} {resp.text[:160]}"] += 1
            return None
        return str(resp.json()["task"]["uuid"])

    tasks = await asyncio.gather(*(create(i) for i in range(count)))
    assert not refused, f"{sum(refused.values())} creates refused: {dict(refused)}"
    return [t for t in tasks if t is not None]


async def _views(api: httpx.AsyncClient, uuids: list[str]) -> dict[str, str]:
    """The API's state of each VM in ``uuids``."""
    out = {}
    for vm_uuid in uuids:
        resp = await api.get(f"/api/v1/vms/{vm_uuid}")
        assert resp.status_code == 200, resp.text
        out[vm_uuid] = resp.json()["state"]
    return out


async def _converged(api: httpx.AsyncClient, want: dict[str, str]) -> list[str]:
    """Where the API's view differs from ``want`` (VM uuid → state)."""
    seen = await _views(api, list(want))
    return [f"VM {u} is {seen[u]}, its node says {s}" for u, s in want.items()
            if seen[u] != s]


async def _start_nodes(cloud: ProcCloud, count: int) -> list[NodeService]:
    """``count`` sim nodes in this test's event loop, joined to ``cloud``: the control
    plane runs in its own processes (on the other core), and the test can change a sim
    host behind the control server's back."""
    assert cloud.root is not None
    nodes = []
    for i in range(count):
        name = f"node-{i:04d}"
        nodes.append(NodeService(NodeSettings(
            name=name, domain_name="chaos", domain_secret=cloud.secret,
            domain_url=f"https://127.0.0.1:{cloud.ports['domain']}", listen_host="127.0.0.1",
            listen_port=0, state_dir=cloud.state_dir(name), heartbeat_interval=2.0,
            hypervisor="sim", report_interval=5.0, sim_vcpus=16, sim_memory_mb=32768,
            sim_disk_gb=4096, pool="default", memory_reserve_mb=0)))
    for chunk in range(0, count, 25):
        await asyncio.gather(*(n.start() for n in nodes[chunk:chunk + 25]))
    return nodes


async def _stop_nodes(nodes: list[NodeService]) -> None:
    results = await asyncio.gather(*(asyncio.wait_for(n.stop(), 30) for n in nodes),
                                   return_exceptions=True)
    for node, result in zip(nodes, results, strict=True):
        if isinstance(result, BaseException):
            log.warning("sim node did not stop: %r", result, extra={"node_name": node.name})


async def test_bulk_create_converges(proc_cloud: ProcCloud, small_qcow2: Path,
                                     database_url: str) -> None:
    db, cloud = _db(database_url), proc_cloud
    began = time.monotonic()
    node_services = await _start_nodes(cloud, NODES)
    try:
        async with cloud.api(timeout=60.0) as api:
            await _converges(cloud, api, node_services, small_qcow2, db, began)
    finally:
        await _stop_nodes(node_services)


async def _converges(cloud: ProcCloud, api: httpx.AsyncClient,
                     node_services: list[NodeService], small_qcow2: Path, db: str,
                     began: float) -> None:
    await _ready(api, NODES, small_qcow2)
    up = time.monotonic() - began

    # -- the bulk, while every node keeps reporting ---------------------------------------
    t = time.monotonic()
    tasks = await _create_all(api, VMS, "scale")
    accepted = time.monotonic() - t
    results = await _wait_tasks(api, tasks, TASKS_TIMEOUT)
    bulk = time.monotonic() - t
    failed = Counter(f"{r['current_step']}: {r['error']}" for r in results
                     if r["state"] != "succeeded")
    assert not failed, f"{sum(failed.values())} creates failed: {dict(failed)}"

    vms = await _list_all(api, "/api/v1/vms")
    nodes = await _list_all(api, "/api/v1/nodes")
    assert len(vms) == VMS and {v["state"] for v in vms} == {"running"}
    assert len({(v["node_uuid"], v["ip"]) for v in vms}) == VMS
    assert len(nodes) == NODES and not _overbooked(nodes)
    per_node = Counter(v["node_uuid"] for v in vms)
    assert all(n["vcpus_reserved"] == per_node[n["uuid"]] for n in nodes)
    held = sum(len(_sim(s).domains) for s in node_services)
    assert held == VMS, f"the sim hosts hold {held} domains"

    # -- one node loses VMs in its reports and regains them -------------------------------
    node_uuid, _ = per_node.most_common(1)[0]
    node = next(n for n in node_services if n.agent.node_id == node_uuid)
    driver = _sim(node)
    on_node = sorted(v["uuid"] for v in vms if v["node_uuid"] == node_uuid)
    assert len(on_node) >= 3, f"node {node.name} holds {len(on_node)} VMs"
    vanished, switched = on_node[0], on_node[1:1 + max(2, len(on_node) // 2)]
    t = time.monotonic()
    # Behind the control server's back: half the guests are switched off (the host's
    # view: shut off), one domain disappears from the host altogether.
    for vm_uuid in switched:
        await driver.destroy(vm_uuid)
    await driver.undefine(vanished)
    lost = {u: "stopped" for u in switched}
    lost_time, still = await wait_until(lambda: _converged(api, lost), CONVERGE_TIMEOUT,
                                        quiet_polls=1)
    assert lost_time is not None, f"the view never followed the node: {still}"
    # ... and they come back: the guests run again.
    for vm_uuid in switched:
        await driver.start(vm_uuid)
    regained = {u: "running" for u in switched}
    regain_time, still = await wait_until(lambda: _converged(api, regained),
                                          CONVERGE_TIMEOUT, quiet_polls=1)
    assert regain_time is not None, f"the view never followed the node: {still}"

    # -- settled: every task ended, nothing overbooked, the checker agrees ----------------
    url = cloud.database_url
    state_dirs = {n.name: n.settings.state_dir for n in node_services}

    async def problems() -> list[str]:
        return (await asyncio.to_thread(unsettled, url)
                + await asyncio.to_thread(check, url, state_dirs))

    settle_time, still = await wait_until(problems, CONVERGE_TIMEOUT, quiet_polls=1)
    assert settle_time is not None, (
        f"{len(still)} invariant violations: {summarize(still)}; e.g. {still[:10]}")
    converge = time.monotonic() - t
    gone = (await api.get(f"/api/v1/vms/{vanished}")).json()
    assert gone["state"] == "error" and "vanished" in gone["error"], gone
    assert not _overbooked(await _list_all(api, "/api/v1/nodes"))
    unfinished = (await api.get("/api/v1/tasks", params={
        "q": "state in (pending,running,rolling_back)", "count": "true",
        "limit": 1})).json()["total"]
    assert unfinished == 0
    assert (node.settings.state_dir / FILE_NAME).exists()
    # Nothing failed unexpectedly on the way (before: deadlocks of quota claims and
    # concurrent first reports picking one sandbox subnet, on PostgreSQL).
    control_log = cloud.root / "logs" / "control.log"
    unexpected = [line[:300] for line in control_log.read_text().splitlines()
                  if '"unexpected error"' in line]
    assert not unexpected, "\n".join(unexpected[:5])
    print(f"SCALE [{db}] {VMS} VMs on {NODES} nodes: cloud up in {up:.1f}s, accepted in "
          f"{accepted:.1f}s, all tasks ended in {bulk:.1f}s ({VMS / bulk:.1f} VMs/s); node "
          f"{node.name}: {len(switched)} guests off seen in {lost_time:.1f}s, on again in "
          f"{regain_time:.1f}s, 1 vanished; all settled {converge:.1f}s after the change; "
          f"test {time.monotonic() - began:.1f}s")


async def _wait_tasks(api: httpx.AsyncClient, tasks: list[str], timeout: float
                      ) -> list[dict[str, Any]]:
    """Poll the count of unfinished tasks until 0 (one request per poll), then read the
    ``tasks`` once."""
    deadline = time.monotonic() + timeout
    while True:
        page = (await api.get("/api/v1/tasks", params={
            "q": "state in (pending,running,rolling_back)", "limit": 1,
            "count": "true"})).json()
        if page["total"] == 0:
            break
        assert time.monotonic() < deadline, f"{page['total']} tasks unfinished"
        await asyncio.sleep(1.0)
    wanted = set(tasks)
    found = {t["uuid"]: t for t in await _list_all(api, "/api/v1/tasks")
             if t["uuid"] in wanted}
    missing = wanted - set(found)
    assert not missing, f"{len(missing)} tasks not listed"
    return [found[u] for u in tasks]


# --------------------------------------------------------------------------- kill -9


class SimNodesProcess(ServiceProcess):
    """``yun serve sim-nodes --count N``: many sim nodes in one process."""

    count: int = 1

    @property
    def argv(self) -> list[str]:
        return [*super().argv[:-3], "sim-nodes", "--count", str(self.count),
                "--prefix", "sim", "--config", str(self.config)]


def _start_sim_nodes(cloud: ProcCloud, count: int) -> dict[str, Path]:
    """A ``sim-nodes`` process of ``count`` nodes joined to ``cloud`` (stopped with it);
    each node's state directory by name."""
    assert cloud.root is not None
    state = cloud.state_dir("sim-nodes")
    common = {"name": "sim-nodes", "domain_name": "chaos", "domain_secret": cloud.secret,
              "domain_url": f"https://127.0.0.1:{cloud.ports['domain']}",
              "listen_host": "127.0.0.1", "state_dir": str(state),
              "heartbeat_interval": 2.0}
    extra = {"report_interval": 5.0, "pool": "default", "memory_reserve_mb": 0,
             "sim_vcpus": 16, "sim_memory_mb": 32768, "sim_disk_gb": 4096}
    config = write_config(cloud.root / "config" / "sim-nodes.toml", "node", common, extra)
    proc = SimNodesProcess("sim-nodes", "node", config, cloud.root / "logs" / "sim-nodes.log")
    proc.count = count
    cloud.procs["sim-nodes"] = proc  # ProcCloud.close stops it with the rest
    proc.start()
    return {f"sim-{i:05d}": state / "sim-hosts" / f"sim-{i:05d}" for i in range(count)}


async def _serves(cloud: ProcCloud, bound: float) -> float | None:
    """Seconds until an authenticated list through the gateway answers 200 (None: not
    within ``bound``)."""
    began = time.monotonic()
    async with cloud.api(timeout=5.0) as api:
        while time.monotonic() - began < bound:
            try:
                resp = await api.get("/api/v1/vms", params={"limit": 1})
                if resp.status_code == 200:
                    return time.monotonic() - began
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    return None


@pytest.fixture
async def proc_cloud(database_url: str) -> AsyncIterator[ProcCloud]:
    # TTL and heartbeats as in production rather than the chaos test's short ones: 200
    # nodes heartbeat to the domain server, and the control server's absence for a few
    # seconds must not make them look gone.
    cloud = ProcCloud(nodes=0, database_url=database_url, heartbeat_interval=2.0, ttl=20.0,
                      reconcile_interval=2.0, keep=bool(os.environ.get("YUN_SCALE_KEEP")))
    await cloud.start()
    try:
        yield cloud
    finally:
        cloud.close()  # every process group killed, the directory removed, pass or fail


async def test_kill_9_during_bulk_create(proc_cloud: ProcCloud, small_qcow2: Path,
                                         database_url: str) -> None:
    db, cloud = _db(database_url), proc_cloud
    began = time.monotonic()
    nodes = _start_sim_nodes(cloud, KILL_NODES)
    async with cloud.api() as api:
        await _ready(api, KILL_NODES, small_qcow2)
    up = time.monotonic() - began

    # -- the bulk; the control server dies a third of the way in --------------------------
    loop = asyncio.get_running_loop()
    runs = [KeyRun(f"kill-{i:05d}") for i in range(KILL_VMS)]
    deadline = loop.time() + max(240.0, KILL_VMS / 5)
    gate = asyncio.Semaphore(CONCURRENCY)
    answered = 0
    third = asyncio.Event()
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)

    async def one(run: KeyRun, i: int) -> None:
        nonlocal answered
        async with gate:
            await send_with_key(api, run, "POST", "/api/v1/vms", deadline,
                                {"name": f"kill-{i:05d}", **VM_BODY})
        answered += 1
        if answered >= KILL_VMS // 3:
            third.set()

    restart: dict[str, float | None] = {}

    async def kill_and_restart() -> None:
        await third.wait()
        cloud.procs["control"].signal_group(signal.SIGKILL)
        await asyncio.to_thread(cloud.procs["control"].popen.wait, 10)  # type: ignore[union-attr]
        cloud.restart("control")
        restart["serves"] = await _serves(cloud, 60.0)

    t = time.monotonic()
    async with cloud.api(timeout=20.0, limits=limits) as api:
        await asyncio.gather(*(one(run, i) for i, run in enumerate(runs)), kill_and_restart())
    bulk = time.monotonic() - t
    dead = [n for n, p in cloud.procs.items() if not p.alive()]
    assert not dead, f"{dead} exited on their own:\n{cloud.logs(dead)}"
    assert cloud.procs["control"].starts == 2

    # -- settled: the checker finds nothing wrong ------------------------------------------
    url = cloud.database_url
    settle_time, still = await wait_until(lambda: asyncio.to_thread(unsettled, url),
                                          max(120.0, KILL_VMS / 10))
    assert settle_time is not None, f"never settled: {still}"
    keys: dict[str, KeyAnswer] = {run.key: run.answer for run in runs}
    problems = await asyncio.to_thread(check, url, nodes, keys=keys)
    answers = Counter(str(r.answer.status) for r in runs)
    serves = restart.get("serves")
    print(f"KILL-9 [{db}] {KILL_VMS} creates on {KILL_NODES} nodes: cloud up in {up:.1f}s, "
          f"bulk {bulk:.1f}s, control killed after {KILL_VMS // 3} answers; API answered "
          + (f"{serves:.2f}s after the restart" if serves is not None else "never")
          + f"; answers {dict(answers)}; retried keys "
          f"{sum(1 for r in runs if r.attempts > 1)}; settled in {settle_time:.1f}s; "
          f"violations {len(problems)} {summarize(problems)}; test "
          f"{time.monotonic() - began:.1f}s")
    assert serves is not None and serves < RESTART_BOUND, (
        f"the restarted control server answered after {serves} s (goal {RESTART_GOAL} s)")
    assert not [r for r in runs if r.answer.status is None], "some requests got no answer"
    assert not problems, f"{len(problems)} invariant violations: {problems[:20]}"
