"""The chaos test issue 6 is judged by: 300 VM creates, each with its own Idempotency-Key,
while the control server, the sim nodes and the gateway are killed with -9 and restarted.

Every component is a real `yun serve` process (:class:`~yun.testing.procs.ProcCloud`);
clients retry each request with its key until they get a definitive answer. Once the
cloud has settled, :mod:`yun.testing.invariants` checks the database and the nodes' own
state; then everything is deleted through the API and nothing may be left anywhere.
The figures of the run are printed (run with ``-s`` to see them on success).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, func, select

from yun.control.db.models import VmRow
from yun.control.db.session import sync_url
from yun.testing.invariants import KeyAnswer, check, summarize, unsettled
from yun.testing.procs import ProcCloud

VMS = 300
SPREAD = 30.0  # seconds over which the creates are sent, so every crash hits some
CONCURRENCY = 32  # requests in flight at once (a bulk client's connection pool)
CLIENT_DEADLINE = 80.0  # a client gives up on a key this long after the bulk began
REQUEST_TIMEOUT = 20.0
SETTLE_TIMEOUT = 45.0
DELETE_TIMEOUT = 45.0
TTL = 2.0
NODE_DOWN = 3 * TTL  # well past the presence TTL: the domain server sees the node gone
VM_BODY = {"image": "img", "vcpus": 1, "memory_mb": 64, "disk_gb": 1}


@dataclass(eq=False)
class KeyRun:
    """One client request and its retries with the same Idempotency-Key."""

    key: str
    attempts: int = 0
    seen: Counter[str] = field(default_factory=Counter)
    answer: KeyAnswer = field(default_factory=lambda: KeyAnswer(None))


def _retryable(resp: httpx.Response) -> bool:
    """Not an answer yet: the server failed, is overloaded, or still runs the first try."""
    if resp.status_code >= 500 or resp.status_code == 429:
        return True
    return resp.status_code == 409 and "in progress" in resp.text


async def send_with_key(api: httpx.AsyncClient, run: KeyRun, method: str, path: str,
                        deadline: float, json: dict[str, object] | None = None) -> KeyAnswer:
    """Send until a definitive answer or ``deadline`` (event-loop time), with backoff."""
    loop = asyncio.get_running_loop()
    delay = 0.25
    last = "never sent"
    while loop.time() < deadline:
        run.attempts += 1
        try:
            resp = await api.request(method, path, json=json,
                                     headers={"Idempotency-Key": run.key})
        except httpx.TransportError as exc:  # the gateway died or is not back yet
            last = f"{exc.__class__.__name__}"
        else:
            if not _retryable(resp):
                uuid = None
                if resp.status_code < 300 and resp.content:
                    resource = resp.json().get("resource") or {}
                    uuid = resource.get("uuid")
                run.answer = KeyAnswer(resp.status_code, uuid, resp.text[:200])
                run.seen[str(resp.status_code)] += 1
                return run.answer
            last = f"{resp.status_code} {resp.text[:120]}"
        run.seen[last.split(" ", 1)[0]] += 1
        await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())) * random.uniform(
            0.5, 1.0))
        delay = min(delay * 1.6, 2.0)
    run.answer = KeyAnswer(None, None, f"gave up after {run.attempts} tries; last: {last}")
    return run.answer


async def bulk_create(cloud: ProcCloud, prefix: str) -> list[KeyRun]:
    """VMS creates spread over SPREAD seconds, each retried with its key."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    deadline = began + CLIENT_DEADLINE
    gate = asyncio.Semaphore(CONCURRENCY)
    runs = [KeyRun(f"{prefix}-{i:03d}") for i in range(VMS)]
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with cloud.api(REQUEST_TIMEOUT, limits=limits) as api:

        async def one(i: int, run: KeyRun) -> None:
            await asyncio.sleep(max(0.0, began + i * SPREAD / VMS - loop.time()))
            async with gate:
                await send_with_key(api, run, "POST", "/api/v1/vms", deadline,
                                    {"name": f"{prefix}-{i:03d}", **VM_BODY})

        await asyncio.gather(*(one(i, run) for i, run in enumerate(runs)))
    return runs


