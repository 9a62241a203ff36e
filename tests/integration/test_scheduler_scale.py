"""The scheduler at scale (issue 7, "Scheduler on `sim`").

1. The placement layer on a real database (SQLite, and PostgreSQL when
   ``YUN_TEST_POSTGRES_URL`` is set), no HTTP: 10,000 nodes in 10 pools over 2 zones and
   2,000 concurrent :meth:`Placement.place` calls mixing plain requests, zone requests,
   an aggregate (node labels), anti-affinity and affinity groups. Then, from the
   database: no node overbooked with its pool's ratios, ``used`` equal to the sum of the
   allocations, allocations equal to the VMs' sizes, the groups and labels honoured, a
   drained node given nothing, and a group bigger than its pool refused by name.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pytest
from sqlalchemy import select

from yun.control.db.models import (
    AllocationRow,
    ImageRow,
    InventoryRow,
    NodeRow,
    PoolRow,
    ProjectRow,
    VmGroupRow,
    VmRow,
    ZoneRow,
)
from yun.control.db.session import Database, downgrade
from yun.control.scheduler import inventory
from yun.control.scheduler.hoststate import DEFAULT_FILTERS, DEFAULT_WEIGHTS
from yun.control.scheduler.placement import Placed, Placement, Request
from yun.proto.errors import InsufficientCapacity

POSTGRES_URL = os.environ.get("YUN_TEST_POSTGRES_URL", "")

# -- part 1: the placement layer at full scale ---------------------------------------------

NODES = 10_000
POOLS = 10
SMALL_POOL_NODES = 28  # pool s9: where the too-big anti-affinity group goes
# (vCPU ratio, memory ratio) per pool: each pool's own template.
RATIOS = [(4.0, 1.0), (1.0, 1.0), (2.0, 1.5), (4.0, 1.0), (8.0, 1.0),
          (4.0, 1.2), (2.0, 1.0), (1.5, 1.0), (3.0, 1.0), (1.0, 1.0)]
LABELLED_POOL = 1  # 10 % of its nodes carry ssd=true, and are small: they fill up
DRAINED_POOL = 0
DRAINED = 5
LABEL_REQUESTS = 300
SPREAD_MEMBERS = 150  # anti-affinity group in pool s2: fits, on distinct nodes
BIG_MEMBERS = SMALL_POOL_NODES + 8  # anti-affinity group in s9: 8 more than its nodes
PACK_MEMBERS = 12  # affinity group in pool s3: all on one node
ZONE_REQUESTS = 200  # per zone
TOTAL_REQUESTS = 2_000
SIZES = [(1, 1024, 10), (2, 2048, 20), (4, 4096, 40)]


@dataclass
class Fleet:
    """What the scale test built: the database, its pools, zones, nodes and VMs."""

    db: Database
    pools: list[str]  # pool uuids, s0..s9
    zones: dict[str, tuple[str, ...]]  # zone name -> its pools' uuids
    drained: set[str]
    labelled: set[str]
    groups: dict[str, str]  # group name -> uuid
    requests: dict[str, tuple[str, Request]] = field(default_factory=dict)  # vm -> kind, req


async def build_fleet(url: str) -> Fleet:
    """10,000 nodes in 10 pools over 2 zones, their inventories written by the node
    registry's own ``sync_inventory``; the VMs to place and their groups."""
    db = Database(url)
    await db.migrate()
    rng = random.Random(7)
    async with db.session() as s:
        project = (await s.scalars(select(ProjectRow.uuid))).first()
        assert project is not None
        zones = {name: str(uuid.uuid4()) for name in ("east", "west")}
        for name, zone_uuid in zones.items():
            s.add(ZoneRow(uuid=zone_uuid, name=name, description=""))
        await s.flush()  # no ORM relationships: the rows go in the order flushed
        pools = [str(uuid.uuid4()) for _ in range(POOLS)]
        for p, pool_uuid in enumerate(pools):
            cpu_ratio, memory_ratio = RATIOS[p]
            s.add(PoolRow(uuid=pool_uuid, name=f"s{p}", description="",
                          zone_uuid=zones["east" if p < POOLS // 2 else "west"],
                          network_mode="sandbox-private", storage_mode="local", thin=True,
                          ha=False, qos_level="medium", cpu_ratio=cpu_ratio,
                          memory_ratio=memory_ratio, disk_ratio=1.0,
                          filters=list(DEFAULT_FILTERS), weights=dict(DEFAULT_WEIGHTS)))
        await s.flush()
        big_pool_size = (NODES - SMALL_POOL_NODES) // (POOLS - 1)
        drained: set[str] = set()
        labelled: set[str] = set()
        reported: dict[str, dict[str, tuple[int, int]]] = {}
        for i in range(NODES):
            p = min(i // big_pool_size, POOLS - 1)
            index = i - p * big_pool_size
            node_uuid = f"node-{i:05d}"
            labels: dict[str, str] = {}
            admin_state = "active"
            load = rng.uniform(0.2, 0.9)
            vcpus = (16, 1) if i % 2 else (8, 1)
            memory = (32768, 2048)
            if p == LABELLED_POOL and index % 10 == 0:
                labels = {"ssd": "true", "rack": str(index % 7)}
                vcpus = (4, 0)  # two 2-vCPU VMs at this pool's ratio 1.0
                labelled.add(node_uuid)
            if p == DRAINED_POOL and index < DRAINED:
                admin_state = "drained"
                load = 0.0  # the weighers would pick it first if the filter let them
                drained.add(node_uuid)
            if p == POOLS - 1:
                vcpus, memory = (2, 0), (8192, 0)
            s.add(NodeRow(uuid=node_uuid, name=f"n{i:05d}", url=f"https://n{i}.test",
                          status="up", admin_state=admin_state, pool_uuid=pools[p],
                          labels=labels, capabilities=["qos"], hypervisor="sim",
                          accel="sim", nat_subnet="10.77.0.0/24", cpu_load=load,
                          net_load=load / 2))
            reported[node_uuid] = {inventory.VCPU: vcpus, inventory.MEMORY_MB: memory,
                                   inventory.DISK_GB: (1000, 20)}
        assert len(labelled) >= 100 and len(drained) == DRAINED
        await s.flush()
        for node_uuid, classes in reported.items():
            # A node's first report: nothing known yet (the registry's own path).
            assert await inventory.sync_inventory(s, node_uuid, classes, known={})
        s.add(ImageRow(uuid="img", name="img", status="active", project_uuid=project))
        groups: dict[str, str] = {}
        for name, policy in (("spread", "anti-affinity"), ("big", "anti-affinity"),
                             ("pack", "affinity")):
            groups[name] = str(uuid.uuid4())
            s.add(VmGroupRow(uuid=groups[name], name=name, description="",
                             project_uuid=project, policy=policy))
    fleet = Fleet(db, pools, {z: tuple(pools[:5] if z == "east" else pools[5:])
                              for z in zones}, drained, labelled, groups)

    def one(p: int) -> tuple[str, ...]:
        return (pools[p],)

    wanted: list[tuple[str, Request]] = []
    wanted += [("label", Request(2, 1024, 10, one(LABELLED_POOL), labels={"ssd": "true"}))
               for _ in range(LABEL_REQUESTS)]
    wanted += [("spread", Request(1, 1024, 10, one(2), group_uuid=groups["spread"]))
               for _ in range(SPREAD_MEMBERS)]
    wanted += [("big", Request(1, 512, 10, one(POOLS - 1), group_uuid=groups["big"]))
               for _ in range(BIG_MEMBERS)]
    wanted += [("pack", Request(1, 1024, 10, one(3), group_uuid=groups["pack"]))
               for _ in range(PACK_MEMBERS)]
    wanted += [(f"zone:{z}", Request(*SIZES[k % 3], fleet.zones[z]))
               for z in ("east", "west") for k in range(ZONE_REQUESTS)]
    k = 0
    while len(wanted) < TOTAL_REQUESTS:  # plain, round robin over all but the small pool
        wanted.append(("plain", Request(*SIZES[k % 3], one(k % (POOLS - 1)))))
        k += 1
    rng.shuffle(wanted)
    async with db.session() as s:
        for n, (kind, req) in enumerate(wanted):
            vm_uuid = str(uuid.uuid4())
            fleet.requests[vm_uuid] = (kind, req)
            s.add(VmRow(uuid=vm_uuid, name=f"vm-{n:04d}", state="building", vcpus=req.vcpus,
                        memory_mb=req.memory_mb, disk_gb=req.disk_gb, image_uuid="img",
                        project_uuid=project, pool_uuid=req.pool_uuids[0],
                        group_uuid=req.group_uuid, node_labels=dict(req.labels)))
    return fleet


async def place_all(fleet: Fleet, label: str) -> dict[str, Placed | Exception]:
    """Every request at once through one placement; prints the rate seen."""
    placement = Placement(fleet.db)
    started = time.perf_counter()
    answers = await asyncio.gather(*(placement.place(vm, req)
                                     for vm, (_, req) in fleet.requests.items()),
                                   return_exceptions=True)
    elapsed = time.perf_counter() - started
    await placement.stop()
    placed = sum(isinstance(a, Placed) for a in answers)
    print(f"\n[{label}] {len(answers)} concurrent placements over {NODES} nodes in "
          f"{elapsed:.1f} s: {len(answers) / elapsed:.0f} placements/s "
          f"({placed} placed, {len(answers) - placed} refused)")
    return dict(zip(fleet.requests, answers, strict=True))


async def check_fleet(fleet: Fleet, answers: dict[str, Placed | Exception]) -> None:
    """What the database holds after the placements, against what each request asked."""
    unexpected = [a for a in answers.values()
                  if not isinstance(a, Placed | InsufficientCapacity)]
    assert not unexpected, unexpected[:3]
    async with fleet.db.session() as s:
        ratios = {p.uuid: {inventory.VCPU: p.cpu_ratio, inventory.MEMORY_MB: p.memory_ratio,
                           inventory.DISK_GB: p.disk_ratio}
                  for p in (await s.scalars(select(PoolRow))).all()}
        node_pool = dict((await s.execute(select(NodeRow.uuid, NodeRow.pool_uuid))).all())
        inventories = (await s.scalars(select(InventoryRow))).all()
        allocations = (await s.scalars(select(AllocationRow))).all()
        vms = {v.uuid: v for v in (await s.scalars(select(VmRow))).all()}

    # No node overbooked, with its pool's ratios; used is exactly what is allocated there.
    allocated: Counter[tuple[str, str]] = Counter()
    for a in allocations:
        allocated[(a.node_uuid, a.resource_class)] += a.amount
    free_vcpu: dict[str, int] = {}
    for inv in inventories:
        ratio = ratios[node_pool[inv.node_uuid]][inv.resource_class]
        usable = int((inv.total - inv.reserved) * ratio)
        assert inv.used <= usable, (inv.node_uuid, inv.resource_class, inv.used, usable)
        assert inv.used == allocated[(inv.node_uuid, inv.resource_class)], (
            inv.node_uuid, inv.resource_class)
        if inv.resource_class == inventory.VCPU:
            free_vcpu[inv.node_uuid] = usable - inv.used
    assert len(inventories) == 3 * NODES

    # Each placed VM: on the node the answer named, in a pool it asked for, holding
    # exactly its size there; each refused VM holds nothing.
    held: dict[str, dict[str, tuple[str, int]]] = defaultdict(dict)
    for a in allocations:
        held[a.consumer_uuid][a.resource_class] = (a.node_uuid, a.amount)
    placed: dict[str, list[str]] = defaultdict(list)  # kind -> nodes
    refused: dict[str, list[str]] = defaultdict(list)  # kind -> explanations
    for vm_uuid, answer in answers.items():
        kind, req = fleet.requests[vm_uuid]
        vm = vms[vm_uuid]
        if isinstance(answer, InsufficientCapacity):
            refused[kind].append(str(answer))
            assert vm.node_uuid is None and vm_uuid not in held
            continue
        assert isinstance(answer, Placed)
        assert vm.node_uuid == answer.node_uuid and vm.pool_uuid == answer.pool_uuid
        assert answer.pool_uuid in req.pool_uuids
        assert node_pool[answer.node_uuid] == answer.pool_uuid
        assert held[vm_uuid] == {
            inventory.VCPU: (vm.node_uuid, req.vcpus),
            inventory.MEMORY_MB: (vm.node_uuid, req.memory_mb),
            inventory.DISK_GB: (vm.node_uuid, req.disk_gb)}
        assert answer.node_uuid not in answer.alternates
        placed[kind].append(answer.node_uuid)
    assert set(held) <= set(vms)  # no allocation without its VM

    # Only the aggregate's requests (whose nodes fill up) and the too-big group may be
    # refused; every other request had room and got it.
    assert set(refused) <= {"label", "big"}, {k: v[:1] for k, v in refused.items()}
    # Anti-affinity: distinct nodes; the group bigger than its pool gets one VM per node,
    # the rest are refused by the group's name.
    assert len(placed["spread"]) == SPREAD_MEMBERS == len(set(placed["spread"]))
    assert len(placed["big"]) == SMALL_POOL_NODES == len(set(placed["big"]))
    assert len(refused["big"]) == BIG_MEMBERS - SMALL_POOL_NODES
    for text in refused["big"]:
        assert (f"pool s{POOLS - 1}: {SMALL_POOL_NODES} nodes; {SMALL_POOL_NODES} excluded "
                "by anti-affinity group big") in text, text
    # Affinity: one node.
    assert len(placed["pack"]) == PACK_MEMBERS and len(set(placed["pack"])) == 1
    # The aggregate: only labelled nodes; a refusal only once every labelled node is full.
    assert placed["label"] and set(placed["label"]) <= fleet.labelled
    assert len(placed["label"]) <= 2 * len(fleet.labelled)
    if refused["label"]:
        assert all(free_vcpu[n] < 2 for n in fleet.labelled)
        for text in refused["label"]:
            assert "missing labels ssd=true" in text and "short of vCPU" in text, text
    # Zones: a pool of the zone (checked above), and both zones used.
    assert len(placed["zone:east"]) == len(placed["zone:west"]) == ZONE_REQUESTS
    # A drained node got nothing, though it was the least loaded of its pool.
    every_node = {n for nodes in placed.values() for n in nodes}
    assert not fleet.drained & every_node
    assert all(allocated[(n, rc)] == 0 for n in fleet.drained
               for rc in inventory.RESOURCE_CLASSES)
    assert all(node_pool[n] == fleet.pools[DRAINED_POOL] for n in fleet.drained)


async def scale(url: str, label: str) -> None:
    started = time.perf_counter()
    fleet = await build_fleet(url)
    print(f"\n[{label}] {NODES} nodes, {POOLS} pools, {len(fleet.requests)} VMs written in "
          f"{time.perf_counter() - started:.1f} s")
    try:
        answers = await place_all(fleet, label)
        await check_fleet(fleet, answers)
    finally:
        await fleet.db.dispose()


async def test_10000_nodes_2000_concurrent_placements_sqlite(tmp_path) -> None:  # type: ignore[no-untyped-def]
    await scale(f"sqlite+aiosqlite:///{tmp_path}/scale.db", "sqlite")


@pytest.mark.postgres
@pytest.mark.skipif(not POSTGRES_URL, reason="YUN_TEST_POSTGRES_URL is not set")
async def test_10000_nodes_2000_concurrent_placements_postgres() -> None:
    await asyncio.to_thread(downgrade, POSTGRES_URL, "base")  # a schema made afresh
    await scale(POSTGRES_URL, "postgres")
