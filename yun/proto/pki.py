"""The work domain's own public-key infrastructure: keys, the domain CA, certificates, TLS.

The domain server keeps an Ed25519 CA key and a self-signed CA certificate in its state
dir, made at its first start and reused after (so a restart invalidates nothing). Each
component keeps an Ed25519 key pair next to its id file and, at join, gets a short-lived
X.509 certificate for its public key: CN = component id, OU = component type, a SAN URI
``yun:<type>:<id>`` and a SAN naming the host of the component's advertised URL (IP or
DNS name), so TLS hostname checks work. Key files are written mode 0600.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from yun.util.files import write_atomic

log = logging.getLogger("yun.pki")

KEY_MODE = 0o600
CA_LIFETIME = 10 * 365 * 86400.0
# Certificates start a minute in the past: a peer whose clock is slightly behind the
# domain server's still accepts a certificate issued this second.
BACKDATE = 60.0


class CertificateError(ValueError):
    """A certificate is malformed, not issued by the domain CA, or expired."""


# --- keys ---------------------------------------------------------------------------------


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only, atomically."""
    write_atomic(path, data, mode=KEY_MODE)


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key kept in ``path`` (PEM, 0600), made there if absent."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        key = Ed25519PrivateKey.generate()
        write_private(path, private_pem(key))
        log.info("made a new key pair", extra={"file": str(path)})
        return key
    except ValueError as exc:
        raise CertificateError(f"{path}: not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise CertificateError(f"{path}: expected an Ed25519 key, found {type(key).__name__}")
    if path.stat().st_mode & 0o077:
        path.chmod(KEY_MODE)
    return key


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_raw(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of a public key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    """Decode unpadded base64url; raises ValueError on anything else."""
    if not isinstance(text, str) or any(c in text for c in "=+/ \n"):
        raise ValueError("not unpadded base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_from_b64(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from its raw bytes in base64url; ValueError if it is not one."""
    raw = unb64(text)
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, not {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


# --- certificates ---------------------------------------------------------------------------


def url_host(url: str) -> str:
    """The host of ``url`` (no brackets for IPv6); ValueError if it has none."""
    host = urlsplit(url).hostname
    if not host:
        raise ValueError(f"URL {url!r} names no host")
    return host


def url_authority(url: str) -> str:
    """``host:port`` of ``url`` as a client addressing it sends it (lower case)."""
    return urlsplit(url).netloc.rsplit("@", 1)[-1].lower()


def _san_host(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class CertInfo:
    """What a component certificate of this domain says."""

    component_id: str
    component_type: str
    not_after: float


def fingerprint(cert_pem: bytes | str) -> bytes:
    """sha256 of the DER form of a PEM certificate."""
    data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    cert = x509.load_pem_x509_certificate(data)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


class DomainCA:
    """The domain's certificate authority (kept by the domain server only)."""

    def __init__(self, key: Ed25519PrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert
        self.cert_pem: bytes = cert.public_bytes(serialization.Encoding.PEM)
        self.fingerprint = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.key.public_key()

    @classmethod
    def load_or_create(cls, directory: Path, domain: str) -> DomainCA:
        """The CA kept in ``directory`` (``ca.key`` 0600, ``ca.crt``), made there at first use."""
        key_path, cert_path = directory / "ca.key", directory / "ca.crt"
        if key_path.exists() and cert_path.exists():
            key = load_or_create_key(key_path)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if public_raw(key) != public_raw(_ed25519(cert.public_key())):
                raise CertificateError(f"{cert_path} does not belong to the key {key_path}")
            return cls(key, cert)
        key = load_or_create_key(key_path)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"yun domain {domain} CA"),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "yun")])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(seconds=BACKDATE))
            .not_valid_after(now + dt.timedelta(seconds=CA_LIFETIME))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, None)
        )
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        log.info("made the domain CA", extra={"domain": domain, "file": str(cert_path)})
        return cls(key, cert)

    def issue(self, component_id: str, component_type: str, public_key: Ed25519PublicKey,
              host: str, lifetime: float) -> bytes:
        """A PEM certificate for ``public_key`` naming the component and ``host``."""
        now = _now()
        subject = x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, component_id),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, component_type),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "yun"),
        ])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(seconds=BACKDATE))
            .not_valid_after(now + dt.timedelta(seconds=lifetime))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=False, crl_sign=False,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
            .add_extension(x509.SubjectAlternativeName([
                _san_host(host),
                x509.UniformResourceIdentifier(f"yun:{component_type}:{component_id}"),
            ]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.public_key),
                           critical=False)
            .sign(self.key, None)
        )
        return cert.public_bytes(serialization.Encoding.PEM)


