"""The two plugin contracts of the scheduler, and their registry.

A filter answers one question about one host (:meth:`HostFilter.host_passes`); a
weigher gives one number per host (:meth:`HostWeigher.weigh`, the load the host would
have with the request on it, lower is better). Each is a small class in its own file
under ``filters/`` or ``weighers/``, registered by name with :func:`register_filter` or
:func:`register_weigher`; a pool names the ones it runs and the weight of each, and the
settings come in as arguments (the pool), never from a global configuration.

A filter also says why it refused, so a failed placement explains itself: a fixed
:attr:`HostFilter.reason` ("down or drained"), or :meth:`HostFilter.explain` over the
hosts it eliminated (the capacity filters give the closest miss there).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import attrgetter
from typing import ClassVar, TypeVar

from yun.control.scheduler.hoststate import Capacity, HostState, PoolPolicy, RequestSpec


class HostFilter(abc.ABC):
    """Decides whether one host can take one request."""

    #: The registry key, used in a pool's ``filters``.
    name: ClassVar[str]
    #: Why a host was eliminated, after a count: "2 down or drained".
    reason: ClassVar[str] = "eliminated"
    #: Relative cost of one call; the scheduler evaluates cheap filters first (the answer
    #: is the same in any order, only the time differs).
    cost: ClassVar[int] = 1

    @abc.abstractmethod
    def host_passes(self, host: HostState, spec: RequestSpec, pool: PoolPolicy) -> bool:
        """True when ``host`` may take ``spec`` under ``pool``'s settings."""

    def filter_all(self, hosts: Iterable[HostState], spec: RequestSpec,
                   pool: PoolPolicy) -> list[HostState]:
        """The hosts of ``hosts`` that pass, in order: what the scheduler calls.

        Always the same answer as :meth:`host_passes` host by host; a filter may override
        it only to be faster over many hosts (tests hold the two to the same answers).
        """
        return [h for h in hosts if self.host_passes(h, spec, pool)]

    def applies(self, spec: RequestSpec) -> bool:
        """False when this filter passes every host for ``spec`` (e.g. no labels asked).

        The scheduler skips such filters on its fast path; it is an optimisation only,
        so returning True is always correct.
        """
        return True

    def explain(self, eliminated: Sequence[HostState], spec: RequestSpec,
                pool: PoolPolicy) -> str:
        """One clause of a failed placement: how many hosts this filter eliminated, why."""
        return f"{len(eliminated)} {self.reason}"


class CapacityFilter(HostFilter):
    """A resource with an overcommit ratio: the host passes when ``free(ratio) >= asked``.

    A subclass only names three attributes: the host's :class:`Capacity` field, the
    pool's ratio field and the request's field. Its explanation gives the closest miss,
    the most any eliminated host had free, so the user sees how far the request is from
    fitting ("best: 1 free of 2 needed").
    """

    cost = 2
    #: The :class:`HostState` field holding the capacity ("vcpu").
    capacity_field: ClassVar[str]
    #: The :class:`PoolPolicy` field holding the ratio ("cpu_ratio").
    ratio_field: ClassVar[str]
    #: The :class:`RequestSpec` field holding the amount asked ("vcpus").
    asked_field: ClassVar[str]
    #: The resource's name in the explanation: "short of vCPU".
    resource: ClassVar[str]
    #: The unit written after an amount ("MiB"), empty for a count of vCPUs.
    unit: ClassVar[str] = ""

    def capacity(self, host: HostState) -> Capacity:
        """The host's capacity of this resource."""
        capacity: Capacity = getattr(host, self.capacity_field)
        return capacity

    def ratio(self, pool: PoolPolicy) -> float:
        """The pool's overcommit ratio for this resource."""
        ratio: float = getattr(pool, self.ratio_field)
        return ratio

    def asked(self, spec: RequestSpec) -> int:
        """How much of this resource the request needs."""
        asked: int = getattr(spec, self.asked_field)
        return asked

    def host_passes(self, host: HostState, spec: RequestSpec, pool: PoolPolicy) -> bool:
        # A request for none of the resource fits even a host that a lowered ratio left
        # overfull (a VM without a local disk on a host whose disk is overcommitted).
        asked = self.asked(spec)
        return asked <= 0 or self.capacity(host).free(self.ratio(pool)) >= asked

    def filter_all(self, hosts: Iterable[HostState], spec: RequestSpec,
                   pool: PoolPolicy) -> list[HostState]:
        # host_passes() with the lookups done once per call instead of once per host.
        capacity, ratio, asked = attrgetter(self.capacity_field), self.ratio(pool), self.asked(spec)
        if asked <= 0:
            return list(hosts)
        return [h for h in hosts if capacity(h).free(ratio) >= asked]

    def applies(self, spec: RequestSpec) -> bool:
        return self.asked(spec) > 0

    def closest_miss(self, eliminated: Iterable[HostState], pool: PoolPolicy) -> int:
        """The most any of ``eliminated`` has free (0 when none, never negative)."""
        ratio = self.ratio(pool)
        return max((max(self.capacity(h).free(ratio), 0) for h in eliminated), default=0)

    def explain(self, eliminated: Sequence[HostState], spec: RequestSpec,
                pool: PoolPolicy) -> str:
        unit = f" {self.unit}" if self.unit else ""
        best = self.closest_miss(eliminated, pool)
        return (f"{len(eliminated)} short of {self.resource} "
                f"(best: {best}{unit} free of {self.asked(spec)}{unit} needed)")


