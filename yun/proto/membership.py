"""A component's life in the work domain: discover, join, heartbeat, follow its peers.

Every service except the domain server runs one :class:`Membership`. It keeps the
component's key pair (in its state dir, next to its id), the certificate and credential
issued at join, the list of associated peers (F-ASSOC) and one :class:`PeerClient` per
peer, and calls back when peers appear or vanish (F-LEAVE).

The join never sends the domain secret. Step one asks for a challenge with a fresh nonce;
the domain server answers its own nonce, its CA certificate and an HMAC proving it knows
the secret. Only if that proof holds does the component send its own proof (an HMAC
bound to its public key, name and URL); an impostor answering mDNS gets a nonce and
nothing else. The second step already checks the server's TLS certificate against the
CA just proven. Heartbeats bring the revocation list and, past half their life, a
renewed certificate and credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from yun.config import ComponentSettings
from yun.proto.auth import (
    Signer,
    Verifier,
    client_proof,
    join_key,
    proofs_equal,
    server_proof,
)
from yun.proto.client import PeerClient
from yun.proto.components import ComponentType
from yun.proto.discovery import discover_domain
from yun.proto.errors import Forbidden, NotFound, PeerError, Unauthorized, YunError
from yun.proto.http11 import PoolGroup
from yun.proto.messages import (
    HeartbeatRequest,
    HeartbeatResponse,
    JoinChallenge,
    JoinChallengeRequest,
    JoinRequest,
    JoinResponse,
    Peer,
    Revocation,
)
from yun.proto.pki import (
    CertificateError,
    b64,
    ca_public_key,
    client_context,
    fingerprint,
    load_or_create_key,
    public_raw,
    server_context,
    url_authority,
    write_private,
)

log = logging.getLogger("yun.membership")

PeersChanged = Callable[[list[Peer], list[Peer]], Awaitable[None] | None]


class JoinRefused(RuntimeError):
    """The domain refused this component (wrong secret), or the server did not prove it
    knows the secret; retrying will not help."""


class Membership:
    """Membership of one component in its work domain."""

    def __init__(
        self, settings: ComponentSettings, component_type: ComponentType, url: str,
        *, name: str | None = None,
    ) -> None:
        self.settings = settings
        self.type = component_type
        self.url = url
        self.name = name or settings.name
        self.component_id: str | None = self._load_id()
        self.key = load_or_create_key(self._key_file)
        self.public_key = b64(public_raw(self.key))
        self.signer: Signer | None = None
        self.verifier = Verifier(self.audiences)
        self.ca_pem: bytes | None = None
        self.server_tls: ssl.SSLContext | None = None
        self.client_tls: ssl.SSLContext | None = None
        self.domain_url: str | None = None
        self.peers: dict[str, Peer] = {}
        self.joined = asyncio.Event()
        self.generation = -1
        # After a rejoin (the domain server restarted), peers that have not rejoined yet
        # are missing from its lists for a moment: until this monotonic time they are kept
        # (unless revoked), so a domain-server restart changes nothing for running work.
        self._linger_until = 0.0
        self._callbacks: list[PeersChanged] = []
        self._clients: dict[str, PeerClient] = {}
        self._domain: PeerClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._interval = settings.heartbeat_interval
        #: When set (the many sim nodes of one process), the clients to peers and to the
        #: domain send through it, a keep-alive pool shared by the process, instead of
        #: opening connections of their own; requests are still signed by this
        #: component's key. None (every real component): connections of its own.
        self.transport: httpx.AsyncBaseTransport | None = None
        #: Set with ``transport`` (the same sim nodes): the connection pools of that
        #: process for whole-body calls (``transport`` then carries streamed ones only).
        self.pools: PoolGroup | None = None
        #: When set (the same sim nodes), the (server, client) TLS contexts of another
        #: member of the same process, used instead of contexts of this component's own:
        #: they are never used but for that process's one listener and pool, and two
        #: contexts per node were ~40 KiB. Their owner keeps them renewed.
        self.shared_tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None

    # -- identity kept across restarts ------------------------------------------------

    @property
    def _id_file(self) -> Path:
        return self.settings.state_dir / "ids" / f"{self.type}-{self.name}.id"

    @property
    def _key_file(self) -> Path:
        return self.settings.state_dir / "ids" / f"{self.type}-{self.name}.key"

    @property
    def cert_file(self) -> Path:
        return self.settings.state_dir / "ids" / f"{self.type}-{self.name}.crt"

    @property
    def ca_file(self) -> Path:
        return self.settings.state_dir / "ids" / "domain-ca.crt"

    def _load_id(self) -> str | None:
        try:
            return self._id_file.read_text().strip() or None
        except OSError:
            return None

    def _save_id(self) -> None:
        try:
            self._id_file.parent.mkdir(parents=True, exist_ok=True)
            self._id_file.write_text(self.component_id or "")
        except OSError as exc:
            log.warning("cannot keep component id: %s", exc, extra={"file": str(self._id_file)})

    # -- public API ---------------------------------------------------------------------

    @property
    def credential(self) -> str | None:
        """The credential issued at join (renewed with the heartbeat)."""
        return self.signer.credential if self.signer else None

    def serving_tls(self) -> ssl.SSLContext:
        """The TLS context of this component's internal port (known once joined)."""
        if self.server_tls is None:
            raise RuntimeError(f"{self.type} '{self.name}' has no certificate: it must join "
                               "its domain before serving")
        return self.server_tls

    def audiences(self) -> list[str]:
        """The ``host:port`` names peers address this component by."""
        return [url_authority(self.url)] if self.url else []

    def on_peers_changed(self, callback: PeersChanged) -> None:
        """Call ``callback(added, removed)`` whenever the associated peers change."""
        self._callbacks.append(callback)

    def remove_peers_callback(self, callback: PeersChanged) -> None:
        """Stop calling ``callback`` (no error if it was not registered)."""
        with contextlib.suppress(ValueError):
            self._callbacks.remove(callback)

    def peers_of(self, component_type: ComponentType) -> list[Peer]:
        return sorted(
            (p for p in self.peers.values() if p.type == component_type),
            key=lambda p: p.component_id,
        )

    def client(self, peer: Peer) -> PeerClient:
        """The client speaking to ``peer`` with this component's credential."""
        client = self._clients.get(peer.component_id)
        if client is None or client.base_url != peer.url.rstrip("/"):
            client = PeerClient(peer.url, self.signer, self.client_tls, transport=self.transport,
                                pools=self.pools)
            self._clients[peer.component_id] = client
        return client

    def client_for_url(self, url: str) -> PeerClient:
        """A client for a peer known only by its URL (e.g. taken from the database)."""
        for peer in self.peers.values():
            if peer.url.rstrip("/") == url.rstrip("/"):
                return self.client(peer)
        key = f"url:{url}"
        client = self._clients.get(key)
        if client is None:
            client = PeerClient(url, self.signer, self.client_tls, transport=self.transport,
                                pools=self.pools)
            self._clients[key] = client
        return client

    async def start(self, wait: bool = True) -> None:
        """Join the domain (retrying until it answers) and keep heartbeating in the background.

        Raises :class:`JoinRefused` at once if the domain refuses the secret.
        """
        await self._join_once_or_refused(first=True)
        self._task = asyncio.create_task(self._run(), name=f"membership-{self.name}")
        if wait:
            await self.joined.wait()

    async def stop(self, leave: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if leave and self._domain is not None and self.component_id and self.credential:
            try:
                await self._domain.request(
                    "POST", f"/v1/components/{self.component_id}/leave", timeout=2
                )
            except YunError:
                pass
        for client in [*self._clients.values(), *([self._domain] if self._domain else [])]:
            await client.aclose()
        self._clients.clear()

    # -- internals ----------------------------------------------------------------------

    async def _locate_domain(self) -> str | None:
        if self.settings.domain_url:
            return self.settings.domain_url.rstrip("/")
        url = await discover_domain(self.settings.domain_name)
        if url:
            log.info("found domain server by mDNS", extra={"domain": self.settings.domain_name,
                                                             "url": url})
        return url

    async def _join_once_or_refused(self, first: bool = False) -> bool:
        """Try to join once; False when the domain could not be reached."""
        url = await self._locate_domain()
        if url is None:
            if first:
                log.warning("domain server not found yet",
                            extra={"domain": self.settings.domain_name})
            return False
        self.domain_url = url
        key = join_key(self.settings.domain_secret or "-")
        client_nonce = secrets.token_urlsafe(32)
        # Step one: nothing but a nonce is sent, over TLS not yet checked (the CA is
        # what this step proves).
        async with PeerClient(url, None, client_context(None), timeout=10) as probe:
            try:
                challenge = await probe.call(
                    "POST", "/v1/join/challenge", JoinChallenge,
                    body=JoinChallengeRequest(type=self.type, name=self.name,
                                              client_nonce=client_nonce))
            except (Forbidden, Unauthorized) as exc:
                raise JoinRefused(f"domain at {url} refused {self.type} '{self.name}': "
                                  f"{exc}") from exc
            except PeerError as exc:
                if first:
                    log.warning("domain server unreachable: %s", exc, extra={"url": url})
                return False
        ca_pem = challenge.ca_cert_pem.encode()
        try:
            ca_fp = fingerprint(ca_pem)
        except ValueError:
            ca_fp = b""
        expected = server_proof(key, client_nonce, challenge.server_nonce, ca_fp)
        if not ca_fp or not proofs_equal(challenge.server_proof, expected):
            log.error("domain server at %s did not prove knowledge of the domain secret; "
                      "refusing it and sending nothing more", url,
                      extra={"url": url, "domain": self.settings.domain_name,
                             "component_name": self.name})
            raise JoinRefused(f"domain server at {url} did not prove knowledge of the domain "
                              "secret (an impostor, or another domain's secret)")
        log.info("domain server proved it knows the domain secret",
                 extra={"url": url, "ca_sha256": ca_fp.hex()[:16], "component_name": self.name})
        req = JoinRequest(
            challenge_id=challenge.challenge_id, public_key=self.public_key,
            client_proof=client_proof(key, challenge.server_nonce, client_nonce,
                                      str(self.type), self.name, self.url, self.public_key),
            type=self.type, name=self.name, url=self.url, component_id=self.component_id,
        )
        # Step two over TLS checked against the CA just proven: a relay in the middle
        # cannot show a certificate of it for this address.
        async with PeerClient(url, None, client_context(ca_pem), timeout=10) as verified:
            try:
                resp = await verified.call("POST", "/v1/join", JoinResponse, body=req)
            except (Forbidden, Unauthorized) as exc:
                raise JoinRefused(f"domain at {url} refused {self.type} '{self.name}': "
                                  f"{exc}") from exc
            except PeerError as exc:
                log.warning("join failed: %s", exc, extra={"url": url})
                return False
        self.component_id = resp.component_id
        self._save_id()
        await self._install(resp.ca_cert_pem.encode(), resp.certificate_pem.encode(),
                            resp.credential)
        self._apply_revoked(resp.revoked, resp.revocation_generation)
        self._interval = resp.heartbeat_interval
        self.generation = -1  # the next heartbeat's peers are applied whatever they are
        if self.peers:
            # A rejoin: every peer needs up to one heartbeat to notice the restart and a
            # presence TTL is the longest the domain itself would wait for it.
            self._linger_until = time.monotonic() + resp.ttl + 2 * resp.heartbeat_interval
        log.info("joined domain", extra={"domain": resp.domain, "component": self.component_id,
                                         "type": str(self.type), "url": self.url,
                                         "domain_url": url, "peers": len(resp.peers)})
        await self._apply_peers(resp.peers)
        self.joined.set()
        return True

    async def _install(self, ca_pem: bytes, cert_pem: bytes, credential: str) -> None:
        """Keep the certificate and credential issued by the domain, and load them into the
        TLS contexts (the same context objects: servers and clients pick them up at their
        next handshake)."""
        write_private(self.cert_file, cert_pem)
        ca_changed = ca_pem != self.ca_pem
        if ca_changed:
            self.ca_file.write_bytes(ca_pem)
        try:
            self.verifier.set_ca(ca_public_key(ca_pem))
        except CertificateError as exc:
            raise JoinRefused(f"the domain sent an unusable CA certificate: {exc}") from exc
        if self.signer is None:
            self.signer = Signer(self.key, credential)
        else:
            self.signer.credential = credential
        if self.shared_tls is not None:
            self.server_tls, self.client_tls = self.shared_tls
        elif self.server_tls is None or self.client_tls is None:
            self.server_tls = server_context(self.cert_file, self._key_file, ca_pem)
            self.client_tls = client_context(ca_pem, self.cert_file, self._key_file)
        else:
            self.server_tls.load_cert_chain(self.cert_file, self._key_file)
            self.client_tls.load_cert_chain(self.cert_file, self._key_file)
            if ca_changed:
                # A domain server that lost its state made a new CA: trust it too.
                self.server_tls.load_verify_locations(cadata=ca_pem.decode())
                self.client_tls.load_verify_locations(cadata=ca_pem.decode())
        self.ca_pem = ca_pem
        if self._domain is None or self._domain.base_url != (self.domain_url or "").rstrip("/"):
            if self._domain is not None:
                await self._domain.aclose()
            assert self.domain_url is not None
            self._domain = PeerClient(self.domain_url, self.signer, self.client_tls, timeout=10,
                                      transport=self.transport, pools=self.pools)

    def _apply_revoked(self, revoked: list[Revocation], generation: int) -> None:
        if generation == self.verifier.revocation_generation:
            return
        before = set(self.verifier.revoked)
        self.verifier.set_revoked({r.component_id: r.revoked_at for r in revoked}, generation)
        for cid in set(self.verifier.revoked) - before:
            log.info("peer credentials revoked", extra={"component": self.component_id,
                                                        "peer": cid})

    async def _run(self) -> None:
        while True:
            # Jitter keeps many components from heartbeating in lock step.
            await asyncio.sleep(self._interval * random.uniform(0.8, 1.0))
            try:
                if not self.joined.is_set():
                    await self._join_once_or_refused()
                    continue
                await self._heartbeat()
            except JoinRefused:
                log.error("domain refuses this component now; retrying",
                          extra={"component": self.component_id})
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("membership loop error", extra={"component": self.component_id})

    async def _heartbeat(self) -> None:
        assert self._domain is not None
        try:
            resp = await self._domain.call(
                "POST", f"/v1/components/{self.component_id}/heartbeat", HeartbeatResponse,
                body=HeartbeatRequest(url=self.url), timeout=max(self._interval, 2.0),
            )
        except (NotFound, Unauthorized):
            # The domain server restarted (or expired us): join again as ourselves.
            log.info("domain forgot this component; rejoining",
                     extra={"component": self.component_id})
            self.joined.clear()
            await self._join_once_or_refused()
            return
        except PeerError as exc:
            log.warning("heartbeat failed: %s", exc, extra={"component": self.component_id})
            if not self.settings.domain_url:
                # Rediscover: the domain server may have moved (F-MOVE).
                self.joined.clear()
            return
        self._apply_revoked(resp.revoked, resp.revocation_generation)
        if resp.credential and resp.certificate_pem and self.ca_pem is not None:
            await self._install(self.ca_pem, resp.certificate_pem.encode(), resp.credential)
            log.info("certificate and credential renewed", extra={"component": self.component_id})
        if resp.generation != self.generation or self._linger_until:
            self.generation = resp.generation
            await self._apply_peers(resp.peers)

    async def _apply_peers(self, peers: list[Peer]) -> None:
        new = {p.component_id: p for p in peers}
        if self._linger_until:
            if time.monotonic() < self._linger_until:
                for cid, peer in self.peers.items():
                    if cid not in new and cid not in self.verifier.revoked:
                        new[cid] = peer
            else:
                self._linger_until = 0.0  # this list is the domain's whole view again
        added = [p for cid, p in new.items() if self.peers.get(cid) != p]
        removed = [p for cid, p in self.peers.items() if cid not in new]
        self.peers = new
        for peer in removed:
            # Its client stays open: requests under way to it must not be cut because the
            # peer list changed (after a domain-server restart, peers not yet rejoined
            # look removed for a moment). Clients are closed when this component stops.
            log.info("peer gone", extra={"component": self.component_id,
                                         "peer": peer.component_id, "peer_type": str(peer.type)})
        for peer in added:
            log.info("peer available", extra={"component": self.component_id,
                                              "peer": peer.component_id,
                                              "peer_type": str(peer.type), "url": peer.url})
        if added or removed:
            for callback in list(self._callbacks):  # one may remove itself meanwhile
                result = callback(added, removed)
                if inspect.isawaitable(result):
                    await result
