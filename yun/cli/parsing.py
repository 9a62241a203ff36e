"""Parsers of the CLI's option values that are more than a number or a word: rates with
units (``10mbit``, ``20MiB``), ``key=value`` labels and ``name=weight`` pairs.

Each parser is a typer ``parser=``: it raises :class:`typer.BadParameter`, so a bad
value is refused with the option's name before any request is sent; and each is a
plain function of a string, so it is tested on its own."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import typer

# Network rates are decimal (tc and libvirt count 1 kbit as 1000 bit); kbit is the API's unit.
BIT_UNITS = {"bit": Decimal("0.001"), "kbit": Decimal(1), "mbit": Decimal(1000),
             "gbit": Decimal(1000 ** 2)}
# Disk rates: bytes per second, SI or binary prefixes, as storage tools write them.
BYTE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000 ** 2,
              "mb": 1000 ** 2, "mib": 1024 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
              "gib": 1024 ** 3}
_RATE = re.compile(r"^\s*(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[A-Za-z]*)(?:/s)?\s*$")
LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
MAX_LABEL = 63
MAX_WEIGHT = 100.0


@dataclass(frozen=True)
class Label:
    """One ``key=value`` node label."""

    key: str
    value: str


@dataclass(frozen=True)
class NamedWeight:
    """One ``name=weight`` of a pool's weighers."""

    name: str
    weight: float


def _split_rate(text: str, what: str, example: str) -> tuple[Decimal, str]:
    match = _RATE.match(text)
    if match is None:
        raise typer.BadParameter(f"{text!r} is not a {what}; write a number and a unit, "
                                 f"e.g. {example}")
    try:
        number = Decimal(match["number"])
    except InvalidOperation:  # the pattern admits only digits; kept for safety
        raise typer.BadParameter(f"{text!r}: {match['number']!r} is not a number") from None
    return number, match["unit"].lower()


def parse_bandwidth(text: str) -> int:
    """A network rate such as ``10mbit``, ``500kbit`` or ``1gbit`` (``/s`` optional), in
    kbit/s. A unit is required: a bare ``10`` could mean bits, bytes or megabits."""
    number, unit = _split_rate(text, "bandwidth", "10mbit, 500kbit or 1gbit")
    if unit not in BIT_UNITS:
        # "mbps" means megabits to some and megabytes to tc: refused, not guessed.
        hint = (" ('bps' and 'B' are ambiguous or bytes; network rates are written in bits)"
                if unit.endswith(("bps", "b")) else "")
        named = f"unknown unit {unit!r}" if unit else "no unit"
        raise typer.BadParameter(f"{text!r}: {named}; use kbit, mbit or gbit{hint}")
    kbit = number * BIT_UNITS[unit]
    if kbit != kbit.to_integral_value():
        raise typer.BadParameter(f"{text!r} is not a whole number of kbit/s")
    if kbit < 8:
        raise typer.BadParameter(f"{text!r} is below the smallest limit, 8kbit")
    return int(kbit)


def parse_byte_rate(text: str) -> int:
    """A disk rate in bytes per second: ``4096``, ``20MB`` (10^6), ``20MiB`` (2^20),
    ``1.5GB/s``."""
    number, unit = _split_rate(text, "rate in bytes/s", "20MB, 20MiB or 4096")
    if unit not in BYTE_UNITS:
        raise typer.BadParameter(f"{text!r}: unknown unit {unit!r}; use B, KB, KiB, MB, MiB, "
                                 f"GB or GiB (per second)")
    value = number * BYTE_UNITS[unit]
    if value != value.to_integral_value():
        raise typer.BadParameter(f"{text!r} is not a whole number of bytes/s")
    if value < 4096:
        raise typer.BadParameter(f"{text!r} is below the smallest limit, 4096 bytes/s")
    return int(value)


def parse_label(text: str) -> Label:
    """``key=value`` (the value may be empty); keys are letters, digits, ``._/-``."""
    key, sep, value = text.partition("=")
    if not sep:
        raise typer.BadParameter(f"{text!r}: write KEY=VALUE, e.g. ssd=true")
    if not key or len(key) > MAX_LABEL or not LABEL_KEY.match(key):
        raise typer.BadParameter(
            f"{text!r}: a label key is 1-{MAX_LABEL} letters, digits, '.', '_', '/' or '-', "
            f"starting with a letter or digit")
    if len(value) > MAX_LABEL:
        raise typer.BadParameter(f"{text!r}: a label value has at most {MAX_LABEL} characters")
    return Label(key, value)


def parse_weight(text: str) -> NamedWeight:
    """``name=weight``, a weigher's name and a number from 0 to 100."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise typer.BadParameter(f"{text!r}: write NAME=WEIGHT, e.g. cpu=2")
    try:
        weight = float(value)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: {value!r} is not a number") from None
    if not math.isfinite(weight) or not 0 <= weight <= MAX_WEIGHT:
        raise typer.BadParameter(f"{text!r}: a weight is from 0 to {MAX_WEIGHT:g}")
    return NamedWeight(name, weight)


def labels_of(labels: list[Label] | None) -> dict[str, str]:
    """Parsed labels as a mapping; a key given twice is refused rather than guessed."""
    result: dict[str, str] = {}
    for label in labels or []:
        if label.key in result and result[label.key] != label.value:
            raise typer.BadParameter(f"label {label.key!r} is given twice")
        result[label.key] = label.value
    return result


def weights_of(weights: list[NamedWeight] | None) -> dict[str, float] | None:
    """Parsed weights as a mapping (None when none were given)."""
    if not weights:
        return None
    result: dict[str, float] = {}
    for item in weights:
        if item.name in result:
            raise typer.BadParameter(f"weight {item.name!r} is given twice")
        result[item.name] = item.weight
    return result


def format_kbit(kbit: int | None) -> str:
    """``10000`` as ``10 Mbit/s``; None as ``unlimited``."""
    if kbit is None:
        return "unlimited"
    for unit, size in (("Gbit/s", 1000 ** 2), ("Mbit/s", 1000)):
        if kbit >= size and kbit % size == 0:
            return f"{kbit // size} {unit}"
    return f"{kbit} kbit/s"


def format_bytes(rate: int | None) -> str:
    """``20971520`` as ``20 MiB/s``; None as ``unlimited``."""
    if rate is None:
        return "unlimited"
    for unit, size in (("GiB/s", 1024 ** 3), ("MiB/s", 1024 ** 2), ("KiB/s", 1024),
                       ("GB/s", 1000 ** 3), ("MB/s", 1000 ** 2), ("kB/s", 1000)):
        if rate >= size and rate % size == 0:
            return f"{rate // size} {unit}"
    return f"{rate} B/s"
