"""Which accelerator guests get: KVM where it *really* works, TCG otherwise.

``/dev/kvm`` existing, or even answering ``KVM_GET_API_VERSION``, proves little: on
some hosts (nested or para-virtualised KVM) a guest starts under ``-accel kvm`` and
then hangs or dies with "emulation failure" as soon as it leaves real mode. So
``auto`` runs a tiny guest under KVM and believes only what it sees: a 64 KiB ROM
(:func:`probe_rom`) that QEMU maps at the reset vector. It

1. prints ``R`` on COM1 in real mode, loads a GDT and enters protected mode (``P``),
2. builds identity page tables, enables PAE + long mode + paging (``L``),
3. runs a 20-million-step loop adding to a memory word, checks the sum, prints
   ``OK`` and writes to ``isa-debug-exit``, so QEMU exits with status 99.

That is what any guest kernel does in its first milliseconds; real KVM finishes in a
few milliseconds, TCG in about 0.1 s. The stage letters say how far a failing KVM
got, which goes into the log line explaining the decision.

The ROM's source (GNU as; assembled with ``as --64``, linked at 0xF0000 and
``objcopy -O binary``) is kept in :data:`PROBE_SOURCE`; the machine code below is
its output, so running the probe needs nothing but QEMU.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from yun.node.hypervisor.base import HypervisorError
from yun.util.run import CommandError, run

log = logging.getLogger("yun.node.hypervisor.accel")

ACCEL_SETTINGS = ("auto", "kvm", "tcg")
QEMU_BINARY = "qemu-system-x86_64"
PROBE_TIMEOUT = 5.0  # seconds; even TCG needs only ~0.1 s, so 5 s means "hung"
PROBE_EXIT_OK = 99  # isa-debug-exit turns the value 0x31 written into (0x31 << 1) | 1
ROM_SIZE = 0x10000  # QEMU's pc machine wants a BIOS image of a multiple of 64 KiB
RESET_VECTOR_OFFSET = 0xFFF0
STAGES = {"R": "real mode", "P": "protected mode", "L": "64-bit long mode"}

#: Machine code of PROBE_SOURCE from ``start`` to the end of ``gdtdesc`` (262 bytes).
PROBE_CODE = bytes.fromhex(
    "fabaf803b052eeb800f08ed8660f011600010f20c06683c8010f22c066ea2400"
    "0f00080066b810008ed88ec08ed066baf803b050eebf0010000031c0b9000c00"
    "00f3abc7050010000003200000c7050020000003300000c70500300000830000"
    "00b8001000000f22d80f20e083c8200f22e0b9800000c00f320d000100000f30"
    "0f20c00d000000800f22c0ea92000f00180066baf803b04cee48c7c1002d3101"
    "48c7c70000010048c7070000000048010f48ffc975f866baf80348b880168d21"
    "e6b50000483b07750db04feeb04beeb00aeeb031e6f4b045eeb032e6f4f4ebfd"
    "0000000000000000ffff0000009acf00ffff00000092cf00ffff0000009aaf00"
    "1f00e0000f00"
)
#: At the reset vector (F000:FFF0): ``ljmp $0xf000, $0`` to ``start``.
RESET_CODE = bytes.fromhex("ea000000f0")

PROBE_SOURCE = r"""
    .set ROM, 0xF0000
    .set N, 20000000
    .code16
start:
    cli
    mov $0x3f8, %dx
    mov $'R', %al
    out %al, %dx
    mov $0xf000, %ax
    mov %ax, %ds
    lgdtl (gdtdesc - ROM)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $pm32
    .code32
pm32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x3f8, %dx
    mov $'P', %al
    out %al, %dx
    mov $0x1000, %edi          # zero PML4, PDPT, PD at 0x1000..0x3fff
    xor %eax, %eax
    mov $3072, %ecx
    rep stosl
    movl $0x2003, 0x1000
    movl $0x3003, 0x2000
    movl $0x83, 0x3000         # one 2 MiB identity page
    mov $0x1000, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax             # PAE
    mov %eax, %cr4
    mov $0xC0000080, %ecx      # EFER.LME
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000000, %eax       # paging on: long mode active
    mov %eax, %cr0
    ljmp $0x18, $lm64
    .code64
lm64:
    mov $0x3f8, %dx
    mov $'L', %al
    out %al, %dx
    mov $N, %rcx
    mov $0x10000, %rdi
    movq $0, (%rdi)
1:
    add %rcx, (%rdi)
    dec %rcx
    jnz 1b
    mov $0x3f8, %dx
    movabs $(N * (N + 1) / 2), %rax
    cmp (%rdi), %rax
    jne 2f
    mov $'O', %al
    out %al, %dx
    mov $'K', %al
    out %al, %dx
    mov $'\n', %al
    out %al, %dx
    mov $0x31, %al
    out %al, $0xf4
2:
    mov $'E', %al
    out %al, %dx
    mov $0x32, %al
    out %al, $0xf4
3:
    hlt
    jmp 3b
    .p2align 3
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff   # 0x08: 32-bit code
    .quad 0x00cf92000000ffff   # 0x10: data
    .quad 0x00af9a000000ffff   # 0x18: 64-bit code
gdtdesc:
    .word 31
    .long gdt
    . = start + 0xfff0
    .code16
