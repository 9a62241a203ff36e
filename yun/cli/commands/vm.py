"""`yun vm …`: virtual machines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from yun.cli.commands.key import ssh_key_entry
from yun.cli.common import (
    All,
    Cursor,
    IdempotencyKey,
    Limit,
    Output,
    Query,
    Sort,
    TagArgs,
    WaitOpt,
    WaitTimeout,
    accepted,
    add_tag_commands,
    finish,
    parse_tags,
    show_list,
)
from yun.cli.context import client
from yun.cli.output import OutputFormat, emit, fields_table, output_format
from yun.cli.parsing import (
    Label,
    format_bytes,
    format_kbit,
    labels_of,
    parse_bandwidth,
    parse_byte_rate,
    parse_label,
)
from yun.client import DEFAULT_WAIT
from yun.proto.messages import CpuQos, QosSpec
from yun.proto.resources import (
    MAX_USER_DATA,
    Accepted,
    PortForward,
    Vm,
    VmCreate,
    VmQosUpdate,
)

app = typer.Typer(help="Virtual machines.", no_args_is_help=True)

COLUMNS = ["uuid", "name", "state", "vcpus", "memory_mb", "disk_gb", "ip", "pool_name",
           "node_name"]
VmArg = Annotated[str, typer.Argument(help="VM name or uuid")]
BandwidthOpt = Annotated[int | None, typer.Option(
    "--bandwidth", parser=parse_bandwidth, metavar="RATE",
    help="NIC bandwidth limit each way, e.g. 10mbit, 500kbit, 1gbit")]
BytesOpt = Annotated[int | None, typer.Option(
    parser=parse_byte_rate, metavar="RATE", help="bytes/s, e.g. 20MiB, 50MB, 4096")]


def qos_rows(qos: QosSpec) -> dict[str, str]:
    """A VM's QoS limits as readable ``field: value`` rows."""
    return {
        "qos cpu": qos.cpu.value,
        "qos read iops": str(qos.read_iops_sec or "unlimited"),
        "qos write iops": str(qos.write_iops_sec or "unlimited"),
        "qos read bytes/s": format_bytes(qos.read_bytes_sec),
        "qos write bytes/s": format_bytes(qos.write_bytes_sec),
        "qos bandwidth": format_kbit(qos.bandwidth_kbit),
    }


def forward_line(vm: str, forward: PortForward) -> str:
    """``web1:80 -> 10.0.0.5:40001`` (``/udp`` after the VM port when it is UDP)."""
    proto = "" if forward.protocol == "tcp" else f"/{forward.protocol}"
    return f"{vm}:{forward.vm_port}{proto} -> {forward.address}:{forward.port}"


def vm_table(vm: Vm) -> Table:
    """A VM's fields, its QoS limits spelled out (with units, 'unlimited'), its port
    forwards one per row."""
    data = vm.model_dump(mode="json")
    data.pop("qos", None)
    data.pop("port_forwards", None)
    data["extra_ips"] = ", ".join(vm.extra_ips)
    forwards = {f"port forward {i + 1}": forward_line(vm.name, f)
                for i, f in enumerate(vm.port_forwards)}
    return fields_table({**data, **forwards, **qos_rows(vm.qos)})


def show_vm(vm: Vm, output: Output) -> None:
    """Print a VM: its fields and effective QoS limits as a table, or the API's JSON."""
    emit(vm, output, table=lambda: vm_table(vm))


def _after(answer: Accepted | None, ref: str, what: str, wait: bool, timeout: float,
           output: Output) -> None:
    """Follow a VM operation, then show the VM as it is now."""
    finish(answer, what, wait, timeout, output, show=lambda: client().vms.get(ref),
           table=vm_table)


