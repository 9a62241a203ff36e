"""The ports test services are started on: outside the kernel's ephemeral range (an
outgoing connection once took a killed control server's port before its restart), and
never the same one twice in a run."""

from __future__ import annotations

import socket

import pytest

from yun.testing.ports import PORT_RANGE_VARIABLE, _ephemeral_range, free_port


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


def test_a_run_given_a_range_hands_out_only_ports_of_it(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(PORT_RANGE_VARIABLE, "26000-26099")
    ports = {free_port() for _ in range(50)}
    assert ports <= set(range(26000, 26100))


@pytest.mark.parametrize("text", ["26000", "x-y", "26100-26000", "80-90", "26000-70000"])
def test_a_bad_range_is_refused_naming_the_variable(monkeypatch, text: str) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(PORT_RANGE_VARIABLE, text)
    with pytest.raises(ValueError, match=PORT_RANGE_VARIABLE):
        free_port()
