#!/usr/bin/env python3
"""VM boot time through Yun, against the same guest booted by hand in the same run.

Builds a real one-node Yun deployment in network namespaces
(:class:`yun.testing.datacenter.DataCenter` in a :class:`yun.testing.netns.Topology`,
exactly like the system tests), uploads the test guest image and then, ``--runs``
times, boots the test guest three ways, one after the other:

``yun``
    ``POST /api/v1/vms`` (1 vCPU, 192 MiB) through the gateway; the clock runs from
    the request to ``YUN-GUEST-READY`` in the VM's serial log (the file virtlogd
    writes on the node, read directly, polled every 50 ms). The time is split into
    request → 202 accepted → task succeeded → marker, and the middle part further
    into the flow's steps and the node agent's work (from its JSON log).
``virsh``
    The domain XML Yun generated for that VM (``virsh dumpxml --inactive``), with a
    new name and uuid, its disk pointed at a fresh qcow2 overlay of (a copy of) the
    cached guest image and its serial log at a new file, started with ``virsh
    create`` on the *same* node host's libvirtd. The Yun VM is powered off (forced)
    first: the hand-made domain keeps its MAC, so the node's dnsmasq gives it the
    same address and the guest's DHCP wait is the same. Clock: ``virsh create`` →
    marker.
``bare``
    :func:`yun.testing.qemu.boot_guest`: a bare ``qemu-system-x86_64`` with the same
    memory, vCPUs and CPU model (``qemu64``, what Yun's domains get under TCG), no
    libvirt, user-mode networking. Clock: QEMU process start → marker.

The Yun VM is deleted after each run. The script prints every run, the medians,
the ratios Yun / virsh and Yun / bare QEMU (goal: ≤ 1.2 against bare QEMU) and,
when the goal is missed, where Yun's time goes. Everything it starts (namespaces,
daemons, guests, files) is removed at the end, also on failure or SIGTERM.

Needs root, KVM is not used (TCG). Run: ``.venv/bin/python benchmarks/boot.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from machine import cpu_model, memory_gib  # benchmarks/machine.py

from yun.testing.datacenter import DataCenter
from yun.testing.guest import BOOT_MARKER, IP_MARKER, READY_MARKER, ensure_guest_image
from yun.testing.netns import Topology
from yun.testing.nodehost import NodeHost
from yun.testing.qemu import boot_guest
from yun.util.lifecycle import sigterm_as_interrupt
from yun.util.run import run

VCPUS = 1
MEMORY_MB = 192
CPU_MODEL = "qemu64"  # what yun.node.hypervisor.libvirt.xml gives a domain under TCG
IMAGE_NAME = "guest"
POLL = 0.05  # seconds between looks at a serial log (boot_guest polls at the same rate)
GOAL = 1.2  # Yun / bare QEMU
#: What the test guest prints on its serial console, in this order: the initramfs runs,
#: DHCP got an address, HTTP answers (the end of the boot).
MARKERS = {"boot": BOOT_MARKER, "ip": IP_MARKER, "ready": READY_MARKER}


class BenchmarkError(RuntimeError):
    """A boot did not happen as it should; the message says which and why."""


# --------------------------------------------------------------------------- results


@dataclass
class YunRun:
    """One boot through the REST API; times in seconds from the POST request."""

    vm_uuid: str
    accepted: float  # 202 received
    task_done: float  # the task's finished_at (control server clock)
    marker: float  # YUN-GUEST-READY seen in the serial log
    marker_at_first_look: bool  # the marker was there before we began to look
    guest: dict[str, float] = field(default_factory=dict)  # guest marker -> time
    steps: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (start, end)
    node: dict[str, float] = field(default_factory=dict)  # node log event -> time
    libvirt_start: float | None = None  # seconds virDomainCreate took (node log)
    image_fetched: bool = False  # the node downloaded the image during this run


@dataclass
class HandRun:
    """One boot by hand: ``virsh create`` or bare QEMU; times from the start."""

    started: float  # virsh create returned; for bare QEMU: boot_guest returned
    marker: float  # YUN-GUEST-READY seen
    guest: dict[str, float] = field(default_factory=dict)  # guest marker -> time


@dataclass
class Run:
    """One round: the same guest booted through Yun, with virsh and with bare QEMU."""

    yun: YunRun
    virsh: HandRun
    bare: HandRun


# --------------------------------------------------------------------------- helpers


def wall_to_rel(t0: float, value: str | None) -> float | None:
    """Seconds from wall-clock ``t0`` to the ISO timestamp ``value`` (UTC if naive)."""
    if not value:
        return None
    when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp() - t0


def wait_markers(path: Path, timeout: float, t0: float,
                 alive: subprocess.Popen[bytes] | None = None) -> tuple[dict[str, float], bool]:
    """Poll the serial log ``path`` until it holds the ready marker.

    Returns the seconds from wall-clock ``t0`` at which each guest marker (``boot``,
    ``ip``, ``ready``) was first seen, and whether the ready marker was already there
    at the first look (then its time is only an upper bound). Raises
    :class:`BenchmarkError` with the log's tail after ``timeout`` seconds.
    """
    seen: dict[str, float] = {}
    first = True
    deadline = time.monotonic() + timeout
    while True:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        now = time.time() - t0
        for key, marker in MARKERS.items():
            if key not in seen and marker.encode() in data:
                seen[key] = now
        if "ready" in seen:
            return seen, first
        first = False
        if alive is not None and alive.poll() is not None:
            raise BenchmarkError(f"the process writing {path} exited")
        if time.monotonic() > deadline:
            tail = data[-1500:].decode(errors="replace") or "(empty)"
            raise BenchmarkError(f"no {READY_MARKER} in {path} within {timeout:.0f} s:\n{tail}")
        time.sleep(POLL)


def process_start_wall(pid: int) -> float:
    """Wall-clock start time of process ``pid`` (from /proc, 10 ms resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    started_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started_boot)


