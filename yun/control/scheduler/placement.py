"""Placement (F-BALANCE, T-SCHED, rule 5): choose a node for each VM and hold its capacity.

The scheduler (:mod:`yun.control.scheduler.scheduler`) chooses over frozen
:class:`HostState` snapshots with the filters and weighers of the VM's pool; this module
feeds it and makes its choice real:

* hosts are read per pool from the database (nodes, inventories) with the live loads the
  nodes reported (:class:`LiveLoads`), and kept for ``host_refresh`` seconds (5 s), or
  until a node of the pool changes on this server (up, down, drained, added, removed,
  new capacity): within that time this server's own claims are applied to its copy, so
  consecutive placements see each other; releases and what other servers did are seen
  at the next refresh (a copy showing too little room only places less evenly; one
  showing too much only makes a claim fail and the next candidate be tried);
* the claim is the conditional UPDATE of :func:`inventory.claim`, in the same transaction
  as the VM's node and its address: the one final check, so a stale copy can make a
  placement try another node but never overbook one;
* requests arriving together are placed in one transaction (a batch): one transaction
  per batch instead of per VM is what lets hundreds of concurrent creates through
  SQLite's single writer.

A VM names a pool, or a zone: then the pools of the zone are tried in order of most free
memory. When nothing fits, the answer says why, per pool and per filter.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.db.models import NodeRow, PoolRow, VmGroupRow, VmRow
from yun.control.db.session import Database
from yun.control.scheduler import inventory
from yun.control.scheduler.hoststate import (
    Capacity,
    GroupSpec,
    HostState,
    PoolPolicy,
    RequestSpec,
)
from yun.control.scheduler.loads import LiveLoads
from yun.control.scheduler.scheduler import NoValidHost, Scheduler
from yun.proto.errors import InsufficientCapacity, NotFound
from yun.util.metrics import PLACEMENT_BATCH_SIZE, PLACEMENT_SECONDS

log = logging.getLogger("yun.control.placement")

EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class Request:
    """What a VM asks of a node."""

    vcpus: int
    memory_mb: int
    disk_gb: int
    pool_uuids: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    capabilities: frozenset[str] = frozenset()  # what the node must be able to do
    group_uuid: str | None = None
    exclude: frozenset[str] = frozenset()  # nodes tried already (a provision failed there)

    def amounts(self) -> dict[str, int]:
        return inventory.vm_amounts(self.vcpus, self.memory_mb, self.disk_gb)


@dataclass(frozen=True)
class Placed:
    """Where a VM went, and the next best nodes to try if provisioning there fails."""

    node_uuid: str
    node_name: str
    pool_uuid: str | None
    alternates: tuple[str, ...] = ()


# Called in the placement's transaction for a candidate node (the VM, the node, the pool
# it is placed in, the node's sandbox subnet); returns how to undo it, and raises
# InsufficientCapacity when the node cannot take the VM after all (e.g. its network has
# no free address). The network mode of the pool decides what it does.
OnPlaced = Callable[[AsyncSession, VmRow, str, str, str],
                    Awaitable[Callable[[], Awaitable[None]] | None]]


#: The node capabilities every VM of a pool needs, from the pool's network mode (the
#: network modes live above the scheduler, so the control server hands this in).
PoolNeeds = Callable[[str | None], frozenset[str]]


async def _pool_rows(session: AsyncSession, uuids: Sequence[str]) -> list[PoolRow]:
    """The pools ``uuids`` that exist. One pool (most creates) is looked up by key, so
    a row the session already holds (the create read it) costs no statement."""
    if len(uuids) == 1:
        row = await session.get(PoolRow, uuids[0])
        return [row] if row is not None else []
    if not uuids:
        return []
    return list((await session.scalars(select(PoolRow).where(PoolRow.uuid.in_(uuids)))).all())


def pool_policy(row: PoolRow, needs: PoolNeeds | None = None) -> PoolPolicy:
    """What the scheduler needs of the pool ``row``; ``needs`` gives what its network
    mode asks of a node."""
    return PoolPolicy(uuid=row.uuid, name=row.name, cpu_ratio=row.cpu_ratio,
                      memory_ratio=row.memory_ratio, disk_ratio=row.disk_ratio,
                      filters=tuple(row.filters), weights=MappingProxyType(dict(row.weights)),
                      needs=needs(row.network_mode) if needs is not None else frozenset())


def ratios(policy: PoolPolicy) -> dict[str, float]:
    return {inventory.VCPU: policy.cpu_ratio, inventory.MEMORY_MB: policy.memory_ratio,
            inventory.DISK_GB: policy.disk_ratio}


@dataclass
class _PoolHosts:
    """This server's copy of a pool's hosts, with its own claims applied."""

    read_at: float
    hosts: list[HostState]
    index: dict[str, int]
    subnets: dict[str, str]

    def replace(self, host: HostState) -> None:
        self.hosts[self.index[host.uuid]] = host


class Placement:
    """Chooses nodes for VMs and holds their capacity (see the module docstring)."""

    def __init__(self, db: Database, batch_size: int = 200,
                 on_placed: OnPlaced | None = None, loads: LiveLoads | None = None,
                 host_refresh: float = 5.0, pool_needs: PoolNeeds | None = None) -> None:
        self.db = db
        self.pool_needs = pool_needs
        self.batch_size = batch_size
        # Work that must commit with the placement (the VM's address on that node).
        self.on_placed = on_placed
        self.loads = loads or LiveLoads()
        self.host_refresh = host_refresh
        self._queue: asyncio.Queue[tuple[str, Request, asyncio.Future[Placed]]] = (
            asyncio.Queue())
        self._worker: asyncio.Task[None] | None = None
        self._pools: dict[str, _PoolHosts] = {}
        self._schedulers: dict[str, Scheduler] = {}

    def invalidate(self, pool_uuid: str | None = None) -> None:
        """Forget the copy of a pool's hosts (all pools when None): read them again."""
        if pool_uuid is None:
            self._pools.clear()
        else:
            self._pools.pop(pool_uuid, None)

    async def place(self, vm_uuid: str, req: Request) -> Placed:
        """Reserve ``req`` on the best node for ``vm_uuid`` and record the VM there.

        Raises :class:`InsufficientCapacity` (saying why) when no node fits.
        """
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run(), name="placement")
        future: asyncio.Future[Placed] = asyncio.get_running_loop().create_future()
        start = time.perf_counter()
        outcome = "error"
        try:
            await self._queue.put((vm_uuid, req, future))
            placed = await future
            outcome = "placed"
            return placed
        except InsufficientCapacity:
            outcome = "no_capacity"
            raise
        finally:
            PLACEMENT_SECONDS.labels(outcome).observe(time.perf_counter() - start)

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    async def check(self, session: AsyncSession, req: Request) -> None:
        """Raise :class:`InsufficientCapacity`, saying why, when no node could take ``req``
        now; reserves nothing (the create's own placement is the real claim)."""
        policies = {row.uuid: pool_policy(row, self.pool_needs)
                    for row in await _pool_rows(session, req.pool_uuids)}
        group = await self._group(session, req.group_uuid, {})
        spec = _spec(req, group)
        misses = []
        for pool_uuid in req.pool_uuids:
            policy = policies.get(pool_uuid)
            if policy is None:
                continue
            copy = await self._hosts(session, pool_uuid)
            try:
                self._scheduler(policy).select(copy.hosts, spec, alternates=0,
                                               advance=False)
                return
            except NoValidHost as exc:
                misses.append(exc.explanation)
        raise InsufficientCapacity(_no_node(req, misses))

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            PLACEMENT_BATCH_SIZE.observe(len(batch))
            try:
                async with self.db.session() as session:
                    results = await self._place_batch(session, batch)
            except Exception as exc:  # the transaction failed: nothing was reserved
                self.invalidate()  # the copies hold claims that were not committed
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, _, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def _place_batch(
        self, session: AsyncSession, batch: list[tuple[str, Request, asyncio.Future[Placed]]]
    ) -> list[Placed | Exception]:
        wanted = {p for _, req, _ in batch for p in req.pool_uuids}
        # Held for the whole batch: the session's identity map keeps only rows referenced
        # somewhere, and the placement hook (on_placed) gets its VM's pool from it.
        pool_rows = await _pool_rows(session, sorted(wanted))
        policies = {row.uuid: pool_policy(row, self.pool_needs) for row in pool_rows}
        groups: dict[str, GroupSpec] = {}
        results: list[Placed | Exception] = []
        # The batch's VMs in one query, not one each.
        uuids = [vm_uuid for vm_uuid, _, _ in batch]
        vms = {v.uuid: v for v in (await session.scalars(
            select(VmRow).where(VmRow.uuid.in_(uuids)))).all()}
        members: set[str] = set()  # nodes share-locked by this batch already
        for vm_uuid, req, _ in batch:
            vm = vms.get(vm_uuid)
            if vm is None:
                results.append(NotFound(f"VM {vm_uuid} no longer exists"))
                continue
            if vm.node_uuid:  # placed already (a retried step)
                node = await session.get(NodeRow, vm.node_uuid)
                results.append(Placed(node.uuid, node.name, vm.pool_uuid) if node else
                               NotFound(f"node {vm.node_uuid} is gone"))
                continue
            try:
                group = await self._group(session, req.group_uuid, groups)
                results.append(await self._reserve(session, vm, req, policies, group,
                                                   groups, members))
            except InsufficientCapacity as exc:
                results.append(exc)
        return results

    async def _group(self, session: AsyncSession, group_uuid: str | None,
                     groups: dict[str, GroupSpec]) -> GroupSpec | None:
        """The VM's group with the nodes its members are on (read once per batch)."""
        if group_uuid is None:
            return None
        if group_uuid not in groups:
            row = await session.get(VmGroupRow, group_uuid)
            if row is None:
                raise InsufficientCapacity(f"VM group {group_uuid} no longer exists")
            nodes = (await session.scalars(
                select(VmRow.node_uuid).where(VmRow.group_uuid == group_uuid)
                .where(VmRow.node_uuid.is_not(None)).distinct())).all()
            groups[group_uuid] = GroupSpec(uuid=row.uuid, name=row.name, policy=row.policy,
                                           node_uuids=frozenset(n for n in nodes if n))
        return groups[group_uuid]

    async def _reserve(self, session: AsyncSession, vm: VmRow, req: Request,
                       policies: dict[str, PoolPolicy], group: GroupSpec | None,
                       groups: dict[str, GroupSpec], members: set[str]) -> Placed:
        spec = _spec(req, group)
        amounts = req.amounts()
        misses: list[str] = []
        known = [p for p in req.pool_uuids if p in policies]
        if not known:
            raise InsufficientCapacity("the VM's pool no longer exists")
        pools = {p: await self._hosts(session, p) for p in known}
        if len(known) > 1:  # a zone: the pool with the most free memory first
            known.sort(key=lambda p: -_free_memory(pools[p].hosts, policies[p]))
        for pool_uuid in known:
            policy, copy = policies[pool_uuid], pools[pool_uuid]
            hosts = copy.hosts if not req.exclude else [
                h for h in copy.hosts if h.uuid not in req.exclude]
            try:
                chosen = self._scheduler(policy).select(hosts, spec, alternates=3)
            except NoValidHost as exc:
                misses.append(exc.explanation)
                continue
            for i, host in enumerate(chosen):
                undo = None
                if self.on_placed is not None:
                    try:
                        undo = await self.on_placed(session, vm, host.uuid, pool_uuid,
                                                    copy.subnets.get(host.uuid, ""))
                    except InsufficientCapacity:
                        continue  # e.g. the node's network has no free address
                if (await _still_member(session, host.uuid, pool_uuid, members)
                        and await inventory.claim(session, host.uuid, amounts,
                                                  ratios(policy))):
                    await inventory.allocate(session, vm.uuid, host.uuid, amounts)
                    copy.replace(host.claimed(spec))
                    vm.node_uuid, vm.pool_uuid = host.uuid, pool_uuid
                    if group is not None:
                        groups[group.uuid] = GroupSpec(
                            uuid=group.uuid, name=group.name, policy=group.policy,
                            node_uuids=group.node_uuids | {host.uuid})
                    return Placed(host.uuid, host.name, pool_uuid,
                                  tuple(h.uuid for h in chosen[i + 1:]))
                if undo is not None:
                    await undo()
                # Another control server filled the node meanwhile: read it again soon.
                log.info("node filled meanwhile; trying the next", extra={
                    "vm": vm.uuid, "node": host.uuid, "pool": policy.name})
                copy.read_at = 0.0
            misses.append(f"pool {policy.name}: the nodes chosen were filled meanwhile")
        raise InsufficientCapacity(_no_node(req, misses))

    def _scheduler(self, policy: PoolPolicy) -> Scheduler:
        current = self._schedulers.get(policy.uuid)
        if current is None or current.pool != policy:
            current = self._schedulers[policy.uuid] = Scheduler(policy)
        return current

    async def _hosts(self, session: AsyncSession, pool_uuid: str) -> _PoolHosts:
        copy = self._pools.get(pool_uuid)
        now = time.monotonic()
        if copy is not None and now - copy.read_at < self.host_refresh:
            return copy
        copy = await self.read_pool(session, pool_uuid)
        self._pools[pool_uuid] = copy
        return copy

    async def read_pool(self, session: AsyncSession, pool_uuid: str) -> _PoolHosts:
        """The pool's hosts as the database and the live loads have them now."""
        rows = (await session.execute(
            select(NodeRow.uuid, NodeRow.name, NodeRow.status, NodeRow.admin_state,
                   NodeRow.labels, NodeRow.capabilities, NodeRow.sandbox_subnet,
                   NodeRow.cpu_load, NodeRow.memory_used_mb, NodeRow.disk_used_gb,
                   NodeRow.net_load)
            .where(NodeRow.pool_uuid == pool_uuid).order_by(NodeRow.uuid))).all()
        inv = await inventory.inventories(session, [r.uuid for r in rows])
        hosts: list[HostState] = []
        subnets: dict[str, str] = {}
        for r in rows:
            classes = inv.get(r.uuid, {})
            live = self.loads.get(r.uuid)
            hosts.append(HostState(
                uuid=r.uuid, name=r.name, pool_uuid=pool_uuid, up=r.status == "up",
                active=r.admin_state == "active",
                vcpu=_capacity(classes, inventory.VCPU),
                memory_mb=_capacity(classes, inventory.MEMORY_MB),
                disk_gb=_capacity(classes, inventory.DISK_GB),
                cpu_load=live.cpu if live else r.cpu_load,
                memory_used_mb=live.memory_used_mb if live else r.memory_used_mb,
                disk_used_gb=live.disk_used_gb if live else r.disk_used_gb,
                net_load=live.net if live else r.net_load,
                labels=MappingProxyType(dict(r.labels or {})),
                capabilities=frozenset(r.capabilities or ())))
            subnets[r.uuid] = r.sandbox_subnet or ""
        return _PoolHosts(time.monotonic(), hosts, {h.uuid: i for i, h in enumerate(hosts)},
                          subnets)


