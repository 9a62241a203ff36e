"""``client.routers``: the intelligent routers (platform administrators)."""

from __future__ import annotations

from yun.client._core import Call, Namespace, R, endpoint, model
from yun.proto.network import RouterList


class Routers(Namespace[R]):
    """``client.routers``: which generation of the rule set each router applied."""

    @endpoint
    def list(self) -> Call[RouterList]:
        """Every router known to the control server, with its applied generation against
        the current one and whether it pulled recently."""
        return Call("GET", "/routers", model(RouterList))
