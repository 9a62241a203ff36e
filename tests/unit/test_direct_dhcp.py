"""The pure parts of direct mode: reading DHCPACKs off the wire, the blocked networks,
the port checks, the simulated LAN's leases and the node settings."""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest

from yun.config import ConfigError, NodeSettings
from yun.node.network.direct_dhcp import DhcpAck, parse_dhcp_ack
from yun.node.network.direct_nft import PortElement, blocked_networks
from yun.node.network.sim_direct import lan_lease

VM_MAC = "52:54:00:12:34:56"
SERVER_MAC = "02:00:00:00:00:01"


def _checksum(header: bytes) -> int:
    s = sum(struct.unpack(f"!{len(header) // 2}H", header))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def dhcp_frame(mac: str = VM_MAC, yiaddr: str = "192.168.50.77", msg_type: int = 5, *,
               dst_mac: str | None = None, sport: int = 67, dport: int = 68,
               op: int = 2, vlan: int | None = None, frag: int = 0) -> bytes:
    """An Ethernet frame from a DHCP server (192.168.50.1) carrying a BOOTP reply."""
    chaddr = bytes.fromhex(mac.replace(":", ""))
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", op, 1, 6, 0, 0x1234, 0, 0,
                        bytes(4), ipaddress.IPv4Address(yiaddr).packed,
                        ipaddress.IPv4Address("192.168.50.1").packed, bytes(4),
                        chaddr + bytes(10), b"", b"")
    bootp += bytes.fromhex("63825363") + bytes([53, 1, msg_type, 54, 4, 192, 168, 50, 1,
                                                51, 4, 0, 0, 14, 16, 255])
    udp = struct.pack("!HHHH", sport, dport, 8 + len(bootp), 0) + bootp
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 7, frag, 64, 17, 0,
                     ipaddress.IPv4Address("192.168.50.1").packed,
                     ipaddress.IPv4Address(yiaddr).packed)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    dst = bytes.fromhex((dst_mac or mac).replace(":", ""))
    tag = b"" if vlan is None else struct.pack("!HH", 0x8100, vlan)
    return (dst + bytes.fromhex(SERVER_MAC.replace(":", "")) + tag + b"\x08\x00" + ip
            + udp)


def test_an_ack_gives_the_clients_mac_and_address() -> None:
    assert parse_dhcp_ack(dhcp_frame()) == DhcpAck(mac=VM_MAC, ip="192.168.50.77")
    # Broadcast to the client, and behind one 802.1Q tag: the same.
    assert parse_dhcp_ack(dhcp_frame(dst_mac="ff:ff:ff:ff:ff:ff")) == DhcpAck(
        VM_MAC, "192.168.50.77")
    assert parse_dhcp_ack(dhcp_frame(vlan=12)) == DhcpAck(VM_MAC, "192.168.50.77")


@pytest.mark.parametrize("frame", [
    dhcp_frame(msg_type=2),  # OFFER: not taken yet
    dhcp_frame(msg_type=6),  # NAK
    dhcp_frame(op=1),  # a request, not a reply
    dhcp_frame(sport=68, dport=67),  # client to server
    dhcp_frame(sport=1067),
    dhcp_frame(yiaddr="0.0.0.0"),  # ACK to an INFORM
    dhcp_frame(frag=5),  # a later fragment
], ids=["offer", "nak", "request", "client", "other-port", "inform", "fragment"])
def test_other_frames_are_not_acks(frame: bytes) -> None:
    assert parse_dhcp_ack(frame) is None


def test_no_cookie_or_options_cut_short_are_not_acks() -> None:
    frame = dhcp_frame()
    cookie = frame.index(bytes.fromhex("63825363"))
    assert parse_dhcp_ack(frame[:cookie] + b"\x00\x00\x00\x00" + frame[cookie + 4:]) is None
    # The message-type option's length runs past the end.
    assert parse_dhcp_ack(frame[:cookie + 4] + bytes([53, 9, 5])) is None
    # PADs before the message type are skipped.
    padded = frame[:cookie + 4] + b"\x00\x00" + frame[cookie + 4:]
    assert parse_dhcp_ack(padded) == DhcpAck(VM_MAC, "192.168.50.77")


