"""Users' SSH public keys (``/ssh-keys``): stored once, named at a VM's create
(``ssh_keys``), put into the guest by cloud-init.

A key belongs to its user: they list, show and delete their own; a super administrator
sees every user's. A VM keeps the keys it was given as they were (``vms.ssh_keys``):
deleting a key later does not take it out of guests already made.
"""

from __future__ import annotations

import logging
import uuid as uuidlib

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.access.policy import Scope
from yun.control.context import ControlContext
from yun.control.db.models import SshKeyRow
from yun.control.services.common import find
from yun.proto.context import RequestContext
from yun.proto.errors import Conflict, NotFound, Unprocessable
from yun.proto.resources import SshKey, SshKeyCreate
from yun.proto.ssh_keys import SshKeyError, looks_like_public_key, parse_public_key

log = logging.getLogger("yun.control.ssh_keys")


class SshKeyService:
    """Stores, lists and deletes SSH public keys (see the module docstring)."""

    def __init__(self, ctx: ControlContext) -> None:
        self.ctx = ctx

    async def create(self, req: SshKeyCreate, me: RequestContext) -> SshKey:
        """Store one of the caller's public keys; 409 when its name or the key itself is
        already one of theirs."""
        if me.project_uuid is None:
            raise Unprocessable("log in to a project first: an SSH key is recorded with the "
                                "project it was added in")
        key = parse_public_key(req.public_key)
        async with self.ctx.db.session() as session:
            mine = (await session.scalars(select(SshKeyRow).where(
                SshKeyRow.user_uuid == me.user_uuid))).all()
            for row in mine:
                if row.name == req.name:
                    raise Conflict(f"you already have an SSH key named '{req.name}'")
                if row.fingerprint == key.fingerprint:
                    raise Conflict(f"this key ({key.fingerprint}) is already yours, named "
                                   f"'{row.name}'")
            row = SshKeyRow(uuid=str(uuidlib.uuid4()), name=req.name, user_uuid=me.user_uuid,
                            project_uuid=me.project_uuid, public_key=key.line,
                            fingerprint=key.fingerprint)
            session.add(row)
            await session.flush()
            log.info("SSH key added", extra={"ssh_key": row.uuid, "user": me.user_uuid,
                                             "fingerprint": key.fingerprint,
                                             "key_type": key.type})
            return SshKey.model_validate(row)

    async def get(self, ref: str, scope: Scope) -> SshKey:
        async with self.ctx.db.reading() as session:
            return SshKey.model_validate(await find(session, SshKeyRow, ref, "SSH key", scope))

    async def delete(self, ref: str, scope: Scope) -> str:
        """Delete a key (guests already given it keep it); returns its uuid."""
        async with self.ctx.db.session() as session:
            row = await find(session, SshKeyRow, ref, "SSH key", scope)
            await session.delete(row)
            log.info("SSH key deleted", extra={"ssh_key": row.uuid, "user": row.user_uuid,
                                               "fingerprint": row.fingerprint})
            return row.uuid


async def resolve_keys(session: AsyncSession, entries: list[str],
                       user: RequestContext) -> list[str]:
    """The public key lines for a VM's ``ssh_keys``: each entry is the name (or uuid) of
    one of the caller's stored keys or a literal public key; duplicates are dropped.
    An unknown name or a bad key is refused (422) naming the entry."""
    lines: list[str] = []
    seen: set[str] = set()
    for entry in entries:
        if looks_like_public_key(entry):
            try:
                key = parse_public_key(entry)
            except SshKeyError as exc:
                raise Unprocessable(f"ssh_keys: {exc}") from None
            line, fingerprint = key.line, key.fingerprint
        else:
            row = (await session.scalars(select(SshKeyRow).where(
                SshKeyRow.user_uuid == user.user_uuid,
                (SshKeyRow.name == entry) | (SshKeyRow.uuid == entry)).limit(1))).first()
            if row is None:
                raise NotFound(f"ssh_keys: you have no SSH key named '{entry}' (add it with "
                               f"`yun key add {entry} ~/.ssh/id_ed25519.pub`, or give the "
                               "public key itself)")
            line, fingerprint = row.public_key, row.fingerprint
        if fingerprint not in seen:
            seen.add(fingerprint)
            lines.append(line)
    return lines
