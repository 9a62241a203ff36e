"""The base of every message of the internal protocol."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


class Message(BaseModel):
    """A protocol message: unknown fields are refused, never half understood."""

    model_config = ConfigDict(extra="forbid")
