"""The work domain's registry of components: join, heartbeat, presence (F-JOIN, F-LEAVE).

The registry is memory only on purpose: a restarted domain server learns its
components again when their next heartbeat is refused and they rejoin with the
same component id, so nothing a restart loses matters (Z-STATELESS).
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from yun.proto.auth import issue_credential
from yun.proto.components import ComponentType, associated
from yun.proto.errors import Forbidden, NotFound
from yun.proto.messages import (
    ComponentInfo,
    ComponentStatus,
    JoinRequest,
    JoinResponse,
    Peer,
)

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


class Registry:
    """Members of one work domain and their presence."""

    def __init__(self, domain: str, secret: str, *, ttl: float, heartbeat_interval: float):
        if not secret:
            raise ValueError("the domain server needs a domain_secret")
        self.domain = domain
        self._secret = secret
        self.ttl = ttl
        self.heartbeat_interval = heartbeat_interval
        self.members: dict[str, Member] = {}
        # Bumped whenever the set of alive members or an address changes, so that
        # components notice a change in their peers with one integer comparison. It
        # starts from the clock so a restarted domain server never repeats a number a
        # component already saw from its previous life.
        self.generation = time.time_ns()

    def join(self, req: JoinRequest, now: float | None = None) -> JoinResponse:
        """Admit a component that knows the domain secret and tell it its peers."""
        now = now or time.time()
        if not hmac.compare_digest(req.secret.encode(), self._secret.encode()):
            log.warning("join refused: wrong domain secret", extra={"component_name": req.name,
                                                                     "type": str(req.type)})
            raise Forbidden(f"wrong domain secret for domain '{self.domain}'")
        if req.type is ComponentType.DOMAIN:
            raise Forbidden("a domain server cannot join another domain")
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
        self.generation += 1
        return JoinResponse(
            component_id=member.component_id,
            credential=issue_credential(self._secret, member.component_id, str(member.type)),
            domain=self.domain,
            heartbeat_interval=self.heartbeat_interval,
            ttl=self.ttl,
            peers=self.peers_of(member),
        )

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

    def expire(self, now: float | None = None) -> list[Member]:
        """Mark members silent for longer than the TTL as gone; return them."""
        now = now or time.time()
        gone = []
        for member in self.members.values():
            if member.status is ComponentStatus.ALIVE and now - member.last_seen > self.ttl:
                member.status = ComponentStatus.GONE
                gone.append(member)
                log.warning("component gone: no heartbeat", extra={
                    "component": member.component_id, "type": str(member.type),
                    "component_name": member.name, "silent_for": round(now - member.last_seen, 1)})
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
