"""Disks of the VMs on a node: image cache and per-VM volumes."""
