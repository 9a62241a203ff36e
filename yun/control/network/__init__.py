"""VM networking on the control side: network modes, address pools, the routers' rules."""
