"""The invariant checker of yun.testing on a hand-made database: silent on a consistent
cloud, and each invariant shown to fire on a state that breaks it."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session

from yun.control.db.models import (
    AddressRow,
    AllocationRow,
    DepartmentRow,
    FlowRow,
    IdempotencyRow,
    ImageRow,
    InventoryRow,
    NodeRow,
    ProjectRow,
    QuotaRow,
    VmGroupRow,
    VmRow,
)
from yun.control.db.session import upgrade
from yun.testing.invariants import (
    KeyAnswer,
    assert_consistent,
    check,
    load_sim_host,
    summarize,
    unsettled,
)

PROJECT, NODE, NODE2 = "p-1", "n-1", "n-2"
VM_A = "00000000-0000-4000-8000-00000000000a"
VM_B = "00000000-0000-4000-8000-00000000000b"
VM_F = "00000000-0000-4000-8000-00000000000f"  # a failed create: placed nowhere
MAC_A, MAC_B = "52:54:00:00:00:0a", "52:54:00:00:00:0b"


class Cloud:
    """A consistent two-VM cloud: a database and the sim nodes' state files."""

    def __init__(self, root: Path) -> None:
        self.url = f"sqlite:///{root / 'control.db'}"
        upgrade(self.url)
        self.engine: Engine = create_engine(self.url)
        self.nodes = {"node-1": root / "node-1", "node-2": root / "node-2"}
        self.keys = {"k-a": KeyAnswer(202, VM_A), "k-b": KeyAnswer(202, VM_B),
                     "k-f": KeyAnswer(202, VM_F), "k-bad": KeyAnswer(422, None, "bad")}
        with Session(self.engine) as s, s.begin():
            s.add(DepartmentRow(uuid="d-1", name="dept"))
            s.add(ProjectRow(uuid=PROJECT, name="proj", department_uuid="d-1"))
            s.add(ImageRow(uuid="i-1", name="img", project_uuid=PROJECT, status="active"))
            s.add(VmGroupRow(uuid="g-1", name="web", project_uuid=PROJECT,
                             policy="anti-affinity"))
            for uuid, name in ((NODE, "node-1"), (NODE2, "node-2")):
                s.add(NodeRow(uuid=uuid, name=name, url="http://x", status="up",
                              hypervisor="sim", accel="sim", sandbox_subnet=None))
                for rc, total, used in (("vcpu", 16, 3), ("memory_mb", 8192, 384),
                                        ("disk_gb", 100, 3)):
                    s.add(InventoryRow(node_uuid=uuid, resource_class=rc, total=total,
                                       reserved=0, used=used if uuid == NODE else 0))
            for uuid, name, vcpus, memory, ip, mac in (
                    (VM_A, "a", 1, 128, "10.77.0.2", MAC_A),
                    (VM_B, "b", 2, 256, "10.77.0.3", MAC_B)):
                s.add(VmRow(uuid=uuid, name=name, project_uuid=PROJECT, state="running",
                            vcpus=vcpus, memory_mb=memory, disk_gb=1 + (uuid == VM_B),
                            image_uuid="i-1", node_uuid=NODE, ip=ip, mac=mac,
                            group_uuid="g-1" if uuid == VM_A else None))
                s.add(AddressRow(scope=f"node:{NODE}", ip=ip, vm_uuid=uuid))
                for rc, amount in (("vcpu", vcpus), ("memory_mb", memory),
                                   ("disk_gb", 1 + (uuid == VM_B))):
                    s.add(AllocationRow(consumer_uuid=uuid, resource_class=rc,
                                        node_uuid=NODE, amount=amount))
            s.add(VmRow(uuid=VM_F, name="f", project_uuid=PROJECT, state="error",
                        error="create failed: no node", vcpus=1, memory_mb=64, disk_gb=1,
                        image_uuid="i-1"))
            for resource, used in (("vms", 3), ("vcpus", 4), ("memory_mb", 448),
                                   ("disk_gb", 4), ("images", 1)):
                s.add(QuotaRow(project_uuid=PROJECT, resource=resource, limit=-1, used=used))
            s.add(FlowRow(uuid="f-1", kind="vm.create", resource_type="vm",
                          resource_uuid=VM_A, state="succeeded"))
            s.add(IdempotencyRow(key="h-1", user_uuid="u-1", fingerprint="x",
                                 status_code=202, body={},
                                 expires_at=datetime.now(UTC) + timedelta(days=1)))
        self.write_host("node-1", {
            "domains": {VM_A: {"state": "running", "disk_ids": [f"{VM_A}-root"],
                               "macs": [MAC_A]},
                        VM_B: {"state": "running", "disk_ids": [f"{VM_B}-root"],
                               "macs": [MAC_B]}},
            "disks": {f"{VM_A}-root": {"vm_uuid": VM_A, "size_gb": 1},
                      f"{VM_B}-root": {"vm_uuid": VM_B, "size_gb": 2}},
            "ports": {MAC_A: {"vm_uuid": VM_A, "ip": "10.77.0.2"},
                      MAC_B: {"vm_uuid": VM_B, "ip": "10.77.0.3"}}})
        self.write_host("node-2", {"domains": {}, "disks": {}, "ports": {}})

    def write_host(self, name: str, doc: object) -> None:
        self.nodes[name].mkdir(exist_ok=True)
        (self.nodes[name] / "sim-host.json").write_text(json.dumps(doc))

    def host(self, name: str) -> dict:  # type: ignore[type-arg]
        return json.loads((self.nodes[name] / "sim-host.json").read_text())  # type: ignore[no-any-return]

    def edit(self, change: Callable[[Session], object]) -> None:
        with Session(self.engine) as s, s.begin():
            change(s)

    def problems(self, **kwargs: object) -> list[str]:
        return check(self.url, self.nodes, keys=self.keys, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    c = Cloud(tmp_path)
    yield c
    c.engine.dispose()


def test_a_consistent_cloud_passes(cloud: Cloud) -> None:
    assert cloud.problems() == []
    assert_consistent(cloud.url, cloud.nodes, keys=cloud.keys)
    assert unsettled(cloud.url) == []


def _vm(s: Session, uuid: str) -> VmRow:
    vm = s.get(VmRow, uuid)
    assert vm is not None
    return vm


def _node(s: Session, uuid: str = NODE) -> NodeRow:
    node = s.get(NodeRow, uuid)
    assert node is not None
    return node


def _inventory(s: Session, node: str, rc: str) -> InventoryRow:
    row = s.get(InventoryRow, (node, rc))
    assert row is not None
    return row


def _drop_domain_b(c: Cloud) -> None:
    doc = c.host("node-1")
    del doc["domains"][VM_B]
    c.write_host("node-1", doc)


def _orphan_domain_on_node2(c: Cloud) -> None:
    doc = c.host("node-2")
    doc["domains"]["99999999-0000-4000-8000-000000000000"] = {"state": "shutoff"}
    c.write_host("node-2", doc)


def _orphan_disk_and_port(c: Cloud) -> None:
    doc = c.host("node-2")
    doc["disks"]["x-root"] = {"vm_uuid": VM_F, "size_gb": 1}
    doc["ports"]["52:54:00:00:00:ff"] = {"vm_uuid": VM_F, "ip": "10.77.0.9"}
    c.write_host("node-2", doc)


def _shutoff_domain_a(c: Cloud) -> None:
    doc = c.host("node-1")
    doc["domains"][VM_A]["state"] = "shutoff"
    c.write_host("node-1", doc)


def _port_ip_differs(c: Cloud) -> None:
    doc = c.host("node-1")
    doc["ports"][MAC_A]["ip"] = "10.77.0.99"
    c.write_host("node-1", doc)


BREAKAGES: dict[str, tuple[Callable[[Cloud], object], str]] = {
    "flow left running": (lambda c: c.edit(lambda s: s.add(FlowRow(
        uuid="f-2", kind="vm.create", resource_type="vm", resource_uuid=VM_B,
        state="running", current_step="provision"))), "flow unfinished"),
    "key left in progress": (lambda c: c.edit(lambda s: s.add(IdempotencyRow(
        key="h-2", user_uuid="u-1", fingerprint="y", status_code=0, body={},
        created_at=datetime.now(UTC), expires_at=datetime.now(UTC) + timedelta(days=1)))),
        "idempotency key stuck in progress"),
    "VM left building": (lambda c: c.edit(lambda s: setattr(_vm(s, VM_B), "state",
                                                             "building")), "VM stuck"),
    "VM left unknown": (lambda c: c.edit(lambda s: setattr(_vm(s, VM_A), "state",
                                                            "unknown")), "VM stuck"),
    "VM failed silently": (lambda c: c.edit(lambda s: setattr(_vm(s, VM_F), "error", None)),
                           "VM failed without a reason"),
    "running VM on no node": (lambda c: c.edit(lambda s: setattr(_vm(s, VM_B), "node_uuid",
                                                                  None)), "VM not placed"),
    "reservation leaked": (lambda c: c.edit(lambda s: setattr(_inventory(
        s, NODE2, "memory_mb"), "used", 64)), "reservation mismatch"),
    "allocation leaked": (lambda c: c.edit(lambda s: s.add(AllocationRow(
        consumer_uuid="gone", resource_class="vcpu", node_uuid=NODE2, amount=1))),
        "allocation leaked"),
    "allocation on another node": (lambda c: c.edit(lambda s: setattr(s.get(
        AllocationRow, (VM_B, "vcpu")), "node_uuid", NODE2)), "allocation mismatch"),
    "node overbooked": (lambda c: c.edit(lambda s: setattr(_inventory(
        s, NODE, "vcpu"), "total", 2)), "overbooked"),
    "anti-affinity broken": (lambda c: c.edit(lambda s: setattr(_vm(s, VM_B), "group_uuid",
                                                                 "g-1")),
                             "anti-affinity broken"),
    "address leaked": (lambda c: c.edit(lambda s: s.add(AddressRow(
        scope=f"node:{NODE}", ip="10.77.0.7", vm_uuid="gone"))), "address leaked"),
    "failed VM holds an address": (lambda c: c.edit(lambda s: s.add(AddressRow(
        scope=f"node:{NODE2}", ip="10.77.0.2", vm_uuid=VM_F))),
        "address held by a failed VM"),
    "running VM's address released": (lambda c: c.edit(lambda s: s.query(AddressRow).filter(
        AddressRow.vm_uuid == VM_A).delete()), "address not held"),
    "quota leaked": (lambda c: c.edit(lambda s: s.query(QuotaRow).filter(
        QuotaRow.resource == "vms").update({"used": 4})), "quota mismatch"),
    "key unanswered": (lambda c: c.keys.update({"k-x": KeyAnswer(None, None, "409")}),
                       "key unanswered"),
    "two keys, one VM": (lambda c: c.keys.update({"k-y": KeyAnswer(202, VM_A)}),
                         "VM answered to several keys"),
    "VM of no key": (lambda c: c.keys.pop("k-b"), "VM without a key"),
    "answered VM vanished": (lambda c: c.keys.update({"k-z": KeyAnswer(
        202, "77777777-0000-4000-8000-000000000000")}), "answered VM missing"),
    "2xx without a VM": (lambda c: c.keys.update({"k-w": KeyAnswer(202, None)}),
                         "key answered without a VM"),
    "domain vanished from its node": (_drop_domain_b, "domain missing"),
    "domain nobody owns": (_orphan_domain_on_node2, "domain orphaned"),
    "disk and port nobody owns": (_orphan_disk_and_port, "disk orphaned"),
    "running VM, domain off": (_shutoff_domain_a, "domain state mismatch"),
    "port address differs": (_port_ip_differs, "port address mismatch"),
    "node wrote no state": (lambda c: (c.nodes["node-2"] / "sim-host.json").unlink(),
                            "node state missing"),
    "node state malformed": (lambda c: c.write_host("node-2", {"ports": {"m": {"ip": "x"}}}),
                             "node state unreadable"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_each_invariant_fires_on_a_broken_state(cloud: Cloud, breakage: str) -> None:
    breaks, kind = BREAKAGES[breakage]
    breaks(cloud)
    problems = cloud.problems()
    assert kind in summarize(problems), problems
    with pytest.raises(AssertionError, match="invariant violations"):
        assert_consistent(cloud.url, cloud.nodes, keys=cloud.keys)


def test_orphaned_port_is_named_too(cloud: Cloud) -> None:
    _orphan_disk_and_port(cloud)
    assert set(summarize(cloud.problems())) == {"disk orphaned", "port orphaned"}


def test_nothing_left_after_deleting_everything(cloud: Cloud) -> None:
    problems = cloud.problems(expect_no_vms=True)
    assert summarize(problems) == {"VM left": 3}

    def delete_all(s: Session) -> None:
        for model in (VmRow, AddressRow):
            s.query(model).delete()
        s.query(QuotaRow).filter(QuotaRow.resource != "images").update({"used": 0})
        s.query(AllocationRow).delete()
        s.query(InventoryRow).update({"used": 0})

    cloud.edit(delete_all)
    cloud.keys.clear()
    cloud.write_host("node-1", {})
    assert cloud.problems(expect_no_vms=True) == []


def test_unsettled_names_what_moves(cloud: Cloud) -> None:
    def moving(s: Session) -> None:
        _vm(s, VM_A).state = "deleting"
        _node(s, NODE2).status = "down"
        s.add(FlowRow(uuid="f-3", kind="vm.delete", resource_type="vm", resource_uuid=VM_A,
                      state="rolling_back"))

    cloud.edit(moving)
    assert unsettled(cloud.url) == ["1 flows rolling_back", "1 VMs deleting",
                                    "node node-2 is not up"]


def test_loader_reads_the_documented_format(cloud: Cloud) -> None:
    host = load_sim_host(cloud.nodes["node-1"])
    assert set(host.domains) == {VM_A, VM_B}
    assert host.ports[MAC_A]["ip"] == "10.77.0.2"
    cloud.write_host("node-2", {})  # an empty host may write no tables at all
    assert load_sim_host(cloud.nodes["node-2"]).domains == {}
    cloud.write_host("node-2", [])
    with pytest.raises(ValueError, match="expected an object"):
        load_sim_host(cloud.nodes["node-2"])
