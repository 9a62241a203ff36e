"""The `yun` CLI against a real gateway."""

from __future__ import annotations

from pathlib import Path


async def test_cli_vm_lifecycle(cli, small_qcow2: Path) -> None:  # type: ignore[no-untyped-def]
    code, out = await cli("image", "upload", str(small_qcow2), "--name", "base")
    assert code == 0, out
    assert "qcow2" in out and "active" in out
    code, out = await cli("vm", "create", "web1", "--image", "base", "--memory", "128")
    assert code == 0, out
    assert "create web1: done" in out and "running" in out
    code, out = await cli("vm", "list")
    assert code == 0 and "web1" in out and "10.64." in out
    code, out = await cli("node", "list")
    assert code == 0 and "node-0000" in out
    code, out = await cli("vm", "stop", "web1")
    assert code == 0 and "stop web1: done" in out
    code, out = await cli("vm", "show", "web1", "-o", "json")
    assert code == 0 and '"state": "stopped"' in out
    code, out = await cli("vm", "start", "web1")
    assert code == 0
    code, out = await cli("vm", "console-log", "web1")
    assert code == 0 and "YUN-GUEST-READY" in out
    code, out = await cli("image", "delete", "base")
    assert code == 1 and "used by VM(s) web1" in out
    # The private VM's port 80 through a NAT port of its node (F-SB-PRIVATE).
    code, out = await cli("vm", "port-forward", "add", "web1", "80")
    assert code == 0 and out.strip() == "web1:80 -> 127.0.0.1:40000", out
    code, out = await cli("vm", "port-forward", "add", "web1", "53", "--udp")
    assert code == 0 and out.strip() == "web1:53/udp -> 127.0.0.1:40000", out
    code, out = await cli("vm", "port-forward", "add", "web1", "80")
    assert code == 1 and "already forwarded" in out
    code, out = await cli("vm", "port-forward", "add", "web1", "70000")
    assert code == 2 and "65535" in out, out
    code, out = await cli("vm", "port-forward", "list", "web1")
    assert code == 0 and out.splitlines() == ["web1:53/udp -> 127.0.0.1:40000",
                                              "web1:80 -> 127.0.0.1:40000"], out
    code, out = await cli("vm", "show", "web1")
    assert code == 0 and "web1:80 -> 127.0.0.1:40000" in out and "sandbox-private" in out
    code, out = await cli("vm", "port-forward", "remove", "web1", "53", "--udp")
    assert code == 0 and "removed" in out
    code, out = await cli("vm", "port-forward", "list", "web1")
    assert code == 0 and out.splitlines() == ["web1:80 -> 127.0.0.1:40000"], out
    code, out = await cli("vm", "delete", "web1")
    assert code == 0 and "delete web1: done" in out
    code, out = await cli("vm", "show", "web1")
    assert code == 1 and "no VM 'web1'" in out


async def test_cli_reports_errors_clearly(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\x00not an image" * 100)
    code, out = await cli("image", "upload", str(junk), "--name", "junk")
    assert code == 1 and "not a disk image" in out
    code, out = await cli("vm", "create", "x" * 70, "--image", "junk")
    assert code == 1 and "name" in out and "63" in out