def node_log_events(log: Path, vm_uuid: str, t0: float, t1: float) -> dict[str, Any]:
    """Events of VM ``vm_uuid`` in the node agent's JSON log, in seconds from ``t0``.

    Also the image download (``downloading image``/``image cached``) if it happened
    between ``t0`` and ``t1``, and the duration libvirt's start took.
    """
    out: dict[str, Any] = {"events": {}, "libvirt_start": None, "image_fetched": False}
    for line in log.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        at = wall_to_rel(t0, rec.get("ts"))
        msg = str(rec.get("msg", ""))
        if at is None:
            continue
        if rec.get("vm") == vm_uuid:
            if msg.startswith("domain started in"):
                out["libvirt_start"] = float(msg.split()[3])
                out["events"]["domain started"] = at
            elif msg in ("volume created", "port ready", "domain defined", "VM provisioned"):
                out["events"].setdefault(msg, at)
        elif msg in ("downloading image", "image cached") and -0.5 <= at <= t1 - t0 + 0.5:
            out["events"].setdefault(msg, at)
            out["image_fetched"] = True
    return out




# --------------------------------------------------------------------------- the three ways


def boot_yun(dc: DataCenter, node_host: NodeHost, index: int, timeout: float) -> YunRun:
    """Create a VM through the REST API and time it up to the marker."""
    assert dc.api is not None
    t0 = time.time()
    resp = dc.api.post("/api/v1/vms", json={"name": f"bench-{index}", "image": IMAGE_NAME,
                                            "vcpus": VCPUS, "memory_mb": MEMORY_MB})
    accepted = time.time() - t0
    if resp.status_code != 202:
        raise BenchmarkError(f"create answered {resp.status_code}: {resp.text}")
    body = resp.json()
    vm_uuid = body["resource"]["uuid"]
    task = dc.wait_task(body["task"]["uuid"], timeout)
    if task["state"] != "succeeded":
        raise BenchmarkError(f"create task {task['state']}: {task.get('error')}\n{dc.logs()}")
    # The product's own answer for where the serial log is (on the node's file system).
    console = dc.api.get(f"/api/v1/vms/{vm_uuid}/console").json()
    serial = Path(console["serial_log"])
    guest, at_first = wait_markers(serial, timeout, t0)
    task_done = wall_to_rel(t0, task["finished_at"])
    assert task_done is not None
    steps = {}
    for step in task["steps"]:
        start, end = wall_to_rel(t0, step["started_at"]), wall_to_rel(t0, step["finished_at"])
        if start is not None and end is not None:
            steps[step["name"]] = (start, end)
    node = node_log_events(dc.procs[node_host.name].log, vm_uuid, t0, t0 + task_done)
    return YunRun(vm_uuid=vm_uuid, accepted=accepted, task_done=task_done,
                  marker=guest["ready"], marker_at_first_look=at_first, guest=guest,
                  steps=steps, node=node["events"],
                  libvirt_start=node["libvirt_start"], image_fetched=node["image_fetched"])


