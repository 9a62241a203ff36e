"""Delta reports (issue 10): the holdings generation, and which report a node sends each
control server."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from yun.node.agent import (
    FULL_REPORT_EVERY,
    PeerView,
    answered,
    holdings_generation,
    report_for_peer,
)
from yun.proto.messages import (
    DomainInfo,
    DomainState,
    HostInfo,
    NodeReport,
    NodeReportAnswer,
    StorageDirReport,
)

HOST = HostInfo(hostname="h", hypervisor="sim", accel="sim", vcpus=4, memory_mb=4096,
                disk_gb=100)


def dom(uuid: str, state: DomainState = DomainState.RUNNING) -> DomainInfo:
    return DomainInfo(uuid=uuid, name=uuid, state=state, vcpus=1, memory_mb=512)


def report(seq: int, domains: list[DomainInfo], ports: dict[str, list[str]] | None = None,
           used: int = 10) -> NodeReport:
    ports = ports if ports is not None else {d.uuid: [f"52:54:00:00:00:0{i}"]
                                            for i, d in enumerate(domains)}
    disks = {d.uuid: [f"vol-{d.uuid}"] for d in domains}
    volumes = [f"vol-{d.uuid}" for d in domains]
    return NodeReport(node_id="n1", name="n1", url="https://n1", host=HOST, domains=domains,
                      ports=ports, disks=disks, volumes=volumes, boot_id="b", seq=seq,
                      storage=[StorageDirReport(path="/v", total_bytes=1000, used_bytes=used)],
                      generation=holdings_generation(domains, ports, disks, volumes))


def test_generation_follows_what_is_held_not_states_or_order() -> None:
    a, b = dom("a"), dom("b")
    base = holdings_generation([a, b], {"a": ["m1"]}, {"a": ["v1"]}, ["v1"])
    assert base != 0
    assert holdings_generation([b, a], {"a": ["m1"]}, {"a": ["v1"]}, ["v1"]) == base
    assert holdings_generation([dom("a", DomainState.SHUTOFF), b], {"a": ["m1"]},
                               {"a": ["v1"]}, ["v1"]) == base
    for other in (holdings_generation([a], {"a": ["m1"]}, {"a": ["v1"]}, ["v1"]),
                  holdings_generation([a, b], {"a": ["m1"], "b": ["m2"]}, {"a": ["v1"]},
                                      ["v1"]),
                  holdings_generation([a, b], {"a": ["m1"]}, {"a": ["v1", "v2"]}, ["v1"]),
                  holdings_generation([a, b], {"a": ["m1"]}, {"a": ["v1"]}, ["v1", "v9"])):
        assert other != base


def settled_view(first: NodeReport) -> PeerView:
    """The view of a server that takes deltas and answered the full report ``first``."""
    hello = answered(None, first, first, NodeReportAnswer(deltas=True))
    assert hello is not None and hello.want_full  # the next one carries the new fields
    sent = report_for_peer(first, hello, first.seq)
    assert not sent.delta
    view = answered(hello, sent, first, NodeReportAnswer(deltas=True))
    assert view is not None and not view.want_full and view.seq == first.seq
    return view


def test_delta_names_only_changed_domains_and_omits_the_lists() -> None:
    first = report(1, [dom("a"), dom("b")])
    view = settled_view(first)
    same = report(2, [dom("a"), dom("b")])
    sent = report_for_peer(same, view, acked=1)
    assert sent.delta and not sent.full and sent.domains == []
    assert sent.ports is None and sent.disks is None and sent.volumes is None
    assert sent.storage is None and sent.acked_seq == 1
    changed = report(3, [dom("a", DomainState.SHUTOFF), dom("b")])
    sent = report_for_peer(changed, view, acked=1)
    assert sent.delta and [d.uuid for d in sent.domains] == ["a"]
    # Storage that moved is sent along.
    assert report_for_peer(report(4, [dom("a"), dom("b")], used=20), view, 1).storage


def test_full_report_when_holdings_change_or_asked_or_periodically() -> None:
    first = report(1, [dom("a"), dom("b")])
    view = settled_view(first)
    assert not report_for_peer(report(2, [dom("a")]), view, acked=1).delta
    # The acked report is not the one the view describes (an answer was lost).
    assert not report_for_peer(report(2, [dom("a"), dom("b")]), view, acked=0).delta
    asked = answered(view, report_for_peer(report(2, [dom("a"), dom("b")]), view, 1),
                     report(2, [dom("a"), dom("b")]),
                     NodeReportAnswer(deltas=True, full_report=True))
    assert asked is not None and asked.want_full
    assert not report_for_peer(report(3, [dom("a"), dom("b")]), asked, acked=2).delta
    # An older server (no "deltas" in its answer) gets full reports only.
    assert answered(view, first, first, NodeReportAnswer()) is None
    assert not report_for_peer(report(2, [dom("a"), dom("b")]), None, acked=1).delta
    # Every FULL_REPORT_EVERY-th report is full.
    kinds = []
    for seq in range(2, 2 + 2 * FULL_REPORT_EVERY):
        taken = report(seq, [dom("a"), dom("b")])
        sent = report_for_peer(taken, view, acked=seq - 1)
        kinds.append(sent.delta)
        new = answered(view, sent, taken, NodeReportAnswer(deltas=True))
        assert new is not None
        view = new
    assert kinds.count(False) == 2 and kinds[FULL_REPORT_EVERY - 1] is False


def test_a_delta_needs_a_base() -> None:
    with pytest.raises(ValidationError, match="delta report of node n1 needs"):
        NodeReport(node_id="n1", name="n1", url="https://n1", host=HOST, domains=[],
                   full=False, delta=True, generation=5, acked_seq=0)
    with pytest.raises(ValidationError, match="full=True"):
        NodeReport(node_id="n1", name="n1", url="https://n1", host=HOST, domains=[],
                   delta=True, generation=5, acked_seq=3)
