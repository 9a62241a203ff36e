"""What must hold in a settled cloud, checked from the control database and the nodes' own
state: the invariant checker of the chaos test, for any test to reuse.

:func:`check` returns human-readable violations, each naming the resource; an empty list
means the cloud is consistent. :func:`assert_consistent` fails a test with all of them.
Checks are meant for a *settled* cloud (:func:`unsettled` says what is still moving): an
unfinished flow or a VM in ``building`` is a violation, not a state to wait out.

The nodes' state is what each sim node persists in ``<state dir>/sim-host.json``::

    {"domains": {"<vm uuid>": {"state": "running", "disk_ids": [...], "macs": [...]}},
     "disks":   {"<disk id>": {"vm_uuid": "...", "size_gb": 1}},
     "ports":   {"<mac>": {"vm_uuid": "...", "ip": "10.64.0.10"}},
     "forwards": {"<vm uuid>": [{"protocol": "tcp", "node_port": 40000,
                                 "vm_ip": "10.64.0.10", "vm_port": 80}]}}

The network checks: a node-scoped address, a public address or port and a node NAT port
are held only by a VM that exists and has not failed; a running sandbox VM's address is
held; the NAT ports a node forwards are the database's, to the VM's address.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, select
from sqlalchemy.orm import Session

from yun.control.db.models import (
    AddressRow,
    AllocationRow,
    FlowRow,
    IdempotencyRow,
    InventoryRow,
    NodeForwardRow,
    NodeRow,
    PoolRow,
    PublicIpRow,
    QuotaRow,
    VmGroupRow,
    VmNicRow,
    VmRow,
)
from yun.control.db.session import sync_url

SIM_HOST_FILE = "sim-host.json"
# States a VM may rest in; any other one has work under way (or stuck).
SETTLED_VM_STATES = frozenset({"running", "stopped", "error"})
FAILED_VM_STATES = frozenset({"error"})
UNFINISHED_FLOW_STATES = ("pending", "running", "rolling_back")
# The idempotency table's status of a request whose answer is not stored yet.
KEY_IN_PROGRESS = 0
# Quota resources a VM counts against, and the VM column each one sums.
VM_QUOTA = {"vms": None, "vcpus": "vcpus", "memory_mb": "memory_mb", "disk_gb": "disk_gb"}


@dataclass
class SimHost:
    """What one sim node says it holds."""

    domains: dict[str, dict[str, Any]] = field(default_factory=dict)
    disks: dict[str, dict[str, Any]] = field(default_factory=dict)
    ports: dict[str, dict[str, Any]] = field(default_factory=dict)
    forwards: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def load_sim_host(state_dir: Path) -> SimHost:
    """The sim node's persisted state in ``state_dir``.

    Raises FileNotFoundError when the node has written none, and ValueError naming the
    file and the entry when it is not of the documented shape. A missing top-level table
    reads as empty (a host that never held a port need not write ``"ports"``); every entry
    must name its VM.
    """
    path = Path(state_dir) / SIM_HOST_FILE
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected an object, found {type(doc).__name__}")
    host = SimHost()
    for table in ("domains", "disks", "ports"):
        entries = doc.get(table, {})
        if not isinstance(entries, dict):
            raise ValueError(f"{path}: {table!r} must be an object")
        for key, entry in entries.items():
            if not isinstance(entry, dict):
                raise ValueError(f"{path}: {table}[{key!r}] must be an object")
            if table == "domains" and not isinstance(entry.get("state"), str):
                raise ValueError(f"{path}: domains[{key!r}] has no state")
            if table != "domains" and not isinstance(entry.get("vm_uuid"), str):
                raise ValueError(f"{path}: {table}[{key!r}] names no vm_uuid")
        setattr(host, table, entries)
    forwards = doc.get("forwards", {})
    if not isinstance(forwards, dict) or not all(
            isinstance(f, list) and all(isinstance(e, dict) for e in f)
            for f in forwards.values()):
        raise ValueError(f"{path}: 'forwards' must map VMs to lists of objects")
    host.forwards = forwards
    return host


@dataclass(frozen=True)
class KeyAnswer:
    """What a client finally got for one Idempotency-Key.

    ``status`` None: no definitive answer before the client gave up (``detail`` says the
    last thing it saw). ``vm_uuid``: the VM a 2xx answer named."""

    status: int | None
    vm_uuid: str | None = None
    detail: str = ""


def engine_for(url_or_engine: str | Engine) -> Engine:
    """A blocking engine on the control database (the async driver's URL is accepted)."""
    if isinstance(url_or_engine, Engine):
        return url_or_engine
    url = sync_url(url_or_engine)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30}  # the control server may be writing
    return create_engine(url, **kwargs)