def power_off_yun(dc: DataCenter, vm_uuid: str, timeout: float) -> None:
    """Forced stop through the API: the guest is gone, its MAC and address stay reserved."""
    assert dc.api is not None
    resp = dc.api.post(f"/api/v1/vms/{vm_uuid}/stop", json={"force": True})
    resp.raise_for_status()
    task = dc.wait_task(resp.json()["task"]["uuid"], timeout)
    if task["state"] != "succeeded":
        raise BenchmarkError(f"stop of {vm_uuid} {task['state']}: {task.get('error')}")


def delete_yun(dc: DataCenter, vm_uuid: str, timeout: float) -> None:
    """Delete the VM through the API and wait for its task."""
    assert dc.api is not None
    resp = dc.api.delete(f"/api/v1/vms/{vm_uuid}")
    resp.raise_for_status()
    task = dc.wait_task(resp.json()["task"]["uuid"], timeout)
    if task["state"] != "succeeded":
        raise BenchmarkError(f"delete of {vm_uuid} {task['state']}: {task.get('error')}")


def hand_made_xml(yun_xml: str, name: str, disk: Path, serial_log: Path) -> str:
    """Yun's domain XML with a new name and uuid, its disk and serial log moved.

    The Yun metadata goes (the node agent must not take the domain for its own) and
    so does the tap name (libvirt picks one), so that nothing of Yun's is shared.
    """
    root = ET.fromstring(yun_xml)
    root.find("name").text = name  # type: ignore[union-attr]
    root.find("uuid").text = str(uuidlib.uuid4())  # type: ignore[union-attr]
    for tag in ("metadata", "title", "description"):
        el = root.find(tag)
        if el is not None:
            root.remove(el)
    sources = root.findall("devices/disk[@device='disk']/source")
    if len(sources) != 1:
        raise BenchmarkError(f"expected one disk in Yun's domain XML, found {len(sources)}")
    sources[0].set("file", str(disk))
    log_el = root.find("devices/serial/log")
    if log_el is None:
        raise BenchmarkError("Yun's domain XML has no serial log")
    log_el.set("file", str(serial_log))
    for iface in root.findall("devices/interface"):
        target = iface.find("target")
        if target is not None:
            iface.remove(target)
    return ET.tostring(root, encoding="unicode")


def boot_virsh(node_host: NodeHost, yun_uuid: str, base: Path, index: int,
               timeout: float) -> HandRun:
    """``virsh create`` of Yun's XML (rewritten) on the node host's libvirtd."""
    uri = node_host.libvirt_uri
    name = f"bench-virsh-{index}"
    work = node_host.disk_dir
    disk, serial, xml_file = (work / f"{name}.qcow2", work / f"{name}.log",
                              work / f"{name}.xml")
    yun_xml = run(["virsh", "-c", uri, "dumpxml", "--inactive", f"yun-{yun_uuid}"]).stdout
    yun_disk = ET.fromstring(yun_xml).find("devices/disk[@device='disk']/source")
    assert yun_disk is not None
    size = json.loads(run(["qemu-img", "info", "--output=json", "-U",
                           yun_disk.get("file", "")]).stdout)["virtual-size"]
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
         str(disk), str(size)])
    xml_file.write_text(hand_made_xml(yun_xml, name, disk, serial))
    created = False
    try:
        t0 = time.time()
        run(["virsh", "-c", uri, "create", str(xml_file)], timeout=timeout)
        created = True
        started = time.time() - t0
        guest, _ = wait_markers(serial, timeout, t0)
        return HandRun(started=started, marker=guest["ready"], guest=guest)
    finally:
        if created:
            run(["virsh", "-c", uri, "destroy", name], check=False)
        for path in (disk, serial, xml_file):
            path.unlink(missing_ok=True)


def boot_bare(image: Path, timeout: float) -> HandRun:
    """Bare QEMU through boot_guest; from the QEMU process's start to the marker."""
    with boot_guest(image, memory_mb=MEMORY_MB, cpus=VCPUS, cpu_model=CPU_MODEL,
                    marker=None, timeout=timeout) as qemu:
        returned = time.time()
        t0 = process_start_wall(qemu.process.pid)
        guest, _ = wait_markers(qemu.serial_log, timeout, t0, alive=qemu.process)
    return HandRun(started=returned - t0, marker=guest["ready"], guest=guest)


