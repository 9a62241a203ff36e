#!/usr/bin/env python3
"""Authenticated API reads per second through the gateway, against its ``/healthz``.

The deployment is the one ``create_throughput.py`` builds, with its code: the control
plane as separate processes on 127.0.0.1 (``python -m yun serve
domain|control|storage|gateway --config F``, SQLite, the gateway's rate limit off) and
the simulated nodes in one more process (``python -m yun serve sim-nodes``). The
script logs in as ``admin`` (project ``default``), uploads a small image, creates
``--vms`` VMs (1 vCPU, 256 MiB, two tags) on ``--nodes`` sim nodes, makes an API key
pair (``POST /api/v1/keys``) and then, for each case, keeps ``--connections``
keep-alive connections busy for ``--warmup`` + ``--duration`` seconds (each connection
sends its next request when the previous answer is in) and counts what completed in
the last ``--duration`` seconds:

* ``healthz``: ``GET /healthz`` of the gateway, unauthenticated, nothing forwarded
  (the baseline: the HTTP server and FastAPI alone);
* ``get-token`` / ``get-key``: ``GET /api/v1/vms/{uuid}``, each request the next of the
  VMs in turn, with a bearer token / signed with the key pair;
* ``list-token`` / ``list-key``: ``GET /api/v1/vms?q=state=running and
  vcpus>=1&limit=50``, a page of 50 VMs: in turn the first page and the pages after it
  (``cursor`` from ``next_cursor``), as a client walking the list does.

It prints requests per second, p50/p95/p99 latency, the errors (each with its status
and body; there must be none), the ratio to the ``/healthz`` rate and the CPU the
gateway, the control server and this client spent per request, and the latency of
``/healthz`` and of one VM's GET sent one at a time on one connection. Then it profiles
``--profile`` cases again with py-spy attached to the gateway and the control server
(sampling, ``--nonblocking``; figures taken under the profiler are not the benchmark's)
and prints, per process, the functions with the most cumulative time and the self time
by package; the same summary is written to ``benchmarks/results/`` with the date. If
py-spy is not installed (``.venv/bin/pip install py-spy``; it is not a dependency of
Yun), the profile is skipped with a message.

The load client is a minimal HTTP/1.1 client on asyncio streams, not httpx: httpx
costs a few milliseconds of CPU per request, so on a two-core machine it, not the
gateway, would set the rate (see ``create_throughput.py``). Its CPU use is printed.

``--tcp-nodelay`` is a diagnostic: it starts the services through a wrapper that turns
Nagle's algorithm off on the connections they accept, which Yun does not do today (see
NODELAY_WRAPPER); such a run shows what that costs, it does not measure Yun as it is.

Everything started is stopped at the end (SIGTERM, then SIGKILL) and the temporary
directory removed, also on failure or SIGTERM. Exit status 1 if any request failed.

Run: ``.venv/bin/python benchmarks/api_reads.py`` (about 2 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import itertools
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx
from create_throughput import (  # benchmarks/create_throughput.py: the same deployment
    UNFINISHED,
    BenchmarkError,
    Deployment,
    add_deployment_options,
    add_sampling_options,
    bring_up,
    get_json,
    list_all,
    machine,
    new_client,
    pct,
    run_then_stop,
    start_deployment,
    upload_image,
)

from yun.proto import signing

LIST_QUERY = "state=running and vcpus>=1"
PAGE_SIZE = 50
CASES = ("healthz", "get-token", "list-token", "get-key", "list-key")
MAX_REQUESTS_PER_CONNECTION = 1_000_000  # a bound on every load loop besides its clock
MAX_HEAD = 64 * 1024
RESULTS = Path(__file__).resolve().parent / "results"
# How far from now the signing dates may go; the gateway allows signing.REPLAY_WINDOW.
DATE_SPREAD = int(signing.REPLAY_WINDOW) - 10
# Diagnostics (--tcp-nodelay): start each service through this wrapper, which sets
# TCP_NODELAY on every TCP socket asyncio wraps. asyncio does so only for sockets whose
# ``proto`` is IPPROTO_TCP; the listening socket yun/util/serve.py binds up front is
# made with proto 0, so the connections the services accept keep Nagle's algorithm, and
# an answer written in two pieces waits for the peer's delayed ACK (≈ 40 ms).
NODELAY_WRAPPER = """\
import asyncio.base_events, runpy, socket
def set_nodelay(sock):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
asyncio.base_events._set_nodelay = set_nodelay
runpy.run_module("yun", run_name="__main__", alter_sys=True)
"""
# Frames every sample of a thread passes through (process start, the event loop's own
# turn, a thread's start): left out of the cumulative listing, which they would fill.
TRUNK = ("typer/", "click/", "<frozen runpy>", "yun/__main__.py", "yun/cli/",
         "asyncio/runners.py", "asyncio/base_events.py", "asyncio/events.py", "threading.py",
         "concurrent/futures/thread.py")
# The ASGI server's and framework's layers around every request (middlewares, routing):
# in the cumulative listing they would all show the whole request's time.
PLUMBING = ("uvicorn/", "starlette/", "fastapi/applications.py", "fastapi/routing.py",
            "fastapi/middleware/", "fastapi/_body_limit.py", "fastapi/telemetry/",
            "yun/gateway/requestid.py", "yun/gateway/limits.py", "yun/control/api/routing.py")


# --------------------------------------------------------------------------- requests


def raw_get(host: str, target: str, headers: dict[str, str] | None = None) -> bytes:
    """The bytes of ``GET target`` on a keep-alive HTTP/1.1 connection."""
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}"]
    lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass(frozen=True)
class Target:
    """One request target: the path and the query pairs (decoded), as signed."""

    path: str
    query: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return self.path + ("?" + urlencode(self.query, quote_via=quote) if self.query else "")


class UniqueSigner:
    """Signs GETs with an API key pair so that no two requests carry the same signature.

    The gateway accepts each signature once (it remembers it until the request's date
    + 300 s) and ``X-Yun-Date`` counts whole seconds, so identical requests in the same
    second would be identical signatures, and all but the first refused as replays. The
    SDK's ``KeyPairAuth`` waits for the next second instead, which would cap a client
    repeating one request at one per second, far below what is measured here.

    The variation chosen is the one that changes nothing the gateway or the control
    server does besides checking the signature: the *date*. The gateway accepts any date
    within ±300 s of its clock, so for each target this signer hands out the dates
    ``now - 290 s``, then one second later each time, up to ``now + 290 s`` (and the
    floor follows the clock): every (target, date) pair is used once, every request
    is otherwise byte for byte what a client would send, and the route, the query, the
    SQL and the answer are exactly those of the token case. The targets rotate too (the
    200 VMs; the 4 pages of the list), as they do in the token cases, which gives each
    case ≈ 580 signatures per target plus one per second. Should that run out, the
    signer raises instead of waiting, so the figures are never throttled silently.
    (Rejected alternatives: ``X-Request-Id`` is not signed; an extra query parameter or
    another ``limit`` would change the request or the page.)
    """

    def __init__(self, access_key: str, secret: str) -> None:
        self.access_key = access_key
        self.secret = secret
        self._next: dict[Target, int] = {}  # next date (epoch second) to use per target
        self.signed = 0

    def headers(self, target: Target) -> dict[str, str]:
        now = int(time.time())
        when = max(self._next.get(target, 0), now - DATE_SPREAD)
        if when > now + DATE_SPREAD:
            raise BenchmarkError(f"no unused signing date left for {target} (more than "
                                 f"{2 * DATE_SPREAD} signatures of it within the window); "
                                 f"add targets")
        self._next[target] = when + 1
        self.signed += 1
        return signing.sign_headers(self.access_key, self.secret, "GET", target.path,
                                    target.query, b"", datetime.fromtimestamp(when, UTC))


# --------------------------------------------------------------------------- load


@dataclass
class Outcome:
    """What one case measured in its window."""

    case: str
    connections: int
    seconds: float
    ok: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # warm-up included
    cpu_s: dict[str, float] = field(default_factory=dict)  # in the window

    @property
    def per_second(self) -> float:
        return self.ok / self.seconds

    def summary(self) -> dict[str, Any]:
        lat = self.latencies or [0.0]
        return {"case": self.case, "connections": self.connections, "seconds": self.seconds,
                "requests": self.ok, "per_second": self.per_second,
                "p50_ms": 1000 * statistics.median(lat), "p95_ms": 1000 * pct(lat, 0.95),
                "p99_ms": 1000 * pct(lat, 0.99), "errors": len(self.errors),
                "error_samples": self.errors[:20], "cpu_s": self.cpu_s,
                "cpu_ms_per_request": {k: 1000 * v / max(1, self.ok)
                                       for k, v in self.cpu_s.items()}}


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Status, body and whether the server will close the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length: int | None = None
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    if length is None:
        raise ValueError(f"answer {status} without Content-Length")
    return status, await reader.readexactly(length), close


def cpu_now(dep: Deployment) -> dict[str, float]:
    """CPU seconds so far of the gateway, the control server and this client."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"gateway": dep.services["gateway"].cpu_seconds(),
            "control": dep.services["control"].cpu_seconds(),
            "client": ru.ru_utime + ru.ru_stime}


