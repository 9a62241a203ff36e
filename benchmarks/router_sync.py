#!/usr/bin/env python3
"""Router rule sync for 10,000 mappings, and forwarding through a router namespace.

1. Sync (run inside a fresh network namespace "router"): the rule set of ``--mappings``
   mappings (half mono, half share) computed by the pure
   :func:`~yun.control.network.router_rules.rule_set` from rows; the full sync at start
   (the whole ``yun_router`` table in one ``nft -j`` transaction); one incremental change
   (one mapping moved to another VM: element deletions and additions in one
   transaction); and the periodic drift check (``nft -j list table`` parsed and
   compared). Each timed ``--repeat`` times; the median and the worst are printed.
2. Throughput: a bounded number of bytes (``--bytes``) sent over TCP by a Python socket
   sender from namespace "src" to a receiver in namespace "dst", once through the router
   namespace (to the public address of a mono mapping, translated by the table above, so
   every packet goes through the 10,000-element maps) and once over a direct veth pair
   between the same two namespaces; ``--rounds`` alternated rounds, best of each, and the
   ratio. iperf3 is not installed here, hence the Python sender.

Every address is inside the namespaces this script makes; all are deleted at the end.
Run as root: ``PYTHONPATH=. .venv/bin/python benchmarks/router_sync.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from yun.testing.netns import Topology

PUBLIC = "203.0.113.10"
VM_IP = "10.64.0.10"
PLAIN_IP = "10.64.1.10"


def _rows(count: int) -> tuple[list[Any], dict[str, str | None]]:
    import ipaddress

    from yun.control.db.models import PublicIpRow

    rows: list[Any] = []
    ips: dict[str, str | None] = {}
    pub0, vm0 = ipaddress.IPv4Address("100.64.0.0"), ipaddress.IPv4Address("10.65.0.0")
    for i in range(count):
        vm = f"vm-{i}"
        ips[vm] = str(vm0 + 1 + i)
        if i % 2 == 0:
            rows.append(PublicIpRow(uuid=f"p{i}", kind="vm", ip=str(pub0 + 1 + i), port=0,
                                    protocol="", vm_uuid=vm))
        else:
            rows.append(PublicIpRow(uuid=f"p{i}", kind="vm", ip=str(pub0 + 1 + (i % 64)),
                                    port=10000 + i, protocol="tcp", vm_uuid=vm, vm_port=80))
    rows.append(PublicIpRow(uuid="lab", kind="vm", ip=PUBLIC, port=0, protocol="",
                            vm_uuid="lab-vm"))
    ips["lab-vm"] = VM_IP
    return rows, ips


async def _inner(count: int, repeat: int) -> dict[str, Any]:
    """Runs inside the router namespace: the sync timings.

    The router side is measured through the router's own :meth:`RouterService.sync` (its
    lock, the pulled JSON decoded and validated, the table updated, the routes, the
    bookkeeping); only the HTTP request to a control server is left out: ``pull`` decodes
    the very JSON body the control server would send. The control server's own work per
    pull (the rule set from rows and its JSON) is timed apart."""
    import tempfile

    from yun.config import RouterSettings
    from yun.control.network.router_rules import rule_set
    from yun.proto.network import MonoMapping, RouterRuleSet
    from yun.router.nft import NftTable, desired_state
    from yun.router.service import RouterService

    class LocalPull(RouterService):
        body = b""

        async def pull(self) -> RouterRuleSet:
            data = json.loads(self.body)
            # (getattr: the same script times a tree from before the decoder, for the
            # before/after figures in docs/BENCHMARKS.md.)
            decoder = getattr(self, "decoder", None)
            return decoder.decode(data) if decoder else RouterRuleSet.model_validate(data)

    rows, ips = _rows(count)
    out: dict[str, list[float]] = {k: [] for k in (
        "compute", "encode", "full", "change", "change_nft", "change_cmd", "check")}
    rules = rule_set(1, rows, ips, [])
    with tempfile.TemporaryDirectory() as state:
        for n in range(repeat):
            t0 = time.perf_counter()
            rules = rule_set(1 + 2 * n, rows, ips, [])
            out["compute"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            body = rules.model_dump_json().encode()
            out["encode"].append(time.perf_counter() - t0)
            moved = rules.model_copy(update={"generation": rules.generation + 1, "mono": [
                MonoMapping(public_ip=m.public_ip, vm_ip="10.66.0.1" if i == 1 else m.vm_ip,
                            vm_uuid=m.vm_uuid) for i, m in enumerate(rules.mono)]})
            router = LocalPull(RouterSettings(
                name="bench", state_dir=Path(state), listen_host="0.0.0.0", listen_port=0,
                lan_address="10.0.0.1", manage_forwarding=False))
            try:
                await router.nft.delete()
                # Full sync at start: a fresh router's first sync replaces the table.
                router.body = body
                t0 = time.perf_counter()
                await router.sync(full=False)
                out["full"].append(time.perf_counter() - t0)
                assert router.last_sync["how"] == "full"
                # One change after a notice, end to end in the router process.
                router.body = moved.model_dump_json().encode()
                t0 = time.perf_counter()
                await router.sync(full=False)
                out["change"].append(time.perf_counter() - t0)
                assert router.last_sync["how"] == "incremental", router.last_sync
                # The same change alone, as the nft table applies it (libnftables)...
                t0 = time.perf_counter()
                assert router.applied is not None
                assert await router.nft.update(router.applied, rules)
                out["change_nft"].append(time.perf_counter() - t0)
                # ...and by running the nft command (the path before libnftables).
                try:
                    cmd = NftTable(library=False)  # type: ignore[call-arg]
                except TypeError:  # a tree from before libnftables: nft only
                    cmd = NftTable()
                t0 = time.perf_counter()
                assert await cmd.update(rules, moved)
                out["change_cmd"].append(time.perf_counter() - t0)
                # The periodic check: the live table listed, parsed and compared.
                t0 = time.perf_counter()
                live = await router.nft.state()
                same = live == desired_state(moved)
                out["check"].append(time.perf_counter() - t0)
                assert same, "the live table differs from the applied rules"
                backend = getattr(router.nft, "backend", "nft")
            finally:
                if hasattr(router.nft, "close"):
                    router.nft.close()
                router.server.sock.close()
    return {"mappings": len(rules.mono) + len(rules.ports), "mono": len(rules.mono),
            "ports": len(rules.ports), "backend": backend, **out}


def _ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:.1f} ms, worst {max(values) * 1000:.1f} ms"


RECEIVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(4)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    total = 0
    while True:
        b = c.recv(1 << 20)
        if not b: break
        total += len(b)
    c.sendall(str(total).encode()); c.close()
"""