# --------------------------------------------------------------------------- reporting


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    model, mem_gib = cpu_model(), memory_gib()
    qemu = run(["qemu-system-x86_64", "--version"], check=False).stdout.splitlines()
    libvirt = run(["libvirtd", "--version"], check=False).stdout.strip()
    return {"cpu": model, "cores": str(os.cpu_count()), "memory": f"{mem_gib:.1f} GiB",
            "accel": "TCG", "qemu": qemu[0] if qemu else "?", "libvirt": libvirt,
            "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def fmt(value: float | None) -> str:
    """A table cell: seconds, or a dash when the value is unknown."""
    return "     -" if value is None else f"{value:6.2f}"


def yun_split(r: YunRun) -> list[tuple[str, float | None]]:
    """Consecutive segments of one Yun boot, in seconds (None: not in the logs).

    The flow starts inside the create request, so the 202 may reach the client after
    the schedule step is done: it is shown as a point in time, not a segment.
    """
    sched_done = r.steps["schedule"][1] if "schedule" in r.steps else None
    prov = r.steps.get("provision")
    started = r.node.get("domain started")
    begins = started - r.libvirt_start if started is not None and \
        r.libvirt_start is not None else None
    return [
        ("POST → schedule step done (API, placement)", sched_done),
        ("→ libvirt start begins (image, disk, port, define)",
         begins - sched_done if begins is not None and sched_done is not None else None),
        ("libvirt start (QEMU spawned, CPU resumed)", r.libvirt_start),
        ("→ task succeeded (node reply, confirm, journal)",
         r.task_done - started if started is not None else None),
        ("→ YUN-GUEST-READY (guest boot)", r.marker - r.task_done),
        ("total", r.marker),
        ("  (202 accepted at)", r.accepted),
        ("  (provision step took)", prov[1] - prov[0] if prov else None),
    ]


def run_running(run: Run, kind: str) -> float:
    """When the guest's CPU started running, in seconds from the start of that boot.

    Yun: the node's libvirt start returned (libvirt starts QEMU paused and resumes it
    at the end); virsh: ``virsh create`` returned; bare QEMU: QEMU answered QMP.
    """
    if kind == "yun":
        return run.yun.node.get("domain started", run.yun.task_done)
    hand: HandRun = getattr(run, kind)
    return hand.started


GUEST_SEGMENTS: list[tuple[str, Any]] = [
    ("start → QEMU running (guest CPU starts)", lambda r, g: r),
    ("→ YUN-GUEST-BOOT (firmware, loader, kernel)", lambda r, g: g["boot"] - r),
    ("→ YUN-GUEST-IP (init, DHCP lease)", lambda r, g: g["ip"] - g["boot"]),
    ("→ YUN-GUEST-READY (HTTP up)", lambda r, g: g["ready"] - g["ip"]),
    ("total", lambda r, g: g["ready"]),
]
GUEST_WIDTH = max(len(label) for label, _ in GUEST_SEGMENTS)


def report(runs: list[Run], info: dict[str, str]) -> dict[str, Any]:
    """Print the tables; return the summary (also for --json)."""
    yun = [r.yun.marker for r in runs]
    virsh = [r.virsh.marker for r in runs]
    bare = [r.bare.marker for r in runs]
    med = {k: statistics.median(v) for k, v in (("yun", yun), ("virsh", virsh),
                                                  ("bare", bare))}
    print()
    print("Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"Guest: yun test guest, {VCPUS} vCPU, {MEMORY_MB} MiB, cpu {CPU_MODEL}, TCG")
    print()
    print("Boot time to YUN-GUEST-READY, seconds")
    print("run |   Yun  | virsh create | bare QEMU | Yun: 202 | task ok | notes")
    for i, r in enumerate(runs, 1):
        notes = []
        if r.yun.image_fetched:
            notes.append("node fetched the image (cold cache)")
        if r.yun.marker_at_first_look:
            notes.append("marker already there at first look")
        print(f"{i:3d} | {r.yun.marker:6.2f} | {r.virsh.marker:12.2f} | {r.bare.marker:9.2f} "
              f"| {r.yun.accepted:8.3f} | {r.yun.task_done:7.2f} | {'; '.join(notes)}")
    print(f"med | {med['yun']:6.2f} | {med['virsh']:12.2f} | {med['bare']:9.2f} |")
    ratio_virsh = med["yun"] / med["virsh"]
    ratio_bare = med["yun"] / med["bare"]
    print()
    print(f"Yun / virsh create : {ratio_virsh:.2f}")
    verdict = "met" if ratio_bare <= GOAL else "MISSED"
    print(f"Yun / bare QEMU    : {ratio_bare:.2f}   (goal ≤ {GOAL}: {verdict})")
    print(f"virsh / bare QEMU  : {med['virsh'] / med['bare']:.2f}")
    print()
    print("Where Yun's time goes (seconds, consecutive segments)")
    rows = [yun_split(r.yun) for r in runs]
    width = max(len(label) for label, _ in rows[0])
    print(f"{'segment':<{width}} | "
          + " | ".join(f"{'run ' + str(i):>6}" for i in range(1, len(runs) + 1)) + " | median")
    for j, (label, _) in enumerate(rows[0]):
        values = [row[j][1] for row in rows]
        known = [v for v in values if v is not None]
        median = statistics.median(known) if known else None
        print(f"{label:<{width}} | " + " | ".join(fmt(v) for v in values)
              + f" | {fmt(median)}")
    print()
    print("The same boots seen from the guest (medians, seconds)")
    print(f"{'segment':<{GUEST_WIDTH}} |    Yun | virsh create | bare QEMU")
    for label, pick in GUEST_SEGMENTS:
        values = [statistics.median(pick(run_running(r, kind), getattr(r, kind).guest)
                                    for r in runs) for kind in ("yun", "virsh", "bare")]
        print(f"{label:<{GUEST_WIDTH}} | {values[0]:6.2f} | {values[1]:12.2f} | "
              f"{values[2]:9.2f}")
    return {"machine": info, "medians": med, "yun_over_virsh": ratio_virsh,
            "yun_over_bare": ratio_bare, "goal": GOAL,
            "runs": [asdict(r) for r in runs]}


# --------------------------------------------------------------------------- main


def benchmark(runs: int, timeout: float) -> list[Run]:
    """Build the deployment, boot ``runs`` times each way, tear everything down."""
    image = ensure_guest_image()
    workdir = Path(tempfile.mkdtemp(prefix="yun-bench-boot-"))
    results: list[Run] = []
    try:
        with Topology() as topo:
            dc = DataCenter(topo, workdir, nodes=1)
            try:
                t = time.monotonic()
                dc.start()
                print(f"deployment up in {time.monotonic() - t:.1f} s "
                      f"(topology {topo.tag}, work dir {workdir})", flush=True)
                dc.upload_guest_image(IMAGE_NAME)
                node_host = dc.node_hosts["node0"]
                # The hand-made domain's backing file: the cached guest image, copied to
                # where QEMU (as libvirt-qemu) may read it and libvirt may relabel it.
                base = node_host.disk_dir / "bench-base.qcow2"
                shutil.copyfile(image, base)
                for i in range(1, runs + 1):
                    yun = boot_yun(dc, node_host, i, timeout)
                    print(f"run {i}: Yun {yun.marker:.2f} s", end="", flush=True)
                    power_off_yun(dc, yun.vm_uuid, timeout)
                    try:
                        virsh = boot_virsh(node_host, yun.vm_uuid, base, i, timeout)
                    finally:
                        delete_yun(dc, yun.vm_uuid, timeout)
                    print(f", virsh {virsh.marker:.2f} s", end="", flush=True)
                    bare = boot_bare(image, timeout)
                    print(f", bare QEMU {bare.marker:.2f} s", flush=True)
                    results.append(Run(yun, virsh, bare))
            except BaseException:
                print(dc.logs(), file=sys.stderr)
                raise
            finally:
                dc.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/boot.py",
        description="VM boot time (REST API request → YUN-GUEST-READY on the serial "
                    "console) through Yun on a one-node deployment in network namespaces, "
                    "against the same guest started with 'virsh create' of Yun's domain XML "
                    "on the same libvirtd and with a bare qemu-system-x86_64, all in the "
                    "same run. Needs root; everything runs under TCG.")
    parser.add_argument("--runs", type=int, default=3,
                        help="boots of each kind (default 3); the VM is deleted between runs")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds one boot may take before the benchmark fails "
                             "(default 180)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="also write every measurement to FILE as JSON")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("boot.py needs root (network namespaces, libvirtd)", file=sys.stderr)
        return 2
    started = time.monotonic()
    info_before = machine()
    try:
        with sigterm_as_interrupt():
            runs = benchmark(args.runs, args.timeout)
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'SIGINT'}); everything started was removed",
              file=sys.stderr)
        return 130
    info = {**info_before, "loadavg after": machine()["loadavg"]}
    summary = report(runs, info)
    print(f"\nbenchmark wall time {time.monotonic() - started:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
