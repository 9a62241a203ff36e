"""Hypervisor drivers: one interface (base.py), one package per hypervisor."""

from __future__ import annotations

from yun.node.hypervisor.base import HypervisorDriver


def load_driver(name: str, **options: object) -> HypervisorDriver:
    """The driver called ``name`` ("libvirt" or "sim"), built with ``options``."""
    if name == "libvirt":
        from yun.node.hypervisor.libvirt.driver import LibvirtDriver

        return LibvirtDriver(**options)  # type: ignore[arg-type]
    if name == "sim":
        from yun.node.hypervisor.sim.driver import SimDriver

        return SimDriver(**options)  # type: ignore[arg-type]
    raise ValueError(f"unknown hypervisor driver {name!r}: choose 'libvirt' or 'sim'")
