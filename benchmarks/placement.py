#!/usr/bin/env python3
"""Placement decisions per second of the pure scheduler: 10,000 nodes, 100,000 VMs.

Builds ``--nodes`` :class:`HostState` snapshots in ``--pools`` pools (sizes, labels,
capabilities and real-time loads varied with a fixed seed), places ``--vms`` VMs'
worth of usage on them, then times ``--selects`` placements the way the placement
batch makes them: pick a pool (round robin), :meth:`Scheduler.select` over that pool's
hosts, and replace the chosen host by :meth:`HostState.claimed`. A share of the
requests belongs to anti-affinity groups and a share asks for a label, so those
filters are exercised too.

Prints placements per second, the time per select (median, 99th percentile), the
memory the snapshots take (tracemalloc), and how widely the placements spread. No
database: the lead's DB-backed mode (reading the snapshots, the conditional UPDATE
claim) comes on top of this.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/placement.py``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import tracemalloc
from collections import Counter

from yun.control.scheduler.hoststate import (
    Capacity,
    GroupSpec,
    HostState,
    PoolPolicy,
    RequestSpec,
)
from yun.control.scheduler.scheduler import NoValidHost, Scheduler

# (vCPUs, MiB, GiB) of the VMs placed beforehand and asked for in the timed part.
FLAVOURS = [(1, 512, 10), (1, 1024, 20), (2, 2048, 20), (2, 4096, 40), (4, 8192, 80)]
# Host sizes: (cores, MiB, GiB).
SIZES = [(32, 131072, 2000), (48, 196608, 4000), (64, 262144, 4000)]


def build(nodes: int, pools: int, vms: int, rng: random.Random
          ) -> tuple[list[PoolPolicy], list[list[HostState]]]:
    """``pools`` pools and their hosts, with ``vms`` VMs' worth of usage spread over them."""
    policies = [PoolPolicy(uuid=f"pool-{p}", name=f"p{p}") for p in range(pools)]
    used: list[list[int]] = [[0, 0, 0] for _ in range(nodes)]
    for _ in range(vms):
        flavour = rng.choice(FLAVOURS)
        slot = used[rng.randrange(nodes)]
        for k in range(3):
            slot[k] += flavour[k]
    members: list[list[HostState]] = [[] for _ in range(pools)]
    for i in range(nodes):
        cores, mib, gib = rng.choice(SIZES)
        v, m, d = used[i]
        labels = {"ssd": "true"} if i % 3 == 0 else {}
        members[i % pools].append(HostState(
            uuid=f"node-{i:05d}", name=f"n{i}", pool_uuid=policies[i % pools].uuid,
            up=rng.random() > 0.01, active=rng.random() > 0.01,
            vcpu=Capacity(cores, 2, v), memory_mb=Capacity(mib, 4096, m),
            disk_gb=Capacity(gib, 50, d),
            cpu_load=rng.random(), memory_used_mb=int(m * rng.uniform(0.5, 1.0)),
            disk_used_gb=int(d * rng.uniform(0.2, 0.8)), net_load=rng.random() * 0.5,
            labels=labels, capabilities=frozenset({"live_migration", "qos"}),
        ))
    return policies, members


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--pools", type=int, default=10)
    parser.add_argument("--vms", type=int, default=100_000)
    parser.add_argument("--selects", type=int, default=5_000)
    parser.add_argument("--min-feasible", type=int, default=100)
    parser.add_argument("--percentage", type=float, default=None,
                        help="share of a pool to find feasible (default: adaptive)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    policies, members = build(args.nodes, args.pools, args.vms, rng)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    size = sum(s.size_diff for s in after.compare_to(before, "filename"))
    print(f"{args.nodes} host snapshots in {args.pools} pools, {args.vms} VMs of usage: "
          f"{size / 2**20:.1f} MiB ({size / args.nodes:.0f} B per host)")

    schedulers = [Scheduler(p, min_feasible=args.min_feasible, percentage=args.percentage)
                  for p in policies]
    index = [{h.uuid: i for i, h in enumerate(hosts)} for hosts in members]
    groups = [GroupSpec(uuid=f"g{p}", name=f"web{p}", policy="anti-affinity")
              for p in range(args.pools)]
    sample = schedulers[0].sample_size(len(members[0]))
    print(f"pool size {len(members[0])}, feasible sample {sample}")

    chosen: Counter[str] = Counter()
    times: list[float] = []
    refused: Counter[str] = Counter()
    started, cpu_started = time.perf_counter(), time.process_time()
    for n in range(args.selects):
        p = n % args.pools
        vcpus, mib, gib = FLAVOURS[n % len(FLAVOURS)]
        group = groups[p] if (n // args.pools) % 10 == 0 else None  # a tenth per pool
        labels = {"ssd": "true"} if n % 7 == 0 else {}
        spec = RequestSpec(vcpus, mib, gib, labels=labels, group=group)
        t0 = time.perf_counter()
        try:
            best = schedulers[p].select(members[p], spec)[0]
        except NoValidHost as exc:
            refused[exc.explanation] += 1
            continue
        i = index[p][best.uuid]
        members[p][i] = best.claimed(spec)
        times.append(time.perf_counter() - t0)
        chosen[best.uuid] += 1
        if group is not None:
            groups[p] = GroupSpec(group.uuid, group.name, group.policy,
                                  group.node_uuids | {best.uuid})
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    times.sort()
    print(f"{args.selects} selects + claims in {elapsed:.2f} s: "
          f"{args.selects / elapsed:.0f} placements/s "
          f"({args.selects / cpu:.0f} per CPU second; the machine is shared)")
    print(f"per select: median {statistics.median(times) * 1e3:.3f} ms, "
          f"p99 {times[int(len(times) * 0.99)] * 1e3:.3f} ms, max {times[-1] * 1e3:.3f} ms")
    print(f"refused {sum(refused.values())}; {len(chosen)} distinct hosts chosen, "
          f"most on one host {max(chosen.values(), default=0)}")
    for explanation, count in refused.most_common(3):
        print(f"  {count} x {explanation}")


if __name__ == "__main__":
    main()
