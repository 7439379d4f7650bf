"""Units: parse and format sizes, counts and durations. The one place numbers meet text.

``parse_size("12GiB")`` -> bytes, ``parse_count("10B")`` -> 10**10, ``format_count(1.5e6)`` -> "1.5M",
``format_bytes(3 * GiB)`` -> "3.00 GiB", ``format_duration(5400)`` -> "90 min".
Imports nothing from gpt2fit but ``errors``.
"""

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Iterable

from gpt2fit.errors import UserError

KiB, MiB, GiB = 1024, 1024**2, 1024**3

_SIZE_UNITS = {"": 1, "b": 1, "k": KiB, "kib": KiB, "m": MiB, "mib": MiB, "g": GiB, "gib": GiB, "t": 1024**4,
               "tib": 1024**4, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE_FORMS = "bytes (12884901888), KiB/MiB/GiB/TiB or K/M/G/T (binary: 800MiB, 11.5G), KB/MB/GB/TB (decimal: 12GB)"
_COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_COUNT_FORMS = "an integer (491520, 1_000_000), scientific (1e9) or k/M/B/T suffixes (300k, 2.5M, 10B)"
_NUMBER = r"([0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9]+)(e[+-]?[0-9]+)?"


def _split_number(text: str, units: Iterable[str]) -> tuple[Decimal, str] | None:
    m = re.fullmatch(_NUMBER + r"\s*([a-z]*)", text.strip().lower())
    if not m or m.group(3) not in units:
        return None
    try:
        return Decimal(m.group(1).replace("_", "") + (m.group(2) or "")), m.group(3)
    except InvalidOperation:
        return None


def parse_size(text: str | int) -> int:
    """A memory size -> bytes. "12GiB", "12G", "11.5G", "800MiB" are binary (1 GiB = 1024**3);
    "12GB", "800MB" are decimal (1 GB = 10**9); a bare number is bytes. Rounds down to a byte."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise UserError(f"memory size must be positive, got {text}; use {_SIZE_FORMS}")
        return text
    parsed = _split_number(str(text), _SIZE_UNITS)
    if parsed is None or parsed[0] <= 0:
        raise UserError(f"cannot read memory size {text!r}; use {_SIZE_FORMS}")
    value = int(parsed[0] * _SIZE_UNITS[parsed[1]])
    if value <= 0:
        raise UserError(f"memory size {text!r} is less than a byte; use {_SIZE_FORMS}")
    return value


def parse_count(text: str | int) -> int:
    """A count -> int: "10B" = 10**9 * 10, "2.5M", "300k", "1e9", "491520". Must be a whole number."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise UserError(f"count must not be negative, got {text}")
        return text
    parsed = _split_number(str(text), _COUNT_UNITS)
    if parsed is None:
        raise UserError(f"cannot read count {text!r}; use {_COUNT_FORMS}")
    value = parsed[0] * _COUNT_UNITS[parsed[1]]
    if value != value.to_integral_value():
        raise UserError(f"count {text!r} is not a whole number; use {_COUNT_FORMS}")
    return int(value)


def format_count(n: float) -> str:
    """1234567 -> '1.23M': three significant digits and a k/M/B/T suffix (counts, tokens, tok/s)."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 120:
        return f"{minutes:.0f} min"
    hours = minutes / 60
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"


def format_bytes(n: float | None, unit: str = "GiB") -> str:
    """Bytes in binary units, two decimals: format_bytes(3 * GiB) -> '3.00 GiB'; '' for None."""
    return "" if n is None else f"{n / {'KiB': KiB, 'MiB': MiB, 'GiB': GiB}[unit]:.2f} {unit}"


def finite(value: float, key: str) -> float:
    """``value`` unless it is nan or inf, which no count, size or rate can be."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{key}={value!r} is not a finite number; give a real value.")
    return value
