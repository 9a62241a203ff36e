"""SSH public keys as users give them (``ssh-ed25519 AAAA… comment``): parsed, checked
and fingerprinted the way ``ssh-keygen -l`` shows them (``SHA256:…``).

The control server refuses a key it cannot parse when it is stored (``yun key add``)
or given at a VM's create, so a guest never gets a line its sshd would skip in silence.
Only the key types a current OpenSSH accepts by default are taken: Ed25519, RSA of at
least 2048 bits, and ECDSA on the three NIST curves.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from dataclasses import dataclass

#: the key types accepted, with the curve each ECDSA type must name in its blob
KEY_TYPES: dict[str, str | None] = {
    "ssh-ed25519": None,
    "ssh-rsa": None,
    "ecdsa-sha2-nistp256": "nistp256",
    "ecdsa-sha2-nistp384": "nistp384",
    "ecdsa-sha2-nistp521": "nistp521",
}
#: RSA keys shorter than this are refused (OpenSSH itself refuses below 1024)
MIN_RSA_BITS = 2048
#: a public key line longer than this is not a key (a 16384-bit RSA key is ~2.8 KB)
MAX_KEY_LENGTH = 8192
MAX_COMMENT = 255
# ECDSA points are uncompressed (0x04 || X || Y): their length per curve.
_EC_POINT = {"nistp256": 65, "nistp384": 97, "nistp521": 133}
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")


class SshKeyError(ValueError):
    """A public key that cannot be used; the message says what is wrong."""


@dataclass(frozen=True)
class PublicKey:
    """A parsed public key: ``line`` is what goes into ``authorized_keys``."""

    type: str
    blob: bytes
    comment: str
    bits: int

    @property
    def fingerprint(self) -> str:
        """``SHA256:`` and the unpadded base64 of the blob's SHA-256, as ``ssh-keygen -l``."""
        digest = base64.b64encode(hashlib.sha256(self.blob).digest()).decode().rstrip("=")
        return f"SHA256:{digest}"

    @property
    def line(self) -> str:
        """The key as one ``authorized_keys`` line (type, base64, comment if any)."""
        data = base64.b64encode(self.blob).decode()
        return f"{self.type} {data} {self.comment}".rstrip()


def _strings(blob: bytes) -> list[bytes]:
    """The length-prefixed strings of an SSH wire-format blob (RFC 4251 §5)."""
    out, pos = [], 0
    while pos < len(blob):
        if pos + 4 > len(blob):
            raise SshKeyError("the key data is truncated (a length field is cut off)")
        (size,) = struct.unpack(">I", blob[pos:pos + 4])
        pos += 4
        if size > len(blob) - pos:
            raise SshKeyError("the key data is truncated (a field is longer than the data)")
        out.append(blob[pos:pos + size])
        pos += size
    return out


def _mpint_bits(value: bytes) -> int:
    return int.from_bytes(value, "big").bit_length()


def _check_blob(key_type: str, blob: bytes) -> int:
    """The key's size in bits, after checking its blob matches ``key_type``."""
    fields = _strings(blob)
    if not fields or fields[0] != key_type.encode():
        named = fields[0].decode(errors="replace") if fields else "nothing"
        raise SshKeyError(f"the key data is of type {named!r}, not {key_type!r} as the "
                          "line says")
    if key_type == "ssh-ed25519":
        if len(fields) != 2 or len(fields[1]) != 32:
            raise SshKeyError("an ssh-ed25519 key holds one 32-byte public key; this one "
                              "does not")
        return 256
    if key_type == "ssh-rsa":
        if len(fields) != 3:
            raise SshKeyError("an ssh-rsa key holds an exponent and a modulus; this one "
                              "does not")
        exponent, bits = int.from_bytes(fields[1], "big"), _mpint_bits(fields[2])
        if exponent < 3 or exponent % 2 == 0:
            raise SshKeyError("the RSA public exponent is not a valid one")
        if bits < MIN_RSA_BITS:
            raise SshKeyError(f"the RSA key has {bits} bits; at least {MIN_RSA_BITS} are "
                              "required (make a new one: ssh-keygen -t ed25519)")
        return bits
    curve = KEY_TYPES[key_type]
    assert curve is not None
    if len(fields) != 3 or fields[1] != curve.encode():
        raise SshKeyError(f"an {key_type} key names curve {curve} and holds one point; this "
                          "one does not")
    if len(fields[2]) != _EC_POINT[curve] or fields[2][:1] != b"\x04":
        raise SshKeyError(f"the {curve} point of the key is malformed")
    return {"nistp256": 256, "nistp384": 384, "nistp521": 521}[curve]


def parse_public_key(text: str) -> PublicKey:
    """Parse one public key line (``type base64 [comment]``), as in a ``.pub`` file.

    Raises :class:`SshKeyError` naming what is wrong: a private key, an unknown type,
    options before the type, bad base64, a blob of another type, a short RSA key."""
    line = text.strip()
    if not line:
        raise SshKeyError("the public key is empty")
    if len(line) > MAX_KEY_LENGTH:
        raise SshKeyError(f"the public key is {len(line)} characters long; at most "
                          f"{MAX_KEY_LENGTH} are allowed")
    if "PRIVATE KEY" in line:
        raise SshKeyError("this is a private key: give the public one (the .pub file), and "
                          "never send a private key anywhere")
    if "\n" in line or "\r" in line:
        raise SshKeyError("give one public key per entry (the text has several lines)")
    parts = line.split(None, 2)
    key_type = parts[0]
    if key_type not in KEY_TYPES:
        if any(t in line for t in KEY_TYPES):
            raise SshKeyError(f"the line starts with {key_type[:40]!r}: options before the "
                              "key type (as in authorized_keys) are not accepted")
        raise SshKeyError(f"unknown key type {key_type[:40]!r}: use one of "
                          f"{', '.join(KEY_TYPES)}")
    if len(parts) < 2:
        raise SshKeyError(f"the {key_type} key has no key data after its type")
    data = parts[1]
    if not _BASE64.match(data) or len(data) % 4:
        raise SshKeyError(f"the key data of the {key_type} key is not valid base64")
    try:
        blob = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SshKeyError(f"the key data of the {key_type} key is not valid base64") from exc
    bits = _check_blob(key_type, blob)
    comment = parts[2].strip() if len(parts) > 2 else ""
    if len(comment) > MAX_COMMENT:
        raise SshKeyError(f"the key's comment is longer than {MAX_COMMENT} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in comment):
        raise SshKeyError("the key's comment has control characters")
    return PublicKey(key_type, blob, comment, bits)


def looks_like_public_key(text: str) -> bool:
    """Whether ``text`` is meant as a literal key (it starts with a key type or holds
    whitespace), not the name of a stored key."""
    stripped = text.strip()
    if not stripped:
        return False
    # A stored key's name is one word of letters, digits, '.', '_' and '-'.
    return len(stripped.split()) > 1 or stripped.split()[0] in KEY_TYPES