async def drive(dep: Deployment, case: str, make: Callable[[int], bytes], connections: int,
                warmup: float, duration: float) -> Outcome:
    """Keep ``connections`` connections busy with ``make(i)`` for ``warmup + duration``
    seconds; count the answers completed in the last ``duration`` seconds."""
    port = dep.ports["gateway"]
    loop = asyncio.get_running_loop()
    begin = loop.time() + warmup
    end = begin + duration
    out = Outcome(case, connections, duration)
    numbers = itertools.count()
    cpu: dict[str, dict[str, float]] = {}

    async def window() -> None:
        await asyncio.sleep(max(0.0, begin - loop.time()))
        cpu["begin"] = cpu_now(dep)
        await asyncio.sleep(max(0.0, end - loop.time()))
        cpu["end"] = cpu_now(dep)

    async def connection() -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            for _ in range(MAX_REQUESTS_PER_CONNECTION):
                if loop.time() >= end:
                    break
                request = make(next(numbers))
                started = loop.time()
                try:
                    if reader is None or writer is None:
                        reader, writer = await asyncio.open_connection(
                            "127.0.0.1", port, limit=MAX_HEAD)
                    writer.write(request)
                    status, body, close = await read_response(reader)
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                        ValueError) as exc:
                    out.errors.append(f"transport: {exc!r}")
                    if writer is not None:
                        writer.close()
                    reader = writer = None
                    await asyncio.sleep(0.01)  # no busy loop if the gateway is gone
                    continue
                done = loop.time()
                if status != 200:
                    out.errors.append(f"{status} {body[:400].decode(errors='replace')}")
                elif begin <= done <= end:
                    out.ok += 1
                    out.latencies.append(done - started)
                if close:
                    writer.close()
                    reader = writer = None
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    await asyncio.wait_for(asyncio.gather(window(), *(connection() for _ in range(connections))),
                           warmup + duration + 60)
    out.cpu_s = {k: cpu["end"][k] - cpu["begin"][k] for k in cpu["end"]}
    return out