@app.command("create")
def create(
    name: str,
    image: Annotated[str | None, typer.Option(
        help="disk image name or uuid to boot from")] = None,
    iso: Annotated[str | None, typer.Option(
        help="ISO image for its CD drive; without --image the VM gets a blank disk of "
             "--disk GiB and boots from the ISO to be installed")] = None,
    ssh_key: Annotated[list[str] | None, typer.Option(
        "--ssh-key", metavar="NAME_OR_FILE",
        help="an SSH key for the guest (cloud-init): the name of one of your keys "
             "(`yun key add`), a .pub file, or the key itself; repeatable")] = None,
    user_data: Annotated[Path | None, typer.Option(
        "--user-data", metavar="FILE", help="cloud-init user data (cloud-config or a "
                                            "script), at most 64 KiB")] = None,
    vcpus: Annotated[int, typer.Option(min=1, help="virtual CPUs")] = 1,
    memory: Annotated[int, typer.Option("--memory", "--memory-mb", help="MiB")] = 256,
    disk: Annotated[int, typer.Option("--disk", "--disk-gb", help="GiB")] = 1,
    pool: Annotated[str | None, typer.Option(
        help="compute pool name or uuid; default: the platform's default pool")] = None,
    zone: Annotated[str | None, typer.Option(
        help="a zone instead of a pool: the scheduler picks a pool in it")] = None,
    group: Annotated[str | None, typer.Option(
        help="VM group (affinity or anti-affinity) to join")] = None,
    node_label: Annotated[list[Label] | None, typer.Option(
        "--node-label", parser=parse_label, metavar="KEY=VALUE",
        help="only nodes carrying this label, repeatable, e.g. ssd=true")] = None,
    bandwidth: BandwidthOpt = None,
    description: str = "",
    tag: TagArgs = None,
    wait: WaitOpt = True,
    wait_timeout: WaitTimeout = DEFAULT_WAIT,
    idempotency_key: IdempotencyKey = None,
    output: Output = None,
) -> None:
    """Create a VM from an image (or blank, to install from --iso) and boot it, in a pool
    (or a zone); everything but its size, images, keys and bandwidth comes from the
    pool's template."""
    if pool is not None and zone is not None:
        raise typer.BadParameter("give --pool or --zone, not both (a pool has one zone)")
    if image is None and iso is None:
        raise typer.BadParameter("give --image to boot from a disk image, or --iso to "
                                 "install from an ISO onto a blank disk (or both)")
    guest = {"iso": iso, "ssh_keys": [ssh_key_entry(k) for k in ssh_key or []] or None,
             "user_data": read_user_data(user_data) if user_data is not None else None}
    # Only what was given is sent: the API's defaults stay the API's.
    placement = {"pool": pool, "zone": zone, "group": group,
                 "node_labels": labels_of(node_label) or None, "bandwidth_kbit": bandwidth}
    spec = VmCreate.model_validate({
        "name": name, "vcpus": vcpus, "memory_mb": memory, "disk_gb": disk,
        "description": description, "tags": parse_tags(tag or []),
        **{key: value for key, value in {"image": image, **guest, **placement}.items()
           if value is not None}})
    answer = accepted(client().vms.create(spec, idempotency_key=idempotency_key))
    ref = str(answer.resource.get("uuid", name)) if answer else name
    _after(answer, ref, f"create {name}", wait, wait_timeout, output)


