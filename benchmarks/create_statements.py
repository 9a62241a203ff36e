#!/usr/bin/env python3
"""SQL statements the control server runs per VM created (issue 10), grouped by shape.

Starts an in-process sim cluster (``--nodes`` nodes, SQLite), uploads a small image,
creates one VM to warm up, then creates ``--vms`` VMs (``--concurrency`` in flight) and
waits for their tasks, counting every statement the control server's engine sends
(SQLAlchemy's ``before_cursor_execute``). Prints the statements per create, and the
most frequent shapes (values replaced by ``?``) with their count per create. The count
includes the polls of the tasks that wait for the creates (a few per create), and the
node reports that arrive meanwhile.

The profiles of the create path lose their callers in SQLAlchemy's greenlets; this
says which statements the CPU goes to. Run:
``PYTHONPATH=. .venv/bin/python benchmarks/create_statements.py`` under
``flock /tmp/yun-bench.lock``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import event

from yun.testing.cluster import SimCluster

_SPACES = re.compile(r"\s+")
_VALUES = re.compile(r"\(\?(, \?)*\)")


def shape(sql: str, width: int = 150) -> str:
    """A statement with its whitespace folded and its value lists shortened."""
    return _VALUES.sub("(?..)", _SPACES.sub(" ", sql))[:width]


async def run(vms: int, nodes: int, concurrency: int, top: int) -> None:
    with tempfile.TemporaryDirectory(prefix="yun-stmts-") as tmp:
        root = Path(tmp)
        image = root / "small.qcow2"
        await asyncio.to_thread(subprocess.run, ["qemu-img", "create", "-q", "-f", "qcow2",
                                                 str(image), "64M"], check=True)
        cluster = SimCluster(root / "cluster", nodes=nodes)
        await cluster.start()
        try:
            assert cluster.api is not None and cluster.control is not None
            resp = await cluster.api.post(
                "/api/v1/images", params={"name": "img"},
                content=await asyncio.to_thread(image.read_bytes),
                headers={"Content-Type": "application/octet-stream"})
            resp.raise_for_status()
            warm = (await cluster.api.post("/api/v1/vms", json={"name": "warm",
                                                                "image": "img"})).json()
            await cluster.wait_task(warm["task"]["uuid"])
            seen: list[str] = []

            def count(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
                seen.append(sql)

            engine = cluster.control.ctx.db.engine.sync_engine
            event.listen(engine, "before_cursor_execute", count)
            gate = asyncio.Semaphore(concurrency)

            async def create(i: int) -> str:
                assert cluster.api is not None
                async with gate:
                    resp = await cluster.api.post("/api/v1/vms", json={"name": f"s-{i:05d}",
                                                                       "image": "img"})
                    resp.raise_for_status()
                    return str(resp.json()["task"]["uuid"])

            try:
                tasks = await asyncio.gather(*(create(i) for i in range(vms)))
                await cluster.wait_tasks(list(tasks))
            finally:
                event.remove(engine, "before_cursor_execute", count)
        finally:
            await cluster.stop()
    shapes = collections.Counter(shape(sql) for sql in seen)
    print(f"{vms} creates on {nodes} sim nodes, {concurrency} in flight (SQLite, in-process)")
    print(f"statements per create: {len(seen) / vms:.1f}")
    for text, n in shapes.most_common(top):
        print(f"{n / vms:5.2f}  {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=100, help="VMs created (default 100)")
    parser.add_argument("--nodes", type=int, default=4, help="sim nodes (default 4)")
    parser.add_argument("--concurrency", type=int, default=20,
                        help="creates in flight (default 20)")
    parser.add_argument("--top", type=int, default=40, help="shapes listed (default 40)")
    args = parser.parse_args()
    asyncio.run(run(args.vms, args.nodes, args.concurrency, args.top))


if __name__ == "__main__":
    main()