def _spec(req: Request, group: GroupSpec | None) -> RequestSpec:
    return RequestSpec(vcpus=req.vcpus, memory_mb=req.memory_mb, disk_gb=req.disk_gb,
                       labels=req.labels, capabilities=req.capabilities, group=group)


def _no_node(req: Request, misses: list[str]) -> str:
    return (f"no node can host {req.vcpus} vCPU, {req.memory_mb} MiB memory, "
            f"{req.disk_gb} GiB disk: " + ("; ".join(misses) or "no pool to place it in"))


async def _still_member(session: AsyncSession, node_uuid: str, pool_uuid: str,
                        members: set[str]) -> bool:
    """Whether the node is still an active member of the pool, holding a share lock on
    its row until the placement commits (PostgreSQL; SQLite serialises writers): a drain
    or a removal from the pool waits for this placement, or this one sees it. Asked once
    per node and batch: ``members`` holds the nodes this batch has locked already."""
    if node_uuid in members:
        return True
    with session.no_autoflush:  # the batch's pending rows are flushed once, at its end
        found = await session.scalar(
            select(NodeRow.uuid).where(NodeRow.uuid == node_uuid)
            .where(NodeRow.pool_uuid == pool_uuid).where(NodeRow.admin_state == "active")
            .where(NodeRow.status == "up").with_for_update(read=True))
    if found is None:
        return False
    members.add(node_uuid)
    return True


def _capacity(classes: Mapping[str, tuple[int, int, int]], rc: str) -> Capacity:
    total, reserved, used = classes.get(rc, (0, 0, 0))
    return Capacity(total=total, reserved=reserved, used=used)


def _free_memory(hosts: list[HostState], policy: PoolPolicy) -> int:
    return sum(max(h.memory_mb.free(policy.memory_ratio), 0)
               for h in hosts if h.up and h.active)