def _ed25519(key: object) -> Ed25519PublicKey:
    if not isinstance(key, Ed25519PublicKey):
        raise CertificateError(f"expected an Ed25519 key, found {type(key).__name__}")
    return key


def ca_public_key(ca_pem: bytes | str) -> Ed25519PublicKey:
    """The public key of a CA certificate."""
    data = ca_pem.encode() if isinstance(ca_pem, str) else ca_pem
    try:
        return _ed25519(x509.load_pem_x509_certificate(data).public_key())
    except ValueError as exc:
        raise CertificateError(f"not a PEM certificate: {exc}") from exc


def verify_certificate(ca_pem: bytes | str, cert_pem: bytes | str) -> CertInfo:
    """Check that ``cert_pem`` was issued by the CA and is valid now; what it names."""
    try:
        cert = x509.load_pem_x509_certificate(
            cert_pem.encode() if isinstance(cert_pem, str) else cert_pem)
    except ValueError as exc:
        raise CertificateError(f"not a PEM certificate: {exc}") from exc
    try:
        ca_public_key(ca_pem).verify(cert.signature, cert.tbs_certificate_bytes)
    except InvalidSignature as exc:
        raise CertificateError("certificate not issued by this domain's CA") from exc
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertificateError(f"certificate valid {cert.not_valid_before_utc} to "
                               f"{cert.not_valid_after_utc}, not now")
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if not cn or not ou:
        raise CertificateError("certificate names no component")
    return CertInfo(str(cn[0].value), str(ou[0].value), cert.not_valid_after_utc.timestamp())


# --- TLS ------------------------------------------------------------------------------------


def server_context(cert_file: Path, key_file: Path, ca_pem: bytes,
                   *, require_client_cert: bool = True) -> ssl.SSLContext:
    """The TLS context of an internal port: this component's certificate, and client
    certificates checked against the domain CA (required, or optional on the domain
    server, whose join routes serve components that have none yet)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert_file, key_file)
    ctx.load_verify_locations(cadata=ca_pem.decode())
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(ca_pem: bytes | None, cert_file: Path | None = None,
                   key_file: Path | None = None) -> ssl.SSLContext:
    """The TLS context of a client of internal ports: the server must show a certificate of
    the domain CA naming the host addressed; ``cert_file`` is presented when asked.

    ``ca_pem`` None gives an unverified context, used only for the first step of a join,
    whose answer is then proven by the domain secret (see :mod:`yun.proto.membership`).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if ca_pem is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cadata=ca_pem.decode())
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
    if cert_file is not None and key_file is not None:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def serving_tls(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether a TLS server answers on ``host:port`` (a readiness probe for internal ports,
    which need a client certificate of the domain: a server that asks for one, or
    answers, is up; a socket bound but not yet serving is not)."""
    ctx = client_context(None)
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host):
            # The handshake completed: a TLS stack is serving (a socket bound but not yet
            # served leaves the handshake hanging until the timeout). What follows depends
            # on the certificate: a server requiring one may just close the connection.
            return True
    except ssl.SSLError as exc:
        return "CERTIFICATE_REQUIRED" in str(exc).upper()
    except OSError:
        return False