def read_user_data(path: Path) -> str:
    """The user data file's text; refused before any request when it is missing, not
    UTF-8 or larger than the API takes."""
    try:
        data = path.expanduser().read_bytes()
    except OSError as exc:
        raise typer.BadParameter(f"--user-data {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_USER_DATA:
        raise typer.BadParameter(f"--user-data {path} is {len(data)} bytes; at most "
                                 f"{MAX_USER_DATA} (64 KiB) are allowed")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise typer.BadParameter(f"--user-data {path} is not UTF-8 text") from None


@app.command("list")
def list_(q: Query = None, sort: Sort = None, limit: Limit = 100, cursor: Cursor = None,
          every: All = False, output: Output = None) -> None:
    """List VMs."""
    show_list(client().vms, q, sort, limit, cursor, every, output, COLUMNS, "VMs")


@app.command("show")
def show(vm: VmArg, output: Output = None) -> None:
    """Show one VM: its state, pool, node, address and effective QoS limits."""
    show_vm(client().vms.get(vm), output)


@app.command("set-qos")
def set_qos(
    vm: VmArg,
    cpu: Annotated[CpuQos | None, typer.Option(
        case_sensitive=False, help="CPU level: high, medium or low")] = None,
    iops: Annotated[int | None, typer.Option(
        min=1, max=1_000_000, metavar="N", help="read and write IOPS limit")] = None,
    read_iops: Annotated[int | None, typer.Option(
        min=1, max=1_000_000, metavar="N", help="read IOPS limit")] = None,
    write_iops: Annotated[int | None, typer.Option(
        min=1, max=1_000_000, metavar="N", help="write IOPS limit")] = None,
    read_bps: BytesOpt = None,
    write_bps: BytesOpt = None,
    bandwidth: BandwidthOpt = None,
    clear_iops: Annotated[bool, typer.Option(
        help="lift the read and write IOPS limits")] = False,
    clear_bps: Annotated[bool, typer.Option(
        help="lift the read and write bytes/s limits")] = False,
    clear_bandwidth: Annotated[bool, typer.Option(help="lift the bandwidth limit")] = False,
    wait: WaitOpt = True,
    wait_timeout: WaitTimeout = DEFAULT_WAIT,
    idempotency_key: IdempotencyKey = None,
    output: Output = None,
) -> None:
    """Change a VM's QoS; a running VM gets it at once. Limits not named are kept."""
    spec = qos_update(cpu=cpu, iops=iops, read_iops=read_iops, write_iops=write_iops,
                      read_bps=read_bps, write_bps=write_bps, bandwidth=bandwidth,
                      clear_iops=clear_iops, clear_bps=clear_bps,
                      clear_bandwidth=clear_bandwidth)
    answer = accepted(client().vms.set_qos(vm, spec, idempotency_key=idempotency_key))
    _after(answer, vm, f"set-qos {vm}", wait, wait_timeout, output)


def qos_update(*, cpu: CpuQos | None = None, iops: int | None = None,
               read_iops: int | None = None, write_iops: int | None = None,
               read_bps: int | None = None, write_bps: int | None = None,
               bandwidth: int | None = None, clear_iops: bool = False,
               clear_bps: bool = False, clear_bandwidth: bool = False) -> VmQosUpdate:
    """The QoS change the set-qos options ask for; contradictions are refused here,
    before any request (``--iops 500 --clear-iops``, ``--iops`` with ``--read-iops``)."""
    if iops is not None and (read_iops is not None or write_iops is not None):
        raise typer.BadParameter("--iops sets both read and write; do not also give "
                                 "--read-iops or --write-iops")
    read_iops = iops if iops is not None else read_iops
    write_iops = iops if iops is not None else write_iops
    clear: list[str] = []
    conflicts = []
    if clear_iops:
        clear += ["read_iops_sec", "write_iops_sec"]
        if read_iops is not None or write_iops is not None:
            conflicts.append("--clear-iops with an IOPS limit")
    if clear_bps:
        clear += ["read_bytes_sec", "write_bytes_sec"]
        if read_bps is not None or write_bps is not None:
            conflicts.append("--clear-bps with a bytes/s limit")
    if clear_bandwidth:
        clear.append("bandwidth_kbit")
        if bandwidth is not None:
            conflicts.append("--clear-bandwidth with --bandwidth")
    if conflicts:
        raise typer.BadParameter(f"contradictory options: {'; '.join(conflicts)}")
    fields = {"cpu": cpu, "read_iops_sec": read_iops, "write_iops_sec": write_iops,
              "read_bytes_sec": read_bps, "write_bytes_sec": write_bps,
              "bandwidth_kbit": bandwidth}
    given = {key: value for key, value in fields.items() if value is not None}
    if not given and not clear:
        raise typer.BadParameter("give at least one change, e.g. --cpu high, --iops 500 "
                                 "or --bandwidth 10mbit")
    return VmQosUpdate.model_validate({**given, **({"clear": clear} if clear else {})})


@app.command("start")
def start(vm: VmArg, wait: WaitOpt = True, wait_timeout: WaitTimeout = DEFAULT_WAIT,
          idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Power a VM on."""
    answer = accepted(client().vms.start(vm, idempotency_key=idempotency_key))
    _after(answer, vm, f"start {vm}", wait, wait_timeout, output)


@app.command("stop")
def stop(vm: VmArg,
         force: Annotated[bool, typer.Option(help="power off at once")] = False,
         timeout: Annotated[float, typer.Option(help="seconds before forcing")] = 60,
         wait: WaitOpt = True, wait_timeout: WaitTimeout = DEFAULT_WAIT,
         idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Shut a VM down (ACPI), forcing it off after the timeout."""
    answer = accepted(client().vms.stop(vm, force=force, timeout=timeout,
                                        idempotency_key=idempotency_key))
    _after(answer, vm, f"stop {vm}", wait, wait_timeout, output)


@app.command("reboot")
def reboot(vm: VmArg, wait: WaitOpt = True, wait_timeout: WaitTimeout = DEFAULT_WAIT,
           idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Reboot a VM."""
    answer = accepted(client().vms.reboot(vm, idempotency_key=idempotency_key))
    _after(answer, vm, f"reboot {vm}", wait, wait_timeout, output)


@app.command("delete")
def delete(vm: VmArg, wait: WaitOpt = True, wait_timeout: WaitTimeout = DEFAULT_WAIT,
           keep_volumes: Annotated[bool, typer.Option(
               "--keep-volumes", help="keep every data volume (detached, available)")] = False,
           idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Delete a VM with its root volume, address and network port, and the data volumes
    marked to go with it (unless --keep-volumes)."""
    answer = accepted(client().vms.delete(vm, keep_volumes=keep_volumes,
                                          idempotency_key=idempotency_key))
    finish(answer, f"delete {vm}", wait, wait_timeout, output)


@app.command("console-log")
def console_log(vm: VmArg, max_bytes: Annotated[int, typer.Option(min=1)] = 65536,
                output: Output = None) -> None:
    """Print what the VM wrote on its serial console."""
    emit(client().vms.console_log(vm, max_bytes), output)


@app.command("console")
def console(vm: VmArg, output: Output = None) -> None:
    """Where the VM's VNC display is."""
    emit(client().vms.console(vm), output)


forwards_app = typer.Typer(help="Reach ports of a VM from outside (sandbox-private: a NAT "
                                "port of its node; sandbox-share: a public ip:port).",
                           no_args_is_help=True)
app.add_typer(forwards_app, name="port-forward")
PortArg = Annotated[int, typer.Argument(min=1, max=65535, help="the VM's port")]
UdpOpt = Annotated[bool, typer.Option("--udp", help="a UDP port (default TCP)")]


@forwards_app.command("add")
def forward_add(vm: VmArg, port: PortArg, udp: UdpOpt = False,
                idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Forward a port of the VM; prints how to reach it, e.g. web1:80 -> 10.0.0.5:40001."""
    made = client().vms.add_port_forward(vm, port, "udp" if udp else "tcp",
                                         idempotency_key=idempotency_key)
    if output_format(output) is OutputFormat.TABLE:
        typer.echo(forward_line(vm, made))
    else:
        emit(made, output)


@forwards_app.command("list")
def forward_list(vm: VmArg, output: Output = None) -> None:
    """The VM's port forwards, one per line."""
    forwards = client().vms.port_forwards(vm)
    if output_format(output) is not OutputFormat.TABLE:
        emit(forwards, output)
        return
    for forward in forwards:
        typer.echo(forward_line(vm, forward))
    if not forwards:
        typer.echo(f"VM {vm} has no port forward")


@forwards_app.command("remove")
def forward_remove(vm: VmArg, port: PortArg, udp: UdpOpt = False,
                   idempotency_key: IdempotencyKey = None) -> None:
    """Stop forwarding a port of the VM."""
    client().vms.remove_port_forward(vm, port, "udp" if udp else "tcp",
                                     idempotency_key=idempotency_key)
    typer.echo(f"port forward of {vm}:{port}{'/udp' if udp else ''} removed")


addresses_app = typer.Typer(help="Extra addresses of a sandbox VM (hot-plugged, routed to "
                                 "its NIC; the guest configures them itself).",
                            no_args_is_help=True)
app.add_typer(addresses_app, name="address")


@addresses_app.command("add")
def address_add(vm: VmArg, idempotency_key: IdempotencyKey = None,
                output: Output = None) -> None:
    """Give the VM one more address of its node's subnet; prints it."""
    made = client().vms.add_address(vm, idempotency_key=idempotency_key)
    if output_format(output) is OutputFormat.TABLE:
        typer.echo(made.ip)
    else:
        emit(made, output)


@addresses_app.command("remove")
def address_remove(vm: VmArg, ip: Annotated[str, typer.Argument(help="the extra address")],
                   idempotency_key: IdempotencyKey = None) -> None:
    """Take an extra address off the VM."""
    client().vms.remove_address(vm, ip, idempotency_key=idempotency_key)
    typer.echo(f"address {ip} removed from {vm}")


nics_app = typer.Typer(help="NICs of a VM, plugged in and out while it runs (or while it "
                            "is stopped: it has them at its next start).",
                       no_args_is_help=True)
app.add_typer(nics_app, name="nic")
NIC_COLUMNS = ("index", "mac", "network", "exposure", "ip", "uuid")


@nics_app.command("add")
def nic_add(vm: VmArg, network: Annotated[str | None, typer.Option(
        help="sandbox or direct: the VM's own network (the default; no other is allowed)")]
            = None,
            idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Plug one more NIC into the VM; prints its index, MAC and address."""
    made = client().vms.add_nic(vm, network=network, idempotency_key=idempotency_key)
    if output_format(output) is OutputFormat.TABLE:
        typer.echo(f"NIC {made.index} of {vm}: {made.mac}"
                   + (f" {made.ip}" if made.ip else ""))
    else:
        emit(made, output)


@nics_app.command("list")
def nic_list(vm: VmArg, output: Output = None) -> None:
    """The VM's NICs, the primary one (index 0) first."""
    emit(client().vms.nics(vm), output, columns=NIC_COLUMNS)


@nics_app.command("remove")
def nic_remove(vm: VmArg, nic: Annotated[str, typer.Argument(
        help="the NIC's index, uuid or MAC (not 0: the primary NIC stays)")],
               idempotency_key: IdempotencyKey = None) -> None:
    """Unplug a NIC of the VM and give its MAC and address back."""
    client().vms.remove_nic(vm, nic, idempotency_key=idempotency_key)
    typer.echo(f"NIC {nic} removed from {vm}")


cdrom_app = typer.Typer(help="The VM's CD drive: insert and eject ISO images, like a CD.",
                        no_args_is_help=True)
app.add_typer(cdrom_app, name="cdrom")


@cdrom_app.command("insert")
def cdrom_insert(vm: VmArg, iso: Annotated[str, typer.Argument(help="ISO image name or uuid")],
                 wait: WaitOpt = True, wait_timeout: WaitTimeout = DEFAULT_WAIT,
                 idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Put an ISO into the VM's CD drive (a running guest sees it at once)."""
    answer = accepted(client().vms.insert_cdrom(vm, iso, idempotency_key=idempotency_key))
    _after(answer, vm, f"cdrom insert {vm}", wait, wait_timeout, output)


@cdrom_app.command("eject")
def cdrom_eject(vm: VmArg, wait: WaitOpt = True, wait_timeout: WaitTimeout = DEFAULT_WAIT,
                idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Eject the ISO. A VM installed from it boots from its disk from then on."""
    answer = accepted(client().vms.eject_cdrom(vm, idempotency_key=idempotency_key))
    _after(answer, vm, f"cdrom eject {vm}", wait, wait_timeout, output)


add_tag_commands(app, "VM", lambda c: c.vms.tags)