async def one_by_one(dep: Deployment, make: Callable[[int], bytes], count: int
                     ) -> list[float]:
    """Latencies of ``count`` requests sent one after the other on one keep-alive
    connection (after a first one, not counted): the latency of an idle cloud."""
    reader, writer = await asyncio.open_connection("127.0.0.1", dep.ports["gateway"],
                                                   limit=MAX_HEAD)
    latencies: list[float] = []
    try:
        for i in range(count + 1):
            started = time.perf_counter()
            writer.write(make(i))
            status, body, _ = await asyncio.wait_for(read_response(reader), 30)
            if status != 200:
                raise BenchmarkError(f"one-by-one request: {status} {body[:300]!r}")
            if i:
                latencies.append(time.perf_counter() - started)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return latencies


# --------------------------------------------------------------------------- set-up


@dataclass
class Fixture:
    """What the cases read: the VMs, the pages of the list, the credentials."""

    token: str
    signer: UniqueSigner  # one for the whole run: a (target, date) is never signed twice
    vm_uuids: list[str]
    pages: list[Target]


async def create_vms(api: httpx.AsyncClient, count: int, concurrency: int,
                     timeout: float) -> float:
    """``count`` running VMs (1 vCPU, 256 MiB, two tags); seconds it took."""
    started = time.monotonic()
    sem = asyncio.Semaphore(concurrency)
    refused: list[str] = []

    async def create(i: int) -> None:
        async with sem:
            resp = await api.post("/api/v1/vms", json={
                "name": f"r-{i:04d}", "image": "img", "vcpus": 1, "memory_mb": 256,
                "tags": {"bench": "api-reads", "tier": "web" if i % 2 else "db"}})
            if resp.status_code != 202:
                refused.append(f"r-{i:04d}: {resp.status_code} {resp.text[:300]}")

    await asyncio.gather(*(create(i) for i in range(count)))
    if refused:
        raise BenchmarkError(f"{len(refused)} creates refused, e.g. {refused[:3]}")
    deadline = time.monotonic() + timeout
    while True:
        page = await get_json(api, "/api/v1/tasks", params={
            "q": f"state in ({','.join(UNFINISHED)})", "limit": 1, "count": "true"})
        if int(page["total"]) == 0:
            break
        if time.monotonic() > deadline:
            raise BenchmarkError(f"{page['total']} tasks unfinished after {timeout:.0f} s")
        await asyncio.sleep(0.5)
    failed = await list_all(api, "/api/v1/tasks", q="state=failed")
    if failed:
        raise BenchmarkError(f"{len(failed)} tasks failed, e.g. {failed[0].get('error')}")
    return time.monotonic() - started


