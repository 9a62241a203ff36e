"""Choosing a node in one pool: filters, then weighers, over a sample of the pool.

:meth:`Scheduler.select` is pure (no database, no I/O): it gets the pool's hosts as
frozen :class:`HostState` snapshots and returns the best host followed by alternates,
so a provision that fails on one node retries the next. The placement claims the
chosen host with its conditional ``UPDATE … WHERE free >= asked`` and, within a batch,
replaces it in its list by :meth:`HostState.claimed` before the next select.

Sampling (how 1,000 selects per second over 1,000-node pools stay possible in Python):
like kube-scheduler's ``percentageOfNodesToScore``, a select stops filtering once it has
found enough feasible hosts, at least ``min_feasible`` or a percentage of the pool, and
weighs only those. Filtering starts where the previous select stopped (a rotating
offset), so every host of the pool is examined in turn and none is starved: a host the
sample missed this time is at the front of a later one. It is safe because

* every host returned passed every filter: sampling only limits which feasible hosts
  are *compared*, never which are *allowed*;
* the winner is the least loaded of a large sample (100 hosts or more), so it is close
  to the pool's least loaded in rank, and the claims of a batch, each raising its
  host's load, spread the following picks anyway;
* when the sample finds nothing the whole pool has been examined (the loop runs to the
  end), and only then is :class:`NoValidHost` raised, after an explanation pass over
  every host.

With ``percentage=None`` the share adapts to the pool's size: 12.5 % of a small pool,
falling by one point per 400 hosts to a floor of 5 % (so 100 of a 1,000-host pool, 500
of a 10,000-host one), and never fewer than ``min_feasible``. That is a quarter of
kube-scheduler's adaptive share (50 %, a point less per 125 hosts, floor 5 %): measured
here (benchmarks/placement.py), its 420 of a 1,000-host pool gave about 950 placements/s
on this 2-core machine, short of the 1,000/s goal with nothing left for the database,
while 100 gave about 2,000/s; and the best of 100 hosts is already, in expectation,
in the best 1 % of the pool.

Filters run in order of their ``cost`` on this fast path (status before capacity before
labels) and those that cannot eliminate anything for the request (no labels asked, no
group) are skipped; the explanation pass runs them in the pool's order, so each
eliminated host is counted under the first filter of the pool's list that refused it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

from yun.control.scheduler.base import HostFilter, make_filters, make_weighers
from yun.control.scheduler.hoststate import HostState, PoolPolicy, RequestSpec

logger = logging.getLogger(__name__)

# The fewest hosts a select filters at once once its first slice fell short: small
# enough not to overshoot the sample much, large enough to keep the calls few.
_MIN_CHUNK = 32


class NoValidHost(Exception):
    """No host of the pool can take the request; the text says why, filter by filter."""

    def __init__(self, explanation: str, per_filter: dict[str, int]) -> None:
        super().__init__(explanation)
        #: One line per pool: "pool p1: 12 nodes; 2 down or drained; 7 short of vCPU …".
        self.explanation = explanation
        #: How many hosts each filter eliminated (each host counted under its first).
        self.per_filter = per_filter

    @classmethod
    def merge(cls, errors: Sequence[NoValidHost]) -> NoValidHost:
        """One error for a zone: the pools' lines joined, the counts added up."""
        per_filter: dict[str, int] = {}
        for error in errors:
            for name, count in error.per_filter.items():
                per_filter[name] = per_filter.get(name, 0) + count
        return cls("\n".join(e.explanation for e in errors), per_filter)


