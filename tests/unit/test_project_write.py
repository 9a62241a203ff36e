"""Creating a project's resource needs a writer's role and a token scoped to a project."""

from __future__ import annotations

import pytest

from yun.control.access.policy import require_project_write
from yun.proto.context import RequestContext
from yun.proto.errors import Forbidden, Unprocessable
from yun.proto.identity import Role


def ctx(*roles: Role, project: str | None = "p1") -> RequestContext:
    return RequestContext(user_uuid="u1", user_name="alice", project_uuid=project,
                          project_name="web" if project else None, roles=frozenset(roles))


def test_a_member_of_a_project_writes_in_it() -> None:
    assert require_project_write(ctx(Role.MEMBER), "create VMs") == "p1"


def test_a_reader_is_refused_naming_what_it_tried() -> None:
    with pytest.raises(Forbidden, match="may not allocate elastic IPs: that needs the role"):
        require_project_write(ctx(Role.READER), "allocate elastic IPs")


def test_a_token_without_a_project_is_refused_even_for_a_super_admin() -> None:
    with pytest.raises(Unprocessable, match="this token is not scoped to a project; log in "
                                            "to a project to upload images in it"):
        require_project_write(ctx(Role.SUPER_ADMIN, project=None), "upload images")