SENDER = r"""
import socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
buf = b"x" * (1 << 20)
s = socket.create_connection((host, port), timeout=30)
t0 = time.perf_counter(); sent = 0
while sent < size:
    sent += s.send(buf[: min(len(buf), size - sent)])
s.shutdown(socket.SHUT_WR)
got = int(s.recv(64) or b"0")
dt = time.perf_counter() - t0
print(f"{got} {dt}")
"""


def _throughput(topo: Topology, size: int, rounds: int) -> dict[str, Any]:
    """Three paths between the same two namespaces, each made of the same veth pairs
    (created the same way, so with the same offloads): direct (one veth pair), through
    the router namespace holding the 10,000-mapping table (two pairs, the stateless
    translation), and through a second router namespace with no table at all (two pairs,
    plain forwarding): the last one tells the cost of the extra hop from that of the
    rules. Rounds alternate the paths (and their order) so that the machine's load
    changes hit all of them alike."""
    router = topo.namespaces[-1]  # the namespace holding the table
    plain = topo.add_namespace("plain")
    src, dst = topo.add_namespace("src"), topo.add_namespace("dst")

    def veth(a: Any, an: str, b: Any, bn: str) -> None:
        a.run(["ip", "link", "add", an, "type", "veth", "peer", "name", bn, "netns", b.name])
        a.run(["ip", "link", "set", an, "up"])
        b.run(["ip", "link", "set", bn, "up"])

    veth(src, "r0", router, "wan0")
    veth(router, "lan0", dst, "r0")
    veth(src, "p0", plain, "wan0")
    veth(plain, "lan0", dst, "p0")
    veth(src, "d0", dst, "d0")
    # Through the router: to the public address of a mono mapping, translated to VM_IP.
    src.run(["ip", "addr", "add", "198.51.100.100/24", "dev", "r0"])
    router.run(["ip", "addr", "add", "198.51.100.1/24", "dev", "wan0"])
    router.run(["ip", "addr", "add", "10.64.0.1/32", "dev", "lan0"])
    router.run(["ip", "route", "add", f"{VM_IP}/32", "dev", "lan0"])
    router.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    dst.run(["ip", "addr", "add", f"{VM_IP}/32", "dev", "r0"])
    dst.run(["ip", "route", "add", "10.64.0.1", "dev", "r0"])
    dst.run(["ip", "route", "add", "default", "via", "10.64.0.1"])
    src.run(["ip", "route", "add", "203.0.113.0/24", "via", "198.51.100.1"])
    # Through the plain router: the same shape, no nftables table.
    src.run(["ip", "addr", "add", "198.51.101.100/24", "dev", "p0"])
    plain.run(["ip", "addr", "add", "198.51.101.1/24", "dev", "wan0"])
    plain.run(["ip", "addr", "add", "10.64.1.1/32", "dev", "lan0"])
    plain.run(["ip", "route", "add", f"{PLAIN_IP}/32", "dev", "lan0"])
    plain.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    dst.run(["ip", "addr", "add", f"{PLAIN_IP}/32", "dev", "p0"])
    dst.run(["ip", "route", "add", "10.64.1.1", "dev", "p0"])
    dst.run(["ip", "route", "add", "198.51.101.0/24", "via", "10.64.1.1", "dev", "p0"])
    src.run(["ip", "route", "add", f"{PLAIN_IP}/32", "via", "198.51.101.1"])
    # Direct.
    src.run(["ip", "addr", "add", "192.0.2.1/30", "dev", "d0"])
    dst.run(["ip", "addr", "add", "192.0.2.2/30", "dev", "d0"])
    targets = {"router": PUBLIC, "plain": PLAIN_IP, "direct": "192.0.2.2"}
    recv = dst.popen([sys.executable, "-c", RECEIVER, "5201"], stdout=subprocess.PIPE,
                     text=True)
    try:
        assert recv.stdout is not None and recv.stdout.readline().strip() == "ready"
        results: dict[str, list[float]] = {k: [] for k in targets}
        order = list(targets)
        for n in range(rounds + 1):
            for path in order if n % 2 else reversed(order):
                out = src.run([sys.executable, "-c", SENDER, targets[path], "5201", str(size)],
                              timeout=300).stdout.split()
                got, seconds = int(out[0]), float(out[1])
                assert got == size, f"{path}: {got} of {size} bytes arrived"
                if n:  # the first round warms up (page cache, the interpreter, the maps)
                    results[path].append(size * 8 / seconds / 1e9)
    finally:
        recv.kill()
        recv.wait(5)
    median = {k: statistics.median(v) for k, v in results.items()}
    best = {k: max(v) for k, v in results.items()}
    # Per round (the paths of one round ran within seconds of each other): the ratio.
    per_round = [r / d for r, d in zip(results["router"], results["direct"], strict=True)]
    return {"gbit": results, "median": median, "best": best,
            "ratio": median["router"] / median["direct"],
            "ratio_best": best["router"] / best["direct"],
            "ratio_plain": median["plain"] / median["direct"],
            "ratio_rounds": per_round}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mappings", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--bytes", type=int, default=1 << 30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(asyncio.run(_inner(args.mappings, args.repeat))))
        return
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"kernel {platform.release()}, "
          f"{subprocess.run(['nft', '--version'], capture_output=True, text=True).stdout.strip()}")
    with Topology(prefix="yb", root_link=False) as topo:
        router = topo.add_namespace("router")
        res = router.run([sys.executable, __file__, "--inner", "--mappings",
                          str(args.mappings), "--repeat", str(args.repeat)],
                         timeout=600, env={**os.environ})
        sync = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"rule set: {sync['mappings']} mappings ({sync['mono']} mono, "
              f"{sync['ports']} share ports)")
        print(f"  control server, per pull: rule_set() from rows {_ms(sync['compute'])}; "
              f"JSON {_ms(sync['encode'])}")
        print(f"  router ({sync['backend']}), RouterService.sync from the pulled JSON:")
        print(f"    full sync at start:                {_ms(sync['full'])}   goal <= 1000 ms")
        print(f"    incremental change (one mapping):  {_ms(sync['change'])}   goal <= 50 ms")
        print(f"      of which the table update alone: {_ms(sync['change_nft'])}; "
              f"with the nft command instead: {_ms(sync['change_cmd'])}")
        print(f"    drift check (list + compare):      {_ms(sync['check'])}")
        tp = _throughput(topo, args.bytes, args.rounds)
        print(f"throughput, {args.bytes >> 20} MiB per run, {args.rounds} rounds after one "
              f"warm-up, median (best): router {tp['median']['router']:.2f} "
              f"({tp['best']['router']:.2f}) Gbit/s, direct veth "
              f"{tp['median']['direct']:.2f} ({tp['best']['direct']:.2f}) Gbit/s, "
              f"plain forwarding {tp['median']['plain']:.2f} ({tp['best']['plain']:.2f})")
        print(f"  ratio router/direct: median {tp['ratio']:.2f} (best/best "
              f"{tp['ratio_best']:.2f})   goal >= 0.9; plain/direct {tp['ratio_plain']:.2f}")
        print("  per round router/direct: "
              + ", ".join(f"{x:.2f}" for x in tp["ratio_rounds"]))
        print("  all runs (Gbit/s): " + json.dumps(
            {k: [round(x, 2) for x in v] for k, v in tp["gbit"].items()}))

if __name__ == "__main__":
    main()
