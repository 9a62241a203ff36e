"""The control server's client of node agents."""

from __future__ import annotations

from typing import Protocol

from yun.control.db.models import NodeRow
from yun.proto.client import PeerClient
from yun.proto.errors import Unavailable
from yun.proto.membership import Membership


class HasMembership(Protocol):
    membership: Membership


def node_client(ctx: HasMembership, node: NodeRow) -> PeerClient:
    """The authenticated client of ``node``'s agent; 503 if the node is down."""
    if node.status != "up":
        raise Unavailable(f"node {node.name} is down")
    return ctx.membership.client_for_url(node.url)
