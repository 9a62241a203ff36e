"""The user commands, one module per kind of resource."""
