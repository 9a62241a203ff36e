"""What the scheduler decides on: frozen snapshots of nodes, requests and pool settings.

Nothing here touches the database: the placement reads the nodes once per batch into
:class:`HostState` values, the scheduler chooses among them, and the placement's
conditional ``UPDATE … WHERE free >= asked`` stays the one final claim. Between two
placements of one batch the caller replaces the chosen host by
:meth:`HostState.claimed`, so the next choice sees the capacity already taken.

All values are frozen and hashable, so a snapshot can be shared, cached or used as a
dictionary key without anyone changing it underneath the scheduler.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any


class FrozenMap(Mapping[str, Any]):
    """An immutable, hashable mapping (labels, weights).

    ``MappingProxyType`` is read-only but not hashable, which would make every frozen
    dataclass holding one unhashable too.
    """

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        self._data: dict[str, Any] = dict(data or {})
        self._hash: int | None = None

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def get(self, key: str, default: Any = None) -> Any:
        # Mapping.get goes through __getitem__ and an exception; the labels filter calls
        # this for every host it looks at.
        return self._data.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._data == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


EMPTY: FrozenMap = FrozenMap()

# The filters every pool runs unless it names its own, in the order their eliminations
# are reported (and a cheap order to evaluate them in).
DEFAULT_FILTERS: tuple[str, ...] = (
    "status", "vcpu", "memory", "disk", "labels", "capabilities", "affinity", "anti_affinity",
)
# The seed's weighted real-time load: CPU and memory count fully, disk and network half.
DEFAULT_WEIGHTS: FrozenMap = FrozenMap({"cpu": 1.0, "memory": 1.0, "disk": 0.5, "network": 0.5})

# Overcommit beyond this is a typo, not a policy (Nova's default vCPU ratio is 16).
MAX_RATIO = 64.0  # as the API allows (yun.proto.resources.Ratio)


def _frozen(obj: object, name: str) -> None:
    """Replace a plain dict given for field ``name`` by a :class:`FrozenMap`."""
    value = getattr(obj, name)
    if not isinstance(value, FrozenMap):
        object.__setattr__(obj, name, FrozenMap(value))


@dataclass(frozen=True, slots=True)
class Capacity:
    """One resource of a node: its size, what the host keeps, what VMs hold."""

    total: int
    reserved: int  # kept for the host itself, never given to VMs
    used: int  # allocated to VMs (the placement's reservations)

    def usable(self, ratio: float) -> int:
        """What VMs may be given with overcommit ``ratio``: ``(total - reserved) * ratio``."""
        usable = int((self.total - self.reserved) * ratio)
        return usable if usable > 0 else 0  # not max(): this runs for every host looked at

    def free(self, ratio: float) -> int:
        """What is left for new VMs (negative when a lowered ratio left the node overfull)."""
        usable = int((self.total - self.reserved) * ratio)  # usable(), inlined for speed
        return (usable if usable > 0 else 0) - self.used


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """A VM group the request belongs to, and where its members already run."""

    uuid: str
    name: str
    policy: str  # "affinity" | "anti-affinity"
    node_uuids: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.policy not in ("affinity", "anti-affinity"):
            raise ValueError(
                f"VM group {self.name}: unknown policy {self.policy!r} "
                "(known: affinity, anti-affinity)")
        if not isinstance(self.node_uuids, frozenset):
            object.__setattr__(self, "node_uuids", frozenset(self.node_uuids))


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """What one VM asks for."""

    vcpus: int
    memory_mb: int
    disk_gb: int
    labels: Mapping[str, str] = EMPTY  # aggregates: the host's labels must contain all
    capabilities: frozenset[str] = frozenset()  # the host must have all
    group: GroupSpec | None = None

    def __post_init__(self) -> None:
        for name in ("vcpus", "memory_mb", "disk_gb"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"request {name} must be a non-negative integer, got {value!r}")
        _frozen(self, "labels")
        if not isinstance(self.capabilities, frozenset):
            object.__setattr__(self, "capabilities", frozenset(self.capabilities))

    def describe(self) -> str:
        """The request in words, for errors: ``1 vCPU, 256 MiB memory, 1 GiB disk``."""
        return f"{self.vcpus} vCPU, {self.memory_mb} MiB memory, {self.disk_gb} GiB disk"


@dataclass(frozen=True, slots=True)
class HostState:
    """A frozen snapshot of one node, as the scheduler sees it."""

    uuid: str
    name: str
    pool_uuid: str | None
    up: bool  # status "up"
    active: bool  # admin_state "active" (False: drained, keeps its VMs, gets no new one)
    vcpu: Capacity
    memory_mb: Capacity
    disk_gb: Capacity
    cpu_load: float = 0.0  # 0..1, reported by the node
    memory_used_mb: int = 0  # reported by the node
    disk_used_gb: int = 0  # reported by the node
    net_load: float = 0.0  # 0..1, reported by the node
    labels: Mapping[str, str] = EMPTY
    capabilities: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        _frozen(self, "labels")
        if not isinstance(self.capabilities, frozenset):
            object.__setattr__(self, "capabilities", frozenset(self.capabilities))

    def claimed(self, spec: RequestSpec) -> HostState:
        """This host with ``spec`` allocated on it (what the placement's claim does)."""
        vcpu, memory, disk = self.vcpu, self.memory_mb, self.disk_gb
        return dataclasses.replace(
            self,
            vcpu=Capacity(vcpu.total, vcpu.reserved, vcpu.used + spec.vcpus),
            memory_mb=Capacity(memory.total, memory.reserved, memory.used + spec.memory_mb),
            disk_gb=Capacity(disk.total, disk.reserved, disk.used + spec.disk_gb),
        )


@dataclass(frozen=True, slots=True)
class PoolPolicy:
    """What the scheduler needs of a compute pool: its ratios, filters and weights.

    Raises :class:`ValueError` naming the field on a bad ratio, an unknown filter or
    weigher, or a negative weight, so a pool is refused before it is stored.
    """

    uuid: str
    name: str
    cpu_ratio: float = 4.0
    memory_ratio: float = 1.0
    disk_ratio: float = 1.0
    filters: tuple[str, ...] = DEFAULT_FILTERS
    weights: Mapping[str, float] = field(default=DEFAULT_WEIGHTS)
    #: node capabilities every VM of the pool needs (its network mode's, e.g. net_direct),
    #: whether the VM named the pool or only its zone
    needs: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for name in ("cpu_ratio", "memory_ratio", "disk_ratio"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value) or not 0 < value <= MAX_RATIO):
                raise ValueError(
                    f"pool {self.name}: {name} must be a number above 0 and at most "
                    f"{MAX_RATIO:g}, got {value!r}")
        if not isinstance(self.filters, tuple):
            object.__setattr__(self, "filters", tuple(self.filters))
        if not isinstance(self.needs, frozenset):
            object.__setattr__(self, "needs", frozenset(self.needs))
        if self.needs and "capabilities" not in self.filters:
            # What the pool's VMs need is not a preference an operator may switch off.
            object.__setattr__(self, "filters", (*self.filters, "capabilities"))
        _frozen(self, "weights")
        # Imported here: the registry imports this module for its types.
        from yun.control.scheduler.base import check_filter_names, check_weights

        check_filter_names(self.filters, what=f"pool {self.name}")
        check_weights(self.weights, what=f"pool {self.name}")
