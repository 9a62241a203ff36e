"""The ports test services are started on: outside the kernel's ephemeral range (an
outgoing connection once took a killed control server's port before its restart), and
never the same one twice in a run."""

from __future__ import annotations

import socket

from yun.testing.ports import _ephemeral_range, free_port


def test_ports_are_outside_the_ephemeral_range_and_never_repeat() -> None:
    ephemeral = _ephemeral_range()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert not [p for p in ports if p in ephemeral]


def test_a_port_someone_listens_on_is_not_handed_out() -> None:
    taken = []
    try:
        for _ in range(50):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            taken.append(sock)
            port = free_port()
            sock.bind(("127.0.0.1", port))  # free: binding it works
            sock.listen()
        listening = {s.getsockname()[1] for s in taken}
        assert not listening & {free_port() for _ in range(100)}
    finally:
        for sock in taken:
            sock.close()