async def chaos(cloud: ProcCloud, events: list[str]) -> None:
    """The crashes, at fixed times into the bulk; each is logged to ``events``."""
    began = time.monotonic()
    schedule: list[tuple[float, list[str], float]] = [
        (3.0, ["control"], 1.0),
        (7.0, ["node-0", "node-1"], NODE_DOWN),
        (14.0, ["node-2"], NODE_DOWN),
        (17.0, ["gateway"], 1.0),
        (23.0, ["control"], 1.0),
        (27.0, ["gateway", "control"], 1.5),
    ]
    pending: list[asyncio.Task[None]] = []
    for at, names, down in schedule:
        await asyncio.sleep(max(0.0, began + at - time.monotonic()))
        events.append(f"{time.monotonic() - began:5.1f}s kill -9 {'+'.join(names)} "
                      f"for {down:.1f}s")
        # Crashes overlap (the nodes are still down when the gateway goes): each waits
        # out its own downtime in its own task.
        pending.append(asyncio.create_task(cloud.crash(names, down)))
    await asyncio.gather(*pending)


async def wait_until(probe: Callable[[], Awaitable[list[str]]], timeout: float,
                     quiet_polls: int = 3) -> tuple[float | None, list[str]]:
    """Poll ``probe`` until it reports nothing ``quiet_polls`` times in a row: the time
    that took (None on timeout) and what it reported last."""
    began = time.monotonic()
    quiet = 0
    last: list[str] = []
    while time.monotonic() - began < timeout:
        last = await probe()
        quiet = quiet + 1 if not last else 0
        if quiet >= quiet_polls:
            return time.monotonic() - began, []
        await asyncio.sleep(1.0)
    return None, last


@pytest.fixture
async def cloud(database_url: str) -> AsyncIterator[ProcCloud]:
    c = ProcCloud(nodes=3, database_url=database_url, heartbeat_interval=0.5, ttl=TTL,
                  report_interval=1.0, reconcile_interval=1.0,
                  keep=bool(os.environ.get("YUN_CHAOS_KEEP")))
    await c.start()
    try:
        yield c
    finally:
        c.close()  # every process group killed, the directory removed, pass or fail


async def _vm_uuids(url: str) -> list[str]:
    def read() -> list[str]:
        engine = create_engine(sync_url(url))
        try:
            with engine.connect() as conn:
                return list(conn.scalars(select(VmRow.uuid)))
        finally:
            engine.dispose()
    return await asyncio.to_thread(read)


async def _vm_states(url: str) -> Counter[str]:
    def read() -> Counter[str]:
        engine = create_engine(sync_url(url))
        try:
            with engine.connect() as conn:
                return Counter(dict(conn.execute(select(VmRow.state, func.count())
                                                 .group_by(VmRow.state)).all()))
        finally:
            engine.dispose()
    return await asyncio.to_thread(read)


async def _error_reasons(url: str) -> Counter[str]:
    """Why the failed VMs failed, by the first words of their error (numbers dropped)."""
    def read() -> Counter[str]:
        engine = create_engine(sync_url(url))
        try:
            with engine.connect() as conn:
                errors = conn.execute(select(VmRow.error).where(VmRow.state == "error")).all()
        finally:
            engine.dispose()
        return Counter(re.sub(r"[0-9a-f-]{8,}|\d+(\.\d+)?", "#", e or "no reason")[:70]
                       for (e,) in errors)
    return await asyncio.to_thread(read)


