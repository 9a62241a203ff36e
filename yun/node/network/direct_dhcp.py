"""Reading the LAN DHCP server's answers to direct-mode VMs off the wire (F-NET-DIRECT).

A direct-mode VM takes its address from the LAN's own DHCP server; the node learns it
by snooping the server's DHCPACKs (:func:`parse_dhcp_ack`, pure, for any bytes) with a
raw ``AF_PACKET`` socket on the uplink (:class:`DhcpSnooper`, a daemon thread). The
socket carries a classic BPF filter so the kernel hands up only UDP from port 67: the
agent does not read the node's whole traffic.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("yun.node.network.direct")

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_8021Q = 0x8100
DHCP_MAGIC = b"\x63\x82\x53\x63"
DHCPACK = 5
_BOOTP_FIXED = 236  # op .. file, before the magic cookie
SO_ATTACH_FILTER = 26


@dataclass(frozen=True)
class DhcpAck:
    """A DHCPACK seen on the wire: the client's MAC and the address it was given."""

    mac: str
    ip: str


def _mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def _dhcp_options(data: bytes) -> dict[int, bytes]:
    """The options after the magic cookie; stops at END or at a truncated option."""
    out: dict[int, bytes] = {}
    i = 0
    while i < len(data):
        code = data[i]
        if code == 255:
            break
        if code == 0:  # PAD
            i += 1
            continue
        if i + 1 >= len(data):
            break
        length = data[i + 1]
        value = data[i + 2:i + 2 + length]
        if len(value) != length:
            break
        out.setdefault(code, value)
        i += 2 + length
    return out


def parse_dhcp_ack(frame: bytes) -> DhcpAck | None:
    """The DHCPACK an Ethernet frame carries (one 802.1Q tag allowed), or None for any
    other frame: not IPv4/UDP from port 67 to 68, not BOOTREPLY, no magic cookie, not
    message type ACK, a zero address, or cut short anywhere. Never raises."""
    try:
        return _parse(frame)
    except (IndexError, struct.error, ValueError):
        return None


def _parse(frame: bytes) -> DhcpAck | None:
    if len(frame) < 14:
        return None
    offset = 12
    (ethertype,) = struct.unpack_from("!H", frame, offset)
    if ethertype == ETH_P_8021Q:
        offset += 4
        (ethertype,) = struct.unpack_from("!H", frame, offset)
    if ethertype != ETH_P_IP:
        return None
    ip_at = offset + 2
    version_ihl = frame[ip_at]
    ihl = (version_ihl & 0x0F) * 4
    if version_ihl >> 4 != 4 or ihl < 20 or frame[ip_at + 9] != 17:  # UDP
        return None
    (flags_frag,) = struct.unpack_from("!H", frame, ip_at + 6)
    if flags_frag & 0x1FFF:  # a later fragment carries no UDP header
        return None
    udp_at = ip_at + ihl
    sport, dport = struct.unpack_from("!HH", frame, udp_at)
    if (sport, dport) != (67, 68):
        return None
    (udp_len,) = struct.unpack_from("!H", frame, udp_at + 4)
    if udp_len < 8 or udp_at + udp_len > len(frame):  # cut short (Ethernet may pad)
        return None
    bootp = frame[udp_at + 8:udp_at + udp_len]
    if len(bootp) < _BOOTP_FIXED + 4 or bootp[0] != 2:  # BOOTREPLY
        return None
    hlen = bootp[2]
    if bootp[1] != 1 or hlen != 6:  # Ethernet hardware addresses only
        return None
    if bootp[_BOOTP_FIXED:_BOOTP_FIXED + 4] != DHCP_MAGIC:
        return None
    options = _dhcp_options(bootp[_BOOTP_FIXED + 4:])
    if options.get(53) != bytes([DHCPACK]):
        return None
    yiaddr = ipaddress.IPv4Address(bootp[16:20])
    if yiaddr.is_unspecified:  # an ACK to DHCPINFORM gives no address
        return None
    return DhcpAck(mac=_mac_text(bootp[28:34]), ip=str(yiaddr))


# "udp and src port 67" on Ethernet, unfragmented IPv4 only: classic BPF instructions
# (code, jt, jf, k), written from the instruction set (linux/filter.h); a jump goes
# to pc + 1 + jt/jf, and every "drop" lands on the last instruction.
_BPF_UDP_SPORT_67 = [
    (0x28, 0, 0, 12),          # ldh [12]           ethertype
    (0x15, 0, 8, ETH_P_IP),    # jeq #0x800         else drop
    (0x30, 0, 0, 23),          # ldb [23]           IP protocol
    (0x15, 0, 6, 17),          # jeq #17 (UDP)      else drop
    (0x28, 0, 0, 20),          # ldh [20]           flags + fragment offset
    (0x45, 4, 0, 0x1FFF),      # jset #0x1fff       a fragment: drop
    (0xB1, 0, 0, 14),          # ldxb 4*([14]&0xf)  IP header length
    (0x48, 0, 0, 14),          # ldh [x+14]         UDP source port
    (0x15, 0, 1, 67),          # jeq #67            else drop
    (0x06, 0, 0, 0x40000),     # ret #262144        accept
    (0x06, 0, 0, 0),           # ret #0             drop
]


def _bpf_program() -> bytes:
    """``struct sock_fprog`` for SO_ATTACH_FILTER (its instruction buffer is kept alive
    by the module-level bytes object the pointer refers to)."""
    import ctypes

    global _BPF_BUFFER
    code = b"".join(struct.pack("HBBI", *ins) for ins in _BPF_UDP_SPORT_67)
    _BPF_BUFFER = ctypes.create_string_buffer(code)
    return struct.pack("HL", len(_BPF_UDP_SPORT_67), ctypes.addressof(_BPF_BUFFER))


_BPF_BUFFER: object = None


class DhcpSnooper:
    """A daemon thread reading DHCPACKs on ``ifname`` and handing each to ``on_ack``.

    It sees the frames the interface receives and sends; on the uplink of a direct
    bridge that is every answer of the LAN's DHCP server to a VM."""

    def __init__(self, ifname: str, on_ack: Callable[[DhcpAck], None]) -> None:
        self.ifname = ifname
        self.on_ack = on_ack
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Open the socket (errors are raised here, in the caller) and start reading."""
        if self.running:
            return
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, _bpf_program())
            sock.bind((self.ifname, ETH_P_ALL))
            sock.settimeout(0.5)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"dhcp-snoop-{self.ifname}",
                                        daemon=True)
        self._thread.start()
        log.info("DHCP snooping started", extra={"interface": self.ifname})

    def _run(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stop.is_set():
            try:
                frame = sock.recv(65535)
            except TimeoutError:
                continue
            except OSError as exc:
                log.warning("DHCP snooping stopped: %s", exc, extra={"interface": self.ifname})
                return
            ack = parse_dhcp_ack(frame)
            if ack is None:
                continue
            try:
                self.on_ack(ack)
            except Exception:  # one bad callback must not end the snooping
                log.exception("DHCP ACK not recorded", extra={"interface": self.ifname,
                                                              "mac": ack.mac, "ip": ack.ip})

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._thread = self._sock = None
