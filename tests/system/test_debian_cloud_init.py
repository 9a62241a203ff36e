"""A real Debian 12 cloud guest booted through Yun takes its NoCloud seed.

The image (:mod:`yun.testing.debian_guest`) is built once by scripts/setup.sh from
Debian packages; this module never downloads anything: without the cached image it
skips (a failure under YUN_TEST_STRICT). One deployment (control plane + one node host
with its own libvirtd) is shared by the module. The fixture does what an operator does,
with the ``yun`` CLI against the gateway: upload the image, ``yun key add`` a key pair
made here, and ``yun vm create deb1 --image debian-12 --ssh-key NAME --user-data
FILE``. The tests then log in over SSH from inside the node's network namespace (where
the sandbox network routes to the guest) and check what cloud-init did with the seed
Yun generated: the host name, the key, the user data, the data source and the instance
id.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.system.conftest import need_root
from yun.testing.datacenter import DataCenter, deployed
from yun.testing.debian_guest import DEFAULT_USER, cached_debian_image
from yun.testing.netns import Host, Topology

pytestmark = pytest.mark.system

SSH_TIMEOUT = 300.0  # boot to a working login under TCG; about a minute when idle
VM_NAME = "deb1"
IMAGE_NAME = "debian-12"
KEY_NAME = "deb-key"
# cloud-init is Python and the cloud kernel's initramfs unpacks in RAM: 512 MiB keeps
# the guest out of swapless memory pressure (the busybox test guest needs 192).
MEMORY_MB = 512
DISK_GB = 2  # the image's virtual size (debian_guest.DISK_SIZE_MIB)
# What ssh prints when sshd goes away before authentication (cloud-init restarting it).
SSHD_RESTARTING = ("Connection refused", "kex_exchange_identification",
                   "Connection reset by peer", "Connection closed by")

USER_DATA = """\
#cloud-config
write_files:
  - path: /var/lib/yun-test/written
    content: |
      written by write_files {token}
runcmd:
  - [sh, -c, "echo ran runcmd {token} > /var/lib/yun-test/ran"]
"""


@dataclass
class Debian:
    dc: DataCenter
    vm: dict[str, Any]
    key: Path  # the private half of the key given at create
    other: Path  # a key the guest never saw
    token: str  # written by the user data's write_files and runcmd
    commands: list[str]  # the CLI commands the fixture ran

    @property
    def node(self) -> Host:
        return self.dc.node_of(self.vm)

    def ssh(self, command: str, key: Path | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``command`` in the guest from its node's namespace, key login only.

        cloud-init restarts sshd once it has configured it (cloud-config stage), after a
        first login may already have worked: a connection refused, or reset or closed
        before authentication (sshd stopping under a connection it had accepted; seen
        on a loaded host), is tried again for a while (bounded). A key refused is not."""
        argv = self.node.exec_argv(
            ["ssh", "-i", str(key or self.key), "-o", "StrictHostKeyChecking=no",
             "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
             "-o", "PasswordAuthentication=no", "-o", "ConnectTimeout=10",
             "-o", "LogLevel=ERROR", f"{DEFAULT_USER}@{self.vm['ip']}", command])
        deadline = time.monotonic() + 30
        while True:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, check=False)
            if done.returncode != 255 or time.monotonic() > deadline \
                    or not any(sign in done.stderr for sign in SSHD_RESTARTING):
                return done
            time.sleep(1)

    def console(self) -> str:
        assert self.dc.api is not None
        return self.dc.api.get(f"/api/v1/vms/{self.vm['uuid']}/console-log").text


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "yun-test",
                    "-f", str(path)], check=True, timeout=30)
    return path


