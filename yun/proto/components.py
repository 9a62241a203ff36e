"""Component types and the association table of the work domain (F-ASSOC)."""

from __future__ import annotations

from enum import StrEnum


class ComponentType(StrEnum):
    DOMAIN = "domain"
    CONTROL = "control"
    NODE = "node"
    STORAGE = "storage"
    GATEWAY = "gateway"
    ROUTER = "router"
    STATS = "stats"


# Which types of component a component of each type connects to. Node Client and
# Storage Server pair with each other and with the Control Server; every other
# type pairs with the Control Server; control servers also see each other (F-CLUSTER).
ASSOCIATIONS: dict[ComponentType, frozenset[ComponentType]] = {
    ComponentType.NODE: frozenset({ComponentType.CONTROL, ComponentType.STORAGE}),
    ComponentType.STORAGE: frozenset({ComponentType.CONTROL, ComponentType.NODE}),
    ComponentType.GATEWAY: frozenset({ComponentType.CONTROL}),
    ComponentType.ROUTER: frozenset({ComponentType.CONTROL}),
    ComponentType.STATS: frozenset({ComponentType.CONTROL}),
    ComponentType.CONTROL: frozenset(
        {
            ComponentType.CONTROL,
            ComponentType.NODE,
            ComponentType.STORAGE,
            ComponentType.GATEWAY,
            ComponentType.ROUTER,
            ComponentType.STATS,
        }
    ),
    ComponentType.DOMAIN: frozenset(),
}


def associated(a: ComponentType, b: ComponentType) -> bool:
    """Whether a component of type ``a`` connects to one of type ``b``."""
    return b in ASSOCIATIONS[a]
