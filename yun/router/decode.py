"""Validating the pulled rule set without validating again what did not change.

A router pulls the WHOLE rule set for every change (the protocol is pull-on-notice), and
validating 10,000 mappings with pydantic (each address parsed by :mod:`ipaddress`) costs
more than applying one change. :class:`RuleSetDecoder` remembers the validated mapping of
each raw JSON object of the previous pull; an object seen again, equal field for field,
reuses it (validation is a pure function of the object), and only new or changed objects
are validated. Everything is still checked: the top level by the model, every new object
by its model.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from yun.proto.network import MonoMapping, NodeRoute, PortMapping, RouterRuleSet

_ITEM_MODELS: dict[str, type[BaseModel]] = {"mono": MonoMapping, "ports": PortMapping,
                                            "routes": NodeRoute}


def _raw_key(item: Any) -> tuple[Any, ...] | None:
    """The cache key of one raw JSON object: its (field, value) pairs in order (the same
    object in another field order is only validated again), or None when it is not an
    object (the model then refuses it)."""
    return tuple(item.items()) if type(item) is dict else None


class RuleSetDecoder:
    """Turns the pulled JSON into a :class:`RouterRuleSet`, reusing the mappings validated
    at the previous pull. Holds only the objects of the last pull (no growth)."""

    def __init__(self) -> None:
        self._seen: dict[str, dict[tuple[Any, ...], BaseModel]] = {k: {} for k in _ITEM_MODELS}
        self.reused = 0
        self.validated = 0

    def decode(self, data: Any) -> RouterRuleSet:
        """The validated rule set of ``data`` (raises pydantic's ValidationError naming
        the bad field, like ``RouterRuleSet.model_validate``)."""
        if not isinstance(data, dict):
            return RouterRuleSet.model_validate(data)
        prepared = dict(data)
        fresh: dict[str, dict[tuple[Any, ...], BaseModel]] = {}
        reused = validated = 0
        for field, model in _ITEM_MODELS.items():
            items = data.get(field)
            if not isinstance(items, list):
                continue  # absent or malformed: the model below says what is wrong
            seen, now = self._seen[field], {}
            out: list[Any] = []
            for item in items:
                key = _raw_key(item)
                try:
                    done = seen.get(key) if key is not None else None
                except TypeError:  # a nested list or object inside: not hashable
                    key = done = None
                if done is None:
                    done = model.model_validate(item)
                    validated += 1
                else:
                    reused += 1
                if key is not None:
                    now[key] = done
                out.append(done)
            prepared[field] = out
            fresh[field] = now
        # Validated instances pass the model's check as they are (no revalidation).
        rules = RouterRuleSet.model_validate(prepared)
        for field, now in fresh.items():
            self._seen[field] = now
        self.reused, self.validated = reused, validated
        return rules
