"""The intelligent router (C-RT): applies the control server's rule set (stateless 1:1
address and port translation between public addresses and sandbox VMs) in one nftables
table, routes each node's sandbox subnet to the node, and forwards only once synced."""
