"""Publishing a VM's public mappings to the intelligent routers (F-BALANCE's
"forwarders" step, and port forwards of share VMs).

The database is the truth: a network change recorded in the same transaction moves the
routers' generation, and every router converges on it by itself (its periodic full check).
Telling the live routers at once is only to be quick, so it is best effort: a router
that is down catches up when it returns, and the create never fails because of it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sqlalchemy import select

from yun.control.db.models import PublicIpRow
from yun.control.network.changes import note_change
from yun.control.network.router_sync import notify_routers

if TYPE_CHECKING:
    from yun.control.context import ControlContext

log = logging.getLogger("yun.control.network.publish")


async def publish(control: ControlContext, vm_uuid: str) -> bool:
    """Record that the VM's mappings changed and tell the live routers (best effort).

    A VM without a public address or port (private, direct) changes nothing the routers
    apply: no change is recorded then. Returns whether one was."""
    async with control.db.reading() as session:
        mapped = await session.scalar(select(PublicIpRow.uuid).where(
            PublicIpRow.vm_uuid == vm_uuid).limit(1))
    if mapped is None:
        return False
    async with control.db.session() as session:
        note_change(session, vm_uuid)
    await notify(control, vm_uuid)
    return True


async def notify(control: ControlContext, subject: str) -> None:
    """Tell the live routers the rule set moved on; never raises (they catch up anyway)."""
    try:
        await notify_routers(control)
    except Exception as exc:  # a router down must not fail the caller
        log.warning("routers not told of a change; they catch up by their periodic check",
                    extra={"subject": subject, "error": str(exc)})