class Scheduler:
    """Selects hosts in one pool by its filters and weights.

    Keep one instance per pool for as long as the pool's settings last: it holds the
    rotating offset that makes successive selects start at different hosts.
    """

    def __init__(self, pool: PoolPolicy, *, min_feasible: int = 100,
                 percentage: float | None = None) -> None:
        if min_feasible < 1:
            raise ValueError(f"min_feasible must be at least 1, got {min_feasible}")
        if percentage is not None and not 0 < percentage <= 100:
            raise ValueError(f"percentage must be above 0 and at most 100, got {percentage}")
        self.pool = pool
        self.min_feasible = min_feasible
        self.percentage = percentage
        self._filters: list[HostFilter] = make_filters(pool.filters)  # the pool's order
        self._fast: list[HostFilter] = sorted(self._filters, key=lambda f: f.cost)
        self._weighers = make_weighers(pool.weights)
        self._offset = 0

    def sample_size(self, hosts: int) -> int:
        """How many feasible hosts a select looks for among ``hosts`` before weighing."""
        if hosts <= self.min_feasible:
            return hosts
        percentage = self.percentage
        if percentage is None:
            percentage = max(5.0, 12.5 - hosts / 400)
        return min(hosts, max(self.min_feasible, int(hosts * percentage / 100)))

    def select(self, hosts: Sequence[HostState], spec: RequestSpec,
               alternates: int = 3, *, advance: bool = True) -> list[HostState]:
        """The best host for ``spec`` then up to ``alternates`` others, best first.

        Raises :class:`NoValidHost` (with an explanation over all ``hosts``) when no
        host passes every filter. ``advance=False`` leaves the rotation where it is (a
        dry run must not change where the next real placement starts).
        """
        if alternates < 0:
            raise ValueError(f"alternates must be >= 0, got {alternates}")
        count = len(hosts)
        if count == 0:
            raise self.explain(hosts, spec)
        pool = self.pool
        filters = [f for f in self._fast if f.applies(spec)]
        wanted = self.sample_size(count)
        start = self._offset % count
        ordered = list(itertools.chain(hosts[start:], hosts[:start]))
        feasible: list[HostState] = []
        examined = 0
        # Filter a slice at a time, each filter over the whole slice (one call per filter
        # rather than per host and filter); each slice is as long as the hosts still
        # wanted, so a pool that is mostly feasible takes one or two rounds.
        while examined < count and len(feasible) < wanted:
            chunk = ordered[examined:examined + max(wanted - len(feasible), _MIN_CHUNK)]
            examined += len(chunk)
            for f in filters:
                chunk = f.filter_all(chunk, spec, pool)
                if not chunk:
                    break
            feasible.extend(chunk)
        if advance:
            # Past what was examined, so a sampled pool is covered over time; by one when
            # the whole pool was, so equally good hosts take turns.
            self._offset = (start + (examined if examined < count else 1)) % count
        if not feasible:
            raise self.explain(hosts, spec)
        return self._best(feasible, spec, alternates + 1)

    def _best(self, feasible: list[HostState], spec: RequestSpec,
              keep: int) -> list[HostState]:
        """The ``keep`` lowest of ``feasible`` by weighted, normalised load."""
        if len(feasible) == 1:
            return feasible
        pool = self.pool
        totals = [0.0] * len(feasible)
        for weigher, weight in self._weighers:
            values = weigher.weigh_all(feasible, spec, pool)
            low, high = min(values), max(values)
            span = high - low
            if span <= 0:  # every candidate alike: this weigher cannot tell them apart
                continue
            scale = weight / span
            totals = [t + (v - low) * scale for t, v in zip(totals, values, strict=True)]
        # Stable: ties keep the rotation order, so equal hosts take turns.
        order = sorted(range(len(feasible)), key=totals.__getitem__)[:keep]
        return [feasible[i] for i in order]

    def explain(self, hosts: Sequence[HostState], spec: RequestSpec) -> NoValidHost:
        """Why no host of ``hosts`` passes, as a :class:`NoValidHost` (returned, not raised).

        Every host is counted under the first filter, in the pool's order, that refuses
        it; capacity filters add the closest miss among the hosts they eliminated.
        """
        pool = self.pool
        per_filter = {f.name: 0 for f in self._filters}
        if not hosts:
            error = NoValidHost(f"pool {pool.name}: no nodes", per_filter)
        else:
            eliminated: dict[str, list[HostState]] = {f.name: [] for f in self._filters}
            relevant = [f for f in self._filters if f.applies(spec)]
            for host in hosts:
                for f in relevant:
                    if not f.host_passes(host, spec, pool):
                        eliminated[f.name].append(host)
                        break
            clauses = [f.explain(eliminated[f.name], spec, pool)
                       for f in self._filters if eliminated[f.name]]
            per_filter = {name: len(found) for name, found in eliminated.items()}
            nodes = "1 node" if len(hosts) == 1 else f"{len(hosts)} nodes"
            error = NoValidHost("; ".join([f"pool {pool.name}: {nodes}", *clauses]),
                                per_filter)
        logger.info("no node of pool %s can host %s: %s", pool.name, spec.describe(),
                    error.explanation,
                    extra={"pool": pool.uuid, "per_filter": error.per_filter})
        return error


def room(hosts: Sequence[HostState], pool: PoolPolicy) -> float:
    """The share of a pool's usable memory still free on its schedulable hosts (0..1).

    Memory, because it is the resource that is not overcommitted by default and so the
    one a pool runs out of first.
    """
    usable = free = 0
    for host in hosts:
        if host.up and host.active:
            capacity = host.memory_mb
            usable += capacity.usable(pool.memory_ratio)
            free += max(capacity.free(pool.memory_ratio), 0)
    return free / usable if usable > 0 else 0.0


def select_in_zone(pools: Sequence[tuple[Scheduler, Sequence[HostState]]],
                   spec: RequestSpec, alternates: int = 3
                   ) -> tuple[Scheduler, list[HostState]]:
    """Place ``spec`` in one of a zone's pools: the roomiest pool that can take it.

    Pools are tried in order of :func:`room` (most free memory share first), so a zone
    fills its pools evenly; weights are not compared across pools, since each pool
    normalises and weighs by its own settings. Returns the pool's scheduler and its
    :meth:`Scheduler.select` answer (alternates stay in that pool). Raises one
    :class:`NoValidHost` with a line per pool when none can, or for a zone without pools.
    """
    if not pools:
        raise NoValidHost("no pools in the zone", {})
    order = sorted(range(len(pools)), key=lambda i: room(pools[i][1], pools[i][0].pool),
                   reverse=True)
    errors: dict[int, NoValidHost] = {}
    for i in order:
        scheduler, hosts = pools[i]
        try:
            return scheduler, scheduler.select(hosts, spec, alternates)
        except NoValidHost as exc:
            errors[i] = exc
    # The lines in the order the pools were given (stable for the reader), not tried.
    raise NoValidHost.merge([errors[i] for i in sorted(errors)])
