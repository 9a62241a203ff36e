"""The accelerator decision: KVM only when a probe guest proved it works."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from yun.node.hypervisor.base import HypervisorError
from yun.node.hypervisor.libvirt import accel
from yun.node.hypervisor.libvirt.accel import AccelError, KvmProbe, decide, resolve_accel


class FakeProbe:
    """A probe with a fixed result that counts its calls."""

    def __init__(self, works: bool, reason: str = "fake") -> None:
        self.result = KvmProbe(works, reason)
        self.calls = 0

    def __call__(self) -> KvmProbe:
        self.calls += 1
        return self.result


def test_tcg_setting_never_probes() -> None:
    probe = FakeProbe(works=True)
    assert decide("tcg", probe)[0] == "tcg"
    assert probe.calls == 0


def test_auto_uses_kvm_when_the_probe_guest_ran() -> None:
    probe = FakeProbe(works=True, reason="a probe guest ran under kvm in 0.01 s")
    accel_, reason = decide("auto", probe)
    assert accel_ == "kvm" and "probe guest ran" in reason
    assert probe.calls == 1


def test_auto_falls_back_to_tcg_and_says_why() -> None:
    probe = FakeProbe(works=False, reason="hung after reaching real mode")
    accel_, reason = decide("auto", probe)
    assert accel_ == "tcg"
    assert "hung after reaching real mode" in reason


def test_forced_kvm_on_a_broken_host_is_an_error_naming_the_cause() -> None:
    probe = FakeProbe(works=False, reason="/dev/kvm does not exist")
    with pytest.raises(AccelError) as info:
        decide("kvm", probe)
    assert isinstance(info.value, HypervisorError)
    assert "accel=kvm" in str(info.value) and "/dev/kvm does not exist" in str(info.value)


def test_forced_kvm_on_a_working_host() -> None:
    assert decide("kvm", FakeProbe(works=True))[0] == "kvm"


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(AccelError, match="one of auto, kvm, tcg"):
        decide("xen", FakeProbe(works=True))


def test_resolve_logs_the_decision_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="yun.node.hypervisor.accel"):
        assert resolve_accel("auto", probe=FakeProbe(False, "emulation failure")) == "tcg"
    record = caplog.records[-1]
    assert record.accel == "tcg"  # type: ignore[attr-defined]
    assert "emulation failure" in record.reason  # type: ignore[attr-defined]


def test_probe_result_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fake_run_probe(kind: str = "kvm", **_: object) -> KvmProbe:
        calls.append(kind)
        return KvmProbe(False, "fake")

    accel.clear_cache()
    monkeypatch.setattr(accel, "run_probe", fake_run_probe)
    try:
        accel.probe_kvm("some-qemu")
        accel.probe_kvm("some-qemu")
        assert calls == ["kvm"]
    finally:
        accel.clear_cache()


def test_stage_names_the_furthest_mode_reached() -> None:
    assert accel._stage("") .startswith("nothing")
    assert accel._stage("R") == "real mode"
    assert accel._stage("RP") == "protected mode"
    assert accel._stage("RPL") == "64-bit long mode"


def test_probe_rom_layout() -> None:
    rom = accel.probe_rom()
    assert len(rom) == 64 * 1024  # QEMU's pc machine wants a multiple of 64 KiB
    assert rom[: len(accel.PROBE_CODE)] == accel.PROBE_CODE
    assert rom[0xFFF0:0xFFF5] == bytes.fromhex("ea000000f0")  # ljmp $0xf000, $0


@pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld") and shutil.which("objcopy")),
                    reason="binutils not installed")
def test_probe_code_is_the_assembled_source(tmp_path: Path) -> None:
    """The bytes in accel.py are what PROBE_SOURCE assembles to (no hidden edits)."""
    (tmp_path / "probe.S").write_text(accel.PROBE_SOURCE)
    (tmp_path / "probe.ld").write_text(
        "SECTIONS { . = 0xF0000; .text : { *(.text) } /DISCARD/ : { *(*) } }\n"
    )
    for argv in (["as", "--64", "-o", "probe.o", "probe.S"],
                 ["ld", "-T", "probe.ld", "-o", "probe.elf", "probe.o"],
                 ["objcopy", "-O", "binary", "probe.elf", "probe.bin"]):
        subprocess.run(argv, cwd=tmp_path, check=True, capture_output=True, timeout=30)
    assert (tmp_path / "probe.bin").read_bytes() == accel.probe_rom()
