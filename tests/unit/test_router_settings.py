"""RouterSettings: the LAN address is required in a usable form, named when wrong."""

from __future__ import annotations

import pytest

from yun.config import ConfigError, RouterSettings


def test_lan_address_defaults_to_an_ipv4_listen_host() -> None:
    s = RouterSettings(listen_host="172.31.0.11")
    assert s.lan_address == "172.31.0.11" and s.listen_port == 7740
    assert s.sync_interval == 10.0


@pytest.mark.parametrize("kwargs, words", [
    ({"listen_host": "0.0.0.0"}, "lan_address"),
    ({"listen_host": "router.lan"}, "lan_address"),
    ({"lan_address": "10.0.0.300"}, "not an IPv4 address"),
    ({"lan_address": "10.0.0.1", "wan_interfaces": ["a very long name"]}, "wan_interfaces"),
])
def test_bad_router_settings_are_refused_by_name(kwargs: dict, words: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=words):
        RouterSettings(**kwargs)
