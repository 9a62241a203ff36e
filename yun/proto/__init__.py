"""The internal protocol: authenticated, versioned HTTP+JSON between components."""

PROTOCOL_VERSION = 1
VERSION_HEADER = "X-Yun-Protocol"
REQUEST_ID_HEADER = "X-Yun-Request-Id"
