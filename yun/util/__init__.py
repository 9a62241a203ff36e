"""Small helpers shared by every service (process execution, logging, ids)."""
