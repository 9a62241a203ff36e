"""The cloud-init NoCloud seed: what meta-data and user-data say, and the ISO written."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from yun.node.storage.seed import render_meta_data, render_user_data, write_seed
from yun.proto.messages import CloudInitSpec
from yun.util.run import run

VM = "0b8a3c1e-8f43-4a7e-9d0b-3c1f6f0a2b11"
KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJx1 alice@laptop"
KEY_B = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 bob \"quoted\""


def yaml_lines(text: str) -> dict[str, str]:
    """Top-level ``key: value`` lines, as the test guest's seed script reads them."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if not line.startswith(" ") and value.strip():
            out[key] = value.strip()
    return out


def listed(text: str, key: str) -> list[str]:
    """The items of the block list under ``key:`` (each a JSON-quoted string)."""
    lines = text.splitlines()
    start = lines.index(f"{key}:") + 1
    items = []
    for line in lines[start:]:
        if not line.startswith("  - "):
            break
        items.append(json.loads(line[4:]))
    return items


def test_meta_data_has_instance_id_hostname_and_keys() -> None:
    spec = CloudInitSpec(instance_id=VM, hostname="web-1", ssh_keys=[KEY_A, KEY_B])
    meta = render_meta_data(spec)
    top = yaml_lines(meta)
    assert json.loads(top["instance-id"]) == VM
    assert top["local-hostname"] == "web-1"
    assert listed(meta, "public-keys") == [KEY_A, KEY_B]  # quotes in a key survive


def test_meta_data_without_keys_has_no_key_list() -> None:
    meta = render_meta_data(CloudInitSpec(instance_id=VM, hostname="db"))
    assert "public-keys" not in meta and yaml_lines(meta)["local-hostname"] == "db"


def test_default_user_data_is_cloud_config_with_hostname_and_keys() -> None:
    user = render_user_data(CloudInitSpec(instance_id=VM, hostname="web-1", ssh_keys=[KEY_A]))
    assert user.splitlines()[0] == "#cloud-config"
    assert yaml_lines(user)["hostname"] == "web-1"
    assert listed(user, "ssh_authorized_keys") == [KEY_A]


def test_given_user_data_is_kept_exactly_and_keys_still_reach_the_guest() -> None:
    script = "#!/bin/sh\necho hi > /tmp/x\n"
    spec = CloudInitSpec(instance_id=VM, hostname="web-1", ssh_keys=[KEY_A], user_data=script)
    assert render_user_data(spec) == script
    assert listed(render_meta_data(spec), "public-keys") == [KEY_A]


def test_a_multi_line_key_is_refused_naming_it() -> None:
    spec = CloudInitSpec(instance_id=VM, hostname="a", ssh_keys=["ssh-ed25519 AAAA\nevil: 1"])
    with pytest.raises(ValueError, match="SSH public key"):
        render_meta_data(spec)


def iso_file(iso: Path, name: str) -> str:
    return run(["isoinfo", "-R", "-i", str(iso), "-x", f"/{name}"]).stdout


async def test_write_seed_makes_a_private_cidata_iso(tmp_path: Path) -> None:
    spec = CloudInitSpec(instance_id=VM, hostname="web-1", ssh_keys=[KEY_A],
                         user_data="#cloud-config\npackages: [htop]\n")
    path = tmp_path / "vm" / "seed.iso"
    await write_seed(path, spec)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    header = run(["isoinfo", "-d", "-i", str(path)]).stdout
    assert "Volume id: cidata" in header
    assert iso_file(path, "meta-data") == render_meta_data(spec)
    assert iso_file(path, "user-data") == spec.user_data
    # Rewritten in place for a changed spec; nothing left beside it.
    await write_seed(path, spec.model_copy(update={"hostname": "web-2"}))
    assert "local-hostname: web-2" in iso_file(path, "meta-data")
    assert os.listdir(path.parent) == ["seed.iso"]