async def prepare(dep: Deployment, api: httpx.AsyncClient, args: argparse.Namespace
                  ) -> Fixture:
    """VMs, the list's pages and an API key pair."""
    created = await create_vms(api, args.vms, 25, args.timeout)
    running = await list_all(api, "/api/v1/vms", q="state=running")
    if len(running) < args.vms:
        raise BenchmarkError(f"only {len(running)} of {args.vms} VMs running")
    print(f"{args.vms} VMs running after {created:.1f} s", flush=True)
    pages: list[Target] = []
    query: tuple[tuple[str, str], ...] = (("q", LIST_QUERY), ("limit", str(PAGE_SIZE)))
    for _ in range(args.vms // PAGE_SIZE):  # full pages only: every read is 50 VMs
        target = Target("/api/v1/vms", query)
        page = await get_json(api, str(target))
        if len(page["items"]) != PAGE_SIZE:
            break
        pages.append(target)
        if not page.get("next_cursor"):
            break
        query = (("q", LIST_QUERY), ("limit", str(PAGE_SIZE)),
                 ("cursor", page["next_cursor"]))
    if not pages:
        raise BenchmarkError(f"no full page of {PAGE_SIZE} running VMs")
    resp = await api.post("/api/v1/keys", json={"name": "bench-reads"})
    if resp.status_code != 201:
        raise BenchmarkError(f"key creation: {resp.status_code} {resp.text[:300]}")
    key = resp.json()
    return Fixture(dep.token, UniqueSigner(key["access_key"], key["secret"]),
                   [vm["uuid"] for vm in running[:args.vms]], pages)


def request_maker(case: str, fx: Fixture, host: str) -> Callable[[int], bytes]:
    """The ``i``-th request of ``case`` (the key cases sign anew each time)."""
    if case == "healthz":
        request = raw_get(host, "/healthz")
        return lambda i: request
    kind, auth = case.split("-")
    targets = ([Target(f"/api/v1/vms/{u}") for u in fx.vm_uuids] if kind == "get"
               else fx.pages)
    if auth == "token":
        bearer = {"Authorization": f"Bearer {fx.token}"}
        requests = [raw_get(host, str(t), bearer) for t in targets]
        return lambda i: requests[i % len(requests)]
    signer = fx.signer
    texts = [str(t) for t in targets]

    def signed(i: int) -> bytes:
        j = i % len(targets)
        return raw_get(host, texts[j], signer.headers(targets[j]))

    return signed


LABELS = {
    "healthz": "GET /healthz (no auth, not forwarded)",
    "get-token": "GET /api/v1/vms/{uuid}, token",
    "list-token": f"GET /api/v1/vms?q={LIST_QUERY}&limit={PAGE_SIZE}, token",
    "get-key": "GET /api/v1/vms/{uuid}, key pair",
    "list-key": f"GET /api/v1/vms?q={LIST_QUERY}&limit={PAGE_SIZE}, key pair",
}


# --------------------------------------------------------------------------- profile


def find_py_spy() -> str | None:
    """py-spy next to this Python (the virtualenv) or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def package_of(frame: str) -> str:
    """``func (path/file.py:12)`` → the package it belongs to (``yun.gateway``, ``httpx``)."""
    path = frame.rpartition(" (")[2].rstrip(")").rsplit(":", 1)[0]
    parts = [p for p in path.split("/") if p]
    if not parts:
        return "?"
    if parts[0] == "yun" and len(parts) > 2:
        return f"yun.{parts[1]}"
    top = parts[0]
    return top[:-3] if top.endswith(".py") else top


def summarize_folded(raw: str, seconds: float, rate: int, top: int) -> list[str]:
    """Self time by package, then Yun's functions and all functions by cumulative time
    and functions by self time, from py-spy's folded stacks (``thread (tid):
    name;frame;...;frame count``). Shares are of all the process's samples: py-spy
    counts a thread as busy when it is runnable (a thread being woken too), so the CPU
    each process really used is the table's, from /proc."""
    possible = seconds * rate  # samples of one thread busy all the time
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    roots: Counter[str] = Counter()  # first frame of the main thread's stacks
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0].partition(": ")[2] or frames[0]
        frames = frames[1:] if frames[0].startswith("thread (") else frames
        total += count
        threads[thread] += count
        if thread == "MainThread":
            roots[frames[0] if frames else "(no frames)"] += count
        for frame in set(frames):
            inclusive[frame] += count
        if frames:
            own[frames[-1]] += count
            packages[package_of(frames[-1])] += count
    if total == 0:
        return ["  no samples (was the process busy?)"]

    def share(n: int) -> str:
        return f"{100 * n / total:5.1f}%"

    from_entry = roots.most_common(1)[0][1] if roots else 0
    detached = sum(roots.values()) - from_entry
    out = [f"  {total} samples of busy threads in {seconds:.0f} s at {rate} Hz, as many as "
           f"{total / possible:.2f} threads always busy; % = share of these samples"]
    out.append("  threads: " + ", ".join(f"{name} {share(n).strip()}"
                                          for name, n in threads.most_common()))
    if detached:
        out.append(f"  {share(detached).strip()} of the main thread's samples are stacks "
                   f"without their callers (read while the process ran: --nonblocking; in "
                   f"the control server also SQLAlchemy's greenlets): they count for the "
                   f"frames they have")
    out.append("  self time by package:")
    out.extend(f"    {share(n)}  {name}" for name, n in packages.most_common(12))
    ranked = [(frame, n) for frame, n in inclusive.most_common()
              if not any(f"({prefix}" in frame for prefix in TRUNK)]
    out.append(f"  top {top} of Yun's functions by cumulative time (cum, self):")
    out.extend(f"    {share(n)} {share(own.get(frame, 0))}  {frame}"
               for frame, n in [(f, n) for f, n in ranked if "(yun/" in f][:top])
    out.append(f"  top {top} functions by cumulative time (cum, self), leaving out the "
               f"frames of start-up, the event loop, thread start and the ASGI server and "
               f"framework plumbing every request passes through:")
    out.extend(f"    {share(n)} {share(own.get(frame, 0))}  {frame}"
               for frame, n in [(f, n) for f, n in ranked
                                if not any(f"({prefix}" in f for prefix in PLUMBING)][:top])
    out.append(f"  top {top} functions by self time:")
    out.extend(f"    {share(n)}  {frame}" for frame, n in own.most_common(top))
    return out