def test_malformed_frames_never_raise() -> None:
    frame = dhcp_frame()
    for n in range(len(frame)):
        assert parse_dhcp_ack(frame[:n]) is None, n  # every truncation
    rng = random.Random(8)
    for _ in range(3000):
        junk = bytearray(frame)
        for _ in range(rng.randint(1, 8)):
            junk[rng.randrange(len(junk))] = rng.randrange(256)
        result = parse_dhcp_ack(bytes(junk))
        assert result is None or isinstance(result, DhcpAck)
        noise = bytes(rng.randrange(256) for _ in range(rng.randint(0, 400)))
        assert parse_dhcp_ack(noise) is None
    # A bogus IHL, and Ethernet padding after the UDP datagram (ignored).
    assert parse_dhcp_ack(frame[:14] + bytes([0x41]) + frame[15:]) is None
    assert parse_dhcp_ack(frame + bytes(30)) == DhcpAck(VM_MAC, "192.168.50.77")


def test_blocked_networks_keep_the_lan_reachable() -> None:
    nets = blocked_networks(["10.64.0.0/10", "192.168.0.0/16"], ["192.168.50.0/24"],
                            ["192.168.50.10/32"], ["192.168.50.2", "10.1.2.3"])

    def blocked(ip: str) -> bool:
        return any(ipaddress.IPv4Address(ip) in n for n in nets)

    assert not blocked("192.168.50.77")  # another host of the LAN
    assert blocked("192.168.50.2") and blocked("192.168.50.10")  # node, management
    assert blocked("192.168.51.1") and blocked("192.168.49.255") and blocked("10.64.3.5")
    assert blocked("10.1.2.3")
    # A blocked network inside the LAN is dropped with the rest of the LAN.
    assert blocked_networks(["192.168.50.128/25"], ["192.168.50.0/24"], [], []) == []
    # Collapsed: no overlapping elements for the interval set.
    assert blocked_networks(["10.0.0.0/8", "10.64.0.0/10"], [], [], []) == [
        ipaddress.IPv4Network("10.0.0.0/8")]


def test_port_elements_refuse_what_is_not_a_tap_or_a_mac() -> None:
    assert PortElement("yd0123456789", VM_MAC).text() == f'"yd0123456789" . {VM_MAC}'
    with pytest.raises(ValueError, match="not a direct tap"):
        PortElement('yd"; flush', VM_MAC)
    with pytest.raises(ValueError, match="not a lower-case MAC"):
        PortElement("yd0123456789", "52:54:00:12:34:5G")


def test_sim_lan_leases_are_deterministic_and_distinct() -> None:
    lan = ipaddress.IPv4Network("192.168.77.0/29")  # hosts .1-.6; .1 is the router
    first = lan_lease(lan, VM_MAC, set())
    assert first == lan_lease(lan, VM_MAC, set())
    taken: set[str] = set()
    for i in range(5):
        taken.add(lan_lease(lan, f"52:54:00:00:00:{i:02x}", taken))
    assert len(taken) == 5 and "192.168.77.1" not in taken
    with pytest.raises(Exception, match="no free address"):
        lan_lease(lan, "52:54:00:00:00:ff", taken)


@pytest.mark.parametrize(("kw", "why"), [
    ({"direct_uplink": "eth0; rm"}, "direct_uplink: 'eth0; rm' is not an interface name"),
    ({"direct_uplink": "a" * 16}, "is not an interface name"),
    ({"direct_uplink": "eth0", "direct_bridge": "eth0"}, "is the uplink itself"),
    ({"direct_blocked": ["192.168.1.300/32"]}, "direct_blocked: '192.168.1.300/32' is not"),
    ({"sim_direct_lan": "lan"}, "sim_direct_lan: 'lan' is not an IPv4 network"),
])
def test_bad_direct_settings_are_refused(kw: dict[str, object], why: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=why):
        NodeSettings(**kw)  # type: ignore[arg-type]
    assert NodeSettings(direct_uplink="eth0").direct_bridge == "yunbr0"
