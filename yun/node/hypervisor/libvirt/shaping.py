"""Bandwidth limits of a VM's NICs (F-QOS-NET) with tc on the taps libvirt creates.

Why not libvirt's own ``<interface><bandwidth>``: libvirt always hangs an ``sfq`` qdisc
under its htb class and polices what the guest sends with the ``police`` action. Kernels
built without ``sch_sfq`` or ``act_police`` (the test machine's is one) then refuse to
start the domain at all. What is used here is the common core every distribution kernel
has: ``tbf`` (sch_tbf), the ingress qdisc, ``u32`` and ``mirred`` and ``ifb`` devices.

* towards the guest: a token bucket (tbf) as the tap's root qdisc (the tap's egress is
  what the guest receives);
* from the guest: the tap's ingress is redirected (mirred) to an ifb device of its own,
  whose root is the same token bucket. Shaping queues instead of dropping, so TCP keeps
  close to the rate, as with a real link.

The tap disappears whenever the domain stops, and its qdiscs with it, so the driver
applies the shaping after every start and whenever the limit changes; the ifb device is
removed with the domain. The limit itself is kept in the domain's Yun metadata.
"""

from __future__ import annotations

from collections.abc import Sequence

#: Seconds of traffic the bucket holds over the rate: enough for TCP, small enough that a
#: measurement over a few seconds is not skewed by the initial burst.
BURST_S = 0.05
MIN_BURST_BYTES = 16 * 1024
LATENCY_MS = 100  # how long a packet may wait in the bucket's queue before it is dropped


def ifb_name(tap: str) -> str:
    """The ifb device shaping what the guest sends through ``tap`` (≤ 15 characters)."""
    return ("yi" + tap[2:] if len(tap) > 2 else "yi" + tap)[:15]


def burst_bytes(kbit: int) -> int:
    return max(MIN_BURST_BYTES, int(kbit * 1000 / 8 * BURST_S))


def _tbf(dev: str, kbit: int) -> list[str]:
    return ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{kbit}kbit",
            "burst", str(burst_bytes(kbit)), "latency", f"{LATENCY_MS}ms"]


def shape_commands(tap: str, kbit: int, ifb_exists: bool) -> list[list[str]]:
    """Commands (argv lists) that limit ``tap`` to ``kbit`` kilobits/s each way.

    Idempotent: ``replace`` for qdiscs and the filter, the ifb made only if absent.
    """
    ifb = ifb_name(tap)
    cmds: list[list[str]] = []
    if not ifb_exists:
        cmds.append(["ip", "link", "add", ifb, "type", "ifb"])
    cmds += [
        ["ip", "link", "set", ifb, "up"],
        _tbf(ifb, kbit),
        _tbf(tap, kbit),
        ["tc", "qdisc", "replace", "dev", tap, "handle", "ffff:", "ingress"],
        ["tc", "filter", "replace", "dev", tap, "parent", "ffff:", "protocol", "all",
         "prio", "1", "handle", "800::800", "u32", "match", "u32", "0", "0",
         "action", "mirred", "egress", "redirect", "dev", ifb],
    ]
    return cmds


def unshape_commands(tap: str, tap_exists: bool) -> list[list[str]]:
    """Commands that remove the limit of ``tap`` (errors of each may be ignored)."""
    cmds: list[list[str]] = []
    if tap_exists:
        cmds += [["tc", "qdisc", "del", "dev", tap, "root"],
                 ["tc", "qdisc", "del", "dev", tap, "ingress"]]
    cmds.append(["ip", "link", "del", ifb_name(tap)])
    return cmds


def in_netns(netns: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` run in network namespace ``netns`` (None: this process's own)."""
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
