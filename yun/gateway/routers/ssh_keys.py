"""SSH public keys of users: added, listed, shown, deleted (given to guests by cloud-init)."""

from __future__ import annotations

from fastapi import Response

from yun.gateway.routers.common import (
    Ctx,
    IdempotencyKey,
    Listing,
    RefPath,
    Up,
    answer,
    make_router,
)
from yun.proto.resources import Page, SshKey, SshKeyCreate

router = make_router("ssh-keys")


@router.get("/ssh-keys", response_model=Page[SshKey])
async def list_ssh_keys(ctx: Ctx, up: Up, listing: Listing) -> Response:
    """Your SSH public keys (a super administrator sees everyone's)."""
    return answer(await up.call(ctx, "GET", "/ssh-keys", params=listing), Page[SshKey])


@router.post("/ssh-keys", response_model=SshKey, status_code=201)
async def create_ssh_key(body: SshKeyCreate, ctx: Ctx, up: Up,
                         idempotency_key: IdempotencyKey = None) -> Response:
    """Add one of your SSH public keys (ssh-ed25519, ssh-rsa of at least 2048 bits,
    ecdsa-sha2-nistp256/384/521), to name in a VM's `ssh_keys`. A malformed key is
    refused (422) saying what is wrong; a name or key you already have, 409."""
    return answer(await up.call(ctx, "POST", "/ssh-keys", body=body,
                                idempotency_key=idempotency_key), SshKey)


@router.get("/ssh-keys/{ref}", response_model=SshKey)
async def show_ssh_key(ref: RefPath, ctx: Ctx, up: Up) -> Response:
    """One SSH key, by uuid or name, with its SHA256 fingerprint."""
    return answer(await up.call(ctx, "GET", "/ssh-keys/{ref}", path={"ref": ref}), SshKey)


@router.delete("/ssh-keys/{ref}", status_code=204)
async def delete_ssh_key(ref: RefPath, ctx: Ctx, up: Up,
                         idempotency_key: IdempotencyKey = None) -> Response:
    """Delete an SSH key; guests already given it keep it."""
    return answer(await up.call(ctx, "DELETE", "/ssh-keys/{ref}", path={"ref": ref},
                                idempotency_key=idempotency_key), None)