reset:
    ljmp $0xf000, $(start - ROM)
    . = start + 0x10000
"""


class AccelError(HypervisorError):
    """The requested accelerator cannot be used on this host."""


@dataclass(frozen=True)
class KvmProbe:
    """What running the probe guest under KVM showed."""

    works: bool
    reason: str
    seconds: float = 0.0


def probe_rom() -> bytes:
    """The 64 KiB probe "BIOS": code at its start, a jump to it at the reset vector."""
    rom = bytearray(ROM_SIZE)
    rom[: len(PROBE_CODE)] = PROBE_CODE
    rom[RESET_VECTOR_OFFSET : RESET_VECTOR_OFFSET + len(RESET_CODE)] = RESET_CODE
    return bytes(rom)


def probe_argv(qemu: str, accel: str, rom: Path) -> list[str]:
    """The QEMU command line that runs the probe ROM under ``accel`` ("kvm" or "tcg")."""
    return [
        qemu, "-accel", accel, "-machine", "pc", "-nodefaults", "-no-user-config",
        "-display", "none", "-no-reboot", "-m", "16", "-bios", str(rom),
        "-serial", "stdio", "-monitor", "none",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]  # fmt: skip


def _stage(serial: str) -> str:
    """The furthest mode the probe reported on its serial line."""
    reached = [STAGES[c] for c in serial if c in STAGES]
    return reached[-1] if reached else "nothing (not even the first instruction)"


def run_probe(
    accel: str = "kvm", *, qemu: str = QEMU_BINARY, timeout: float = PROBE_TIMEOUT
) -> KvmProbe:
    """Run the probe guest under ``accel`` and report whether it completed correctly."""
    if accel == "kvm" and not os.path.exists("/dev/kvm"):
        return KvmProbe(False, "/dev/kvm does not exist")
    binary = shutil.which(qemu)
    if binary is None:
        return KvmProbe(False, f"{qemu} is not installed")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="yun-accel-") as tmp:
        rom = Path(tmp) / "probe.rom"
        rom.write_bytes(probe_rom())
        try:
            res = run(probe_argv(binary, accel, rom), timeout=timeout, check=False)
        except CommandError as exc:  # timed out (the usual failure of a broken KVM)
            return KvmProbe(
                False,
                f"the probe guest under {accel} hung for {timeout:.0f} s after reaching "
                f"{_stage(exc.stdout)}",
                time.monotonic() - started,
            )
    elapsed = time.monotonic() - started
    if res.returncode == PROBE_EXIT_OK and "OK" in res.stdout:
        return KvmProbe(True, f"a probe guest ran under {accel} in {elapsed:.2f} s", elapsed)
    detail = (res.stderr.strip().splitlines() or [""])[-1]
    return KvmProbe(
        False,
        f"the probe guest under {accel} exited {res.returncode} after reaching "
        f"{_stage(res.stdout)}" + (f": {detail}" if detail else ""),
        elapsed,
    )


_cache: dict[str, KvmProbe] = {}
_cache_lock = threading.Lock()


def probe_kvm(qemu: str = QEMU_BINARY) -> KvmProbe:
    """:func:`run_probe` under KVM, run once per process and QEMU binary (then cached)."""
    with _cache_lock:  # two drivers opening at once must not probe twice
        if qemu not in _cache:
            _cache[qemu] = run_probe("kvm", qemu=qemu)
        return _cache[qemu]


def clear_cache() -> None:
    """Forget cached probe results (tests; or after the host's KVM was fixed)."""
    with _cache_lock:
        _cache.clear()


def decide(setting: str, probe: Callable[[], KvmProbe]) -> tuple[str, str]:
    """The accelerator for ``setting`` and why; ``probe`` is only called if needed.

    * ``tcg``: always TCG, never probes (an operator's explicit choice).
    * ``auto``: KVM if the probe guest completed under KVM, else TCG.
    * ``kvm``: KVM if the probe succeeds, else :class:`AccelError`: an operator who
      demands KVM wants to hear that it is broken, not to get guests that hang.
    """
    if setting not in ACCEL_SETTINGS:
        raise AccelError(f"accel must be one of {', '.join(ACCEL_SETTINGS)}, not {setting!r}")
    if setting == "tcg":
        return "tcg", "accel=tcg was configured"
    result = probe()
    if result.works:
        return "kvm", result.reason
    if setting == "kvm":
        raise AccelError(
            f"accel=kvm was configured but KVM does not work on this host: {result.reason}; "
            "configure accel=auto or accel=tcg"
        )
    return "tcg", f"KVM does not work here, using TCG: {result.reason}"


def resolve_accel(setting: str = "auto", *, probe: Callable[[], KvmProbe] = probe_kvm) -> str:
    """``"kvm"`` or ``"tcg"`` for the configured ``setting`` (see :func:`decide`); logged.

    Blocking (the probe may take up to :data:`PROBE_TIMEOUT` the first time); call it
    through ``asyncio.to_thread`` from async code.
    """
    try:
        accel, reason = decide(setting, probe)
    except AccelError as exc:
        log.error("accelerator refused", extra={"accel_setting": setting, "reason": str(exc)})
        raise
    log.info("accelerator %s", accel, extra={"accel": accel, "accel_setting": setting,
                                              "reason": reason})
    return accel
