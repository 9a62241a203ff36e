"""Boot a disk image with a bare ``qemu-system-x86_64`` (no libvirt).

Used by the tests of the test guest itself and by the benchmarks as the "bare
QEMU" baseline. The command line is the minimum a Yun VM has: TCG (KVM does not
work on our machines), a virtio disk, a virtio NIC on user-mode networking with the
guest's port 80 forwarded to ``127.0.0.1:<free port>``, the serial console written
to a file, and a QMP socket to press the power button.

Unless asked for ``writable=True``, the disk is a throw-away qcow2 overlay, so the
cached image is never modified. The QEMU process is always killed: by
:meth:`QemuGuest.stop`, by the context manager, when the object is collected, and
at interpreter exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from yun.testing.guest import READY_MARKER, parse_guest_info, parse_serial_ip
from yun.testing.ports import free_port
from yun.util.run import run

QEMU = "qemu-system-x86_64"


class GuestError(RuntimeError):
    """The guest did not do what was awaited in time, or QEMU died."""


def qemu_argv(
    *,
    disk: Path | None,
    serial_log: Path,
    qmp_socket: Path,
    http_port: int,
    disk_format: str = "qcow2",
    cdrom: Path | None = None,
    boot_cdrom: bool = False,
    memory_mb: int = 256,
    cpus: int = 1,
    cpu_model: str = "max",
    dhcp_hostname: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The QEMU command line of a test guest (pure: builds the list, starts nothing).

    ``-nodefaults`` keeps out the default VGA, floppy, CD-ROM and NIC so that the
    machine holds only what is listed here. ``dhcp_hostname`` makes QEMU's DHCP
    server hand out that host name (option 12).
    """
    netdev = f"user,id=net0,hostfwd=tcp:127.0.0.1:{http_port}-:80"
    if dhcp_hostname is not None:
        netdev += f",hostname={dhcp_hostname}"
    argv = [
        QEMU,
        "-accel", "tcg",
        "-machine", "pc",
        "-cpu", cpu_model,
        "-smp", str(cpus),
        "-m", str(memory_mb),
        "-nodefaults", "-no-user-config",
        "-display", "none",
        "-serial", f"file:{serial_log}",
        "-qmp", f"unix:{qmp_socket},server=on,wait=off",
        "-netdev", netdev,
        "-device", "virtio-net-pci,netdev=net0",
    ]
    if disk is not None:
        argv += ["-drive", f"file={disk},if=virtio,format={disk_format}"]
    if cdrom is not None:
        argv += ["-drive", f"file={cdrom},if=ide,media=cdrom,readonly=on"]
    argv += ["-boot", "d" if boot_cdrom else "c"]
    return [*argv, *extra_args]


