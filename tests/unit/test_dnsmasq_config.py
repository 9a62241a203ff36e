"""The sandbox dnsmasq: its command line, hosts files and lease database (files only;
the port validation of both backends is in test_sandbox_contract.py)."""

from __future__ import annotations

import ipaddress
import threading
import time
from pathlib import Path

import pytest

from yun.node.network.dnsmasq import (
    Dnsmasq,
    DnsmasqConfig,
    DnsmasqError,
    PortRecord,
    dnsmasq_argv,
    parse_hosts_file,
    render_hosts_file,
)
from yun.node.network.ports import tap_name
from yun.proto.messages import NicSpec

VM = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
NIC_ID = "9a8b7c6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d"


def nic(ip: str = "10.77.0.10", mac: str = "52:54:00:00:00:01", nic_id: str = NIC_ID) -> NicSpec:
    return NicSpec(nic_id=nic_id, mac=mac, ip=ip)


def cfg(tmp_path: Path) -> DnsmasqConfig:
    return DnsmasqConfig(interface="ys*", subnet=ipaddress.IPv4Network("10.77.0.0/24"),
                         gateway="10.77.0.1", state_dir=tmp_path / "net")


# --------------------------------------------------------------------------- argv


def test_argv_serves_the_sandbox_taps_only_and_static_leases(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    argv = dnsmasq_argv(c)
    assert argv[0] == "dnsmasq"
    for opt in ("--interface=ys*", "--bind-dynamic", "--except-interface=lo",
                "--dhcp-option=option:router,10.77.0.1",
                "--port=0", "--conf-file=/dev/null",
                "--dhcp-range=10.77.0.0,static,255.255.255.0,1h",
                f"--dhcp-hostsdir={c.state_dir / 'hosts'}",
                f"--pid-file={c.state_dir / 'dnsmasq.pid'}",
                f"--dhcp-leasefile={c.state_dir / 'dnsmasq.leases'}",
                f"--log-facility={c.state_dir / 'dnsmasq.log'}"):
        assert opt in argv, opt
    # argv only: no shell, every option one element
    assert all(" " not in a for a in argv)


def test_argv_follows_the_subnet(tmp_path: Path) -> None:
    c = DnsmasqConfig(interface="ys*", subnet=ipaddress.IPv4Network("10.8.0.0/16"),
                      gateway="10.8.0.1", state_dir=tmp_path)
    assert "--dhcp-range=10.8.0.0,static,255.255.0.0,1h" in dnsmasq_argv(c)


# --------------------------------------------------------------------------- hosts files


def test_hosts_file_round_trip() -> None:
    recs = [PortRecord("n1", "52:54:00:00:00:01", "10.77.0.10", "vm-abc", "ys0000000001"),
            PortRecord("n2", "52:54:00:00:00:02", "10.77.0.11", "vm-abc", "ys0000000002",
                       "mono", ("10.77.0.12", "10.77.0.13"))]
    text = render_hosts_file("vm-uuid", recs)
    assert "52:54:00:00:00:01,10.77.0.10,vm-abc\n" in text
    # Only comments and MAC,IP,hostname lines: the format dnsmasq reads.
    for line in text.splitlines():
        assert line.startswith("#") or line.count(",") == 2
    assert parse_hosts_file(text) == recs


def test_hand_written_hosts_line_is_still_read() -> None:
    assert parse_hosts_file("52:54:00:AA:00:01,10.77.0.9\n") == [
        PortRecord("", "52:54:00:aa:00:01", "10.77.0.9", "", "")]


def test_write_hosts_is_atomic_and_readable_by_the_daemon(tmp_path: Path) -> None:
    d = Dnsmasq(cfg(tmp_path))
    rec = PortRecord("n1", "52:54:00:00:00:01", "10.77.0.10", "vm-x", "yv1")
    d.write_hosts(VM, [rec])
    path = d.cfg.hosts_dir / VM
    assert path.stat().st_mode & 0o004  # "nobody" must read it
    assert d.all_hosts() == {VM: [rec]}
    assert [p.name for p in d.cfg.hosts_dir.iterdir()] == [VM]  # no temporary left


def test_retire_then_drop_hosts(tmp_path: Path) -> None:
    d = Dnsmasq(cfg(tmp_path))
    rec = PortRecord("n1", "52:54:00:00:00:01", "10.77.0.10", "vm-x", "yv1")
    d.write_hosts(VM, [rec])
    assert d.retire_hosts(VM) == [rec]
    assert d.all_hosts() == {}  # dot-files are invisible to dnsmasq and to us
    assert d.retire_hosts(VM) == [rec]  # an interrupted release is resumed
    d.drop_retired(VM)
    assert d.retire_hosts(VM) == []
    assert list(d.cfg.hosts_dir.iterdir()) == []


def test_forget_leases_edits_the_database(tmp_path: Path) -> None:
    d = Dnsmasq(cfg(tmp_path))
    d.cfg.state_dir.mkdir(parents=True)
    d.cfg.lease_file.write_text(
        "1795324990 52:54:00:00:00:01 10.77.0.10 vm-x 01:52:54:00:00:00:01\n"
        "1795324990 52:54:00:00:00:02 10.77.0.11 vm-y *\n")
    rec = PortRecord("n1", "52:54:00:00:00:01", "10.77.0.10", "vm-x", "yv1")
    assert d.forget_leases([rec]) is True  # no daemon runs: only the file changes
    assert d.leases() == [("52:54:00:00:00:02", "10.77.0.11")]
    assert d.forget_leases([rec]) is False


def test_forget_leases_sees_a_lease_dnsmasq_is_rewriting(tmp_path: Path) -> None:
    """CI found a lease left behind after a NIC unplug: the SIGHUP of the hosts change
    made dnsmasq rewrite its database in place (truncate, then write) just as the
    release read it, so it read an empty file and struck nothing."""
    d = Dnsmasq(cfg(tmp_path))
    d.cfg.state_dir.mkdir(parents=True)
    content = ("1795324990 52:54:00:00:00:01 10.77.0.10 vm-x 01:52:54:00:00:00:01\n"
               "1795324990 52:54:00:00:00:02 10.77.0.11 vm-y *\n")
    d.cfg.lease_file.write_text("")  # truncated: dnsmasq's write is still to come

    def rewrite() -> None:
        time.sleep(0.02)
        d.cfg.lease_file.write_text(content)

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        rec = PortRecord("n1", "52:54:00:00:00:01", "10.77.0.10", "vm-x", "yv1")
        assert d.forget_leases([rec]) is True
    finally:
        writer.join()
    assert d.leases() == [("52:54:00:00:00:02", "10.77.0.11")]


def test_prepare_refuses_a_state_dir_nobody_cannot_reach(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    locked.chmod(0o700)
    d = Dnsmasq(DnsmasqConfig(interface="ys*", gateway="10.77.0.1",
                              subnet=ipaddress.IPv4Network("10.77.0.0/24"),
                              state_dir=locked / "net"))
    with pytest.raises(DnsmasqError, match="cannot enter"):
        d.prepare()


def test_no_pid_file_means_not_running(tmp_path: Path) -> None:
    d = Dnsmasq(cfg(tmp_path))
    assert d.pid() is None
    d.stop()  # no error
    d.reload()  # no error


# --------------------------------------------------------------------------- validation


def test_tap_names_are_short_deterministic_and_distinct() -> None:
    assert tap_name(NIC_ID) == "ys9a8b7c6d5e"
    assert tap_name(NIC_ID) == tap_name(NIC_ID)
    for odd in ("nic0", "eth-0", "x" * 200):
        name = tap_name(odd)
        assert len(name) <= 15 and name.startswith("ys") and name.isalnum()
    assert tap_name("nic0") != tap_name("nic1")