class HostWeigher(abc.ABC):
    """Scores one host for one request: the load it would have with the request placed.

    The scheduler normalises each weigher's values over the candidates (min-max to
    0..1), multiplies them by the pool's weight for the weigher and adds them up; the
    lowest total wins. So a weigher only has to order hosts, its scale does not matter.
    """

    #: The registry key, used in a pool's ``weights``.
    name: ClassVar[str]

    @abc.abstractmethod
    def weigh(self, host: HostState, spec: RequestSpec, pool: PoolPolicy) -> float:
        """The host's load with ``spec`` placed on it (lower is better)."""

    def weigh_all(self, hosts: Sequence[HostState], spec: RequestSpec,
                  pool: PoolPolicy) -> list[float]:
        """:meth:`weigh` of each host, in order: what the scheduler calls.

        A weigher may override it only to be faster over many hosts, with the same answers.
        """
        return [self.weigh(h, spec, pool) for h in hosts]


class GroupFilter(HostFilter):
    """A filter about the request's VM group: its refusals name the group."""

    def explain(self, eliminated: Sequence[HostState], spec: RequestSpec,
                pool: PoolPolicy) -> str:
        group = spec.group.name if spec.group is not None else "?"
        return f"{len(eliminated)} {self.reason} {group}"


def share_after(capacity: Capacity, ratio: float, asked: int) -> float:
    """Allocated share of ``capacity`` once ``asked`` more is placed (1.0 and above: full)."""
    usable = int((capacity.total - capacity.reserved) * ratio)  # Capacity.usable(), inlined
    if usable <= 0:
        return 1.0
    return (capacity.used + asked) / usable


def capacity_load(capacity: Capacity, measured_used: int, ratio: float, asked: int) -> float:
    """``max(allocated share, measured share)`` of a resource with ``asked`` more placed:
    the allocated share against what VMs may use, the measured one against the total."""
    allocated = share_after(capacity, ratio, asked)
    total = capacity.total
    measured = (measured_used + asked) / total if total > 0 else 1.0
    return allocated if allocated > measured else measured


_FILTERS: dict[str, type[HostFilter]] = {}
_WEIGHERS: dict[str, type[HostWeigher]] = {}

F = TypeVar("F", bound=type[HostFilter])
W = TypeVar("W", bound=type[HostWeigher])


def _register(registry: dict[str, type], kind: str) -> Callable[[type], type]:
    def decorate(cls: type) -> type:
        name = cls.__dict__.get("name")
        if not isinstance(name, str) or not name:
            raise TypeError(f"{kind} {cls.__qualname__} needs a class attribute 'name'")
        if name in registry and registry[name] is not cls:
            raise ValueError(f"{kind} name {name!r} is taken by {registry[name].__qualname__}")
        registry[name] = cls
        return cls
    return decorate


def register_filter(cls: F) -> F:
    """Class decorator: make ``cls`` available to pools under ``cls.name``."""
    _register(_FILTERS, "filter")(cls)
    return cls


def register_weigher(cls: W) -> W:
    """Class decorator: make ``cls`` available to pools under ``cls.name``."""
    _register(_WEIGHERS, "weigher")(cls)
    return cls


def _load_builtin() -> None:
    # The built-in plugins register themselves when their packages are imported; import
    # them here so the registry is complete whoever asks first.
    import yun.control.scheduler.filters
    import yun.control.scheduler.weighers  # noqa: F401


def filter_names() -> list[str]:
    """The names a pool may list in ``filters``, sorted."""
    _load_builtin()
    return sorted(_FILTERS)


def weigher_names() -> list[str]:
    """The names a pool may list in ``weights``, sorted."""
    _load_builtin()
    return sorted(_WEIGHERS)


def check_filter_names(names: Iterable[str], what: str = "pool") -> None:
    """Raise :class:`ValueError` naming the first unknown or repeated filter."""
    known = filter_names()
    seen: set[str] = set()
    for name in names:
        if name not in _FILTERS:
            raise ValueError(f"{what}: unknown filter {name!r} (known: {', '.join(known)})")
        if name in seen:
            raise ValueError(f"{what}: filter {name!r} is listed twice")
        seen.add(name)


def check_weights(weights: Mapping[str, float], what: str = "pool") -> None:
    """Raise :class:`ValueError` naming an unknown weigher or a weight that is not >= 0."""
    known = weigher_names()
    for name, weight in weights.items():
        if name not in _WEIGHERS:
            raise ValueError(f"{what}: unknown weigher {name!r} (known: {', '.join(known)})")
        if (isinstance(weight, bool) or not isinstance(weight, int | float)
                or not math.isfinite(weight) or weight < 0):
            raise ValueError(
                f"{what}: weight of {name!r} must be a finite number >= 0, got {weight!r}")


def make_filters(names: Iterable[str]) -> list[HostFilter]:
    """Instances of the named filters, in the given order (unknown name: ValueError)."""
    names = list(names)
    check_filter_names(names)
    return [_FILTERS[name]() for name in names]


def make_weighers(weights: Mapping[str, float]) -> list[tuple[HostWeigher, float]]:
    """Instances of the named weighers with their weights; weight 0 leaves one out."""
    check_weights(weights)
    return [(_WEIGHERS[name](), float(w)) for name, w in weights.items() if w > 0]
