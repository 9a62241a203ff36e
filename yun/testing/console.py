"""Commands typed on a test guest's serial console, their output read back through the API.

The project's test guest runs a root shell (busybox) on its serial console. A system test
types a line there through the node host's libvirtd and finds the answer in the VM's
console log as the control plane serves it (``GET /api/v1/vms/{uuid}/console-log``), so
what it checks went through Yun's own path.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

from yun.testing.datacenter import DataCenter
from yun.testing.nodehost import NodeHost


@contextlib.contextmanager
def serial_console(node_host: NodeHost, vm_uuid: str) -> Iterator[Callable[[str], None]]:
    """A function typing a line on the guest's serial console (a root shell in the test
    guest). The console stays open meanwhile: QEMU notices a newly opened pty only on
    its next poll (about a second), and what was typed into a pty closed before is lost."""
    import libvirt  # only system tests use this module; unit runs need no libvirt

    conn = libvirt.open(node_host.libvirt_uri)
    stream = conn.newStream(0)
    try:
        conn.lookupByUUIDString(vm_uuid).openConsole(None, stream,
                                                     libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        yield lambda line: stream.send(f"\r{line}\r".encode())
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        conn.close()


def answer_pattern(tag: str) -> re.Pattern[str]:
    """The console line ``TAG=<output>`` the guest prints for a command typed as
    ``echo TAG=$(...)``. The typed line itself (echoed by the terminal) never matches:
    ``$(`` follows the tag there."""
    return re.compile(rf"(?:^|\n){re.escape(tag)}=(?!\$\()([^\r\n]*)\r?\n")


def guest_sh(dc: DataCenter, vm: dict[str, Any], *setup: str, last: str,
             timeout: float = 120) -> str:
    """Type the ``setup`` lines then ``echo TAG=$(last)`` on the console of ``vm`` (a VM
    as the API shows it: ``uuid``, ``name``, ``node_name``) in ``dc``; the output of
    ``last`` with its newlines as spaces, stripped. The command is typed again every
    30 s until its answer shows (a line typed while the guest was busy may be lost);
    TimeoutError with the console's tail after ``timeout`` seconds. Lines stay short:
    the console is 80 columns wide."""
    if dc.api is None:
        raise RuntimeError("the data centre is not started: no API client")
    tag = "Y" + secrets.token_hex(3)
    pattern = answer_pattern(tag)
    # Braces: the stderr of every command of ``last`` is part of the answer, except
    # where ``last`` sends it elsewhere itself (its own redirections come after ours).
    command = f"echo {tag}=$({{ {last};}} 2>&1|tr '\\n' ' ')"
    url = f"/api/v1/vms/{vm['uuid']}/console-log"
    deadline = time.monotonic() + timeout
    with serial_console(dc.node_hosts[vm["node_name"]], vm["uuid"]) as type_line:
        time.sleep(2)  # until QEMU polls the pty again and sees it open
        for line in setup:
            type_line(line)
            time.sleep(1)
        while time.monotonic() < deadline:
            type_line(command)
            until = min(deadline, time.monotonic() + 30)
            while time.monotonic() < until:
                found = pattern.search(dc.api.get(url).text)
                if found:
                    print(f"{vm['name']}$ {last} -> {found.group(1)!r}")
                    return found.group(1).strip()
                time.sleep(1)
    log = dc.api.get(url).text
    raise TimeoutError(f"{vm['name']} never ran {last!r}:\n{log[-1500:]}")


def guest_wait(dc: DataCenter, vm: dict[str, Any], command: str, wanted: str,
               timeout: float = 60) -> str:
    """Run ``command`` in the guest until its output is ``wanted`` (block devices appear,
    go and change size a moment after the hypervisor is done with them); AssertionError
    naming the last output after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        out = guest_sh(dc, vm, last=command, timeout=max(10.0, deadline - time.monotonic()))
        if out == wanted:
            return out
        time.sleep(1)
    raise AssertionError(f"{vm['name']}: {command!r} gave {out!r}, not {wanted!r}")