async def profile_case(dep: Deployment, case: str, make: Callable[[int], bytes],
                       args: argparse.Namespace, py_spy: str, work: Path) -> list[str]:
    """Run ``case`` again with py-spy on the gateway and the control server."""
    seconds, rate = args.profile_seconds, args.profile_rate
    spies: dict[str, tuple[asyncio.subprocess.Process, Path, Path]] = {}
    for name in ("gateway", "control"):
        folded, log = work / f"{case}-{name}.folded", work / f"{case}-{name}.log"
        with log.open("wb") as err:
            spies[name] = (await asyncio.create_subprocess_exec(
                py_spy, "record", "--pid", str(dep.services[name].pid), "--duration",
                str(seconds), "--rate", str(rate), "--format", "raw", "--nonblocking",
                "--threads", "--function", "--output", str(folded),
                stdin=subprocess.DEVNULL, stdout=err, stderr=err), folded, log)
    try:
        # The load starts with the samplers and outlasts them; its rate is printed
        # only to show what the profiled run did.
        outcome = await drive(dep, case, make, args.connections, 1.0, seconds)
    finally:
        for spy, _, _ in spies.values():
            try:
                await asyncio.wait_for(spy.wait(), 30)
            except TimeoutError:
                spy.kill()
                await spy.wait()
    lines = [f"case {case}: {LABELS[case]}, {args.connections} connections; "
             f"{outcome.per_second:.0f} req/s under the profiler, {len(outcome.errors)} errors"]
    for name, (spy, folded, log) in spies.items():
        lines.append(f"{name} (pid {dep.services[name].pid}):")
        if spy.returncode != 0 or not folded.exists():
            lines.append(f"  py-spy failed ({spy.returncode}): "
                         f"{log.read_text(errors='replace')[-400:]}")
            continue
        lines.extend(summarize_folded(folded.read_text(), seconds, rate, args.profile_top))
        if args.profile_raw is not None:
            args.profile_raw.mkdir(parents=True, exist_ok=True)
            shutil.copy(folded, args.profile_raw)
    return lines


