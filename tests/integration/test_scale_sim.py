"""500 VMs created at once on 50 simulated nodes: all run, no node is overbooked."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from tests.integration.conftest import upload
from yun.testing.cluster import SimCluster


async def test_500_vms_on_50_nodes(tmp_path: Path, small_qcow2: Path) -> None:
    cluster = SimCluster(tmp_path, nodes=50, report_interval=3.0, heartbeat_interval=1.0,
                         ttl=10.0)
    await cluster.start()
    try:
        api = cluster.api
        assert api is not None
        await upload(cluster, small_qcow2)
        # 16 vCPU and 32 GiB per node: 50 nodes hold 800 such 1 vCPU / 512 MiB VMs by
        # vCPU, 3,200 by memory — room for 500, but only if placement spreads them.
        sem = asyncio.Semaphore(100)

        async def create(i: int) -> str:
            async with sem:
                resp = await api.post("/api/v1/vms", json={
                    "name": f"vm-{i:03d}", "image": "img", "vcpus": 1, "memory_mb": 512})
                assert resp.status_code == 202, resp.text
                return str(resp.json()["task"]["uuid"])

        tasks = await asyncio.gather(*(create(i) for i in range(500)))
        results = await cluster.wait_tasks(tasks, timeout=300)
        failed = [r for r in results if r["state"] != "succeeded"]
        assert not failed, [(f["error"], f["current_step"]) for f in failed[:5]]

        vms = []
        for offset in range(0, 500, 250):
            page = (await api.get("/api/v1/vms", params={"limit": 250, "offset": offset})).json()
            vms.extend(page["items"])
        assert len(vms) == 500 and all(v["state"] == "running" for v in vms)
        assert len({(v["node_uuid"], v["ip"]) for v in vms}) == 500

        per_node = Counter(v["node_uuid"] for v in vms)
        nodes = (await api.get("/api/v1/nodes", params={"limit": 100})).json()["items"]
        assert len(nodes) == 50
        for node in nodes:
            assert node["vcpus_reserved"] <= node["vcpus"]
            assert node["memory_reserved_mb"] <= node["memory_mb"]
            assert node["vcpus_reserved"] == per_node[node["uuid"]]
        # Least-loaded placement spreads evenly: 10 per node, give or take one.
        assert max(per_node.values()) - min(per_node.values()) <= 2
        # What the nodes really run matches the records.
        running = sum(len(n.agent.driver.domains) for n in cluster.node_services)  # type: ignore[attr-defined]
        assert running == 500
    finally:
        await cluster.stop()