@contextmanager
def _session(url_or_engine: str | Engine) -> Iterator[Session]:
    engine = engine_for(url_or_engine)
    try:
        with Session(engine) as session:
            yield session
    finally:
        if engine is not url_or_engine:
            engine.dispose()


def unsettled(url_or_engine: str | Engine) -> list[str]:
    """What is still moving: unfinished flows, VMs in a passing state, nodes down."""
    with _session(url_or_engine) as session:
        flows = Counter(session.scalars(select(FlowRow.state).where(
            FlowRow.state.in_(UNFINISHED_FLOW_STATES))).all())
        vms = Counter(session.scalars(select(VmRow.state).where(
            VmRow.state.not_in(SETTLED_VM_STATES))).all())
        down = session.scalars(select(NodeRow.name).where(NodeRow.status != "up")).all()
    return ([f"{n} flows {s}" for s, n in sorted(flows.items())]
            + [f"{n} VMs {s}" for s, n in sorted(vms.items())]
            + [f"node {name} is not up" for name in sorted(down)])


def check(url_or_engine: str | Engine, nodes: Mapping[str, Path] | None = None, *,
          keys: Mapping[str, KeyAnswer] | None = None,
          expect_no_vms: bool = False) -> list[str]:
    """Every violated invariant of the cloud, one line each naming the resource.

    ``nodes``: sim node name → its state directory, for the checks of what the node
    holds. ``keys``: the clients' Idempotency-Keys of VM creates and what each got; given,
    every key must have been answered, each answered VM named by one key only, and every
    VM recorded must be one a key answered. ``expect_no_vms``: after deleting everything,
    no VM may be left.
    """
    with _session(url_or_engine) as session:
        vms = {vm.uuid: vm for vm in session.scalars(select(VmRow))}
        db_nodes = list(session.scalars(select(NodeRow)))
        addresses = list(session.scalars(select(AddressRow)))
        pools = {p.uuid: p for p in session.scalars(select(PoolRow))}
        forwards = list(session.scalars(select(NodeForwardRow)))
        flows = list(session.scalars(select(FlowRow).where(
            FlowRow.state.in_(UNFINISHED_FLOW_STATES))))
        stuck_keys = list(session.scalars(select(IdempotencyRow).where(
            IdempotencyRow.status_code == KEY_IN_PROGRESS)))
        quotas = list(session.scalars(select(QuotaRow).where(
            QuotaRow.resource.in_(VM_QUOTA))))
        problems: list[str] = []
        problems += _flows(flows)
        problems += _keys_in_progress(stuck_keys)
        problems += _vm_states(vms)
        problems += _reservations(
            db_nodes, vms, list(session.scalars(select(InventoryRow))),
            list(session.scalars(select(AllocationRow))),
            pools)
        problems += _groups(vms, {g.uuid: g for g in session.scalars(select(VmGroupRow))})
        problems += _addresses(addresses, vms, pools)
        problems += _public_ips(list(session.scalars(select(PublicIpRow))), vms)
        problems += _node_forwards(forwards, vms)
        problems += _quotas(quotas, vms)
        if keys is not None:
            problems += _key_answers(keys, vms)
        if nodes is not None:
            by_name = {n.name: n for n in db_nodes}
            # NICs plugged in later (U-HOTPLUG) have ports with addresses of their own.
            nic_ips: dict[str, set[str]] = defaultdict(set)
            for nic in session.scalars(select(VmNicRow)):
                if nic.ip:
                    nic_ips[nic.vm_uuid].add(nic.ip)
            for name, state_dir in sorted(nodes.items()):
                problems += _node_holdings(name, Path(state_dir), by_name.get(name), vms,
                                           forwards, nic_ips)
        if expect_no_vms:
            problems += [f"VM left: {vm.uuid} ({vm.name}) is {vm.state}"
                         for vm in vms.values()]
    return problems


def assert_consistent(url_or_engine: str | Engine, nodes: Mapping[str, Path] | None = None,
                      **kwargs: Any) -> None:
    """Fail with every violation :func:`check` finds (the first 50 listed, all counted)."""
    problems = check(url_or_engine, nodes, **kwargs)
    if problems:
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise AssertionError(f"{len(problems)} invariant violations:\n  {shown}{more}")


def summarize(problems: list[str]) -> dict[str, int]:
    """How many violations of each kind (the text before the first ':')."""
    return dict(Counter(p.split(":", 1)[0] for p in problems).most_common())