# --------------------------------------------------------------------------- the run


def server_stack() -> str:
    """What the services' HTTP servers run on (same virtualenv as this script)."""
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return (f"uvicorn {version('uvicorn')} (HTTP parser: {http}), fastapi "
            f"{version('fastapi')}, pydantic {version('pydantic')}, httpx "
            f"{version('httpx')}, SQLAlchemy {version('sqlalchemy')}; uvloop "
            f"{version('uvloop')} installed")


async def measure(dep: Deployment, args: argparse.Namespace) -> dict[str, Any]:
    async with new_client(dep, 25) as api:
        t = time.monotonic()
        await bring_up(dep, api, args.nodes, args.startup_timeout)
        print(f"cloud up in {time.monotonic() - t:.1f} s: {args.nodes} sim nodes, control "
              f"plane as separate processes, API {dep.api_url}", flush=True)
        await upload_image(dep, api, args.startup_timeout)
        fx = await prepare(dep, api, args)
    host = f"127.0.0.1:{dep.ports['gateway']}"
    print(f"{len(fx.pages)} list pages of {PAGE_SIZE}; key {fx.signer.access_key}; each case: "
          f"{args.connections} connections, {args.warmup:g} s warm-up + "
          f"{args.duration:g} s measured", flush=True)
    idle = {case: await one_by_one(dep, request_maker(case, fx, host), 20)
            for case in ("healthz", "get-token")}
    outcomes: dict[str, Outcome] = {}
    for case in args.cases:
        outcome = await drive(dep, case, request_maker(case, fx, host), args.connections,
                              args.warmup, args.duration)
        outcomes[case] = outcome
        print(f"  {case:<10} {outcome.per_second:7.0f} req/s, {len(outcome.errors)} errors",
              flush=True)
    profile: list[str] = []
    if args.profile:
        py_spy = find_py_spy()
        if py_spy is None:
            profile = ["py-spy is not installed: no profile (`.venv/bin/pip install py-spy` "
                       "for a local run; it is not a dependency of Yun)"]
        else:
            work = dep.root / "profile"
            work.mkdir(exist_ok=True)
            for case in args.profile:
                print(f"profiling {case} ({args.profile_seconds} s) ...", flush=True)
                profile.extend(await profile_case(dep, case, request_maker(case, fx, host),
                                                  args, py_spy, work))
    return {"outcomes": outcomes, "profile": profile, "pages": len(fx.pages), "idle": idle}


