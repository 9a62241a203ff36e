"""Pure parts of the Debian cloud guest builder and the SSH forward of bare QEMU."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from yun.testing import debian_guest
from yun.testing.debian_guest import (
    CLOUD_CFG,
    KERNEL_ARGS,
    compute_cache_key,
    find_mirror,
    newest_kernel,
    parse_apt_sources,
)
from yun.testing.guest import GuestBuildError, prune_builds
from yun.testing.qemu import qemu_argv

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
"""

ONE_LINE = """\
# a comment
deb-src http://src.example/debian bookworm main
deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ bookworm main contrib
deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main
"""


def test_deb822_sources_give_the_main_archive_not_security() -> None:
    assert find_mirror([DEB822]) == "http://deb.debian.org/debian"
    entries = parse_apt_sources([DEB822])
    assert ("http://deb.debian.org/debian-security", ["bookworm-security"], ["main"]) in entries


def test_one_line_sources_with_options_and_trailing_slash() -> None:
    assert find_mirror([ONE_LINE]) == "http://mirror.example/debian"


def test_third_party_and_disabled_sources_are_not_mirrors() -> None:
    other = ("Types: deb\nURIs: https://deb.nodesource.com/node_20.x\n"
             "Suites: nodistro\nComponents: main\n")
    disabled = DEB822.replace("Types: deb\n#", "Enabled: no\nTypes: deb\n#", 1)
    with pytest.raises(GuestBuildError, match="bookworm main"):
        find_mirror([other, "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main"])
    with pytest.raises(GuestBuildError):
        find_mirror([disabled])


def test_cache_key_changes_with_every_input() -> None:
    base = compute_cache_key("http://a/debian", "builder", ["mbr", "extlinux"])
    assert base == compute_cache_key("http://a/debian", "builder", ["mbr", "extlinux"])
    assert len(base) == 16
    others = {
        compute_cache_key("http://b/debian", "builder", ["mbr", "extlinux"]),
        compute_cache_key("http://a/debian", "builder2", ["mbr", "extlinux"]),
        compute_cache_key("http://a/debian", "builder", ["mbr2", "extlinux"]),
        compute_cache_key("http://a/debian", "builder", ["mbr", "extlinux"], builder_version=99),
    }
    assert base not in others and len(others) == 4


def test_newest_kernel_needs_an_initrd(tmp_path: Path) -> None:
    for version in ("6.1.0-9-cloud-amd64", "6.1.0-50-cloud-amd64", "6.1.0-60-cloud-amd64"):
        (tmp_path / f"vmlinuz-{version}").write_bytes(b"k")
    for version in ("6.1.0-9-cloud-amd64", "6.1.0-50-cloud-amd64"):
        (tmp_path / f"initrd.img-{version}").write_bytes(b"i")
    assert newest_kernel(tmp_path) == "6.1.0-50-cloud-amd64"  # 60 has no initrd
    with pytest.raises(GuestBuildError, match="no kernel"):
        newest_kernel(tmp_path / "missing")


def test_image_is_nocloud_only_and_boots_on_the_serial_console() -> None:
    assert "datasource_list: [ NoCloud, None ]" in CLOUD_CFG
    assert "console=ttyS0,115200n8" in KERNEL_ARGS
    assert f"root=LABEL={debian_guest.ROOT_LABEL}" in KERNEL_ARGS


def test_qemu_forwards_ssh_only_when_asked(tmp_path: Path) -> None:
    common = {"disk": tmp_path / "d.qcow2", "serial_log": tmp_path / "s",
              "qmp_socket": tmp_path / "q", "http_port": 20080}
    netdev = qemu_argv(**common, ssh_port=20022)  # type: ignore[arg-type]
    plain = qemu_argv(**common)  # type: ignore[arg-type]
    net = netdev[netdev.index("-netdev") + 1]
    assert "hostfwd=tcp:127.0.0.1:20080-:80" in net
    assert "hostfwd=tcp:127.0.0.1:20022-:22" in net
    assert ":22" not in plain[plain.index("-netdev") + 1]


def test_prune_builds_touches_only_its_own_prefix(tmp_path: Path) -> None:
    old = time.time() - 3 * 24 * 3600
    for stem in ("debian-12-aaa", "debian-12-bbb", "debian-12-ccc", "yun-guest-zzz"):
        for suffix in (".qcow2", ".json"):
            (tmp_path / (stem + suffix)).write_text("x")
    for i, stem in enumerate(("debian-12-aaa", "debian-12-bbb", "debian-12-ccc",
                              "yun-guest-zzz")):
        os.utime(tmp_path / f"{stem}.json", (old + i, old + i))
    prune_builds(tmp_path, "debian-12-", 1, suffixes=(".qcow2", ".json"))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["debian-12-ccc.json", "debian-12-ccc.qcow2",
                    "yun-guest-zzz.json", "yun-guest-zzz.qcow2"]


def test_debootstrap_log_tail_names_the_last_lines(tmp_path: Path) -> None:
    log_file = tmp_path / "debootstrap.log"
    log_file.write_text("".join(f"line {i}\n" for i in range(40)))
    tail = debian_guest.debootstrap_log_tail(log_file, lines=3)
    assert tail == "line 37\nline 38\nline 39"
    assert "no " in debian_guest.debootstrap_log_tail(tmp_path / "absent.log")
