"""Cost of the metrics middleware per request (yun.util.metrics, issue 10).

Calls a FastAPI app directly through ASGI (no sockets: only the app's own work) 10,000
times with and without :func:`install_metrics`, in alternating rounds so that the load
of a shared machine disturbs both alike, and prints the best round of each and the
difference in microseconds per request.

    python benchmarks/metrics_overhead.py [--requests 10000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from fastapi import FastAPI

from yun.util.metrics import install_metrics


def make_app(with_metrics: bool) -> FastAPI:
    app = FastAPI()

    @app.get("/api/v1/vms/{ref}")
    async def vm(ref: str) -> dict[str, str]:
        return {"ref": ref}

    if with_metrics:
        install_metrics(app, "bench")
    return app


async def run(app: FastAPI, requests: int) -> float:
    """Seconds for ``requests`` GETs of one route through ``app``."""
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200, message

    start = time.perf_counter()
    for i in range(requests):
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "GET", "scheme": "http", "path": f"/api/v1/vms/web-{i % 100}",
                 "raw_path": b"", "root_path": "", "query_string": b"", "headers": [],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        await app(scope, receive, send)  # type: ignore[arg-type]
    return time.perf_counter() - start


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    plain, metered = make_app(False), make_app(True)
    await run(plain, 500)  # warm up both (route compilation, label children)
    await run(metered, 500)
    best = {"without": float("inf"), "with": float("inf")}
    for _ in range(args.rounds):
        best["without"] = min(best["without"], await run(plain, args.requests))
        best["with"] = min(best["with"], await run(metered, args.requests))
    per = {k: v / args.requests * 1e6 for k, v in best.items()}
    print(f"{args.requests} requests, best of {args.rounds} rounds")
    print(f"without metrics: {per['without']:.1f} us/request")
    print(f"with metrics:    {per['with']:.1f} us/request")
    print(f"added:           {per['with'] - per['without']:.1f} us/request")


if __name__ == "__main__":
    asyncio.run(main())
