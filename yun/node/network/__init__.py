"""Host networking of a node: the node-local NAT network, taps, DHCP leases, nftables."""
