"""Allocators of counted resources (addresses, project quotas), claimed in a transaction."""