# -- the invariants ------------------------------------------------------------------------


def _flows(flows: list[FlowRow]) -> list[str]:
    return [f"flow unfinished: {f.uuid} ({f.kind} of {f.resource_type} {f.resource_uuid}) "
            f"is {f.state} at step {f.current_step!r}" for f in flows]


def _keys_in_progress(rows: list[IdempotencyRow]) -> list[str]:
    return [f"idempotency key stuck in progress: {row.key[:16]}… of user {row.user_uuid} "
            f"since {row.created_at:%H:%M:%S}" for row in rows]


def _vm_states(vms: Mapping[str, VmRow]) -> list[str]:
    problems = []
    for vm in vms.values():
        if vm.state not in SETTLED_VM_STATES:
            problems.append(f"VM stuck: {vm.uuid} ({vm.name}) is {vm.state}"
                            + (f" ({vm.error})" if vm.error else ""))
        elif vm.state in FAILED_VM_STATES and not (vm.error or "").strip():
            problems.append(f"VM failed without a reason: {vm.uuid} ({vm.name})")
        elif vm.state not in FAILED_VM_STATES and not vm.node_uuid:
            problems.append(f"VM not placed: {vm.uuid} ({vm.name}) is {vm.state} on no node")
    return problems


RESOURCE_OF_VM = {"vcpu": "vcpus", "memory_mb": "memory_mb", "disk_gb": "disk_gb"}


def _reservations(nodes: list[NodeRow], vms: Mapping[str, VmRow],
                  inventories: list[InventoryRow], allocations: list[AllocationRow],
                  pools: Mapping[str, PoolRow]) -> list[str]:
    """Each node's used capacity is what its placed VMs hold, never more than its pool
    allows; each VM holds exactly its size on its own node."""
    placed: dict[str, list[VmRow]] = defaultdict(list)
    for vm in vms.values():
        if vm.node_uuid:
            placed[vm.node_uuid].append(vm)
    problems = []
    known = {n.uuid: n for n in nodes}
    inventory = {(i.node_uuid, i.resource_class): i for i in inventories}
    for node in nodes:
        on_it = placed.get(node.uuid, [])
        pool = pools.get(node.pool_uuid or "")
        # An unassigned node has no ratios: nothing is overcommitted on it.
        ratios = {"vcpu": pool.cpu_ratio, "memory_mb": pool.memory_ratio,
                  "disk_gb": pool.disk_ratio} if pool else dict.fromkeys(RESOURCE_OF_VM, 1.0)
        for rc, column in RESOURCE_OF_VM.items():
            row = inventory.get((node.uuid, rc))
            used = row.used if row else 0
            expected = sum(getattr(vm, column) for vm in on_it)
            if used != expected:
                problems.append(f"reservation mismatch: node {node.name} reserves {used} "
                                f"{rc}, its {len(on_it)} placed VMs need {expected}")
            if row is not None and rc in ratios and used > int(
                    (row.total - row.reserved) * ratios[rc]):
                problems.append(f"overbooked: node {node.name} holds {used} {rc} of "
                                f"{int((row.total - row.reserved) * ratios[rc])} usable")
    held: dict[str, dict[str, AllocationRow]] = defaultdict(dict)
    for allocation in allocations:
        held[allocation.consumer_uuid][allocation.resource_class] = allocation
    for consumer, classes in held.items():
        holder = vms.get(consumer)
        if holder is None or not holder.node_uuid:
            problems.append(f"allocation leaked: {consumer} holds {sorted(classes)} but is "
                            f"{'gone' if holder is None else 'unplaced'}")
            continue
        vm = holder
        for rc, column in RESOURCE_OF_VM.items():
            a = classes.get(rc)
            if a is None or a.node_uuid != vm.node_uuid or a.amount != getattr(vm, column):
                problems.append(f"allocation mismatch: VM {vm.uuid} ({vm.name}) holds "
                                f"{a.amount if a else 0} {rc} on {a.node_uuid if a else '-'}"
                                f", placed on {vm.node_uuid} with {getattr(vm, column)}")
    for vm in vms.values():
        if vm.node_uuid and vm.uuid not in held:
            problems.append(f"VM holds nothing on its node: {vm.uuid} ({vm.name})")
    for node_uuid, on_it in placed.items():
        if node_uuid not in known:
            problems += [f"VM on unknown node: {vm.uuid} ({vm.name}) is placed on {node_uuid}"
                         for vm in on_it]
    return problems


