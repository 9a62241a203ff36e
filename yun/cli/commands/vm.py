"""`yun vm …`: virtual machines."""

from __future__ import annotations

from typing import Annotated

import typer

from yun.cli.common import (
    IdempotencyKey,
    Output,
    TagArgs,
    WaitOpt,
    WaitTimeout,
    accepted,
    add_list_and_show,
    add_tag_commands,
    finish,
    parse_tags,
)
from yun.cli.context import client
from yun.cli.output import emit
from yun.client import DEFAULT_WAIT
from yun.proto.resources import Accepted, VmCreate

app = typer.Typer(help="Virtual machines.", no_args_is_help=True)

COLUMNS = ["uuid", "name", "state", "vcpus", "memory_mb", "disk_gb", "ip", "node_name"]
VmArg = Annotated[str, typer.Argument(help="VM name or uuid")]


def _after(answer: Accepted | None, ref: str, what: str, wait: bool, timeout: float,
           output: Output) -> None:
    """Follow a VM operation, then show the VM as it is now."""
    finish(answer, what, wait, timeout, output, show=lambda: client().vms.get(ref))


@app.command("create")
def create(
    name: str,
    image: Annotated[str, typer.Option(help="image name or uuid")],
    vcpus: Annotated[int, typer.Option(min=1, help="virtual CPUs")] = 1,
    memory: Annotated[int, typer.Option("--memory", "--memory-mb", help="MiB")] = 256,
    disk: Annotated[int, typer.Option("--disk", "--disk-gb", help="GiB")] = 1,
    description: str = "",
    tag: TagArgs = None,
    wait: WaitOpt = True,
    wait_timeout: WaitTimeout = DEFAULT_WAIT,
    idempotency_key: IdempotencyKey = None,
    output: Output = None,
) -> None:
    """Create a VM from an image and boot it."""
    spec = VmCreate(name=name, image=image, vcpus=vcpus, memory_mb=memory, disk_gb=disk,
                    description=description, tags=parse_tags(tag or []))
    answer = accepted(client().vms.create(spec, idempotency_key=idempotency_key))
    ref = str(answer.resource.get("uuid", name)) if answer else name
    _after(answer, ref, f"create {name}", wait, wait_timeout, output)


add_list_and_show(app, "VM", "VMs", COLUMNS, lambda c: c.vms,
                  "List VMs.")


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
           idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Delete a VM with its disks, address and network port."""
    answer = accepted(client().vms.delete(vm, idempotency_key=idempotency_key))
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


add_tag_commands(app, "VM", lambda c: c.vms.tags)
