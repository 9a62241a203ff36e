"""The work domain's registry of components: join, heartbeat, presence (F-JOIN, F-LEAVE).

The member list is memory only on purpose: a restarted domain server learns its
components again when their next heartbeat is refused and they rejoin with the
same component id, so nothing a restart loses matters (Z-STATELESS). What a restart
must not lose is kept in the state dir: the CA (so issued certificates and credentials
stay valid) and the revocation list (so a removed component stays refused).

A join is two steps, so the secret never crosses the wire: :meth:`Registry.challenge`
proves the server knows it (the component checks that before saying anything more),
:meth:`Registry.join` checks the component's proof and issues its certificate and
credential for the public key it sent.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from yun.proto.auth import (
    Verifier,
    client_proof,
    issue_credential,
    join_key,
    proofs_equal,
    server_proof,
)
from yun.proto.components import ComponentType, associated
from yun.proto.errors import Forbidden, NotFound, Unavailable
from yun.proto.messages import (
    ComponentInfo,
    ComponentStatus,
    JoinChallenge,
    JoinChallengeRequest,
    JoinRequest,
    JoinResponse,
    Peer,
    Revocation,
)
from yun.proto.pki import CertificateError, DomainCA, public_from_b64, url_host, write_private

log = logging.getLogger("yun.domain")


@dataclass
class Member:
    component_id: str
    type: ComponentType
    name: str
    url: str
    joined_at: float
    last_seen: float
    status: ComponentStatus = ComponentStatus.ALIVE
    public_key: str = ""
    credential_issued_at: float = 0.0

    def peer(self) -> Peer:
        return Peer(component_id=self.component_id, type=self.type, name=self.name, url=self.url)

    def info(self) -> ComponentInfo:
        return ComponentInfo(
            component_id=self.component_id,
            type=self.type,
            name=self.name,
            url=self.url,
            status=self.status,
            joined_at=datetime.fromtimestamp(self.joined_at, UTC),
            last_seen=datetime.fromtimestamp(self.last_seen, UTC),
        )


@dataclass
class _Challenge:
    type: ComponentType
    name: str
    client_nonce: str
    server_nonce: str
    expires_at: float


class Registry:
    """Members of one work domain, their presence, their credentials and revocations."""

    def __init__(self, domain: str, secret: str, *, ttl: float, heartbeat_interval: float,
                 ca: DomainCA, credential_lifetime: float = 3600.0,
                 state_dir: Path | None = None, verifier: Verifier | None = None,
                 challenge_ttl: float = 30.0, max_challenges: int = 1024):
        if not secret:
            raise ValueError("the domain server needs a domain_secret")
        self.domain = domain
        self._join_key = join_key(secret)
        self.ca = ca
        self.ttl = ttl
        self.heartbeat_interval = heartbeat_interval
        self.credential_lifetime = credential_lifetime
        self.challenge_ttl = challenge_ttl
        self.max_challenges = max_challenges
        self.members: dict[str, Member] = {}
        # Times (wall clock, start and end) when this server itself was stalled and heard
        # nobody: not counted as any member's silence.
        self._deaf: list[tuple[float, float]] = []
        self._challenges: dict[str, _Challenge] = {}
        self._revoked_file = state_dir / "revoked.json" if state_dir else None
        self.revoked: dict[str, Revocation] = self._load_revoked()
        self.verifier = verifier
        # Bumped whenever the set of alive members or an address changes, so that
        # components notice a change in their peers with one integer comparison. It
        # starts from the clock so a restarted domain server never repeats a number a
        # component already saw from its previous life. Likewise for revocations.
        self.generation = time.time_ns()
        self.revocation_generation = time.time_ns()
        self._publish_revoked()

    # -- join -------------------------------------------------------------------------------

    def challenge(self, req: JoinChallengeRequest, now: float | None = None) -> JoinChallenge:
        """First step of a join: prove this server knows the secret, and remember the nonces
        (single use, for :attr:`challenge_ttl` seconds)."""
        now = now or time.time()
        if req.type is ComponentType.DOMAIN:
            raise Forbidden("a domain server cannot join another domain")
        for cid in [c for c, ch in self._challenges.items() if ch.expires_at < now]:
            del self._challenges[cid]
        if len(self._challenges) >= self.max_challenges:
            raise Unavailable("too many joins in progress; try again shortly")
        challenge_id = secrets.token_urlsafe(18)
        server_nonce = secrets.token_urlsafe(32)
        self._challenges[challenge_id] = _Challenge(req.type, req.name, req.client_nonce,
                                                    server_nonce, now + self.challenge_ttl)
        return JoinChallenge(
            challenge_id=challenge_id, server_nonce=server_nonce,
            ca_cert_pem=self.ca.cert_pem.decode(),
            server_proof=server_proof(self._join_key, req.client_nonce, server_nonce,
                                      self.ca.fingerprint))

    def join(self, req: JoinRequest, now: float | None = None) -> JoinResponse:
        """Admit a component that proved it knows the domain secret, issue its certificate
        and credential, and tell it its peers."""
        now = now or time.time()
        challenge = self._challenges.pop(req.challenge_id, None)
        if challenge is None or challenge.expires_at < now:
            raise Forbidden("unknown or expired join challenge; ask for a new one")
        if (challenge.type, challenge.name) != (req.type, req.name):
            raise Forbidden("the join does not match its challenge's component type and name")
        expected = client_proof(self._join_key, challenge.server_nonce, challenge.client_nonce,
                                str(req.type), req.name, req.url, req.public_key)
        if not proofs_equal(req.client_proof, expected):
            log.warning("join refused: wrong domain secret", extra={"component_name": req.name,
                                                                     "type": str(req.type)})
            raise Forbidden(f"wrong domain secret for domain '{self.domain}'")
        try:
            public_from_b64(req.public_key)
            host = url_host(req.url)
        except ValueError as exc:
            raise Forbidden(f"join of {req.type} '{req.name}' refused: {exc}") from exc
        member = self.members.get(req.component_id or "")
        if member is None:
            # A component that lost its id (fresh state dir) but keeps its type and
            # name takes its old place instead of appearing twice.
            member = next(
                (m for m in self.members.values() if m.type == req.type and m.name == req.name),
                None,
            )
        if member is not None and member.type != req.type:
            raise Forbidden(f"component id {member.component_id} belongs to a {member.type}")
        if member is None:
            member = Member(
                component_id=req.component_id or str(uuid.uuid4()),
                type=req.type, name=req.name, url=req.url, joined_at=now, last_seen=now,
            )
            self.members[member.component_id] = member
            log.info("component joined", extra={"component": member.component_id,
                                                 "type": str(req.type), "component_name": req.name,
                                                 "url": req.url})
        else:
            if member.status is not ComponentStatus.ALIVE or member.url != req.url:
                log.info("component rejoined", extra={"component": member.component_id,
                                                       "type": str(req.type), "url": req.url})
            member.url = req.url
            member.name = req.name
            member.status = ComponentStatus.ALIVE
            member.last_seen = now
        member.public_key = req.public_key
        self.generation += 1
        credential, cert = self._issue(member, host, now)
        log.info("issued certificate and credential", extra={
            "component": member.component_id, "type": str(member.type), "san": host,
            "lifetime_s": self.credential_lifetime})
        return JoinResponse(
            component_id=member.component_id, credential=credential,
            certificate_pem=cert.decode(), ca_cert_pem=self.ca.cert_pem.decode(),
            domain=self.domain, heartbeat_interval=self.heartbeat_interval, ttl=self.ttl,
            peers=self.peers_of(member), revoked=list(self.revoked.values()),
            revocation_generation=self.revocation_generation,
        )

    def _issue(self, member: Member, host: str, now: float) -> tuple[str, bytes]:
        public = public_from_b64(member.public_key)
        # A revocation is "credentials issued up to then": never issue at the same instant.
        revoked = self.revoked.get(member.component_id)
        if revoked is not None and now <= revoked.revoked_at:
            now = revoked.revoked_at + 1e-3
        member.credential_issued_at = now
        credential = issue_credential(self.ca.key, member.component_id, str(member.type),
                                      public, self.credential_lifetime, now=now)
        try:
            cert = self.ca.issue(member.component_id, str(member.type), public, host,
                                 self.credential_lifetime)
        except (CertificateError, ValueError) as exc:
            raise Forbidden(f"cannot issue a certificate for {host!r}: {exc}") from exc
        return credential, cert

    def renewal(self, member: Member, now: float | None = None) -> tuple[str, bytes] | None:
        """A new credential and certificate when ``member``'s are past half their life."""
        now = now or time.time()
        if not member.public_key or \
                now - member.credential_issued_at < self.credential_lifetime / 2:
            return None
        log.info("renewing certificate and credential", extra={
            "component": member.component_id, "type": str(member.type)})
        return self._issue(member, url_host(member.url), now)

    # -- revocation ---------------------------------------------------------------------------

    def revoke(self, component_id: str, reason: str, now: float | None = None) -> None:
        """Refuse every credential issued to ``component_id`` until now, here and (within
        one heartbeat) on every component."""
        now = now or time.time()
        self.revoked[component_id] = Revocation(
            component_id=component_id, revoked_at=now,
            expires_at=now + self.credential_lifetime + 60)
        self.revocation_generation += 1
        log.info("credentials revoked", extra={"component": component_id, "reason": reason})
        self._save_revoked()
        self._publish_revoked()

    def remove(self, component_id: str, by: str) -> None:
        """An operator's removal: forget the member and revoke its credentials."""
        member = self.members.pop(component_id, None)
        if member is None and component_id not in self.revoked:
            raise NotFound(f"no component {component_id} in this domain")
        self.generation += 1
        self.revoke(component_id, f"removed by {by}")

    def purge_revoked(self, now: float | None = None) -> None:
        """Drop revocations whose credentials have all expired."""
        now = now or time.time()
        old = [cid for cid, r in self.revoked.items() if r.expires_at < now]
        for cid in old:
            del self.revoked[cid]
        if old:
            self.revocation_generation += 1
            self._save_revoked()
            self._publish_revoked()

    def _publish_revoked(self) -> None:
        if self.verifier is not None:
            self.verifier.set_revoked({c: r.revoked_at for c, r in self.revoked.items()},
                                      self.revocation_generation)

    def _load_revoked(self) -> dict[str, Revocation]:
        if self._revoked_file is None or not self._revoked_file.exists():
            return {}
        try:
            items = [Revocation.model_validate(i)
                     for i in json.loads(self._revoked_file.read_text())]
        except (OSError, ValueError) as exc:
            # Refusing to start would lock every component out; the file is rebuilt.
            log.error("revocation list unreadable: %s", exc,
                      extra={"file": str(self._revoked_file)})
            return {}
        now = time.time()
        return {r.component_id: r for r in items if r.expires_at >= now}

    def _save_revoked(self) -> None:
        if self._revoked_file is None:
            return
        data = json.dumps([r.model_dump() for r in self.revoked.values()]).encode()
        try:
            write_private(self._revoked_file, data)
        except OSError as exc:
            log.error("cannot keep the revocation list: %s", exc,
                      extra={"file": str(self._revoked_file)})

    def heartbeat(self, component_id: str, url: str | None, now: float | None = None) -> Member:
        """Record that a component is alive; a moved component reports its new URL (F-MOVE)."""
        now = now or time.time()
        member = self.members.get(component_id)
        if member is None or member.status is ComponentStatus.LEFT:
            raise NotFound(f"component {component_id} is not a member of this domain; join again")
        if member.status is ComponentStatus.GONE:
            log.info("component is back", extra={"component": component_id})
            member.status = ComponentStatus.ALIVE
            self.generation += 1
        if url and url != member.url:
            log.info("component moved", extra={"component": component_id, "url": url,
                                                "old_url": member.url})
            member.url = url
            self.generation += 1
        member.last_seen = now
        return member

    def leave(self, component_id: str) -> None:
        member = self.members.get(component_id)
        if member is None:
            return
        member.status = ComponentStatus.LEFT
        self.generation += 1
        log.info("component left", extra={"component": component_id, "type": str(member.type)})
        self.revoke(component_id, "left the domain")

    def deaf(self, start: float, end: float) -> None:
        """Record that this server could hear no heartbeat from ``start`` to ``end`` (its own
        stall: a blocked event loop, a starved or paused process). Heartbeats sent meanwhile
        wait unread in its sockets, so that time is not counted as the senders' silence."""
        self._deaf = [(s, e) for s, e in self._deaf if e > end - 10 * self.ttl]
        self._deaf.append((start, end))

    def silence(self, member: Member, now: float) -> float:
        """How long this server has heard nothing from ``member`` while it was listening."""
        unheard = sum(max(0.0, min(e, now) - max(s, member.last_seen)) for s, e in self._deaf)
        return now - member.last_seen - unheard

    def expire(self, now: float | None = None) -> list[Member]:
        """Mark members silent for longer than the TTL as gone; return them."""
        now = now or time.time()
        gone = []
        for member in self.members.values():
            if member.status is not ComponentStatus.ALIVE:
                continue
            silent_for = self.silence(member, now)
            if silent_for > self.ttl:
                member.status = ComponentStatus.GONE
                gone.append(member)
                log.warning("component gone: no heartbeat", extra={
                    "component": member.component_id, "type": str(member.type),
                    "component_name": member.name, "silent_for": round(silent_for, 1)})
        if gone:
            self.generation += 1
        return gone

    def peers_of(self, member: Member) -> list[Peer]:
        """The alive components ``member`` connects to, by the association table."""
        return [
            m.peer()
            for m in self.members.values()
            if m.component_id != member.component_id
            and m.status is ComponentStatus.ALIVE
            and associated(member.type, m.type)
        ]

    def get(self, component_id: str) -> Member:
        member = self.members.get(component_id)
        if member is None:
            raise NotFound(f"no component {component_id} in this domain")
        return member