def report(result: dict[str, Any], args: argparse.Namespace, started_at: str,
           info: str) -> dict[str, Any]:
    outcomes: dict[str, Outcome] = result["outcomes"]
    base = outcomes.get("healthz")
    print()
    print(f"Authenticated API reads through the gateway: {args.vms} VMs on {args.nodes} sim "
          f"nodes, control plane as separate processes (SQLite), {args.connections} "
          f"keep-alive connections, {args.duration:g} s measured after {args.warmup:g} s "
          f"warm-up per case")
    print(f"servers: {server_stack()}")
    if args.tcp_nodelay:
        print("DIAGNOSTIC RUN: services started with TCP_NODELAY forced on (--tcp-nodelay)")
    width = max(len(LABELS[c]) for c in outcomes)
    print(f"{'case':<{width}} |  req/s | p50 ms | p95 ms | p99 ms | errors | / healthz "
          f"| CPU ms per request: gateway control client")
    for case, o in outcomes.items():
        s = o.summary()
        ratio = f"{o.per_second / base.per_second:9.3f}" if base and base.ok else "        -"
        per = s["cpu_ms_per_request"]
        print(f"{LABELS[case]:<{width}} | {s['per_second']:6.0f} | {s['p50_ms']:6.1f} | "
              f"{s['p95_ms']:6.1f} | {s['p99_ms']:6.1f} | {s['errors']:6d} | {ratio} "
              f"| {per['gateway']:22.2f} {per['control']:7.2f} {per['client']:6.2f}")
    idle = {case: {"p50_ms": 1000 * statistics.median(v), "max_ms": 1000 * max(v)}
            for case, v in result["idle"].items()}
    print("one connection, one request at a time (20 requests after a first): "
          + "; ".join(f"{LABELS[c]} p50 {v['p50_ms']:.1f} ms, max {v['max_ms']:.1f} ms"
                      for c, v in idle.items()))
    errors = [(case, e) for case, o in outcomes.items() for e in o.errors]
    if errors:
        print(f"\nERRORS ({len(errors)}), first ones:")
        for case, error in errors[:10]:
            print(f"  {case}: {error}")
    summary = {"started_at": started_at, "machine": info, "vms": args.vms,
               "nodes": args.nodes, "connections": args.connections,
               "duration": args.duration, "warmup": args.warmup, "servers": server_stack(),
               "list_pages": result["pages"], "one_by_one": idle,
               "tcp_nodelay_wrapper": args.tcp_nodelay,
               "cases": {c: o.summary() for c, o in outcomes.items()},
               "errors": len(errors)}
    if result["profile"]:
        text = "\n".join(result["profile"])
        print("\nWhere the time goes (py-spy, sampling the gateway and the control server)")
        print(text)
        if args.profile_out is not None and len(result["profile"]) > 1:
            args.profile_out.parent.mkdir(parents=True, exist_ok=True)
            args.profile_out.write_text(
                f"benchmarks/api_reads.py profile, {started_at}\n{info}\n"
                f"servers: {server_stack()}\n"
                f"command: {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}\n"
                f"deployment: {args.vms} VMs on {args.nodes} sim nodes, control plane as "
                f"separate processes (SQLite)"
                f"{'; TCP_NODELAY forced on (diagnostic)' if args.tcp_nodelay else ''}"
                f"\n\n{text}\n")
            print(f"(written to {args.profile_out})")
        summary["profile"] = result["profile"]
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/api_reads.py",
        description="Authenticated API reads per second through the gateway (GET of one VM "
                    "and a filtered page of 50, with a token and with a signed key pair) "
                    "against the gateway's unauthenticated /healthz in the same run, on "
                    "the control plane of create_throughput.py; then a py-spy profile of "
                    "the gateway and the control server.")
    parser.add_argument("--vms", type=int, default=200, help="VMs to read (default 200)")
    parser.add_argument("--nodes", type=int, default=20, help="sim nodes (default 20)")
    parser.add_argument("--connections", type=int, default=32,
                        help="concurrent keep-alive connections (default 32)")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="measured seconds per case (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds of load before each measurement (default 2)")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated cases to run, of {', '.join(CASES)} "
                             "(default: all; the ratio needs healthz)")
    parser.add_argument("--profile", default="get-token,list-token",
                        help="comma-separated cases to profile with py-spy afterwards "
                             "(default get-token,list-token; 'none' to skip)")
    parser.add_argument("--profile-seconds", type=int, default=10,
                        help="seconds each profile samples (default 10)")
    add_sampling_options(parser)
    parser.add_argument("--profile-out", type=Path,
                        default=RESULTS / f"api_reads-profile-{date.today().isoformat()}.txt",
                        help="where the profile summary is written (default "
                             "benchmarks/results/api_reads-profile-<date>.txt)")
    parser.add_argument("--profile-raw", type=Path, default=None, metavar="DIR",
                        help="also keep py-spy's folded stacks (flamegraph input) in DIR")
    parser.add_argument("--tcp-nodelay", action="store_true",
                        help="diagnostics: start the services through a wrapper that sets "
                             "TCP_NODELAY on the connections they accept (Yun's own sockets "
                             "do so since 2026-11-23); kept to compare with older figures")
    add_deployment_options(parser)
    args = parser.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    args.profile = [] if args.profile.strip() in ("", "none") else \
        [c.strip() for c in args.profile.split(",") if c.strip()]
    for case in [*args.cases, *args.profile]:
        if case not in CASES:
            parser.error(f"unknown case {case!r}; the cases are {', '.join(CASES)}")
    for name in ("vms", "nodes", "connections"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.vms < PAGE_SIZE:
        parser.error(f"--vms must be at least {PAGE_SIZE} (one full page)")
    if args.duration <= 0 or args.warmup < 0 or args.profile_seconds < 1:
        parser.error("--duration and --profile-seconds must be positive, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    started_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    info = machine()
    print(info, flush=True)
    root = Path(tempfile.mkdtemp(prefix="yun-bench-reads-"))
    dep = start_deployment(root, args.nodes, 16, 32768)
    if args.tcp_nodelay:
        for service in dep.services.values():
            assert service.argv[1:3] == ["-m", "yun"], service.argv
            service.argv[1:3] = ["-c", NODELAY_WRAPPER]
    summary = run_then_stop(root, dep, args.keep_logs, lambda: report(
        asyncio.run(measure(dep, args)), args, started_at, info))
    if summary is None:
        return 130
    print(f"benchmark wall time {time.monotonic() - started:.0f} s; {machine()}")
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