async def test_bulk_create_survives_kill_9(cloud: ProcCloud, small_qcow2: Path,
                                           database_url: str) -> None:
    db = "postgresql" if database_url else "sqlite"
    url = cloud.database_url
    nodes = cloud.node_state_dirs()
    async with cloud.api() as api:
        resp = await api.post("/api/v1/images", params={"name": "img"},
                              content=await asyncio.to_thread(small_qcow2.read_bytes),
                              headers={"Content-Type": "application/octet-stream"})
        assert resp.status_code == 201, resp.text

    # -- the bulk, under fire ---------------------------------------------------------------
    events: list[str] = []
    began = time.monotonic()
    runs, _ = await asyncio.gather(bulk_create(cloud, f"chaos-{secrets.token_hex(3)}"),
                                   chaos(cloud, events))
    bulk_time = time.monotonic() - began
    dead = [n for n, p in cloud.procs.items() if not p.alive()]
    assert not dead, f"{dead} exited on their own:\n{cloud.logs(dead)}"

    settle_time, still = await wait_until(lambda: asyncio.to_thread(unsettled, url),
                                          SETTLE_TIMEOUT)
    keys = {run.key: run.answer for run in runs}
    after_chaos = await asyncio.to_thread(check, url, nodes, keys=keys)
    states = await _vm_states(url)
    reasons = await _error_reasons(url)

    # -- delete everything through the API ---------------------------------------------------
    delete_began = time.monotonic()
    loop = asyncio.get_running_loop()
    deletes = {KeyRun(f"delete-{u}"): u for u in await _vm_uuids(url)}
    async with cloud.api(REQUEST_TIMEOUT) as api:
        deadline = loop.time() + DELETE_TIMEOUT
        gate = asyncio.Semaphore(CONCURRENCY)

        async def delete(run: KeyRun, vm_uuid: str) -> None:
            async with gate:
                await send_with_key(api, run, "DELETE", f"/api/v1/vms/{vm_uuid}", deadline)

        await asyncio.gather(*(delete(run, u) for run, u in deletes.items()))
    delete_answers = Counter(str(r.answer.status) for r in deletes)

    async def leftovers() -> list[str]:
        return await asyncio.to_thread(check, url, nodes, expect_no_vms=True)

    empty_time, _ = await wait_until(leftovers, DELETE_TIMEOUT, quiet_polls=2)
    after_delete = await leftovers()
    delete_time = time.monotonic() - delete_began

    # -- figures -----------------------------------------------------------------------------
    retried = [r for r in runs if r.attempts > 1]
    answered = Counter(str(r.answer.status) for r in runs)
    lines = [
        f"CHAOS [{db}] {VMS} creates in {bulk_time:.1f}s; crashes:",
        *(f"CHAOS [{db}]   {e}" for e in events),
        f"CHAOS [{db}] keys retried: {len(retried)} of {VMS}; retries total: "
        f"{sum(r.attempts - 1 for r in runs)}; what the tries got: "
        f"{dict(sum((r.seen for r in runs), Counter()).most_common())}",
        f"CHAOS [{db}] final answers: {dict(answered)}",
        f"CHAOS [{db}] VMs after settling: {dict(states)} (running "
        f"{states.get('running', 0)}, failed {states.get('error', 0)})",
        f"CHAOS [{db}] why VMs failed: {dict(reasons.most_common())}",
        f"CHAOS [{db}] time to settle: "
        + (f"{settle_time:.1f}s" if settle_time is not None
           else f"did not settle in {SETTLE_TIMEOUT:.0f}s: {still}"),
        f"CHAOS [{db}] violations after chaos: {len(after_chaos)} {summarize(after_chaos)}",
        f"CHAOS [{db}] deletes: {len(deletes)} answered {dict(delete_answers)}; empty "
        + (f"after {empty_time:.1f}s" if empty_time is not None else "never")
        + f" ({delete_time:.1f}s in all)",
        f"CHAOS [{db}] violations after deleting: {len(after_delete)} "
        f"{summarize(after_delete)}",
    ]
    if cloud.keep:
        lines.append(f"CHAOS [{db}] logs and state kept in {cloud.root}")
    print("\n".join(lines))
    problems = [f"after chaos: {p}" for p in after_chaos] + \
               [f"after deleting: {p}" for p in after_delete]
    if settle_time is None:
        problems.insert(0, f"did not settle in {SETTLE_TIMEOUT:.0f}s: {still}")
    shown = "\n  ".join(problems[:40])
    assert not problems, (f"{len(problems)} violations ({summarize(after_chaos)} after "
                          f"chaos; {summarize(after_delete)} after deleting):\n  {shown}")