def _groups(vms: Mapping[str, VmRow], groups: Mapping[str, VmGroupRow]) -> list[str]:
    """Anti-affinity members each on their own node; affinity members all on one."""
    members: dict[str, list[VmRow]] = defaultdict(list)
    for vm in vms.values():
        if vm.group_uuid and vm.node_uuid:
            members[vm.group_uuid].append(vm)
    problems = []
    for group_uuid, placed in members.items():
        group = groups.get(group_uuid)
        nodes = Counter(vm.node_uuid for vm in placed)
        if group is None:
            problems.append(f"VMs in unknown group {group_uuid}")
        elif group.policy == "anti-affinity" and any(n > 1 for n in nodes.values()):
            problems.append(f"anti-affinity broken: group {group.name} has "
                            f"{max(nodes.values())} VMs on one node")
        elif group.policy == "affinity" and len(nodes) > 1:
            problems.append(f"affinity broken: group {group.name} spans {len(nodes)} nodes")
    return problems


def _addresses(addresses: list[AddressRow], vms: Mapping[str, VmRow],
               pools: Mapping[str, PoolRow]) -> list[str]:
    problems = []
    held: dict[str, list[AddressRow]] = defaultdict(list)
    for address in addresses:
        held[address.vm_uuid].append(address)
        vm = vms.get(address.vm_uuid)
        if vm is None:
            problems.append(f"address leaked: {address.ip} ({address.scope}) is held by "
                            f"VM {address.vm_uuid}, which does not exist")
        elif vm.state in FAILED_VM_STATES:
            problems.append(f"address held by a failed VM: {address.ip} ({address.scope}) "
                            f"by {vm.uuid} ({vm.name})")
    for vm in vms.values():
        pool = pools.get(vm.pool_uuid or "")
        if pool is not None and pool.network_mode == "direct":
            continue  # its address is the LAN's DHCP server's, not the platform's
        if vm.state == "running" and vm.ip and vm.ip not in {a.ip for a in held[vm.uuid]}:
            problems.append(f"address not held: running VM {vm.uuid} ({vm.name}) uses "
                            f"{vm.ip} but no address record holds it")
    return problems


def _public_ips(rows: list[PublicIpRow], vms: Mapping[str, VmRow]) -> list[str]:
    problems = []
    for row in rows:
        where = f"{row.ip}:{row.port}" if row.port else row.ip
        if row.vm_uuid is None:
            if row.kind != "eip":
                problems.append(f"public address leaked: {where} ({row.kind}) is held by "
                                f"no VM")
            continue
        vm = vms.get(row.vm_uuid)
        if vm is None:
            problems.append(f"public address leaked: {where} is held by VM {row.vm_uuid}, "
                            f"which does not exist")
        elif vm.state in FAILED_VM_STATES and row.kind != "eip":
            problems.append(f"public address held by a failed VM: {where} by {vm.uuid} "
                            f"({vm.name})")
    return problems


def _node_forwards(rows: list[NodeForwardRow], vms: Mapping[str, VmRow]) -> list[str]:
    problems = []
    for row in rows:
        vm = vms.get(row.vm_uuid)
        if vm is None or vm.node_uuid != row.node_uuid:
            problems.append(f"node port leaked: {row.protocol}/{row.node_port} of node "
                            f"{row.node_uuid} forwards to VM {row.vm_uuid}, "
                            f"{_elsewhere(vms, row.vm_uuid)}")
    return problems


def _quotas(quotas: list[QuotaRow], vms: Mapping[str, VmRow]) -> list[str]:
    per_project: dict[str, list[VmRow]] = defaultdict(list)
    for vm in vms.values():
        per_project[vm.project_uuid].append(vm)
    problems = []
    for row in quotas:
        column = VM_QUOTA[row.resource]
        owned = per_project.get(row.project_uuid, [])
        expected = len(owned) if column is None else sum(getattr(v, column) for v in owned)
        if row.used != expected:
            problems.append(f"quota mismatch: project {row.project_uuid} uses {row.used} "
                            f"{row.resource}, its {len(owned)} VMs count {expected}")
    return problems


