"""Netlink access shared by the node's network backends: links listed and deleted.

pyroute2 is imported on first use, so that a sim node (and every module that only
imports the backends) does not need it.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Any

from yun.node.network.base import NetworkError


def netlink_error() -> type[Exception]:
    """pyroute2's NetlinkError class (what a refused netlink request raises)."""
    from pyroute2 import NetlinkError

    return NetlinkError  # type: ignore[no-any-return,unused-ignore]


def iproute() -> Any:
    """A netlink socket of this network namespace (a context manager)."""
    from pyroute2 import IPRoute

    return IPRoute()


def delete_links(names: Sequence[str]) -> list[str]:
    """Delete the links that exist among ``names`` (their routes go with them); the
    names deleted."""
    deleted = []
    with iproute() as ipr:
        for name in names:
            for index in ipr.link_lookup(ifname=name):
                try:
                    ipr.link("del", index=index)
                except netlink_error() as exc:
                    if getattr(exc, "code", None) == errno.ENODEV:
                        continue
                    raise NetworkError(f"deleting link {name}: netlink: {exc}") from exc
                deleted.append(name)
    return deleted


def taps_named(prefix: str) -> list[str]:
    """Every link of this namespace named like a tap of ``prefix`` (prefix and 10 hex
    digits: see :func:`yun.node.network.ports.tap_name`)."""
    with iproute() as ipr:
        names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    return [n for n in names if n and n.startswith(prefix) and len(n) == len(prefix) + 10]
