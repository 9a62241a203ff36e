"""Where a node's NAT ports answer (F-SB-PRIVATE): the address the API shows for them."""

from __future__ import annotations

import pytest

from yun.config import ConfigError, NodeSettings
from yun.util.net import outbound_address, reachable_address


def test_a_specific_address_is_its_own_reachable_address() -> None:
    assert reachable_address("192.0.2.15") == "192.0.2.15"


@pytest.mark.parametrize("listen", ["127.0.0.1", "0.0.0.0", "localhost"])
def test_loopback_and_wildcards_fall_back_to_the_default_route_source(listen: str) -> None:
    assert reachable_address(listen) == outbound_address()


def test_forward_address_setting_is_checked() -> None:
    assert NodeSettings(forward_address="192.0.2.9").forward_address == "192.0.2.9"
    assert NodeSettings().forward_address is None
    with pytest.raises((ConfigError, ValueError), match="forward_address: not an IPv4"):
        NodeSettings(forward_address="node1.example")