def _key_answers(keys: Mapping[str, KeyAnswer], vms: Mapping[str, VmRow]) -> list[str]:
    problems = []
    owners: dict[str, list[str]] = defaultdict(list)
    for key, answer in sorted(keys.items()):
        if answer.status is None:
            problems.append(f"key unanswered: {key} ({answer.detail or 'no answer'})")
        elif 200 <= answer.status < 300:
            if answer.vm_uuid is None:
                problems.append(f"key answered without a VM: {key} got {answer.status}")
            else:
                owners[answer.vm_uuid].append(key)
    for vm_uuid, owning in owners.items():
        if len(owning) > 1:
            problems.append(f"VM answered to several keys: {vm_uuid} to {', '.join(owning)}")
        if vm_uuid not in vms:
            problems.append(f"answered VM missing: {vm_uuid} (key {owning[0]}) is not recorded")
    problems += [f"VM without a key: {vm.uuid} ({vm.name}, {vm.state}) was answered to no key"
                 for vm in vms.values() if vm.uuid not in owners]
    return problems


def _node_holdings(name: str, state_dir: Path, node: NodeRow | None,
                   vms: Mapping[str, VmRow], forwards: list[NodeForwardRow],
                   nic_ips: Mapping[str, set[str]] | None = None) -> list[str]:
    if node is None:
        return [f"node unknown: {name} has a state directory but no record"]
    try:
        host = load_sim_host(state_dir)
    except FileNotFoundError:
        return [f"node state missing: {name} wrote no {SIM_HOST_FILE} in {state_dir}"]
    except ValueError as exc:
        return [f"node state unreadable: {name}: {exc}"]
    placed = {u: vm for u, vm in vms.items() if vm.node_uuid == node.uuid}
    problems = []
    for vm_uuid, domain in host.domains.items():
        vm = placed.get(vm_uuid)
        if vm is None:
            where = _elsewhere(vms, vm_uuid)
            problems.append(f"domain orphaned: node {name} holds domain {vm_uuid} "
                            f"({domain['state']}), {where}")
        elif vm.state == "running" and domain["state"] != "running":
            problems.append(f"domain state mismatch: VM {vm_uuid} ({vm.name}) is running, "
                            f"its domain on node {name} is {domain['state']}")
    for vm_uuid, vm in placed.items():
        if vm_uuid not in host.domains:
            problems.append(f"domain missing: VM {vm_uuid} ({vm.name}, {vm.state}) is placed "
                            f"on node {name}, which holds no domain for it")
    for disk_id, disk in host.disks.items():
        if disk["vm_uuid"] not in placed:
            problems.append(f"disk orphaned: node {name} holds disk {disk_id} of VM "
                            f"{disk['vm_uuid']}, {_elsewhere(vms, disk['vm_uuid'])}")
    for mac, port in host.ports.items():
        vm = placed.get(port["vm_uuid"])
        if vm is None:
            problems.append(f"port orphaned: node {name} holds port {mac} "
                            f"({port.get('ip')}) of VM {port['vm_uuid']}, "
                            f"{_elsewhere(vms, port['vm_uuid'])}")
        elif (port.get("ip") and vm.ip
              and port["ip"] not in {vm.ip, *(nic_ips or {}).get(vm.uuid, ())}):
            problems.append(f"port address mismatch: node {name} gives VM {vm.uuid} "
                            f"{port['ip']}, the database {vm.ip}")
    wanted = {(f.vm_uuid, f.protocol, f.node_port, f.vm_port) for f in forwards
              if f.node_uuid == node.uuid}
    for vm_uuid, entries in host.forwards.items():
        vm = placed.get(vm_uuid)
        for entry in entries:
            key = (vm_uuid, entry.get("protocol"), entry.get("node_port"), entry.get("vm_port"))
            if vm is None or key not in wanted:
                problems.append(f"forward orphaned: node {name} forwards "
                                f"{entry.get('protocol')}/{entry.get('node_port')} to VM "
                                f"{vm_uuid}, which the database does not have")
            elif vm.ip and entry.get("vm_ip") != vm.ip:
                problems.append(f"forward address mismatch: node {name} forwards to "
                                f"{entry.get('vm_ip')}, the database's VM {vm_uuid} is {vm.ip}")
    held = {(vm_uuid, e.get("protocol"), e.get("node_port"), e.get("vm_port"))
            for vm_uuid, entries in host.forwards.items() for e in entries}
    for vm_uuid, protocol, node_port, _ in sorted(wanted - held):
        problems.append(f"forward missing: node {name} does not forward {protocol}/{node_port} "
                        f"to VM {vm_uuid} as the database says")
    return problems


def _elsewhere(vms: Mapping[str, VmRow], vm_uuid: str) -> str:
    vm = vms.get(vm_uuid)
    if vm is None:
        return "a VM that does not exist"
    if vm.node_uuid is None:
        return f"a VM placed nowhere ({vm.state})"
    return f"a VM placed on node {vm.node_uuid} ({vm.state})"
