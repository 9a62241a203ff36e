"""The cloud-init NoCloud seed of a VM: an ISO 9660 volume labelled ``cidata``.

cloud-init's NoCloud data source (and the project's own test guest, see
``yun/testing/guest_files/rootfs/usr/libexec/yun-guest/seed``) looks for a file system
labelled ``cidata`` holding two files:

* ``meta-data``: YAML; ``instance-id`` (the VM's uuid: cloud-init runs its per-instance
  modules again when it changes), ``local-hostname`` and ``public-keys`` (the SSH keys:
  NoCloud's meta-data is read like EC2's, whose ``public-keys`` cloud-init installs for
  the default user);
* ``user-data``: the user's own data exactly as given (a ``#cloud-config``, a ``#!``
  script, a MIME multi-part ...), or, when none was given, a ``#cloud-config`` setting
  the hostname and the SSH keys.

The SSH keys always travel in meta-data: user data is the user's and is never rewritten
or wrapped, so keys given together with user data still reach the guest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from yun.proto.messages import CloudInitSpec
from yun.util.run import CommandError, run_async

log = logging.getLogger("yun.node.storage.seed")

VOLUME_LABEL = "cidata"
GENISOIMAGE = "genisoimage"
SEED_MODE = 0o600


class SeedError(RuntimeError):
    """The seed could not be written (names the VM and the reason)."""


def _quoted(value: str, what: str) -> str:
    """``value`` as a YAML double-quoted scalar (JSON's string syntax is valid YAML)."""
    if "\n" in value or "\r" in value:
        raise ValueError(f"{what} must be one line, got {value[:40]!r}...")
    return json.dumps(value, ensure_ascii=False)


def render_meta_data(spec: CloudInitSpec) -> str:
    """The ``meta-data`` file of ``spec``: one ``key: value`` line per field (the test
    guest reads these lines with sed), the SSH keys as a ``public-keys`` list."""
    lines = [
        f"instance-id: {_quoted(spec.instance_id, 'instance id')}",
        f"local-hostname: {spec.hostname}",
    ]
    keys = [k.strip() for k in spec.ssh_keys if k.strip()]
    if keys:
        lines.append("public-keys:")
        lines.extend(f"  - {_quoted(k, 'an SSH public key')}" for k in keys)
    return "\n".join(lines) + "\n"


def render_user_data(spec: CloudInitSpec) -> str:
    """The ``user-data`` file of ``spec``: the user's data byte for byte when given,
    else a ``#cloud-config`` with the hostname and the SSH keys."""
    if spec.user_data is not None:
        return spec.user_data
    lines = ["#cloud-config", f"hostname: {spec.hostname}"]
    keys = [k.strip() for k in spec.ssh_keys if k.strip()]
    if keys:
        lines.append("ssh_authorized_keys:")
        lines.extend(f"  - {_quoted(k, 'an SSH public key')}" for k in keys)
    return "\n".join(lines) + "\n"


def _install(tmp: Path, path: Path, owner: tuple[int, int] | None) -> None:
    """Give the built ISO its mode and owner, flush it, and rename it over ``path``."""
    os.chmod(tmp, SEED_MODE)
    if owner is not None:
        os.chown(tmp, *owner)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


async def write_seed(path: Path, spec: CloudInitSpec, *,
                     owner: tuple[int, int] | None = None) -> None:
    """Write the NoCloud seed ISO of ``spec`` at ``path`` atomically (built beside it,
    then renamed over it), mode 0600 and, when given, ``owner``'s (QEMU's user, like the
    node's other disk files). :class:`SeedError` when genisoimage is missing or fails;
    ValueError for a key or instance id that is not one line."""
    meta, user = render_meta_data(spec), render_user_data(spec)
    if shutil.which(GENISOIMAGE) is None:
        raise SeedError(f"cannot write the cloud-init seed of VM {spec.instance_id}: "
                        f"{GENISOIMAGE} is not installed (scripts/setup.sh installs it)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".seed-", dir=path.parent) as work:
        files = Path(work) / "files"
        files.mkdir()
        (files / "meta-data").write_text(meta)
        (files / "user-data").write_text(user)
        tmp = Path(work) / "seed.iso"
        try:
            # -J -R: Joliet and Rock Ridge names (cloud-init accepts either; the
            # dashes of "meta-data" would not survive plain ISO 9660 names).
            await run_async([GENISOIMAGE, "-quiet", "-output", str(tmp), "-volid",
                             VOLUME_LABEL, "-joliet", "-rock", str(files)], timeout=60)
        except CommandError as exc:
            raise SeedError(f"cannot write the cloud-init seed of VM {spec.instance_id}: "
                            f"genisoimage failed: {exc.stderr.strip() or exc}") from exc
        await asyncio.to_thread(_install, tmp, path, owner)
    log.info("cloud-init seed written", extra={
        "vm": spec.instance_id, "path": str(path), "ssh_keys": len(spec.ssh_keys),
        "user_data": spec.user_data is not None})
