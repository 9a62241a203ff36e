"""SSH public keys: parsed and fingerprinted as ssh-keygen does, bad keys refused saying
what is wrong (the API and the CLI use this one parser)."""

from __future__ import annotations

import base64
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from yun.proto.resources import SshKeyCreate, VmCreate
from yun.proto.ssh_keys import (
    SshKeyError,
    looks_like_public_key,
    parse_public_key,
)

# Made with `ssh-keygen -t ed25519 -C alice@laptop`; fingerprint as `ssh-keygen -lf` shows.
ED25519 = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMw3GzjzWbPx3oruo2tWGdasM+EE1RCB6mUpqEgskBQn "
           "alice@laptop")
ED25519_FP = "SHA256:xeDqCt2+4M2aJb5P83XNWTNrs5NyFzi2I/9VwMpWp4s"


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _line(key_type: str, *fields: bytes) -> str:
    blob = _string(key_type.encode()) + b"".join(_string(f) for f in fields)
    return f"{key_type} {base64.b64encode(blob).decode()}"


def keygen(tmp_path: Path, *args: str) -> tuple[str, str]:
    """A key ssh-keygen makes, and the fingerprint it prints for it."""
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed (openssh-client)")
    path = tmp_path / f"k{len(list(tmp_path.iterdir()))}"
    subprocess.run(["ssh-keygen", "-q", "-N", "", "-C", "test@yun", "-f", str(path), *args],
                   check=True)
    shown = subprocess.run(["ssh-keygen", "-lf", f"{path}.pub"], check=True,
                           capture_output=True, text=True).stdout.split()
    return Path(f"{path}.pub").read_text(), shown[1]


def test_a_known_ed25519_key_and_its_fingerprint() -> None:
    key = parse_public_key(ED25519 + "\n")
    assert (key.type, key.bits, key.comment) == ("ssh-ed25519", 256, "alice@laptop")
    assert key.fingerprint == ED25519_FP
    assert key.line == ED25519


@pytest.mark.parametrize("args,bits", [(("-t", "ed25519"), 256),
                                       (("-t", "rsa", "-b", "2048"), 2048),
                                       (("-t", "ecdsa", "-b", "256"), 256),
                                       (("-t", "ecdsa", "-b", "384"), 384),
                                       (("-t", "ecdsa", "-b", "521"), 521)])
def test_fingerprints_match_ssh_keygen(tmp_path: Path, args: tuple[str, ...],
                                       bits: int) -> None:
    text, fingerprint = keygen(tmp_path, *args)
    key = parse_public_key(text)
    assert key.fingerprint == fingerprint
    assert key.bits == bits and key.comment == "test@yun"
    assert SshKeyCreate(name="k", public_key=text).public_key == text.strip()


def test_a_short_rsa_key_is_refused(tmp_path: Path) -> None:
    text, _ = keygen(tmp_path, "-t", "rsa", "-b", "1024")
    with pytest.raises(SshKeyError, match="1024 bits; at least 2048"):
        parse_public_key(text)


@pytest.mark.parametrize("text,error", [
    ("", "empty"),
    ("ssh-dss AAAAB3NzaC1kc3M= old", "unknown key type 'ssh-dss'"),
    ('from="10.0.0.1" ' + ED25519, "options before the key type"),
    ("ssh-ed25519", "no key data"),
    ("ssh-ed25519 not*base64", "not valid base64"),
    ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMw", "not valid base64"),
    (_line("ssh-ed25519", b"x" * 32).replace("ssh-ed25519", "ssh-rsa", 1),
     "of type 'ssh-ed25519', not 'ssh-rsa'"),
    (_line("ssh-ed25519", b"x" * 31), "one 32-byte public key"),
    (_line("ecdsa-sha2-nistp256", b"nistp384", b"\x04" + b"x" * 64), "names curve nistp256"),
    (_line("ecdsa-sha2-nistp256", b"nistp256", b"\x04" + b"x" * 10), "point of the key"),
    (_line("ssh-rsa", b"\x02", b"\x01" * 256), "public exponent"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----", "private key"),
    (ED25519 + "\n" + ED25519, "several lines"),
    (ED25519 + " \x07bell", "control characters"),
])
def test_bad_keys_are_refused_saying_what_is_wrong(text: str, error: str) -> None:
    with pytest.raises(SshKeyError, match=re.escape(error)):
        parse_public_key(text)


def test_a_truncated_blob_is_refused() -> None:
    blob = _string(b"ssh-ed25519") + struct.pack(">I", 32) + b"x" * 10
    with pytest.raises(SshKeyError, match="truncated"):
        parse_public_key(f"ssh-ed25519 {base64.b64encode(blob).decode()}")


def test_names_and_literal_keys_are_told_apart() -> None:
    assert looks_like_public_key(ED25519) and looks_like_public_key(" ssh-rsa ")
    assert looks_like_public_key("ssh-dss AAAA")  # a key, refused later with its reason
    assert not looks_like_public_key("laptop") and not looks_like_public_key("")


def test_api_models_refuse_bad_keys_and_check_the_vm_options() -> None:
    with pytest.raises(ValidationError, match="unknown key type"):
        SshKeyCreate(name="k", public_key="ssh-foo AAAA")
    with pytest.raises(ValidationError, match="give an image to boot from, or an iso"):
        VmCreate(name="v")
    with pytest.raises(ValidationError, match="65537 bytes; at most 65536"):
        VmCreate(name="v", image="i", user_data="x" * 65537)
    # Bytes, not characters: 32769 two-byte characters are too much.
    with pytest.raises(ValidationError, match="at most 65536"):
        VmCreate(name="v", image="i", user_data="é" * 32769)
    assert VmCreate(name="v", iso="installer").image is None
