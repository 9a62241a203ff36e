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
        # Per list: the raw objects of the last pull, their models in the same order, and
        # the models by raw content (for objects that moved in the list).
        self._raw: dict[str, list[Any]] = {k: [] for k in _ITEM_MODELS}
        self._models: dict[str, list[BaseModel]] = {k: [] for k in _ITEM_MODELS}
        self._seen: dict[str, dict[tuple[Any, ...], BaseModel]] = {k: {} for k in _ITEM_MODELS}
        self.reused = 0
        self.validated = 0

    def decode(self, data: Any) -> RouterRuleSet:
        """The validated rule set of ``data`` (raises pydantic's ValidationError naming
        the bad field, like ``RouterRuleSet.model_validate``)."""
        if not isinstance(data, dict):
            return RouterRuleSet.model_validate(data)
        prepared = dict(data)
        fresh: dict[str, tuple[list[Any], list[BaseModel]]] = {}
        reused = validated = 0
        for name, model in _ITEM_MODELS.items():
            items = data.get(name)
            if not isinstance(items, list):
                continue  # absent or malformed: the model below says what is wrong
            raw, models, seen = self._raw[name], self._models[name], self._seen[name]
            out: list[BaseModel] = []
            for n, item in enumerate(items):
                # The lists come sorted, so a small change leaves most objects where they
                # were: comparing with the same position (dict equality, in C) is cheapest.
                if n < len(raw) and type(item) is dict and raw[n] == item:
                    out.append(models[n])
                    reused += 1
                    continue
                key = _raw_key(item)
                if not seen and raw:
                    # Every object kept passed its model: a dict of scalars, hashable.
                    seen.update((tuple(r.items()), m) for r, m in zip(raw, models, strict=True))
                try:
                    done = seen.get(key) if key is not None else None
                except TypeError:  # a nested list or object inside: not hashable
                    done = None
                if done is None:
                    done = model.model_validate(item)
                    validated += 1
                else:
                    reused += 1
                out.append(done)
            prepared[name] = out
            fresh[name] = (items, out)
        # Validated instances pass the model's check as they are (no revalidation).
        rules = RouterRuleSet.model_validate(prepared)
        for name, (items, out) in fresh.items():
            # The by-content index is rebuilt only when a later pull needs it.
            self._raw[name], self._models[name], self._seen[name] = items, out, {}
        self.reused, self.validated = reused, validated
        return rules