def _kill(process: subprocess.Popen[bytes], remove: Path | None = None) -> None:
    """Kill QEMU's process group if it still runs, reap it, remove ``remove``."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
    if remove is not None:
        shutil.rmtree(remove, ignore_errors=True)


class QemuGuest:
    """A running QEMU with a test guest: its serial log, HTTP port and QMP socket."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        workdir: Path,
        serial_log: Path,
        qmp_socket: Path,
        http_port: int,
        remove_workdir: bool,
    ) -> None:
        self.process = process
        self.workdir = workdir
        self.serial_log = serial_log
        self.qmp_socket = qmp_socket
        self.http_port = http_port
        # The finalizer holds the Popen, not self: it runs on collection and at
        # interpreter exit, so no QEMU (nor our temporary directory) outlives the run.
        self._finalizer = weakref.finalize(
            self, _kill, process, workdir if remove_workdir else None
        )

    # -- serial console
    def serial_text(self) -> str:
        """Everything the guest printed on its serial console so far."""
        try:
            return self.serial_log.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def serial_size(self) -> int:
        """Current length of the serial log, for :meth:`wait_for` ``since=``."""
        try:
            return self.serial_log.stat().st_size
        except FileNotFoundError:
            return 0

    def wait_for(self, marker: str, timeout: float = 120.0, *, since: int = 0) -> float:
        """Wait until ``marker`` appears in the serial log after byte ``since``.

        Returns the seconds waited. Raises :class:`GuestError` with the log's tail
        when the time runs out or QEMU exits first.
        """
        started = time.monotonic()
        needle = marker.encode()
        while True:
            try:
                with self.serial_log.open("rb") as f:
                    f.seek(since)
                    if needle in f.read():
                        return time.monotonic() - started
            except FileNotFoundError:
                pass
            if self.process.poll() is not None:
                raise GuestError(
                    f"QEMU exited ({self.process.returncode}) before {marker!r}: "
                    f"{self._qemu_output()}\n--- serial ---\n{self.serial_text()[-3000:]}"
                )
            if time.monotonic() - started > timeout:
                raise GuestError(
                    f"no {marker!r} within {timeout:.0f} s\n--- serial ---\n"
                    f"{self.serial_text()[-3000:]}"
                )
            time.sleep(0.05)

    @property
    def guest_ip(self) -> str | None:
        """The address the guest announced on its serial console (``YUN-GUEST-IP``)."""
        return parse_serial_ip(self.serial_text())

    # -- HTTP through the forwarded port
    def http_get(self, path: str = "/", timeout: float = 10.0) -> str:
        """GET ``path`` from the guest's HTTP server through 127.0.0.1:``http_port``."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return str(resp.read().decode())

    def info(self, timeout: float = 10.0) -> dict[str, str]:
        """The guest's ``GET /`` facts (hostname, uptime, boots, token ...)."""
        return parse_guest_info(self.http_get("/", timeout=timeout))

    # -- QMP
    def qmp(self, command: str, arguments: dict[str, Any] | None = None,
            timeout: float = 10.0) -> Any:
        """Run one QMP command on a fresh connection and return its ``return`` value."""
        deadline = time.monotonic() + timeout
        while not self.qmp_socket.exists():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise GuestError(f"QMP socket {self.qmp_socket} never appeared")
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.qmp_socket))
            stream = sock.makefile("rwb")
            _qmp_read(stream)  # greeting
            for execute, args in (("qmp_capabilities", None), (command, arguments)):
                msg: dict[str, Any] = {"execute": execute}
                if args:
                    msg["arguments"] = args
                stream.write(json.dumps(msg).encode() + b"\n")
                stream.flush()
                reply = _qmp_read(stream)
                if "error" in reply:
                    raise GuestError(f"QMP {execute}: {reply['error']}")
            return reply.get("return")

    def powerdown(self) -> None:
        """Press the ACPI power button (what libvirt's virDomainShutdown does)."""
        self.qmp("system_powerdown")

    def wait_exit(self, timeout: float) -> int | None:
        """Wait for QEMU to exit by itself; its exit code, or None if it still runs."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    # -- the end
    def stop(self) -> None:
        """Kill QEMU (if it still runs) and remove the work directory when it is ours."""
        self._finalizer()

    def _qemu_output(self) -> str:
        try:
            return (self.workdir / "qemu.log").read_text(errors="replace").strip()[-2000:]
        except FileNotFoundError:
            return ""

    def __enter__(self) -> QemuGuest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _qmp_read(stream: Any) -> dict[str, Any]:
    """The next QMP reply, skipping asynchronous events."""
    while True:
        line = stream.readline()
        if not line:
            raise GuestError("QMP connection closed")
        msg: dict[str, Any] = json.loads(line)
        if "event" not in msg:
            return msg


def boot_guest(
    disk: Path | None,
    *,
    writable: bool = False,
    disk_format: str = "qcow2",
    cdrom: Path | None = None,
    boot_cdrom: bool = False,
    workdir: Path | None = None,
    memory_mb: int = 256,
    cpus: int = 1,
    cpu_model: str = "max",
    dhcp_hostname: str | None = None,
    marker: str | None = READY_MARKER,
    timeout: float = 120.0,
    extra_args: Sequence[str] = (),
) -> QemuGuest:
    """Start QEMU on ``disk`` and wait (up to ``timeout`` s) for ``marker`` on the serial.

    ``writable=False`` (the default) boots a throw-away overlay of ``disk`` made in
    the work directory; ``writable=True`` boots ``disk`` itself (make your own
    overlay when state must survive a second boot). ``cdrom`` adds an IDE CD-ROM (a
    NoCloud seed, or the guest ISO with ``boot_cdrom=True``). ``marker=None``
    returns at once. ``workdir`` (serial log, QMP socket, overlay) defaults to a
    new temporary directory removed by :meth:`QemuGuest.stop`. QEMU is killed if
    the marker does not come.
    """
    if shutil.which(QEMU) is None:
        raise GuestError(f"{QEMU} not found (install qemu-system-x86)")
    remove_workdir = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="yun-qemu-")) if workdir is None else workdir
    workdir.mkdir(parents=True, exist_ok=True)
    guest: QemuGuest | None = None
    try:
        if disk is not None and not writable:
            overlay = workdir / "overlay.qcow2"
            overlay.unlink(missing_ok=True)
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(Path(disk).resolve()),
                 "-F", disk_format, str(overlay)], timeout=30)
            disk, disk_format = overlay, "qcow2"
        serial_log = workdir / "serial.log"
        qmp_socket = workdir / "qmp.sock"
        # QEMU binds the forwarded port itself; another process may take the port
        # between free_port() and that bind, so try a few.
        for attempt in range(3):
            qmp_socket.unlink(missing_ok=True)
            port = free_port()
            argv = qemu_argv(disk=disk, serial_log=serial_log, qmp_socket=qmp_socket,
                             http_port=port, disk_format=disk_format, cdrom=cdrom,
                             boot_cdrom=boot_cdrom, memory_mb=memory_mb, cpus=cpus,
                             cpu_model=cpu_model, dhcp_hostname=dhcp_hostname,
                             extra_args=extra_args)
            # Popen, not yun.util.run.run: QEMU lives on while the caller works with
            # the guest. Its own session so that the kill reaches any child too.
            with (workdir / "qemu.log").open("wb") as out:
                process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=subprocess.STDOUT, start_new_session=True)
            guest = QemuGuest(process, workdir, serial_log, qmp_socket, port, remove_workdir)
            # QMP answers once QEMU's main loop runs: its devices (and the port
            # forwarding) are set up, or it has exited with an error.
            with contextlib.suppress(GuestError, OSError):
                guest.qmp("query-status", timeout=30)
            if process.poll() is None:
                break
            message = guest._qemu_output()
            # Reap only: the work directory serves the next attempt.
            guest._finalizer.detach()
            _kill(process)
            guest = None
            if "host forwarding" not in message or attempt == 2:
                raise GuestError(f"QEMU failed ({process.returncode}): {message}")
        assert guest is not None
        if marker is not None:
            guest.wait_for(marker, timeout)
        return guest
    except BaseException:
        if guest is not None:
            guest.stop()
        elif remove_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
