"""Node Client (C-NODE): runs VMs on one hypervisor host."""
