"""A real Debian 12 cloud guest applies a NoCloud seed written by Yun's own writer.

The image (:mod:`yun.testing.debian_guest`) is built once by scripts/setup.sh from
Debian packages; this test never downloads anything: without the cached image it
skips (a failure under YUN_TEST_STRICT). It boots the image under bare QEMU (TCG) with
the seed from :func:`yun.node.storage.seed.write_seed` as an IDE CD, logs in over the
forwarded SSH port with a key pair made here, and checks that cloud-init took the host
name, the SSH key and the user data (``write_files`` and ``runcmd``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from yun.node.storage.seed import write_seed
from yun.proto.messages import CloudInitSpec
from yun.testing.debian_guest import DEFAULT_USER, cached_debian_image
from yun.testing.qemu import GuestError, QemuGuest, boot_guest

pytestmark = pytest.mark.system

SSH_TIMEOUT = 240.0  # boot to a working login under TCG; about a minute when idle
HOSTNAME = "deb-cloud-test"

USER_DATA = """\
#cloud-config
write_files:
  - path: /var/lib/yun-test/written
    content: |
      written by write_files {token}
runcmd:
  - [sh, -c, "echo ran runcmd {token} > /var/lib/yun-test/ran"]
"""


def _ssh(guest: QemuGuest, key: Path, command: str, timeout: float = 30.0,
         user: str = DEFAULT_USER) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in the guest over the forwarded port, key authentication only."""
    argv = ["ssh", "-i", str(key), "-p", str(guest.ssh_port),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "PasswordAuthentication=no",
            "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
            f"{user}@127.0.0.1", command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


def _wait_for_login(guest: QemuGuest, key: Path, timeout: float) -> float:
    """Poll ``ssh ... true`` until it works; the seconds it took. Bounded by ``timeout``."""
    started = time.monotonic()
    last = ""
    while time.monotonic() - started < timeout:
        if guest.process.poll() is not None:
            raise GuestError(f"QEMU exited ({guest.process.returncode})\n"
                             f"{guest.serial_text()[-3000:]}")
        try:
            result = _ssh(guest, key, "true", timeout=20)
        except subprocess.TimeoutExpired:
            last = "ssh timed out"
        else:
            if result.returncode == 0:
                return time.monotonic() - started
            last = result.stderr.strip()
        time.sleep(2)
    raise GuestError(f"no SSH login within {timeout:.0f} s (last: {last})\n"
                     f"--- serial ---\n{guest.serial_text()[-4000:]}")


def test_debian_guest_takes_hostname_key_and_user_data(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("booting the Debian guest needs root (its cache is root's)")
    for tool in ("qemu-system-x86_64", "qemu-img", "genisoimage", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    image = cached_debian_image()
    if image is None:
        pytest.skip("no cached Debian guest: run scripts/setup.sh "
                    "(or python -m yun.testing.debian_guest) first")

    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "yun-test",
                    "-f", str(key)], check=True, timeout=30)
    token = uuid.uuid4().hex
    spec = CloudInitSpec(instance_id=str(uuid.uuid4()), hostname=HOSTNAME,
                         ssh_keys=[(tmp_path / "id_ed25519.pub").read_text().strip()],
                         user_data=USER_DATA.format(token=token))
    seed = tmp_path / "seed.iso"
    asyncio.run(write_seed(seed, spec))

    started = time.monotonic()
    # 512 MiB: cloud-init is Python; boot_guest boots an overlay in its own temporary
    # directory, removed (QEMU killed) by the context manager whatever happens.
    with boot_guest(image, cdrom=seed, memory_mb=512, forward_ssh=True,
                    marker=None) as guest:
        login_s = _wait_for_login(guest, key, SSH_TIMEOUT)
        print(f"Debian guest: boot to SSH login {time.monotonic() - started:.1f} s "
              f"(polled {login_s:.1f} s)")

        # runcmd runs in cloud-final, after sshd may already accept logins.
        result = _ssh(guest, key, "cloud-init status --wait >/dev/null; hostname; "
                                  "cat /var/lib/yun-test/written /var/lib/yun-test/ran",
                      timeout=180)
        done_s = time.monotonic() - started
        print(f"Debian guest: cloud-init done {done_s:.1f} s after QEMU started")
        assert result.returncode == 0, result.stderr + guest.serial_text()[-3000:]
        lines = result.stdout.splitlines()
        assert lines[0] == HOSTNAME
        assert f"written by write_files {token}" in lines
        assert f"ran runcmd {token}" in lines

        # Only the seed's key let us in: the default user has no password and the
        # key is the one cloud-init wrote from the seed's meta-data.
        keys = _ssh(guest, key, "cat ~/.ssh/authorized_keys")
        assert keys.returncode == 0
        assert spec.ssh_keys[0] in keys.stdout
        other = tmp_path / "other"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                       check=True, timeout=30)
        assert _ssh(guest, other, "true").returncode != 0

        status = _ssh(guest, key, "cloud-init status --long; "
                                  "cat /run/cloud-init/result.json")
        assert "status: done" in status.stdout, status.stdout
        assert "DataSourceNoCloud" in status.stdout, status.stdout
        assert '"errors": []' in status.stdout, status.stdout
