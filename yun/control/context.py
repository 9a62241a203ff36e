"""What every part of a control server shares: settings, database, peers, queues, engine."""

from __future__ import annotations

from dataclasses import dataclass, field

from yun.config import ControlSettings
from yun.control.access.identity import IdentityService
from yun.control.db.batch import GroupCommit
from yun.control.db.session import Database
from yun.control.flows.engine import FlowEngine
from yun.control.network.modes import mode_for, on_placed
from yun.control.scheduler.loads import LiveLoads
from yun.control.scheduler.placement import Placement
from yun.proto.membership import Membership
from yun.util.queues import KeyedQueues


@dataclass
class ControlContext:
    settings: ControlSettings
    db: Database
    membership: Membership
    queues: KeyedQueues = field(default_factory=KeyedQueues)
    loads: LiveLoads = field(default_factory=LiveLoads)
    placement: Placement = field(init=False)
    engine: FlowEngine = field(init=False)
    identity: IdentityService = field(init=False)
    # The audit records of mutating requests, committed together (group commit).
    audit: GroupCommit[str] = field(init=False)
    # The LAN addresses of the live routers, as the node registry's watch last read them
    # (every second); None before its first read. Sandbox settings use it instead of a
    # query of their own.
    live_routers: list[str] | None = None

    def __post_init__(self) -> None:
        self.audit = GroupCommit(self.db, "audit")
        self.placement = Placement(self.db, on_placed=on_placed, loads=self.loads,
                                   pool_needs=lambda mode: mode_for(mode).capabilities)
        self.identity = IdentityService(self.db)