def wait_for_login(deb: Debian, timeout: float) -> None:
    """Poll ``ssh ... true`` until it works, bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            result = deb.ssh("true", timeout=30)
        except subprocess.TimeoutExpired:
            last = "ssh timed out"
        else:
            if result.returncode == 0:
                return
            last = result.stderr.strip()
        time.sleep(2)
    raise TimeoutError(f"no SSH login to {deb.vm['ip']} within {timeout:.0f} s "
                       f"(last: {last})\n--- console ---\n{deb.console()[-4000:]}")


@pytest.fixture(scope="module")
def debian() -> Iterator[Debian]:
    """The deployment with deb1 created through the CLI and logged into once; all of it
    (namespaces, processes, files, the key pairs) removed after."""
    need_root("nft", "dnsmasq", "ssh", "ssh-keygen", "qemu-img")
    image = cached_debian_image()
    if image is None:
        pytest.skip("no cached Debian guest: run scripts/setup.sh "
                    "(or python -m yun.testing.debian_guest) first")
    keys = Path(tempfile.mkdtemp(prefix="yun-deb-keys-"))
    try:
        with Topology() as topo, deployed(topo, image=None) as dc:
            commands: list[str] = []
            key, other = keygen(keys / "id_ed25519"), keygen(keys / "other")
            token = uuid.uuid4().hex
            user_data = keys / "user-data.yaml"
            user_data.write_text(USER_DATA.format(token=token))
            dc.cli(commands, "image", "upload", str(image), "--name", IMAGE_NAME)
            dc.cli(commands, "key", "add", KEY_NAME, f"{key}.pub")
            started = time.monotonic()
            created = dc.cli(commands, "vm", "create", VM_NAME, "--image", IMAGE_NAME,
                              "--ssh-key", KEY_NAME, "--user-data", str(user_data),
                              "--memory", str(MEMORY_MB), "--disk", str(DISK_GB))
            assert created["state"] == "running", created
            running = time.monotonic()
            deb = Debian(dc, created, key, other, token, commands)
            wait_for_login(deb, SSH_TIMEOUT)
            print(f"\nDebian guest through Yun: created and started in "
                  f"{running - started:.1f} s, boot to SSH login "
                  f"{time.monotonic() - running:.1f} s")
            yield deb
    finally:
        shutil.rmtree(keys, ignore_errors=True)


def test_only_the_given_key_logs_in(debian: Debian) -> None:
    authorized = debian.ssh("cat ~/.ssh/authorized_keys")
    assert authorized.returncode == 0, authorized.stderr
    assert Path(f"{debian.key}.pub").read_text().split()[1] in authorized.stdout
    refused = debian.ssh("true", key=debian.other)
    assert refused.returncode != 0
    assert "Permission denied" in refused.stderr, refused.stderr


@pytest.fixture(scope="module")
def applied(debian: Debian) -> dict[str, str]:
    """What cloud-init reports and wrote once it is done, read in one login (each
    ``cloud-init`` command is seconds of Python start-up under TCG): the sections
    ``status``, ``hostname``, ``files``, ``result`` and ``instance``."""
    sections = ("status", "hostname", "files", "result", "instance")
    # runcmd runs in cloud-final, after sshd may already accept logins: wait for it.
    started = time.monotonic()
    result = debian.ssh(
        "cloud-init status --wait --long; echo @@; hostname; echo @@; "
        "cat /var/lib/yun-test/written /var/lib/yun-test/ran; echo @@; "
        "cat /run/cloud-init/result.json; echo @@; "
        "cat /run/cloud-init/instance-data.json", timeout=240)
    print(f"\ncloud-init done {time.monotonic() - started:.1f} s after the first login")
    parts = result.stdout.split("@@\n")
    assert result.returncode == 0 and len(parts) == len(sections), (
        result.stdout + result.stderr + debian.console()[-3000:])
    return dict(zip(sections, parts, strict=True))


def test_hostname_and_user_data_applied(debian: Debian, applied: dict[str, str]) -> None:
    assert applied["hostname"].strip() == VM_NAME
    lines = applied["files"].splitlines()
    assert f"written by write_files {debian.token}" in lines
    assert f"ran runcmd {debian.token}" in lines


def test_cloud_init_done_from_nocloud_with_the_vms_uuid(debian: Debian,
                                                        applied: dict[str, str]) -> None:
    assert "status: done" in applied["status"], applied["status"]
    assert "DataSourceNoCloud" in applied["status"], applied["status"]
    result = json.loads(applied["result"])["v1"]
    assert result["errors"] == [], result
    assert result["datasource"].startswith("DataSourceNoCloud"), result
    # The instance id is the one in the seed Yun wrote: the VM's uuid.
    instance = json.loads(applied["instance"])["v1"]
    assert instance["instance_id"] == debian.vm["uuid"], instance
